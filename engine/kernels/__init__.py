"""Triton kernels behind the engine's fast paths; each is checked against a pure-torch reference.

Triton is imported only by the modules here, and those only when a Triton backend is chosen,
so hosts without it (or without a device Triton targets) still run the pure-torch path.
"""
