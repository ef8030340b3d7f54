"""Checkpoints (the only module that knows orbax).

Layout under ``<workdir>/checkpoints``::

    latest/<step>/state/   step, params, opt_state, model_state ({collection: tree}), rng
    latest/<step>/meta/    JSON: step, data position (next batch index), config, ...
    best/<step>/state/     the variables (params + model-state collections) of the best
                           validation ``select_metric`` so far
    best/<step>/meta/      JSON incl. the validation metrics

``latest`` keeps the last ``keep_last`` steps; ``best`` keeps one (orbax ``best_fn`` on the
validation ``select_metric``, mode "min" or "max", stored with every best checkpoint as the
``_rank`` metric so any reader agrees; a non-finite value counts as the worst).
Saves are asynchronous (the train loop continues while the arrays are written); a save is only
visible after orbax's atomic rename, so a process killed mid-save leaves the previous
checkpoint as the latest one. Checkpoints written before ``model_state`` (top-level
``batch_stats``) still restore their variables.

Reliability (docs/reliability.md):

* :meth:`Checkpointer.restore` (no explicit step) and :meth:`Checkpointer.restore_variables`
  check each candidate step (:func:`verify_step`, then the restore itself) from the newest
  down: a corrupt step (truncated / deleted file) is reported in one warning line naming the
  step and the file, moved to ``checkpoints/corrupt/`` (writable managers) and the previous
  intact step is used. An explicit ``step`` that is corrupt raises
  :class:`~jaxspec.errors.CheckpointError` (one line).
* One run per workdir: the loop stores ``run_id`` in every checkpoint's meta;
  :meth:`Checkpointer.reconcile` moves ``best/`` steps of another run to
  ``checkpoints/orphaned/`` so ``best/`` and ``latest/`` describe one run.
* Parameter health: :func:`params_healthy`, :class:`HealthMonitor` (what the loop calls at a
  checkpoint boundary) and :meth:`Checkpointer.last_healthy_step` (scan saved steps).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxspec.errors import (CheckpointError, CheckpointNotFoundError, DivergenceError,
                            quiet_library_logs)

log = logging.getLogger("jaxspec.checkpoint")

LATEST, BEST = "latest", "best"


def _abstract(tree):
    """ShapeDtypeStruct target (with the live arrays' shardings) for a restore."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


def _replicated_target(state_dir: Path):
    """ShapeDtypeStruct target of a saved ``state/`` item with every array replicated over
    all current devices: a target-less restore that works whatever topology (devices,
    processes) wrote the checkpoint (orbax refuses the saved shardings on another one)."""
    from jax.sharding import NamedSharding, PartitionSpec
    with _quiet_restore():
        md = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    devices = jax.devices()
    rep = NamedSharding(jax.make_mesh((len(devices),), ("d",), devices=devices,
                                      axis_types=(jax.sharding.AxisType.Auto,)), PartitionSpec())

    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=rep)
        return x
    return jax.tree.map(leaf, dict(tree) if isinstance(tree, Mapping) else tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _rank(value: float, mode: str) -> float:
    """Smaller is better: the value (min) or its negation (max); non-finite = worst (+inf)."""
    v = float(value)
    if not math.isfinite(v):
        return math.inf
    return v if mode == "min" else -v


def _best_key(metrics: dict) -> float:
    # "_rank" is written by save_best, so any reader (read-only, other select metric) agrees;
    # best checkpoints written before it ranked by MRAE
    if "_rank" in metrics:
        return float(metrics["_rank"])
    return _rank(metrics.get("mrae", math.inf), "min")


class Checkpointer:
    """Keep-last-N + best-by-validation-metric checkpoints of a training run."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3,
                 async_save: bool = True, read_only: bool = False,
                 select_metric: str = "mrae", select_mode: str = "min"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if select_mode not in ("min", "max"):
            raise ValueError(f"select_mode must be 'min' or 'max', got {select_mode!r}")
        self.select_metric, self.select_mode = select_metric, select_mode
        self.directory = Path(directory).absolute()
        self._read_only = read_only
        self.restored_step: int | None = None
        if read_only:
            quiet_library_logs()   # orbax warns "Given directory is read only" otherwise
        common = dict(enable_async_checkpointing=async_save, read_only=read_only,
                      create=not read_only)
        if read_only:
            common["save_interval_steps"] = 0
        self._latest = ocp.CheckpointManager(
            self.directory / LATEST, options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep_last, **common))
        self._best = ocp.CheckpointManager(
            self.directory / BEST, options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else 1,
                best_fn=_best_key, best_mode="min", keep_checkpoints_without_metrics=False,
                **common))

    # ---- queries ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step()

    def all_steps(self) -> list[int]:
        return list(self._latest.all_steps())

    # ---- save ---------------------------------------------------------------------------
    def save(self, step: int, state_tree: dict, meta: dict, force: bool = True) -> bool:
        """Asynchronously save the full training state (``TrainState.to_pytree()``)."""
        return self._latest.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(dict(meta))),
            force=force)

    def save_best(self, step: int, variables_tree: dict, metrics: dict, meta: dict) -> bool:
        """Offer the variables (params + model-state collections) with validation ``metrics``
        (which must hold the selection metric)."""
        if self.select_metric not in metrics:
            raise ValueError(f"save_best needs metrics[{self.select_metric!r}] (the selection "
                             f"metric); got {sorted(metrics)}")
        metrics = {k: float(v) for k, v in metrics.items()}
        ranked = {**metrics, "_rank": _rank(metrics[self.select_metric], self.select_mode)}
        return self._best.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(variables_tree),
            meta=ocp.args.JsonSave({**dict(meta), "metrics": metrics,
                                    "select_metric": self.select_metric})),
            metrics=ranked, force=True)

    # ---- restore ------------------------------------------------------------------------
    def restore(self, target_tree: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restore the full state into the structure/shardings of ``target_tree``.

        ``step=None``: the newest intact step of ``latest/`` (corrupt newer ones are reported
        and skipped, see the module docstring); the step used is ``meta["data_step"]`` /
        :attr:`restored_step`. An explicit corrupt ``step`` raises ``CheckpointError``.
        """
        def attempt(s):
            out = self._latest.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target_tree)),
                meta=ocp.args.JsonRestore()))
            return out.state, out.meta
        return self._restore_with_fallback(self._latest, LATEST, step, attempt)

    def _restore_with_fallback(self, mngr, which: str, step: int | None, attempt):
        """``attempt(step)`` on ``step``, or on the steps of ``mngr`` newest first."""
        explicit = step is not None
        steps = [int(step)] if explicit else sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory / which}")
        problems = []
        for s in steps:
            problem = verify_step(self.directory / which / str(s))
            result = None
            if problem is None:
                try:
                    with _quiet_restore():
                        result = attempt(s)
                except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                    problem = describe_restore_error(err, self.directory / which / str(s))
                    if not problem.startswith("file "):
                        # no file of the step is at fault: the checkpoint does not fit the
                        # target (another architecture / optimiser); never set it aside
                        raise CheckpointError(
                            f"checkpoint {which}/{s} in {self.directory} cannot be restored "
                            f"into the current model/optimiser state (was the config "
                            f"changed?): {problem}") from err
            if problem is None:
                self.restored_step = s
                if problems:
                    log.warning("%s; restored %s step %d instead", "; ".join(problems), which, s)
                return result
            line = f"corrupt checkpoint {which}/{s} in {self.directory}: {problem}"
            if explicit:
                raise CheckpointError(line)
            moved = self._quarantine(mngr, which, s)
            problems.append(line + (f" (moved to {moved})" if moved else ""))
        raise CheckpointError(f"no intact checkpoint in {self.directory / which}: "
                              + "; ".join(problems))

    def _quarantine(self, mngr, which: str, step: int) -> Path | None:
        """Move a corrupt step out of the manager's directory (kept for inspection) so a
        resumed run can save that step again; returns where it went (None: read-only, or
        the move failed; the restore still falls back)."""
        if self._read_only or jax.process_index() != 0:   # multi-process: process 0 moves
            return None
        src = self.directory / which / str(step)
        dst = self.directory / "corrupt" / f"{which}-{step}-{int(time.time())}"
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
            mngr.reload()
        except OSError:  # pragma: no cover - e.g. permissions
            return None
        return dst

    def restore_variables(self, target_tree: dict | None = None, which: str = BEST,
                          step: int | None = None) -> tuple[dict, dict]:
        """Variables (``{"params": ..., collection: ...}``) from the best (default) or latest
        checkpoint.

        Without ``target_tree`` the arrays come back as restored by orbax (on the default
        device); with it (a variables dict), in its structure and shardings. Empty collections
        of the target come back empty. Without ``step``, a corrupt checkpoint is reported in one
        line and the next intact one is used (best falls back to the newest intact latest step).
        """
        mngr = self._best if which == BEST else self._latest
        empty = {}
        if target_tree is not None:
            target_tree = dict(target_tree)
            empty = {k: v for k, v in target_tree.items() if k != "params" and not v}
            target_tree = {k: v for k, v in target_tree.items() if k not in empty}

        def attempt_on(m):
            def attempt(s):
                if m is self._latest:
                    # the latest checkpoint holds the full state: restore only the variables
                    state = self._restore_latest_variables(s, target_tree)
                    meta = self._latest.restore(s, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore())).meta
                else:
                    restore_args = ocp.args.StandardRestore(
                        _abstract(target_tree) if target_tree is not None else
                        _replicated_target(self.directory / which / str(s) / "state"))
                    out = m.restore(s, args=ocp.args.Composite(state=restore_args,
                                                               meta=ocp.args.JsonRestore()))
                    state, meta = dict(out.state), out.meta
                variables = {k: v for k, v in state.items() if v or k == "params"}
                variables.update(empty)
                return variables, meta
            return attempt

        if step is not None:
            return self._restore_with_fallback(mngr, which, step, attempt_on(mngr))
        if which == BEST and self.best_step() is not None:
            try:
                return self._restore_with_fallback(self._best, BEST, None, attempt_on(self._best))
            except CheckpointError as err:
                log.warning("%s; using the latest checkpoint", err)
        if self.latest_step() is None:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        return self._restore_with_fallback(self._latest, LATEST, None, attempt_on(self._latest))

    def _restore_latest_variables(self, step: int, target: dict | None) -> dict:
        if target is None:
            out = self._latest.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(
                    _replicated_target(self.directory / LATEST / str(step) / "state")))).state
            ms = dict(out.get("model_state") or {})
            if "batch_stats" in out and "model_state" not in out:     # pre-model_state layout
                ms = {"batch_stats": out["batch_stats"]}
            return {"params": out["params"], **ms}
        item = {"params": target["params"],
                "model_state": {k: v for k, v in target.items() if k != "params"}}
        if not item["model_state"]:
            item.pop("model_state")
        abstract = _abstract(item)
        out = self._latest.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
        return {"params": out.state["params"], **dict(out.state.get("model_state", {}))}

    def read_meta(self, which: str = LATEST, step: int | None = None) -> dict:
        mngr = self._best if which == BEST else self._latest
        step = (mngr.best_step() if which == BEST else mngr.latest_step()) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint in {self.directory}")
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    # ---- one run per workdir -----------------------------------------------------------
    def run_id(self, which: str = LATEST) -> str | None:
        """``meta["run_id"]`` of the newest step of ``which`` (None: no step or no run id)."""
        mngr = self._best if which == BEST else self._latest
        steps = sorted(mngr.all_steps(), reverse=True)
        for s in steps:
            rid = _read_meta_file(self.directory / which / str(s)).get("run_id")
            if rid:
                return str(rid)
        return None

    def reconcile(self, run_id: str | None = None) -> list[int]:
        """Make ``best/`` describe the same run as ``latest/``.

        ``run_id`` (default: the run id of the newest latest step) is the current run's id;
        every ``best/`` step whose meta holds another (or no) run id is moved to
        ``checkpoints/orphaned/best-<step>-<their run id>`` with a warning. Returns the moved
        steps. A read-only checkpointer raises ``CheckpointError`` instead of moving.
        """
        run_id = run_id or self.run_id(LATEST)
        if run_id is None:
            return []
        moved = []
        for s in sorted(self._best.all_steps()):
            theirs = _read_meta_file(self.directory / BEST / str(s)).get("run_id")
            if theirs == run_id:
                continue
            if self._read_only:
                raise CheckpointError(
                    f"best/{s} in {self.directory} belongs to run {theirs or '<unknown>'}, "
                    f"latest/ to run {run_id}: the workdir mixes two runs")
            dst = self.directory / "orphaned" / f"best-{s}-{theirs or 'unknown'}"
            if jax.process_index() == 0:   # multi-process: one process moves, all reload
                dst.parent.mkdir(parents=True, exist_ok=True)
                (self.directory / BEST / str(s)).rename(dst)
            moved.append(s)
            log.warning("best/%d in %s is from run %s, not the current run %s: moved to %s",
                        s, self.directory, theirs or "<unknown>", run_id, dst)
        if jax.process_count() > 1:
            from jaxspec import distributed
            distributed.sync("jaxspec-reconcile")
        if moved:
            self._best.reload()
        return moved

    # ---- parameter health ---------------------------------------------------------------
    def param_norms(self, which: str = LATEST) -> dict[int, float]:
        """``{step: global L2 norm of params}`` of the saved steps of ``which`` (from
        ``meta["param_norm"]`` when the loop stored it, else by restoring the params)."""
        mngr = self._best if which == BEST else self._latest
        out = {}
        for s in sorted(mngr.all_steps()):
            meta = _read_meta_file(self.directory / which / str(s))
            if isinstance(meta.get("param_norm"), (int, float)):
                out[s] = float(meta["param_norm"])
                continue
            try:
                variables, _ = self.restore_variables(which=which, step=s)
            except CheckpointError:
                continue
            out[s] = param_norm(variables["params"])
        return out

    def last_healthy_step(self, factor: float = 10.0, which: str = LATEST,
                          initial_norm: float | None = None) -> int | None:
        """The newest saved step whose params are finite and not exploding: walking the
        steps in order, each norm is checked with :func:`params_healthy` against the norm of
        the previous *healthy* step (``initial_norm`` before the first, if given); the first
        unhealthy step ends the walk (later steps descend from it). None if none is healthy."""
        good, prev = None, initial_norm
        for s, n in sorted(self.param_norms(which).items()):
            if not params_healthy(prev, n, factor):
                break
            good, prev = s, n
        return good

    # ---- lifecycle ----------------------------------------------------------------------
    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    d = Path(workdir) / "checkpoints"
    return any((d / sub).is_dir() and any(p.name.isdigit() for p in (d / sub).iterdir())
               for sub in (LATEST, BEST))


