"""Benchmarks: scripts that measure (run them as `python benchmarks/NAME.py`); not part of the package."""
