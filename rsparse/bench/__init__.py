"""Benchmarks for rsparse."""
