"""Backends of the language: the protocol (``base``) and its implementations."""
