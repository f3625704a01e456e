"""Measuring models: benchmarks, Fréchet distances, reward models and the eval harness."""
