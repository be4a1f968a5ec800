"""Helpers for tests and demos: small real checkpoints that need no download."""
