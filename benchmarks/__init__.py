"""Benchmarks and checks; run each from the repo root as `python -m benchmarks.<name>` (benchmarks/README.md)."""
