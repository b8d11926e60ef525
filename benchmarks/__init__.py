"""Benchmarks of the genserve server: a perf_analyzer-style load generator and the ratios of BENCHMARKS.md."""
