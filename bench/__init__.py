"""Benchmarks: each figure is measured next to its baseline in the same run (`make bench`)."""
