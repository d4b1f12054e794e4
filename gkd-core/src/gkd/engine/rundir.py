"""The run directory before training: probed for writing, then held by one run at a time.

:func:`claim_run_dir` is what the trainer calls first. On global rank 0 it

* probes ``run_dir`` and the export directory: a path under a file, under ``/proc`` or
  ``/sys``, or one the process may not write is reported in one line before any training;
* takes an exclusive ``flock`` on ``<run_dir>/.gkd.lock`` for the whole run. A second run on the
  same directory fails at once naming the holder's pid; the kernel releases the lock when its
  holder exits or is killed, so a dead run never leaves the directory stuck.

The other ranks learn of a failure on rank 0 through one all-reduced flag and stop with one line too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gkd import parallel
from gkd.config.run import RunConfig
from gkd.errors import GkdError

LOCK_FILE = ".gkd.lock"
"""In the run directory; holds ``pid host`` of the run that has it locked."""


class RunDirError(GkdError):
    """The run or export directory cannot be written, or another run holds the run directory."""


def write_failure(exc: BaseException) -> str | None:
    """Why the file system refused a write (``No space left on device``), or None when ``exc``
    (or what caused it) is not an I/O error. safetensors reports I/O errors as its own type."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            return os.strerror(cause.errno) if cause.errno else str(cause)
        if type(cause).__name__ == "SafetensorError" and "os error" in str(cause):
            return str(cause).split("Error:", 1)[-1].strip()
        cause = cause.__cause__ or cause.__context__
    return None


def _file_above(path: Path) -> Path | None:
    """The first existing component of ``path`` (itself included) that is not a directory."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return None


def probe_dir(path: Path, field: str, *, create: bool) -> None:
    """Check that ``path`` can be made and written, with one write; ``create`` keeps the directory,
    otherwise nothing is left behind.

    Raises:
        RunDirError: naming ``field``, the path and what stands in the way.
    """
    path = Path(path).absolute()
    blocker = _file_above(path)
    if blocker is not None:
        raise RunDirError(f"{field}: {path} cannot be a directory: {blocker} is a file")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{field}: cannot create {path}: {exc.strerror or exc}") from None
        where = path
    else:
        where = next(p for p in (path, *path.parents) if p.exists())
    try:
        # A directory made and removed: what export and checkpoints do, and nothing is left.
        probe = tempfile.mkdtemp(prefix=".gkd-probe-", dir=where)
        fd = os.open(os.path.join(probe, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"gkd")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(os.path.join(probe, "probe"))
            os.rmdir(probe)
    except OSError as exc:
        raise RunDirError(f"{field}: {where} is not writable: {exc.strerror or exc}") from None


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "a process that is starting"


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold ``<run_dir>/.gkd.lock`` exclusively while the block runs.

    Raises:
        RunDirError: Another process holds it (the message names its pid and host).
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"run_dir: cannot create the lock file {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(f"run_dir: cannot lock {path}: {exc.strerror or exc}") from None
            raise RunDirError(f"run_dir: {Path(run_dir)} is in use by another gkd run ({_holder(path)}); "
                              "wait for it to end or give this run another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next locker)


@contextlib.contextmanager
def claim_run_dir(run: RunConfig) -> Iterator[None]:
    """Probe the run and export directories and lock the run directory (global rank 0), for the
    block's duration. Collective once the process group exists: every rank stops when rank 0 cannot.

    Raises:
        RunDirError: A directory cannot be written, or another run holds the run directory.
    """
    from gkd.engine.step import any_rank

    with contextlib.ExitStack() as stack:
        error: RunDirError | None = None
        if parallel.is_global_rank_zero():
            try:
                probe_dir(run.run_dir, "run_dir", create=True)
                stack.enter_context(lock_run_dir(run.run_dir))
                if run.export.enabled:
                    probe_dir(run.export.dir or run.run_dir / "export", "export.dir", create=False)
            except RunDirError as exc:
                error = exc
        if any_rank(error is not None):
            raise error or RunDirError(f"run_dir: global rank 0 could not prepare {run.run_dir} (see its error)")
        yield


__all__ = ["LOCK_FILE", "RunDirError", "claim_run_dir", "lock_run_dir", "probe_dir", "write_failure"]