# ------------------------------------------------------------------------- integrity checks
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")
_REQUIRED = ("meta/metadata", "state/_METADATA")
_PATH_IN_MESSAGE = re.compile(r'local file "([^"]+)"|File (/\S+) not found|'
                              r"No such file or directory: '([^']+)'")


def _read_meta_file(step_dir: Path) -> dict:
    try:
        d = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def verify_step(step_dir: str | os.PathLike) -> str | None:
    """Cheap structural check of one orbax step directory: the files a restore needs exist
    and the JSON ones parse (truncated JSON is the common form of a torn copy). Returns a
    one-line problem naming the file relative to ``step_dir``, or None. Array data files are
    checked by the restore itself (:func:`describe_restore_error` names them)."""
    d = Path(step_dir)
    if not d.is_dir():
        return f"{d} is missing"
    for rel in _REQUIRED:
        if not (d / rel).is_file():
            return f"file {rel} is missing"
    state = d / "state"
    if not (state / "manifest.ocdbt").is_file() and any(state.glob("ocdbt.process_*")):
        return "file state/manifest.ocdbt is missing"
    json_files = list(_JSON_FILES) + [str(p.relative_to(d)) for p in
                                      (d / "state" / "array_metadatas").glob("*")]
    for rel in json_files:
        p = d / rel
        if not p.is_file():
            continue
        try:
            json.loads(p.read_bytes() or b"null")
            if p.stat().st_size == 0:
                return f"file {rel} is empty"
        except ValueError as err:
            return f"file {rel} is truncated or corrupt ({err})"
    return None


