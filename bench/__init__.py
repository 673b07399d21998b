"""Benchmarks: `python -m bench.NAME` prints a table and writes JSON (never timed tests)."""
