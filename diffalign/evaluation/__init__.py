"""Measuring samplers and models: the benchmark, reference ODE solves, the sampling loop, Fréchet distances."""
