"""Sessions that survive a restart: written on SIGTERM, loaded at start.

One file per session (``<id>.q8kv``: the ExportSession chunk stream, checksummed), written
atomically. A file that is cut off or corrupted is logged, renamed ``*.corrupt`` and never
loaded. Loaded files are removed, so a later crash cannot bring back sessions deleted in
between.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import transfer
from .backends.base import Backend
from .cache import Session, SessionStore
from .errors import ServiceError
from .logs import event

log = logging.getLogger("q8kv.snapshots")


def file_stem(session: Session) -> str:
    """``<id>``, or ``<tenant>~<id>``: ids are per tenant, so two tenants may share one
    ('~' is in neither alphabet, so no two (tenant, id) pairs share a name)."""
    return f"{session.tenant}~{session.id}" if session.tenant else session.id


def save_all(store: SessionStore, backend: Backend, directory: Path) -> int:
    """Write every live session (engine worker, after the drain); returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = 0
    for session in store:
        try:
            transfer.write_snapshot(
                directory, file_stem(session), transfer.session_chunks(backend, session)
            )
            saved += 1
        except OSError as exc:
            event(log, "snapshot_write_failed", level=logging.ERROR, session=session.id,
                  error=str(exc))
    event(log, "snapshot_saved", sessions=saved, directory=str(directory))
    return saved


def load_all(store: SessionStore, backend: Backend, directory: Path) -> int:
    """Restore every snapshot in ``directory`` (before serving); returns how many."""
    if not directory.is_dir():
        return 0
    loaded = 0
    for path in sorted(directory.glob(f"*{transfer.SNAPSHOT_SUFFIX}")):
        try:
            imported = transfer.assemble(transfer.read_snapshot(path))
            transfer.install(store, backend, imported, imported.header.tenant)
        except (ServiceError, OSError) as exc:
            reason = exc.message if isinstance(exc, ServiceError) else str(exc)
            event(log, "snapshot_skipped", level=logging.ERROR, file=path.name, reason=reason)
            path.rename(path.with_name(path.name + ".corrupt"))
            continue
        path.unlink()
        loaded += 1
    event(log, "snapshot_loaded", sessions=loaded, directory=str(directory))
    return loaded