def describe_restore_error(err: BaseException, step_dir: str | os.PathLike) -> str:
    """One line for a failed restore of ``step_dir``: ``file <rel>: <error>`` when the error
    chain names a file inside the step dir (a corrupt / missing file), else ``<error>`` (the
    checkpoint is intact but does not fit the restore target)."""
    step_dir = Path(step_dir)
    seen, e, files = set(), err, []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for m in _PATH_IN_MESSAGE.finditer(str(e)):
            path = next(g for g in m.groups() if g)
            files.append(path)
        e = e.__cause__ or e.__context__
    # the most specific existing-or-named file inside the step dir (data files over dirs)
    named = None
    for f in files:
        p = Path(f)
        try:
            rel = p.relative_to(step_dir)
        except ValueError:
            continue
        if not str(f).endswith("/"):
            named = str(rel)
    first = " ".join(str(err).split("[tensorstore_spec")[0].split())[:200]
    kind = type(err).__name__
    return f"file {named}: {kind}: {first}" if named else f"{kind}: {first}"


def _is_closed_loop_noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


_HOOKS_INSTALLED = []


def _install_noise_hooks() -> None:
    """After a failed orbax restore its sibling read tasks finish on a closed event loop and
    raise "Event loop is closed" from threads / finalizers (dozens of tracebacks burying the
    cause). Drop exactly those; everything else reaches the previous hooks. Idempotent."""
    if _HOOKS_INSTALLED:
        return
    old_thread, old_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args):
        if not _is_closed_loop_noise(args.exc_value):
            old_thread(args)

    def unraisable_hook(args):
        if not _is_closed_loop_noise(args.exc_value):
            old_unraisable(args)

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
    _HOOKS_INSTALLED.append(True)


