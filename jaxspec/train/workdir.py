"""Workdir safety: one run per workdir, atomic JSON, resume compatibility, writable outputs.

* :class:`WorkdirLock` — ``with WorkdirLock(workdir):`` around a training run. A second run
  into the same workdir raises :class:`~jaxspec.errors.WorkdirBusyError` (exit code 5) with one
  line naming the holder (pid, host, start time, command, read from ``<workdir>/.lock``). The
  lock is an ``fcntl.flock`` (:mod:`jaxspec.fs`): the kernel releases it when the holder
  exits or crashes, so a stale lock of a dead process is taken over (with a log line).
  Multi-host jobs take it on process 0 only (``enabled=jax.process_index() == 0``).
* :func:`write_json_atomic` — ``tmp + fsync + os.replace``: readers see the old file or the
  new one, never a torn one; a failure (disk full) leaves the old file and no temp file.
* :func:`check_resume_compatible` — refuses a resume whose config changes the run's state or
  meaning (:data:`STATE_KEYS`, every ``model.*`` key, the dataset's band count) and names the
  keys; schedule / bookkeeping keys (:data:`RESUMABLE_KEYS`) may change.
* :func:`check_output_writable` — create + write + delete a probe file before expensive work.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxspec.errors import OutputError, WorkdirBusyError, WorkdirMismatchError
from jaxspec.fs import HolderLock, describe_holder, read_holder, write_json_atomic

__all__ = ["LOCK_NAME", "RESUMABLE_KEYS", "STATE_KEYS", "WorkdirLock", "check_output_writable",
           "check_resume_compatible", "config_differences", "write_json_atomic"]

LOCK_NAME = ".lock"

#: Keys that must match between the workdir's ``config.json`` and a resumed run: they define
#: the parameter / optimiser-state shapes (``method``, ``model.*``, ``optimizer``, ``b1``/``b2``
#: are in the state's meaning, ``compute_dtype``), the task and what the data are (``dataset``,
#: ``dataset_config``, ``rgb_norm``: the input the weights were trained on; ``loss``: the
#: objective; ``seed``: the data order and rng a resumed run replays; ``crop``/``batch_size``:
#: the batches replayed at a step). ``extra.*`` are method-specific knobs and must match too.
STATE_KEYS = ("method", "task", "dataset", "dataset_config", "optimizer", "b1", "b2", "loss",
              "rgb_norm", "seed", "crop", "batch_size", "compute_dtype", "train_split",
              "weight_decay")

#: Keys that may change on resume: more or fewer ``steps``, learning-rate schedule knobs (the
#: divergence message suggests lowering ``lr``, adding warm-up or clipping, then resuming),
#: evaluation and bookkeeping cadence, where the data live (paths may move), and how the
#: devices are laid out (``mesh_space``: the same numbers on any mesh).
RESUMABLE_KEYS = ("steps", "lr", "lr_min", "warmup_steps", "schedule", "grad_clip",
                  "log_every", "eval_every", "ckpt_every", "keep_last", "max_eval_images",
                  "eval_split", "eval_crop_border", "eval_tile", "eval_tile_overlap",
                  "eval_ensemble", "data_dir", "manual_dir", "preset", "mesh_space")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k in ("model", "extra") and not prefix:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _norm(v):
    """JSON-normal form (tuples -> lists) so a config read back from JSON compares equal."""
    return json.loads(json.dumps(v, default=str))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every key that differs (``model.*``, ``extra.*``
    flattened; a key present on one side only shows ``<unset>`` on the other)."""
    a, b = _flatten(_norm(dict(old))), _flatten(_norm(dict(new)))
    missing = "<unset>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def check_resume_compatible(old_config: Mapping[str, Any], new_config: Mapping[str, Any], *,
                            old_n_bands: int | None = None, new_n_bands: int | None = None,
                            workdir: str | os.PathLike | None = None) -> dict[str, tuple]:
    """Raise :class:`~jaxspec.errors.WorkdirMismatchError` when resuming ``old_config`` (the
    workdir's ``config.json``) with ``new_config`` would change the run.

    Refused: any difference in :data:`STATE_KEYS`, in ``model.*`` or ``extra.*``, any key not
    in :data:`RESUMABLE_KEYS` (unknown keys are refused: safe by default), and a different band
    count of the data (``old_n_bands`` from ``bands.json``, ``new_n_bands`` from the dataset).
    Returns the allowed differences ``{key: (old, new)}`` (log them).
    """
    diffs = config_differences(old_config, new_config)
    refused = {k: v for k, v in diffs.items() if k not in RESUMABLE_KEYS}
    if old_n_bands is not None and new_n_bands is not None and int(old_n_bands) != int(new_n_bands):
        refused["n_bands (dataset)"] = (int(old_n_bands), int(new_n_bands))
    if refused:
        where = f" in {workdir}" if workdir is not None else ""
        shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, n_o in refused.items()
                          for o, n in [n_o])
        raise WorkdirMismatchError(
            f"cannot resume the run{where} with a different configuration ({shown}); use a new "
            f"--workdir, or restore the original values (keys that may change on resume: "
            f"{', '.join(RESUMABLE_KEYS)})")
    return {k: v for k, v in diffs.items() if k in RESUMABLE_KEYS}


def check_output_writable(directory: str | os.PathLike, *, what: str = "output directory",
                          min_free_bytes: int = 0) -> Path:
    """Create ``directory`` if needed and prove it is writable (a probe file is created,
    written, fsynced and deleted), before any expensive work. ``min_free_bytes`` > 0 also
    checks the free space. Raises :class:`~jaxspec.errors.OutputError` naming the directory
    (permission denied, read-only file system, disk full, a file in the way)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OutputError(f"{what} {d} exists and is not a directory") from err
    except OSError as err:
        raise OutputError(f"{what} {d} cannot be created: {err.strerror or err}") from err
    if not d.is_dir():
        raise OutputError(f"{what} {d} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxspec-write-probe-", dir=d)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {d} is not writable: {err.strerror or err}") from err
    if min_free_bytes:
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise OutputError(f"{what} {d} has {free / 2**20:.1f} MiB free, "
                              f"{min_free_bytes / 2**20:.1f} MiB needed "
                              f"({os.strerror(errno.ENOSPC)})")
    return d


class WorkdirLock(HolderLock):
    """``with WorkdirLock(workdir):`` — at most one run per workdir (see module docstring).

    ``enabled=False`` makes it a no-op (multi-host: only process 0 locks). The holder record
    in ``<workdir>/.lock`` is JSON: ``pid``, ``host``, ``started``, ``command``.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 command: str | None = None):
        self.workdir = Path(workdir).absolute()
        self.enabled = enabled
        super().__init__(self.workdir / LOCK_NAME, what=f"workdir {self.workdir}",
                         blocking=False, busy_error=WorkdirBusyError,
                         extra={"command": command} if command else None)

    def acquire(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"workdir {self.workdir} cannot be created: "
                              f"{err.strerror or err}") from err
        return super().acquire()

    def holder(self) -> str:
        """Who holds (or last held, after a crash) the lock, in words."""
        return describe_holder(read_holder(self.path))
