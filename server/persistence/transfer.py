"""Sessions as a stream of chunks: ExportSession / ImportSession and snapshot files.

A session travels as one header, token chunks per layer (raw Q8 codes and scales, free of
the page layout, so servers with other page sizes can take it), and a trailer holding the
SHA-256 of everything before it. A snapshot file is the same chunks, each prefixed by its
length (4 bytes, little-endian), written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from ..backends.base import Backend
from ..cache import Geometry, Session, SessionStore
from ..errors import InvalidArgument, ResourceExhausted

FORMAT_VERSION = 1
CHUNK_BYTES = 4 * 1024 * 1024  # codes per token chunk at most, however large the limit
# Room in a message for what is not codes or scales: the SessionChunk and TokenChunk tags,
# lengths and the layer/start/count varints (a few dozen bytes; generous on purpose).
ENVELOPE_BYTES = 1024
SNAPSHOT_SUFFIX = ".q8kv"


def header_of(session: Session) -> pb.SessionHeader:
    g = session.geometry
    return pb.SessionHeader(
        format_version=FORMAT_VERSION,
        session_id=session.id,
        geometry=pb.Geometry(
            num_layers=g.num_layers, num_heads=g.num_heads, num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim, max_len=g.max_len,
        ),
        softmax_scale=session.softmax_scale,
        ttl_seconds=session.ttl_seconds,
        layer_lengths=[layer.length for layer in session.layers],
        tenant=session.tenant,
    )


def tokens_per_chunk(geometry: Geometry, max_message_bytes: int | None = None) -> int:
    """Tokens per chunk: at most CHUNK_BYTES of codes and, given the limit on a message, a
    whole SessionChunk (codes, scales and envelope) within it."""
    code_bytes = 2 * geometry.num_kv_heads * geometry.head_dim  # per token
    step = max(1, CHUNK_BYTES // code_bytes)
    if max_message_bytes is None:
        return step
    token_bytes = code_bytes + code_bytes // 32 * 4  # codes + float32 scales
    fitting = (max_message_bytes - ENVELOPE_BYTES) // token_bytes
    if fitting < 1:
        raise ResourceExhausted(
            f"max_message_bytes: expected room for one token ({token_bytes} bytes + "
            f"{ENVELOPE_BYTES} of envelope), got a limit of {max_message_bytes} bytes"
        )
    return min(step, fitting)


def layer_chunks(
    backend: Backend,
    session: Session,
    layer_index: int,
    length: int,
    max_message_bytes: int | None = None,
) -> list[pb.TokenChunk]:
    """Token chunks of one layer's first ``length`` tokens (runs on the engine worker), each
    within ``max_message_bytes`` when given (the server's gRPC limit, for ExportSession)."""
    layer = session.layers[layer_index]
    step = tokens_per_chunk(session.geometry, max_message_bytes)
    chunks = []
    for start in range(0, length, step):
        end = min(length, start + step)
        codes, scales = backend.read_tokens(session.layout, layer.page_table(), start, end)
        chunks.append(
            pb.TokenChunk(
                layer=layer_index, start=start, count=end - start,
                codes=np.ascontiguousarray(codes).tobytes(),
                scales=np.ascontiguousarray(scales, dtype="<f4").tobytes(),
            )
        )
    return chunks


class Checksum:
    """SHA-256 over the serialized chunks before the trailer, in order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, chunk: pb.SessionChunk) -> None:
        self._hash.update(chunk.SerializeToString(deterministic=True))

    def trailer(self) -> pb.SessionChunk:
        return pb.SessionChunk(trailer=pb.SessionTrailer(sha256=self._hash.digest()))

    def matches(self, trailer: pb.SessionTrailer) -> bool:
        return trailer.sha256 == self._hash.digest()


def session_chunks(backend: Backend, session: Session) -> Iterator[pb.SessionChunk]:
    """The whole session, header to trailer (for snapshots: run where nothing appends)."""
    checksum = Checksum()
    header = pb.SessionChunk(header=header_of(session))
    checksum.add(header)
    yield header
    for index, layer in enumerate(session.layers):
        for tokens in layer_chunks(backend, session, index, layer.length):
            chunk = pb.SessionChunk(tokens=tokens)
            checksum.add(chunk)
            yield chunk
    yield checksum.trailer()


@dataclass
class ImportedSession:
    """A received session, checked and ready to install (or rejected with a reason)."""

    header: pb.SessionHeader
    tokens: dict[int, list[pb.TokenChunk]] = field(default_factory=dict)


def assemble(chunks: Iterable[pb.SessionChunk]) -> ImportedSession:
    """Check a chunk stream: header first, chunks contiguous per layer and of the right
    size, lengths complete, trailer last with a matching checksum."""
    checksum = Checksum()
    imported: ImportedSession | None = None
    next_start: dict[int, int] = {}
    trailer_seen = False
    for chunk in chunks:
        part = chunk.WhichOneof("part")
        if trailer_seen:
            raise InvalidArgument("chunks: expected nothing after the trailer, got more")
        if part == "trailer":
            if imported is None:
                raise InvalidArgument("chunks: expected a header first, got the trailer")
            if not checksum.matches(chunk.trailer):
                raise InvalidArgument("trailer.sha256: checksum mismatch, data corrupted")
            trailer_seen = True
            continue
        if part == "header":
            if imported is not None:
                raise InvalidArgument("chunks: expected one header, got a second")
            if chunk.header.format_version != FORMAT_VERSION:
                raise InvalidArgument(
                    f"header.format_version: expected {FORMAT_VERSION}, "
                    f"got {chunk.header.format_version}"
                )
            imported = ImportedSession(chunk.header)
        elif part == "tokens":
            if imported is None:
                raise InvalidArgument("chunks: expected a header first, got tokens")
            _check_tokens(imported.header, chunk.tokens, next_start)
            imported.tokens.setdefault(chunk.tokens.layer, []).append(chunk.tokens)
        else:
            raise InvalidArgument("chunks: expected header, tokens or trailer, got an empty one")
        checksum.add(chunk)
    if imported is None or not trailer_seen:
        raise InvalidArgument("chunks: stream ended before the trailer (truncated)")
    for layer, length in enumerate(imported.header.layer_lengths):
        if next_start.get(layer, 0) != length:
            raise InvalidArgument(
                f"tokens: layer {layer} expected {length} tokens, got {next_start.get(layer, 0)}"
            )
    return imported


def _check_tokens(header: pb.SessionHeader, tokens: pb.TokenChunk, next_start: dict) -> None:
    g = header.geometry
    if not 0 <= tokens.layer < len(header.layer_lengths):
        raise InvalidArgument(
            f"tokens.layer: expected 0..{len(header.layer_lengths) - 1}, got {tokens.layer}"
        )
    expected_start = next_start.get(tokens.layer, 0)
    if tokens.start != expected_start or tokens.count < 1:
        raise InvalidArgument(
            f"tokens.start: expected {expected_start} for layer {tokens.layer}, "
            f"got {tokens.start} (count {tokens.count})"
        )
    if tokens.start + tokens.count > header.layer_lengths[tokens.layer]:
        raise InvalidArgument(
            f"tokens.count: layer {tokens.layer} has {header.layer_lengths[tokens.layer]} "
            f"tokens, got chunk [{tokens.start}, {tokens.start + tokens.count})"
        )
    values = 2 * g.num_kv_heads * tokens.count * g.head_dim
    if len(tokens.codes) != values or len(tokens.scales) != values // 32 * 4:
        raise InvalidArgument(
            f"tokens.codes: expected {values} code bytes and {values // 32 * 4} scale bytes, "
            f"got {len(tokens.codes)} and {len(tokens.scales)}"
        )
    next_start[tokens.layer] = tokens.start + tokens.count


def install(
    store: SessionStore, backend: Backend, imported: ImportedSession, tenant: str
) -> Session:
    """Create the session and write its tokens (engine worker); all or nothing."""
    h = imported.header
    g = h.geometry
    geometry = Geometry(g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_len)
    if len(h.layer_lengths) != g.num_layers:
        raise InvalidArgument(
            f"header.layer_lengths: expected {g.num_layers} lengths, got {len(h.layer_lengths)}"
        )
    session = store.create(geometry, h.session_id, h.ttl_seconds, h.softmax_scale, tenant)
    try:
        # One allocation, as for an append: the pages and lengths of every layer.
        with store.begin() as allocation:
            for index, length in enumerate(h.layer_lengths):
                allocation.grow(session, index, length)
                _write_layer(backend, session, index, imported.tokens.get(index, []))
    except BaseException:
        store.delete(session.id, tenant)  # nothing half-made stays
        raise
    return session


def _write_layer(backend: Backend, session: Session, index: int, chunks) -> None:
    g = session.geometry
    for tokens in chunks:
        codes = np.frombuffer(tokens.codes, dtype=np.int8).reshape(
            2, g.num_kv_heads, tokens.count, g.head_dim
        )
        scales = np.frombuffer(tokens.scales, dtype="<f4").reshape(
            2, g.num_kv_heads, tokens.count, g.head_dim // 32
        )
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise InvalidArgument(
                f"tokens.scales: layer {index} holds negative or non-finite scales"
            )
        backend.write_tokens(
            session.layout, session.layers[index].page_table(), tokens.start, codes, scales
        )


# -- snapshot files ------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotFile:
    """A snapshot file as written: where, how many bytes, and their SHA-256 (hex)."""

    path: Path
    size: int
    sha256: str


def write_snapshot(directory: Path, stem: str, chunks: Iterable[pb.SessionChunk]) -> SnapshotFile:
    """Write atomically: a temporary file, fsync, then rename over the final name. A write
    that fails removes its temporary file."""
    final = directory / f"{stem}{SNAPSHOT_SUFFIX}"
    temporary = directory / f".{stem}{SNAPSHOT_SUFFIX}.tmp"
    digest, size = hashlib.sha256(), 0
    try:
        with open(temporary, "wb") as out:
            for chunk in chunks:
                data = chunk.SerializeToString(deterministic=True)
                for part in (struct.pack("<I", len(data)), data):
                    out.write(part)
                    digest.update(part)
                    size += len(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return SnapshotFile(final, size, digest.hexdigest())


def read_snapshot(path: Path, digest=None) -> Iterator[pb.SessionChunk]:
    """Chunks of a snapshot file; a cut-off file ends early (``assemble`` then rejects it).
    ``digest`` (a hashlib object), when given, sees every byte read: read to the end, it
    holds the whole file's hash in the same single pass."""
    with open(path, "rb") as src:

        def read(size: int) -> bytes:
            data = src.read(size)
            if digest is not None:
                digest.update(data)
            return data

        while True:
            prefix = read(4)
            if len(prefix) < 4:
                return
            (size,) = struct.unpack("<I", prefix)
            data = read(size)
            if len(data) < size:
                return
            chunk = pb.SessionChunk()
            try:
                chunk.ParseFromString(data)
            except Exception as exc:  # protobuf's DecodeError: corrupted bytes
                raise InvalidArgument(f"snapshot {path.name}: unreadable chunk ({exc})") from None
            yield chunk
