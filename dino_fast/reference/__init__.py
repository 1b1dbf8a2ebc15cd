"""Eager reference implementations of the official DINO algorithm (tests and benchmarks only)."""
from dino_fast.reference.attention import attention_reference, vit_reference, dino_head_reference  # noqa: E402,F401  (issue 4)
