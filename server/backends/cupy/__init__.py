"""The GPU backend (CuPy): backend.py (CupyBackend: device memory, copies, launches),
packing.py (a batch -> one host buffer and its launch plan), kernels.py (the .cu sources
beside it, compile options, compiled-kernel cache), tuning.py (GpuTuning, the --gpu-* knobs).

Importing this package does not import CuPy; ``create_backend`` imports ``.backend``.
"""
