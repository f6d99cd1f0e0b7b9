"""Benchmarks of keras_moe, kept outside the library package.

`python -m apps.benchmark` and `python -m apps.benchmark_upcycle` run them.
"""
