"""Benchmark suites and the code that builds the project's miniature reasoning model."""
