"""Benchmark scripts for keras_favor; results go to benchmarks/results/."""
