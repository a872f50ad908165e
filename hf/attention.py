"""The "q8kv" attention function and its mask function, as transformers registers them.

The attention function follows transformers' AttentionInterface (5.17 to 5.24): q
[B, H, n, D], k/v [B, KVH, n, D] (here: only the new tokens, from RemoteCache.update),
returns ([B, n, H, D], None). The server masks causally itself, so the mask function
builds no mask: it only refuses what causal masking cannot express (padding, windows,
custom masks), before the model's first layer runs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .cache import ATTN_NAME, take_pending
from .geometry import UnsupportedModel


def q8kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layer = getattr(module, "layer_idx", None)
    pending = take_pending(layer, key)
    where = f"q8kv attention of layer {layer}"
    if not getattr(module, "is_causal", True):
        raise UnsupportedModel(
            f"{where}: module.is_causal: expected True (q8kv runs causal self-attention; "
            f"cross-attention and bidirectional attention are not supported), got False"
        )
    if attention_mask is not None:
        raise UnsupportedModel(
            f"{where}: attention_mask: expected None (q8kv masks causally itself; padding "
            f"and custom masks are not supported), got a mask of shape "
            f"{list(attention_mask.shape)}"
        )
    for field in ("sliding_window", "softcap"):
        if kwargs.get(field) is not None:
            raise UnsupportedModel(
                f"{where}: {field}: expected None (not supported by q8kv), got {kwargs[field]!r}"
            )
    if getattr(module, "sinks", None) is not None:
        raise UnsupportedModel(f"{where}: module.sinks: expected none (attention sinks), got some")
    if dropout:
        raise UnsupportedModel(f"{where}: dropout: expected 0.0 (inference only), got {dropout}")
    out = pending.cache.attend(layer, query, pending.key, pending.value, scaling)
    return out, None


def q8kv_mask(
    *args: Any,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> None:
    """No mask: q8kv's causal masking is the whole mask. ``attention_mask`` here is the
    2D padding mask [B, length] (True/1 = a real token)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        rows = [int(r) for r in torch.nonzero(~attention_mask.bool().all(dim=-1)).flatten()]
        raise UnsupportedModel(
            f"attention_mask: expected no padding (q8kv masks causally and each batch row is a "
            f"session of its own: give rows of equal length, or generate them one by one), "
            f"got padding in rows {rows}"
        )
    if local_size is not None:
        raise UnsupportedModel(
            f"mask local_size: expected None (sliding or chunked attention is not supported), "
            f"got {local_size}"
        )
    if not allow_is_causal_skip:
        raise UnsupportedModel(
            "mask: expected plain causal (q8kv masks causally itself), got a custom mask "
            "(packed sequences, block or token-type masks)"
        )
    return None


def register() -> None:
    """Register "q8kv" with transformers (done when q8kv.hf is imported; idempotent)."""
    AttentionInterface.register(ATTN_NAME, q8kv_attention)
    AttentionMaskInterface.register(ATTN_NAME, q8kv_mask)
