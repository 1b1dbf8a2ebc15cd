"""Eager reference implementations of the official DINO algorithm (tests and benchmarks only)."""
