"""Models: the embedded digits models, the Gaussian mixture, and loading by name."""
