"""Command-line plumbing shared by the bench scripts (``python bench/<name>.py``): the one-line
error contract of :func:`jaxspec.errors.run_cli` (``bench/<name>.py: error: ...`` on stderr
and the documented exit code: 2 for a bad option, 3 for dataset files, 6 for an output that
cannot be written, docs/reliability.md) and the checks a script makes before its expensive
work (names and numbers of list options, output locations writable)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from jaxspec.errors import UsageError, run_cli


def entry(main: Callable, prog: str) -> Callable[..., int]:
    """``cli(argv=None) -> exit code``: ``main(argv)`` under ``run_cli``; a ``main`` that returns
    its results (a dict) instead of an exit code exits 0."""
    def call(argv=None):
        rc = main(argv)
        return rc if isinstance(rc, int) else 0

    def cli(argv=None) -> int:
        return run_cli(call, argv, prog=prog)
    return cli


def names(option: str, text: str, allowed: Iterable[str]) -> list[str]:
    """The comma-separated ``text`` of ``option``, each item one of ``allowed``."""
    allowed = tuple(allowed)
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise UsageError(f"{option}: empty list; choose from {list(allowed)}")
    for v in items:
        if v not in allowed:
            raise UsageError(f"{option}: unknown {v!r}; choose from {list(allowed)}")
    return items


def ints(option: str, text: str, minimum: int = 1) -> list[int]:
    """The comma-separated integers of ``option``, each >= ``minimum``."""
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise UsageError(f"{option}: empty list; give comma-separated integers")
    out = []
    for v in items:
        try:
            n = int(v)
        except ValueError:
            raise UsageError(f"{option}: {v!r} is not an integer (got {text!r})") from None
        if n < minimum:
            raise UsageError(f"{option}: {n} must be >= {minimum}")
        out.append(n)
    return out


def positive(option: str, value, minimum=1):
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")
    return value


def output_file(path: str | os.PathLike, option: str) -> Path:
    """Prove that ``path`` (a file the script writes at the end) can be written: its directory
    is created and probed (:func:`jaxspec.train.workdir.check_output_writable`), and ``path``
    itself is not a directory."""
    from jaxspec.errors import OutputError
    from jaxspec.train.workdir import check_output_writable
    p = Path(path).absolute()
    if p.is_dir():
        raise OutputError(f"{option} {p} is a directory; give a file path")
    check_output_writable(p.parent, what=f"the directory of {option}")
    return p


def output_dir(path: str | os.PathLike, option: str) -> Path:
    from jaxspec.train.workdir import check_output_writable
    return check_output_writable(Path(path).absolute(), what=f"{option} directory")
