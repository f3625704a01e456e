"""Measuring samplers and models: the benchmark, reference ODE solves, the sampling loop, Fréchet distances, reward
models, the eval harness, and the jobs that fit schedulers' side information to a model."""
