"""RemoteCache: a transformers Cache whose layers keep nothing locally. Each batch row is one
q8kv session; a layer's new k/v wait here (``update``) until the "q8kv" attention function
sends them with that layer's q as one packed AttendBatch (``attend``).

transformers' attention modules call ``cache.update(k, v, layer_idx)`` and then the
attention function, in the same thread, with the k/v ``update`` returned: the hand-off
between the two is a thread-local slot, checked by identity (``take_pending``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from q8kv.client import Client, Q8KVError, Session

from .geometry import UnsupportedModel, geometry_of
from .tensors import from_numpy, to_numpy

ATTN_NAME = "q8kv"  # the name registered in transformers' AttentionInterface
_LOCAL = threading.local()


@dataclass(slots=True)
class Pending:
    cache: RemoteCache
    layer: int
    key: torch.Tensor
    value: torch.Tensor


def take_pending(layer: Any, key: torch.Tensor) -> Pending:
    """The k/v a RemoteCache was given for ``layer`` just before this attention call."""
    pending: Pending | None = getattr(_LOCAL, "pending", None)
    _LOCAL.pending = None
    if pending is None or pending.layer != layer or pending.key is not key:
        got = "nothing" if pending is None else f"the k/v of layer {pending.layer}"
        raise UnsupportedModel(
            f"q8kv attention of layer {layer}: expected the k/v its RemoteCache was just "
            f"given (pass past_key_values=q8kv.hf.RemoteCache(...) with use_cache=True), got "
            f"{got}"
        )
    return pending


class RemoteLayer(CacheLayerMixin):
    """One layer: only its length (the same in every session of the batch)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.length = 0
        self.max_len = max_len
        self.is_initialized = True  # nothing to allocate here

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("RemoteCache.update hands k/v to the q8kv attention")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def offload(self) -> None:  # the cache is on the server: nothing to move
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        _refuse("reorder_cache (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _refuse("batch_repeat_interleave (num_return_sequences > 1, contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _refuse("batch_select_indices")

    def crop(self, tokens_to_remove: int) -> None:
        _refuse("RemoteLayer.crop (crop the RemoteCache: every layer at once)")


def _refuse(what: str) -> None:
    raise UnsupportedModel(
        f"{what}: not supported by q8kv.hf.RemoteCache (one session per batch row; rows "
        f"are never reordered or copied)"
    )


def _delete_quietly(sessions: list[Session]) -> None:
    """The garbage collector's cleanup: best effort, never raises."""
    for session in sessions:
        # The server may be gone (or the interpreter ending): the session's TTL reclaims it.
        with contextlib.suppress(Exception):
            session.delete()
    sessions.clear()


class RemoteCache(Cache):
    """The KV cache of ``batch_size`` sequences of a model whose ``config`` q8kv can run,
    kept on a q8kv server reached through ``client``: one session per batch row, created at
    the first attention call (with the model's own softmax scaling) and deleted by
    ``close()``, at the end of a ``with`` block, or when the cache is garbage-collected.

    ``max_len``: tokens per session at most (default: config.max_position_embeddings).
    ``routing_key``: the x-session-id every session is created and called under (default: a
    fresh one, so that behind a session-affine router the batch lives on one replica).
    A config q8kv cannot run exactly raises UnsupportedModel here, before any call.
    """

    def __init__(
        self,
        client: Client,
        config: Any,
        batch_size: int = 1,
        *,
        max_len: int | None = None,
        ttl_seconds: float | None = None,
        routing_key: str | None = None,
    ) -> None:
        self.geometry = geometry_of(config, max_len)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        super().__init__(layers=[RemoteLayer(self.geometry.max_len)
                                 for _ in range(self.geometry.num_layers)])
        self.client = client
        self.config = config
        self._batch_size = batch_size
        self.ttl_seconds = ttl_seconds
        self.routing_key = routing_key or f"hf-{uuid.uuid4().hex}"
        self.softmax_scale: float | None = None  # set when the sessions are created
        self.sessions: list[Session] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _delete_quietly, self.sessions)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # --- what transformers calls -------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Keep the layer's new k/v for the q8kv attention call that follows; return them
        (nothing else reads them: that attention call takes q with them)."""
        self._check_open()
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != ATTN_NAME:
            raise UnsupportedModel(
                f"config._attn_implementation: expected {ATTN_NAME!r} (call "
                f"model.set_attn_implementation({ATTN_NAME!r}) first: a RemoteCache keeps no "
                f"k/v locally, only q8kv attention can read it), got {impl!r}"
            )
        _LOCAL.pending = Pending(self, layer_idx, key_states, value_states)
        return key_states, value_states

    def crop(self, length: int) -> None:
        """transformers' crop: ``length`` < 0 removes that many tokens from the end,
        > 0 keeps the first ``length`` tokens, 0 removes nothing. One Truncate per session."""
        length = int(length)
        current = self.get_seq_length()
        if length == 0 or length >= current:
            return
        self.truncate(max(0, current + length) if length < 0 else length)

    def reset(self) -> None:
        self.truncate(0)

    # --- q8kv ---------------------------------------------------------------------------

    def truncate(self, length: int) -> None:
        """Cut every layer of every session to at most ``length`` tokens (TruncateSession)."""
        self._check_open()
        if length < 0:
            raise ValueError(f"length: expected at least 0, got {length}")
        for session in self.sessions:
            session.truncate(length)
        for layer in self.layers:
            layer.length = min(layer.length, length)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Append the batch's new k/v [B, KVH, n, D] to ``layer`` and attend q [B, H, n, D]
        over each row's cache: one AttendBatch. Returns [B, n, H, D] in q's dtype."""
        self._check_open()
        g = self.geometry
        b, n = self._batch_size, query.shape[2]
        want = {"query": (b, g.num_heads, n, g.head_dim), "key": (b, g.num_kv_heads, n, g.head_dim)}
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            shape = want["query" if name == "query" else "key"]
            if tuple(tensor.shape) != shape:
                raise UnsupportedModel(
                    f"{name}.shape of layer {layer}: expected {list(shape)} [batch_size, heads, "
                    f"n, head_dim] from the config and batch_size, got {list(tensor.shape)}"
                )
        sessions = self._open(layer, scaling)
        q = to_numpy(query.transpose(1, 2), "query")
        k = to_numpy(key.transpose(1, 2), "key")
        v = to_numpy(value.transpose(1, 2), "value")
        state = self.layers[layer]
        result = self.client.attend_batch(
            layer, sessions, q, k, v, expected_lengths=[state.length] * b, with_lengths=True,
            routing_key=self.routing_key,
        )
        state.length = int(result.lengths[0]) if result.lengths else state.length + n
        return from_numpy(result.output, query)

    def cache_bytes(self) -> int:
        """Q8 bytes the sessions hold on the server (SessionInfo.cache_bytes, summed)."""
        return sum(session.info().cache_bytes for session in self.sessions)

    def close(self) -> None:
        """Delete the sessions (a session already gone counts as deleted). Idempotent."""
        self._finalizer.detach()
        self._closed = True
        errors = []
        while self.sessions:
            session = self.sessions.pop()
            try:
                session.delete()
            except Q8KVError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    errors.append(exc)
        for layer in self.layers:
            layer.length = 0
        if errors:
            raise errors[0]

    def __enter__(self) -> RemoteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("RemoteCache: expected an open cache, got one already closed")

    def _open(self, layer: int, scaling: float | None) -> list[Session]:
        """The batch's sessions, created at the first call with the model's ``scaling``; a
        later layer with another scaling cannot share them (one scale per session)."""
        scale = None if scaling is None else float(np.float32(scaling))
        if self.sessions:
            if scale != self.softmax_scale:
                raise UnsupportedModel(
                    f"scaling of layer {layer}: expected {self.softmax_scale} (the sessions' "
                    f"softmax_scale, from the first layer: q8kv keeps one per session), got "
                    f"{scale}"
                )
            return self.sessions
        g = self.geometry
        for _ in range(self._batch_size):  # each one is registered at once: close() finds it
            self.sessions.append(self.client.create_session(
                g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_len,
                ttl_seconds=self.ttl_seconds, softmax_scale=scale, routing_key=self.routing_key,
            ))
        self.softmax_scale = scale
        return self.sessions


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` for ``model.generate(...)`` / ``model(...)``: transformers 5.24
    renamed ``past_key_values`` to ``cache`` (the old name still works there, with a
    FutureWarning); 5.17 knows only ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