@contextlib.contextmanager
def _quiet_restore():
    """Silence the secondary noise of a failed orbax restore: asyncio's "Task exception was
    never retrieved" for the sibling reads and "Event loop is closed" from its threads."""
    aio = logging.getLogger("asyncio")
    old_level = aio.level
    _install_noise_hooks()
    aio.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        aio.setLevel(old_level)


# ------------------------------------------------------------------------- parameter health
def new_run_id() -> str:
    """A fresh run id (store it in ``meta["run_id"]`` of every checkpoint of one run)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def param_norm(params) -> float:
    """Global L2 norm ``sqrt(sum_leaves sum x^2)`` of a parameter tree (float64 on host;
    ``inf``/``nan`` propagate)."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        x = np.asarray(jax.device_get(leaf), np.float64)
        total += float(np.sum(x * x))
    return math.sqrt(total) if total == total and total != math.inf else total


def params_healthy(prev_norm: float | None, new_norm: float, factor: float = 10.0) -> bool:
    """True when parameters of norm ``new_norm`` are fit to keep as a "good" checkpoint.

    ``new_norm`` must be finite; and, when ``prev_norm`` (the norm at the previous good
    checkpoint, or at initialisation) is given and finite, ``new_norm <= factor * prev_norm``
    (and ``>= prev_norm / factor``: a collapse to zero is also a divergence). ``factor`` must
    be > 1; 10 is the default: in the issue's divergence the norm went 71 -> 4.7e7 in one step,
    while healthy training changes the global norm by well under 2x between checkpoints.
    """
    if not factor > 1.0:
        raise ValueError(f"factor must be > 1, got {factor}")
    new_norm = float(new_norm)
    if not math.isfinite(new_norm):
        return False
    if prev_norm is None or not math.isfinite(float(prev_norm)) or float(prev_norm) <= 0.0:
        return True
    prev_norm = float(prev_norm)
    return prev_norm / factor <= new_norm <= prev_norm * factor


