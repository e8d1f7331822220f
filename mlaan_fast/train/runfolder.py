"""The run folder on disk: atomic file writes, a writability probe, and a lock that keeps a second
trainer out of a folder in use (an advisory ``flock``, released by the kernel when its process dies,
so a killed run leaves no stale lock)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used: not writable, or in use by another trainer."""


def describe_os_error(exc: OSError, with_path: bool = True) -> str:
    """'no space left on device: PATH' from an OSError (its message as is when it has no errno)."""
    if exc.strerror is None:
        return str(exc)
    what = exc.strerror[:1].lower() + exc.strerror[1:]
    return f"{what}: {exc.filename}" if exc.filename and with_path else what


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, chunks, durable: bool = False) -> None:
    """Write the bytes ``chunks`` to ``path`` through a temp file and a rename: a reader sees the old
    file or the new one, never a part. ``durable``: fsync the file and the folder too.

    On failure the temp file is removed and an existing ``path`` is left untouched; an OSError
    without a file name gets ``path``'s."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """:func:`atomic_write` of one string (UTF-8)."""
    atomic_write(path, [text.encode()], durable)


class RunFolder:
    """A run folder held by this process: created if absent, probed for writing, locked.

    :meth:`release` drops the lock; :meth:`discard` also removes the folders this object created, if
    nothing but the lock file was written into them (an error before training leaves no trace)."""

    def __init__(self, path: str | Path, option: str = "--out"):
        self.path = Path(path)
        self.created: list[Path] = []
        self._lock_fd: int | None = None
        self._make(option)
        self._lock()

    def _make(self, option: str) -> None:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.created = missing
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self._remove_created()
            if exc.errno == errno.EEXIST or (exc.errno == errno.ENOTDIR and self.path.is_file()):
                why = "it is a file, not a folder"
            else:
                why = describe_os_error(exc)
            raise RunFolderError(f"{option}: cannot write the run folder {self.path} ({why}); "
                                 "choose a writable folder with --out") from None

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunFolderError(f"run folder {self.path} is in use by another mlaan-fast train{who}; wait "
                                 "for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock (the lock file stays; it is harmless once unlocked)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Release, and remove the folders this object created if they hold nothing else."""
        self.release()
        if self.created:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink(missing_ok=True)
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created = []
