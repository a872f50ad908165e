"""Compatibility: the GPU backend moved to the package ``backends/cupy/`` (backend.py).
server/main.py still imports it from here; drop this file once it imports
``from .backends.cupy.backend import CupyBackend``."""

from __future__ import annotations

from .cupy.backend import CupyBackend

__all__ = ["CupyBackend"]
