"""Benchmarks and evaluation: classification, MCUB, results JSON, reports."""
