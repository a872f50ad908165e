"""The GPU backend (CuPy): backend.py (CupyBackend), with its CUDA sources beside it.

Importing this package does not import CuPy; ``create_backend`` imports ``.backend``.
"""
