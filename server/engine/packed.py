"""The packed half of the append transaction (AttendBatch): B sessions' q/k/v stay stacked
[B, n, ...] arrays from the request to the backend. Each session is looked up, checked and
grown in the job's one allocation, with the same checks and messages as an item of its
own; the backend gets one ``PackedItems``."""

from __future__ import annotations

import array
from collections.abc import Callable

import numpy as np

from ..backends.base import Backend, PackedItems
from ..cache import Allocation, Session, SessionStore, touch_all
from ..errors import Aborted, InvalidArgument, ServiceError
from .jobs import PackedBatch


def prepare_packed(
    store: SessionStore,
    batch: PackedBatch,
    tenant: str,
    allocation: Allocation,
    sessions: list[Session],
) -> PackedItems:
    """Pin, check and grow every session of ``batch`` in ``allocation`` (appending each to
    ``sessions``); a failure names the batch index and the session. The caller rolls the
    allocation back on any error."""
    count, n, heads, head_dim = batch.q.shape
    kv_heads = batch.k.shape[2]
    starts: list[int] = []
    layer_index, expected = batch.layer, batch.expected_lengths
    # Every session checked first, then grown: most of them only move a length, in one
    # call (the engine's time at B = 64 is this function: benchmarks/handler_breakdown.py).
    for index, sid in enumerate(batch.session_ids):
        try:
            # The pin keeps the session until the job is answered; the lookups count as a
            # use (touch) once all of them passed.
            session = store.get(sid, tenant, touch=False)
            allocation.pin(session)
            if not 0 <= layer_index < len(session.lengths):
                session.layer(layer_index)  # raises, naming the range
            g = session.geometry
            if (g.num_heads, g.num_kv_heads, g.head_dim) != (heads, kv_heads, head_dim):
                check_shape("q", (n, heads, head_dim), (n, g.num_heads, g.head_dim))
                check_shape("k", (n, kv_heads, head_dim), (n, g.num_kv_heads, g.head_dim))
                check_shape("v", (n, kv_heads, head_dim), (n, g.num_kv_heads, g.head_dim))
            if n < 1:
                raise InvalidArgument(f"q.shape[0]: expected >= 1 tokens, got {n}")
            old_length = session.lengths.item(layer_index)
            if expected is not None and expected[index] != old_length:
                raise Aborted(
                    f"expected_length: expected the layer's length {old_length}, "
                    f"got {expected[index]}"
                )
        except ServiceError as exc:
            raise type(exc)(f"batch[{index}] (session {sid!r}): {exc.message}") from None
        sessions.append(session)
        starts.append(old_length)
    for index in allocation.extend_in_place(sessions, layer_index, n):
        try:
            allocation.grow(sessions[index], layer_index, starts[index] + n)
        except ServiceError as exc:
            sid = batch.session_ids[index]
            raise type(exc)(f"batch[{index}] (session {sid!r}): {exc.message}") from None
    touch_all(sessions)
    tables, joined = _page_tables(sessions, layer_index)
    return PackedItems(
        sessions[0].layout, np.array([s.softmax_scale for s in sessions], np.float64),
        tables, np.array(starts, np.int64), batch.q, batch.k, batch.v,
        out_dtype=batch.q.dtype, joined_page_ids=joined,
    )


def _page_tables(
    sessions: list[Session], layer: int
) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Each session's page table of ``layer`` as views of one int32 array (one join, not
    B arrays), and that array with the counts."""
    joined = array.array("i")
    counts = []
    for session in sessions:
        table = session.page_lists[layer]
        joined.extend(table)
        counts.append(len(table))
    ids = np.frombuffer(joined, np.int32)  # ``joined`` never grows again: a safe view
    ends = np.cumsum(counts).tolist()
    tables = [ids[end - count : end] for end, count in zip(ends, counts, strict=True)]
    return tables, (ids, np.array(counts, np.int64))


def attend_packed_in_chunks(
    backend: Backend,
    packed: PackedItems,
    tokens: int,
    between: Callable[[set[tuple[str, str]]], None],
    keys: set[tuple[str, str]],
) -> np.ndarray:
    """A packed job of more than ``tokens`` new tokens, about ``tokens`` per backend call:
    every session's next ``tokens // B`` tokens (or ``tokens`` sessions at a time, one
    token each, when B is larger). Exact for the reason chunked prefill is (causal
    attention); ``between(keys)`` runs other sessions' work after each call but the last."""
    count, n = packed.size, packed.n
    per_call = max(1, tokens // count)
    group = min(count, max(1, tokens))
    lay = packed.layout
    out = np.empty((count, n, lay.num_heads, lay.head_dim), packed.out_dtype)
    parts = [(s, t) for s in range(0, count, group) for t in range(0, n, per_call)]
    for i, (first_session, first_token) in enumerate(parts):
        rows = slice(first_session, first_session + group)
        cols = slice(first_token, first_token + per_call)
        out[rows, cols] = backend.attend_packed(packed.part(rows, cols))
        if i < len(parts) - 1:
            between(keys)
    return out


def check_shape(field_name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        shown = ["n" if i == 0 else str(d) for i, d in enumerate(expected)]
        raise InvalidArgument(
            f"{field_name}.shape: expected [{', '.join(shown)}] with n = {expected[0]} "
            f"(q.shape[0]), got {list(actual)}"
            if expected[0] >= 0
            else f"{field_name}.shape: expected 3 dimensions, got {list(actual)}"
        )
