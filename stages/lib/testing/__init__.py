"""Random-init models, batch builders and a GPU memory sampler for tests and benchmarks; no stage imports this."""
