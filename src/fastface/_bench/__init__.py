"""Benchmark suites behind ``fastface bench`` and the scripts in ``bench/``."""
