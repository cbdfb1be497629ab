"""Typed errors for finding and loading model checkpoints."""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """A model spec (preset name, directory or .gguf path) could not be resolved to usable files."""


class ModelLoadError(RuntimeError):
    """A checkpoint exists but could not be read (corrupt, truncated or incomplete); names the file."""
