"""Sessions that survive a restart: written on SIGTERM, loaded at start.

Layout: ``<dir>/set-<N>/`` holds one file per session (``<id>.q8kv``: the ExportSession
chunk stream, with its own checksum) and ``MANIFEST.json``, written last, naming every file
with its size and SHA-256. The manifest's atomic rename commits the set; a set without one
is a save that was cut short (``kill -9``, power loss) and is never loaded. The live set is
the newest committed one: a save writes ``set-<N+1>``, commits it, and only then removes the
older sets.

Loading reads and deletes nothing, so a signal or a crash at any point of a start leaves
the live set as it was. The price: until the next save replaces it, the set is what a
crash brings back (sessions deleted since come back; appends since are lost).

A file whose bytes are not what was written (checksum, truncation) is moved to
``<dir>/corrupt/<set>/`` and never loaded. A sound session this server cannot take (memory
budget, limits) is logged, left in place and carried into the next set.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..backends.base import Backend
from ..cache import Session, SessionStore
from ..errors import InvalidArgument, ServiceError
from ..observability.logs import event
from . import transfer

log = logging.getLogger("q8kv.snapshots")

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
_SET = re.compile(r"^set-(\d+)$")
_FILE = re.compile(rf"^[^/\\]+{re.escape(transfer.SNAPSHOT_SUFFIX)}$")


def file_stem(session: Session) -> str:
    """``<id>``, or ``<tenant>~<id>``: ids are per tenant, so two tenants may share one
    ('~' is in neither alphabet, so no two (tenant, id) pairs share a name)."""
    return f"{session.tenant}~{session.id}" if session.tenant else session.id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotDir:
    """The snapshot directory of one server: what the live set holds, what was not loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Files of the live set this server did not load (they did not fit): carried into
        # the next set, so a smaller start loses nothing.
        self.unloaded: dict[str, Path] = {}
        self.loaded_from: Path | None = None  # the set loaded at start (root: loose files)

    def prepare(self) -> None:
        """Create the directory and prove it writable (at start: a configuration error is
        better than a failed save at shutdown). Raises OSError."""
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.root))
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
            pass

    # -- sets --------------------------------------------------------------------------

    def _sets(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.root.iterdir():
            match = _SET.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _manifest(self, directory: Path) -> dict[str, dict] | None:
        """The set's files (name -> {bytes, sha256}); None when it has no manifest.
        Raises ValueError when the manifest is there but unreadable."""
        try:
            text = (directory / MANIFEST).read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            files = data["files"]
            if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
                raise ValueError(f"expected format {MANIFEST_FORMAT} with a files table")
            for name, entry in files.items():
                if not _FILE.match(name) or name.startswith("."):
                    raise ValueError(f"file name {name!r} is not a snapshot file name")
                if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                    raise ValueError(f"entry of {name!r} has no sha256")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{directory.name}/{MANIFEST}: {exc}") from None
        return files

    def _live(self) -> tuple[Path, dict[str, dict | None]] | None:
        """The newest committed set and its files; older layouts' loose files if none."""
        for _, directory in reversed(self._sets()):
            try:
                files = self._manifest(directory)
            except ValueError as exc:
                event(log, "snapshot_set_unreadable", level=logging.ERROR, set=directory.name,
                      reason=str(exc))
                self._set_aside(directory, directory.name)
                continue
            if files is None:
                event(log, "snapshot_set_incomplete", level=logging.WARNING,
                      set=directory.name, reason="no manifest: a save cut short, ignored")
                continue
            return directory, files
        # Before sets existed, each session's file lay in the directory itself.
        loose = sorted(p.name for p in self.root.glob(f"*{transfer.SNAPSHOT_SUFFIX}"))
        return (self.root, dict.fromkeys(loose)) if loose else None

    def _set_aside(self, path: Path, set_name: str) -> None:
        """Move a corrupt file (or set) under corrupt/<set>/ for a person to look at."""
        target = self.root / "corrupt" / set_name
        if path.is_dir():
            target = self.root / "corrupt"
        try:
            target.mkdir(parents=True, exist_ok=True)
            destination = target / path.name
            if destination.exists():
                destination = target / f"{path.name}.{os.getpid()}"
            path.rename(destination)
        except OSError as exc:  # left where it is: never loaded, and logged
            event(log, "snapshot_set_aside_failed", level=logging.ERROR, file=path.name,
                  error=str(exc))

    # -- load --------------------------------------------------------------------------

    async def load(
        self, store: SessionStore, backend: Backend, stopping: Callable[[], bool]
    ) -> bool:
        """Restore the live set (before serving, so nothing else touches the store). Each
        file loads in a worker thread while the event loop keeps handling signals; returns
        False, having stopped early, once ``stopping()`` says so."""
        live = self._live() if self.root.is_dir() else None
        if live is None:
            event(log, "snapshot_loaded", sessions=0, directory=str(self.root))
            return True
        directory, files = live
        self.loaded_from = directory
        set_name = directory.name if directory != self.root else "loose"
        event(log, "snapshot_loading", set=set_name, files=len(files))
        loop = asyncio.get_running_loop()
        loaded = 0
        for name, entry in sorted(files.items()):
            if stopping():
                event(log, "snapshot_load_interrupted", set=set_name, loaded=loaded,
                      files=len(files), reason="stopping: every file kept")
                return False
            loaded += await loop.run_in_executor(
                None, self._load_file, store, backend, directory / name, entry, set_name
            )
        event(log, "snapshot_loaded", sessions=loaded, set=set_name, kept=len(self.unloaded),
              directory=str(self.root))
        return True

    def _load_file(
        self, store: SessionStore, backend: Backend, path: Path, entry: dict | None,
        set_name: str,
    ) -> int:
        digest = hashlib.sha256()
        try:
            imported = transfer.assemble(transfer.read_snapshot(path, digest))
            if entry is not None and digest.hexdigest() != entry["sha256"]:
                raise InvalidArgument("sha256: the file's bytes differ from the manifest's")
        except FileNotFoundError:
            event(log, "snapshot_missing", level=logging.ERROR, file=path.name, set=set_name)
            return 0
        except OSError as exc:  # unreadable now, perhaps not later: keep it
            self._keep(path, "snapshot_unreadable", str(exc))
            return 0
        except ServiceError as exc:
            event(log, "snapshot_skipped", level=logging.ERROR, file=path.name,
                  reason=exc.message, set_aside=f"corrupt/{set_name}/")
            self._set_aside(path, set_name)
            return 0
        try:
            transfer.install(store, backend, imported, imported.header.tenant)
        except ServiceError as exc:  # sound, but not for this server (budget, limits)
            self._keep(path, "snapshot_not_loaded", exc.message)
            return 0
        except Exception as exc:  # a bug, not the file's fault: keep it, start anyway
            log.exception("snapshot_install_failed", extra={"q8kv_fields": {"file": path.name}})
            self._keep(path, "snapshot_not_loaded", f"internal error: {type(exc).__name__}")
            return 0
        return 1

    def _keep(self, path: Path, name: str, reason: str) -> None:
        event(log, name, level=logging.ERROR, file=path.name, reason=reason,
              kept="carried into the next snapshot")
        self.unloaded[path.name] = path

    # -- save --------------------------------------------------------------------------

    def save(self, store: SessionStore, backend: Backend) -> int:
        """Write every live session as a new set, commit it, then remove the older sets
        (engine worker, after the drain). On any write error the new set is dropped and
        the live one stays. Returns how many sessions were written."""
        self.root.mkdir(parents=True, exist_ok=True)
        sets = self._sets()
        directory = self.root / f"set-{(sets[-1][0] + 1 if sets else 1):012d}"
        try:
            directory.mkdir(mode=0o700)  # sessions of every tenant: the service's alone
            files = self._write_sessions(store, backend, directory)
            saved = len(files)
            files.update(self._carry(directory, files))
            self._commit(directory, files)
        except Exception as exc:  # OSError mostly (disk full); never a partial commit
            event(log, "snapshot_save_failed", level=logging.ERROR, set=directory.name,
                  error=str(exc), kept="the previous set")
            shutil.rmtree(directory, ignore_errors=True)
            return 0
        self._remove_older(directory)
        event(log, "snapshot_saved", sessions=saved, carried=len(files) - saved,
              set=directory.name, directory=str(self.root))
        return saved

    def _write_sessions(self, store, backend, directory: Path) -> dict[str, dict]:
        files = {}
        for session in store:
            written = transfer.write_snapshot(
                directory, file_stem(session), transfer.session_chunks(backend, session)
            )
            files[written.path.name] = {"bytes": written.size, "sha256": written.sha256}
        return files

    def _carry(self, directory: Path, written: dict[str, dict]) -> dict[str, dict]:
        """Files not loaded at start, linked into the new set (a live session of the same
        name wins: it is newer)."""
        carried = {}
        for name, source in sorted(self.unloaded.items()):
            if name in written:
                continue
            try:
                entry = {"bytes": source.stat().st_size, "sha256": _sha256(source)}
                try:
                    os.link(source, directory / name)
                except OSError:  # a file system without hard links
                    shutil.copyfile(source, directory / name)
            except OSError as exc:
                event(log, "snapshot_carry_failed", level=logging.ERROR, file=name,
                      error=str(exc))
                continue
            carried[name] = entry
        return carried

    def _commit(self, directory: Path, files: dict[str, dict]) -> None:
        _fsync_dir(directory)  # every file's name is durable before the manifest names it
        temporary = directory / f".{MANIFEST}.tmp"
        with open(temporary, "w") as out:
            json.dump({"format": MANIFEST_FORMAT, "files": files}, out, indent=1,
                      sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, directory / MANIFEST)
        _fsync_dir(directory)
        _fsync_dir(self.root)

    def _remove_older(self, current: Path) -> None:
        """Every set before ``current`` (committed or cut short), and loose files of the
        layout before sets."""
        number = int(_SET.match(current.name).group(1))
        for older, path in self._sets():
            if older < number:
                shutil.rmtree(path, ignore_errors=True)
        if self.loaded_from == self.root:  # loose files are replaced only once loaded
            for path in self.root.glob(f"*{transfer.SNAPSHOT_SUFFIX}"):
                path.unlink(missing_ok=True)
        for path in self.root.glob(f".*{transfer.SNAPSHOT_SUFFIX}.tmp"):
            path.unlink(missing_ok=True)
        self.unloaded = {name: current / name for name in self.unloaded
                         if (current / name).exists()}
