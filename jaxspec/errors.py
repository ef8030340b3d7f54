"""Typed user errors, their exit codes, and the one-line CLI error contract.

Every error a user can cause (a bad option, a bad input file, a dataset directory in the wrong
layout, a corrupt checkpoint, a busy workdir, a full disk) is raised as one of the classes
below. Each also subclasses the builtin exception the code raised before (``ValueError``,
``FileNotFoundError``, ``OSError``, ``FloatingPointError``), so ``except ValueError`` and
``pytest.raises(ValueError)`` keep working.

Exit codes (``python train.py``, ``python -m jaxspec.evaluate|predict|convert``, bench CLIs):

====  ==========================  ========================================================
code  class                       meaning
====  ==========================  ========================================================
0                                 success
1                                 unexpected internal error (a bug: full traceback)
2     ``UsageError``,             bad option / config value / user input file (photo)
      ``InputError``,
      ``InputNotFoundError``
3     ``DataError``,              dataset files: wrong manual_dir layout, corrupt or
      ``DataNotFoundError``       truncated dataset file, wrong band count
4     ``CheckpointError``,        no usable checkpoint, corrupt checkpoint, best/latest of
      ``CheckpointNotFoundError`` different runs
5     ``WorkdirBusyError``,       another process holds the workdir lock; resuming with a
      ``WorkdirMismatchError``    config whose architecture / task / data differ
6     ``OutputError``             output not writable, disk full (ENOSPC / EDQUOT), read-only
                                  file system
7     ``DivergenceError``         training diverged (non-finite loss / gradient / parameters,
                                  or exploding parameters)
130                               interrupted (Ctrl-C / SIGINT)
====  ==========================  ========================================================

:func:`run_cli` (or the :func:`cli_main` decorator) applies the contract: one line on stderr,
``jaxspec: error: <message>``, and the exit code. Plain ``ValueError`` / ``FileNotFoundError``
(the architecture contract for invalid input, docs/architecture.md) are user errors too (code 2);
``FloatingPointError`` is code 7. ``OSError`` with ``ENOSPC``/``EDQUOT``/``EROFS`` and
``PermissionError`` anywhere in the exception chain are code 6. Anything else is a bug and keeps
its traceback (code 1). ``JAXSPEC_DEBUG=1`` re-raises every error (full traceback).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_DATA", "EXIT_CHECKPOINT", "EXIT_WORKDIR",
    "EXIT_OUTPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED",
    "JaxspecError", "UsageError", "InputError", "InputNotFoundError", "DataError",
    "DataNotFoundError", "CheckpointError", "CheckpointNotFoundError", "WorkdirBusyError",
    "WorkdirMismatchError", "OutputError", "DivergenceError",
    "classify", "cli_main", "quiet_library_logs", "run_cli",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_WORKDIR = 5
EXIT_OUTPUT = 6
EXIT_DIVERGED = 7
EXIT_INTERRUPTED = 130


class JaxspecError(Exception):
    """Base of the project's typed user errors; ``exit_code`` is what a CLI exits with."""
    exit_code = EXIT_INTERNAL


class UsageError(JaxspecError, ValueError):
    """A bad command-line option or config value (names the option and the valid choices)."""
    exit_code = EXIT_USAGE


class InputError(JaxspecError, ValueError):
    """A user input file (photo to reconstruct) that cannot be used; names the file."""
    exit_code = EXIT_USAGE


class InputNotFoundError(JaxspecError, FileNotFoundError):
    """A user input file that does not exist."""
    exit_code = EXIT_USAGE


class DataError(JaxspecError, ValueError):
    """A dataset file that is corrupt, truncated or has unexpected content; names the file."""
    exit_code = EXIT_DATA


class DataNotFoundError(JaxspecError, FileNotFoundError):
    """A dataset file or directory that is missing (manual_dir layout)."""
    exit_code = EXIT_DATA


class CheckpointError(JaxspecError, ValueError):
    """A checkpoint that cannot be restored (corrupt, from another run); names step and file."""
    exit_code = EXIT_CHECKPOINT


class CheckpointNotFoundError(JaxspecError, FileNotFoundError):
    """No (intact) checkpoint where one is needed."""
    exit_code = EXIT_CHECKPOINT


class WorkdirBusyError(JaxspecError, OSError):
    """Another process holds the workdir lock; the message names it (pid, host, start, cmd)."""
    exit_code = EXIT_WORKDIR


class WorkdirMismatchError(JaxspecError, ValueError):
    """Resuming a workdir with a config that changes the run; names the differing keys."""
    exit_code = EXIT_WORKDIR


class OutputError(JaxspecError, OSError):
    """An output that cannot be written (permissions, read-only FS, disk full); names it."""
    exit_code = EXIT_OUTPUT