class HealthMonitor:
    """What the training loop calls at each checkpoint boundary.

    ``mon = HealthMonitor(init_norm, factor=10)`` after initialisation (or after a resume,
    with the restored params' norm and ``step``); before saving step ``s``:
    ``mon.check(s, param_norm, loss=..., grad_norm=...)`` returns normally when the state is
    healthy (then save it and call ``mon.saved(s, param_norm)``), or raises
    :class:`~jaxspec.errors.DivergenceError` naming the step, the reason and the last healthy
    checkpoint (:attr:`last_good_step`), which is what the user should resume from.
    """

    def __init__(self, initial_norm: float | None, *, factor: float = 10.0,
                 step: int | None = None, directory: str | os.PathLike | None = None):
        if initial_norm is not None and not math.isfinite(float(initial_norm)):
            raise DivergenceError(f"initial parameters are not finite (norm {initial_norm})")
        self.factor = float(factor)
        self.last_good_norm = initial_norm
        self.last_good_step = step
        self.directory = directory

    def problem(self, param_norm_value: float, loss: float | None = None,
                grad_norm: float | None = None) -> str | None:
        """Why the state is unhealthy (one phrase), or None."""
        for name, v in (("loss", loss), ("gradient norm", grad_norm)):
            if v is not None and not math.isfinite(float(v)):
                return f"non-finite {name} ({v})"
        if not math.isfinite(float(param_norm_value)):
            return f"non-finite parameters (norm {param_norm_value})"
        if not params_healthy(self.last_good_norm, param_norm_value, self.factor):
            return (f"parameter norm {float(param_norm_value):.4g} is more than {self.factor:g}x "
                    f"away from {float(self.last_good_norm):.4g} at the last good checkpoint")
        return None

    def check(self, step: int, param_norm_value: float, loss: float | None = None,
              grad_norm: float | None = None) -> None:
        why = self.problem(param_norm_value, loss, grad_norm)
        if why is None:
            return
        where = f" in {self.directory}" if self.directory is not None else ""
        good = (f"the last healthy checkpoint is step {self.last_good_step}{where}"
                if self.last_good_step is not None else "no healthy checkpoint was saved")
        raise DivergenceError(
            f"training diverged at step {step}: {why}; not checkpointed; {good}. Lower the "
            f"learning rate (--set lr=...), add warm-up (--set warmup_steps=...) or clipping "
            f"(--set grad_clip=1.0) and resume")

    def saved(self, step: int, param_norm_value: float) -> None:
        self.last_good_step, self.last_good_norm = int(step), float(param_norm_value)
