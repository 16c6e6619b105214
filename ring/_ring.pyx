# cython: language_level=3
"""Placeholder until the ring core lands: proves the compiled extension is built and loaded."""

PAGE_SIZE = 4096
