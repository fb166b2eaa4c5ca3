"""Benchmarks: each prints its figures side by side in one run (see README, Benchmarks)."""
