"""A model config read as a q8kv session geometry, and refused, with the field named, where
q8kv's attention cannot run the model exactly (checked before any call to the server).

Pure: reads attributes of a transformers config (any object with them), imports no torch.
"""

from __future__ import annotations

from typing import Any

from q8kv.format import MAX_LEN, QBLOCK, Geometry


class UnsupportedModel(ValueError):
    """The model (its config, or a call its attention makes) needs what q8kv cannot do."""


def _int(config: Any, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModel(f"config.{field}: expected a positive integer, got {value!r}")
    return value


def geometry_of(config: Any, max_len: int | None = None) -> Geometry:
    """The session geometry of ``config`` (a decoder-only transformers config), or
    UnsupportedModel naming the field, the expected and the actual value."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"config.is_encoder_decoder: expected False (q8kv runs causal self-attention; "
            f"cross-attention is not supported), got True ({type(config).__name__})"
        )
    if not getattr(config, "is_causal", True):
        raise UnsupportedModel(
            "config.is_causal: expected True (q8kv's attention is causal), got False"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise UnsupportedModel(
            f"config.sliding_window: expected None (q8kv attends over the whole cache; "
            f"sliding windows are not supported), got {window!r}"
        )
    for i, kind in enumerate(getattr(config, "layer_types", None) or ()):
        if kind != "full_attention":
            raise UnsupportedModel(
                f"config.layer_types[{i}]: expected 'full_attention' (q8kv runs full causal "
                f"attention only), got {kind!r}"
            )
    for field in ("attn_logit_softcapping", "attention_chunk_size"):
        value = getattr(config, field, None)
        if value is not None:
            raise UnsupportedModel(
                f"config.{field}: expected None (not supported by q8kv's attention), got {value!r}"
            )
    layers = _int(config, "num_hidden_layers", getattr(config, "num_hidden_layers", None))
    heads = _int(config, "num_attention_heads", getattr(config, "num_attention_heads", None))
    kv = getattr(config, "num_key_value_heads", None)
    kv_heads = heads if kv is None else _int(config, "num_key_value_heads", kv)
    if heads % kv_heads:
        raise UnsupportedModel(
            f"config.num_key_value_heads: expected a divisor of num_attention_heads {heads} "
            f"(GQA), got {kv_heads}"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden = _int(config, "hidden_size", getattr(config, "hidden_size", None))
        head_dim = hidden // heads
    head_dim = _int(config, "head_dim", head_dim)
    if head_dim % QBLOCK:
        raise UnsupportedModel(
            f"config.head_dim: expected a multiple of {QBLOCK} (q8kv's Q8 blocks run along "
            f"head_dim), got {head_dim}"
        )
    if max_len is None:
        max_len = getattr(config, "max_position_embeddings", None) or MAX_LEN
    max_len = _int(config, "max_position_embeddings", min(int(max_len), MAX_LEN))
    return Geometry(layers, heads, kv_heads, head_dim, max_len)
