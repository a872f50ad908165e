"""torch scaled_dot_product_attention over a dequantized cache, with q8kv's masking: the
yardstick the GPU prefill tests hold the 16-bit kernel to (its error against float64 must
be no worse than SDPA's at the same precision on the same inputs)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.attention.bias import causal_lower_right


def sdpa_over_cache(
    q: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    start: int,
    scale: float,
    dtype: torch.dtype,
    device: str,
) -> np.ndarray:
    """SDPA of q [n, H, D] over keys / values [KVH, >= start + n, D] in ``dtype`` on
    ``device``: new token i sees positions [0, start + i] (the bottom-right causal mask),
    query head h reads kv head h // (H // KVH). q, keys and values are cast to ``dtype``
    (a 16-bit q is exact in its own dtype). Returns the output as float64 [n, H, D]."""
    n, h, d = q.shape
    kvh = keys.shape[0]
    total = start + n

    def tensor(x: np.ndarray) -> torch.Tensor:
        x32 = np.ascontiguousarray(x, dtype=np.float32)  # torch has no ml_dtypes.bfloat16
        return torch.from_numpy(x32).to(device=device).to(dtype)

    tq = tensor(q).transpose(0, 1)[None]  # [1, H, n, D]
    # Kv heads repeated (h // (H // KVH) is repeat_interleave's order): no reliance on
    # enable_gqa, which the lower-right causal bias does not pass to every kernel.
    tk = tensor(keys[:, :total]).repeat_interleave(h // kvh, dim=0)[None]  # [1, H, total, D]
    tv = tensor(values[:, :total]).repeat_interleave(h // kvh, dim=0)[None]
    with torch.no_grad():
        out = F.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=causal_lower_right(n, total), scale=float(scale)
        )
    assert out.shape == (1, h, n, d)
    return out[0].transpose(0, 1).to(torch.float64).cpu().numpy()
