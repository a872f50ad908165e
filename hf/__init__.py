"""q8kv.hf: run the attention of a Hugging Face transformers decoder on a q8kv server
(the optional extra ``hf``: torch, transformers).

    import q8kv.hf                                  # registers the "q8kv" attention
    from q8kv.client import Client

    model.set_attn_implementation("q8kv")
    with Client("127.0.0.1:50051") as client, \\
         q8kv.hf.RemoteCache(client, model.config, batch_size=B) as cache:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)

Every attention layer of every step (prefill and decode) is one packed AttendBatch of the B
rows, one session per row; GQA and the softmax scaling come from the model. What the
server's causal masking cannot express is refused with UnsupportedModel: padding, sliding
windows, cross-attention, softcapping, head_dim not a multiple of 32 (the last ones in the
RemoteCache constructor, before any call). docs/design.md, "Transformers", has the rules.
"""

from __future__ import annotations

from .attention import q8kv_attention, q8kv_mask, register
from .cache import ATTN_NAME, RemoteCache, cache_kwargs
from .geometry import Geometry, UnsupportedModel, geometry_of

register()

__all__ = [
    "ATTN_NAME",
    "Geometry",
    "RemoteCache",
    "UnsupportedModel",
    "cache_kwargs",
    "geometry_of",
    "q8kv_attention",
    "q8kv_mask",
    "register",
]
