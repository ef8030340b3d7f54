"""File-system safety primitives: inter-process locks that say who holds them, atomic JSON.

:func:`write_json_atomic` writes ``tmp + fsync + os.replace`` (readers see the old or the new
file, never a torn one).

:class:`HolderLock` takes an exclusive ``flock`` on a lock file and writes a one-line JSON
record of the holder into it: ``pid``, ``host``, ``started`` (ISO time), ``command``. The
kernel releases an ``flock`` when the holding process exits or crashes (SIGKILL included), so a
lock of a dead process is simply free: the next process takes it over and overwrites the stale
record (it logs that it did). The record is truncated on a clean release.

Used by :class:`jaxspec.train.workdir.WorkdirLock` (non-blocking: a second run refuses) and by
dataset preparation in :mod:`jaxspec.data.builders` (blocking: the others wait, then read).
Only the stdlib and :mod:`jaxspec.errors`, so every layer may import it.

Caveats: the descriptor is opened ``O_CLOEXEC`` (not inherited by ``exec``), but a child made
with a bare ``fork`` (multiprocessing "fork") shares it and keeps the lock alive after its
parent dies; the busy message then names the surviving process found in ``/proc/locks``.
``flock`` works on local file systems and on NFS (Linux emulates it with POSIX locks); where a
file system refuses locks (``ENOLCK``/``EOPNOTSUPP``) the error says so.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxspec.errors import OutputError

log = logging.getLogger("jaxspec.lock")

__all__ = ["HolderLock", "describe_holder", "pid_alive", "read_holder", "write_json_atomic"]

_HELD: dict[str, list] = {}          # realpath -> [fd, depth]; re-entrant within a process
_HELD_LOCK = threading.Lock()


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: a temp file in the same directory,
    ``fsync``, ``os.replace``, ``fsync`` of the directory. On failure (e.g. ENOSPC) the old
    file is untouched, the temp file removed and :class:`~jaxspec.errors.OutputError` raised
    naming ``path``. ``obj`` is serialised first, so an unserialisable object writes nothing."""
    path = Path(path)
    text = json.dumps(obj, indent=indent) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - directories not fsync-able on some file systems
        pass
    return path


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_holder(path: str | os.PathLike) -> dict | None:
    """The holder record in lock file ``path`` (None if empty, unreadable or absent)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        rec = json.loads(text.splitlines()[0])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def describe_holder(rec: dict | None) -> str:
    """``pid 123 on host h since 2026-12-01T10:00:00 (cmd: python train.py ...)``."""
    if not rec:
        return "an unknown process (no holder record)"
    cmd = rec.get("command") or "?"
    return (f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} since "
            f"{rec.get('started', '?')} (command: {cmd})")


def _proc_lock_holders(fd: int) -> list[int]:
    """PIDs that hold a lock on the inode of ``fd`` according to ``/proc/locks`` (Linux)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        for i, tok in enumerate(parts):
            if tok.count(":") == 2 and i > 0:
                if tok == want and parts[i - 1].isdigit():
                    pids.append(int(parts[i - 1]))
                break
    return pids


def _command() -> str:
    return " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable


class HolderLock:
    """Exclusive inter-process lock on ``path`` with a holder record.

    Args:
      path: the lock file (created; never deleted, deleting a lock file races).
      what: what is locked, for messages (``"workdir /x"``).
      blocking: wait for the lock (True) or fail at once (False).
      timeout: with ``blocking``, give up after this many seconds (None: wait forever).
      busy_error: exception class raised when the lock is busy (non-blocking / timeout).
      on_wait: called once with the holder record when a blocking acquire has to wait.
      extra: additional fields written into the holder record.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "", blocking: bool = False,
                 timeout: float | None = None, busy_error: type[Exception] = BlockingIOError,
                 on_wait: Callable[[dict | None], None] | None = None, extra: dict | None = None,
                 poll: float = 0.1):
        self.path = Path(path)
        self.what = what or str(self.path)
        self.blocking, self.timeout, self.poll = blocking, timeout, poll
        self.busy_error, self.on_wait, self.extra = busy_error, on_wait, dict(extra or {})
        self.took_over: dict | None = None   # the stale record found on acquire, if any
        self._key: str | None = None

    # ---- acquire / release ------------------------------------------------------------
    def _busy_message(self, fd: int) -> str:
        rec = read_holder(self.path)
        msg = f"{self.what} is in use by {describe_holder(rec)}"
        if rec and rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) \
                and not pid_alive(rec["pid"]):
            others = [p for p in _proc_lock_holders(fd) if p != os.getpid()]
            alive = ", ".join(str(p) for p in others) or "unknown"
            msg = (f"{self.what} is locked: recorded holder pid {rec['pid']} has exited but "
                   f"process(es) {alive} still hold the lock (a forked child?); stop them or "
                   f"wait")
        return msg + f" (lock file {self.path})"

    def acquire(self) -> "HolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_LOCK:
            if key in _HELD:            # re-entrant in this process
                _HELD[key][1] += 1
                self._key = key
                return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._lock_fd(fd)
            self.took_over = read_holder(self.path)
            if self.took_over:
                log.warning("%s: taking over the lock of %s, which is no longer running",
                            self.what, describe_holder(self.took_over))
            rec = {"pid": os.getpid(), "host": socket.gethostname(),
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "command": _command(), **self.extra}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
            try:
                os.fsync(fd)
            except OSError:  # pragma: no cover - fsync unsupported (some FUSE)
                pass
        except BaseException:
            os.close(fd)
            raise
        with _HELD_LOCK:
            _HELD[key] = [fd, 1]
        self._key = key
        return self

    def _lock_fd(self, fd: int) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise OSError(err.errno, f"file locking is not supported for {self.path} "
                                  f"({os.strerror(err.errno)}); use a local directory") from err
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if not self.blocking or (deadline is not None and time.monotonic() >= deadline):
                raise self.busy_error(self._busy_message(fd))
            if not waited:
                waited = True
                rec = read_holder(self.path)
                if self.on_wait is not None:
                    self.on_wait(rec)
                else:
                    log.warning("waiting for %s held by %s", self.what, describe_holder(rec))
            time.sleep(self.poll)

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_LOCK:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)     # a clean release leaves no holder record
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> "HolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
