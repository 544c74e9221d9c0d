"""Benchmark scripts, run as ``python -m benchmarks.NAME``; results under ``benchmarks/results/``."""
