"""Triton kernels for the fast paths; each is checked against a pure-torch reference."""