class DivergenceError(JaxspecError, FloatingPointError):
    """Training diverged; the message names the last healthy checkpoint."""
    exit_code = EXIT_DIVERGED


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_ERRNO_TEXT = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
               errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
               errno.EPERM: "Operation not permitted"}


def _chain(exc: BaseException):
    """``exc`` and its causes / contexts (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _disk_error(exc: BaseException) -> str | None:
    """A one-line description when ``exc`` (or a cause) is a disk-full / permission / read-only
    error, else None. Some libraries (orbax, tensorstore) wrap these in ValueError text."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = e.filename or ""
            return f"{_ERRNO_TEXT[e.errno]}{': ' + str(where) if where else ''}"
    for e in _chain(exc):
        text = str(e)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            if _ERRNO_TEXT[code] in text:
                return _ERRNO_TEXT[code] + " (" + _first_line(text, 200) + ")"
    return None


def _first_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.strip().split("\n")[0].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _one_line(text: str, limit: int = 1000) -> str:
    """All lines of a message joined with ' | ' (messages such as a layout error span lines)."""
    parts = [" ".join(p.split()) for p in str(text).strip().splitlines() if p.strip()]
    out = " | ".join(parts) if parts else ""
    return out if len(out) <= limit else out[: limit - 3] + "..."


def classify(exc: BaseException) -> tuple[int, str] | None:
    """``(exit_code, one-line message)`` for an expected user error, None for a bug."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, JaxspecError):
        return exc.exit_code, _one_line(str(exc))
    disk = _disk_error(exc) if isinstance(exc, Exception) else None
    if disk is not None:
        return EXIT_OUTPUT, disk
    if isinstance(exc, FloatingPointError):
        return EXIT_DIVERGED, _one_line(str(exc))
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, _one_line(str(exc))
    return None


class _LibraryNoise(logging.Filter):
    """Drops known harmless warnings of orbax/absl/tfds that a user cannot act on."""

    PATTERNS = (
        "Given directory is read only",        # orbax CheckpointManager(read_only=True)
        "is read only, save will be skipped",
        "is read only, delete will be skipped",
        # orbax on a torn step dir; jaxspec.train.checkpointing reports it in one line
        "Failed to json parse Metadata file",
        "Metadata file does not exist",
        # orbax logs a failed background write (e.g. disk full) with its traceback before the
        # same exception reaches the caller, which reports it in one line
        "_SignalingThread.run() raised an exception",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = str(record.msg)
        except Exception:  # pragma: no cover - a record whose msg cannot be str()-ed
            return True
        return not any(p in msg for p in self.PATTERNS)


_NOISE_FILTER = _LibraryNoise()


def quiet_library_logs() -> None:
    """Install the filter that drops orbax's ``Given directory is read only=...`` warnings.

    orbax logs them through ``absl.logging`` (python logger ``"absl"``) every time a read-only
    ``CheckpointManager`` is created, i.e. on every ``evaluate``/``predict``; and orbax's
    traceback-carrying log of a failed background write, whose exception reaches the caller
    anyway. Idempotent; a no-op with ``JAXSPEC_DEBUG=1``.
    """
    if _debug():
        return
    for name in ("absl", "orbax", ""):
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)
    try:
        from absl import logging as absl_logging
        handler = absl_logging.get_absl_handler()
        if _NOISE_FILTER not in handler.filters:
            handler.addFilter(_NOISE_FILTER)
    except ImportError:  # pragma: no cover - absl comes with orbax/tfds
        pass


def _debug() -> bool:
    return os.environ.get("JAXSPEC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_cli(main_fn: Callable[..., int | None], argv: Sequence[str] | None = None, *,
            prog: str = "jaxspec") -> int:
    """Call ``main_fn(argv)`` and turn expected user errors into one stderr line + exit code.

    Returns the exit code (``main_fn``'s own return value, 0 for None). On an expected error
    (see :func:`classify`) prints ``<prog>: error: <message>`` to stderr and returns its code;
    ``SystemExit`` (argparse) passes through; unexpected exceptions propagate with their
    traceback. With ``JAXSPEC_DEBUG=1`` every exception propagates.
    """
    quiet_library_logs()
    try:
        rc = main_fn(argv) if argv is not None else main_fn()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - classified below, re-raised when unknown
        if _debug():
            raise
        found = classify(exc)
        if found is None:
            raise
        code, msg = found
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # stdout on the full disk / closed: still report
            pass
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return code
    return int(rc or 0)


def cli_main(fn: Callable[..., int | None] | None = None, *, prog: str = "jaxspec"):
    """Decorator form of :func:`run_cli`: ``@cli_main`` on ``def main(argv=None)``; the wrapped
    function returns the exit code (use ``sys.exit(main())``)."""
    def wrap(f):
        @functools.wraps(f)
        def wrapper(argv=None):
            return run_cli(f, argv, prog=prog)
        return wrapper
    return wrap(fn) if fn is not None else wrap
