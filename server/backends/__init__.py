"""Backends: one interface (base.Backend), two implementations of the same math."""

from __future__ import annotations

from .base import DEFAULT_PAGE_CODE_BYTES, AttendItem, Backend, LayerLayout
from .cupy.tuning import GpuTuning

__all__ = [
    "DEFAULT_PAGE_CODE_BYTES",
    "AttendItem",
    "Backend",
    "GpuTuning",
    "LayerLayout",
    "cuda_available",
    "create_backend",
]


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA present but no driver/device
        return False


def create_backend(
    name: str,
    num_pages: int,
    page_code_bytes: int = DEFAULT_PAGE_CODE_BYTES,
    tuning: GpuTuning | None = None,
) -> Backend:
    """``name`` is auto | numpy | cupy; auto picks cupy where a GPU is found. ``tuning``
    (the GPU kernels' knobs, default GpuTuning()) is for cupy; numpy has no knobs."""
    if name == "auto":
        name = "cupy" if cuda_available() else "numpy"
    if name == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend(num_pages, page_code_bytes)
    if name == "cupy":
        from .cupy.backend import CupyBackend

        return CupyBackend(num_pages, page_code_bytes, tuning=tuning)
    raise ValueError(f"backend: expected auto, numpy or cupy, got {name!r}")
