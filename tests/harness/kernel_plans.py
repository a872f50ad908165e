"""Stand-ins for the GPU backend's compiled kernels: what launch planning reads of them
(tokens per stage or tile, rows per tile, prefill or not), with no compile and no GPU."""

from __future__ import annotations

from q8kv.server.backends import GpuTuning
from q8kv.server.backends.cupy import kernels, planning


def fake_kernel(head_dim: int, route: int = planning.DECODE) -> kernels.AttnKernel:
    """The kernel the backend would hand planning for (head_dim, route), uncompiled."""
    if route != planning.DECODE:
        if head_dim in kernels.WS_HEAD_DIMS:  # K/V dequantized into tile pairs first
            pair_bytes = kernels.ws_tile_bytes(head_dim)
            return kernels.AttnKernel(None, kernels.PREFILL_TILE, 128, 0, 1, prefill=True,
                                      tiles=object(), tile_bytes=pair_bytes)  # fmt: skip
        tok = kernels.prefill_tile_tokens(head_dim)
        return kernels.AttnKernel(None, tok, kernels.PREFILL_ROWS, 0, 2, prefill=True)
    tok = kernels.tokens_per_stage(head_dim, GpuTuning())
    return kernels.AttnKernel(None, tok, kernels.ROWS_PER_TILE, 0, 2)
