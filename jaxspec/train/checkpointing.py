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
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST, BEST = "latest", "best"


def _abstract(tree):
    """ShapeDtypeStruct target (with the live arrays' shardings) for a restore."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


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
        """Restore the full state into the structure/shardings of ``target_tree``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory / LATEST}")
        out = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target_tree)), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_variables(self, target_tree: dict | None = None, which: str = BEST,
                          step: int | None = None) -> tuple[dict, dict]:
        """Variables (``{"params": ..., collection: ...}``) from the best (default) or latest
        checkpoint.

        Without ``target_tree`` the arrays come back as restored by orbax (on the default
        device); with it (a variables dict), in its structure and shardings. Empty collections
        of the target come back empty.
        """
        mngr = self._best if which == BEST else self._latest
        if step is None:
            step = self.best_step() if which == BEST else self.latest_step()
            if step is None and which == BEST:
                mngr, step = self._latest, self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        empty = {}
        if target_tree is not None:
            target_tree = dict(target_tree)
            empty = {k: v for k, v in target_tree.items() if k != "params" and not v}
            target_tree = {k: v for k, v in target_tree.items() if k not in empty}
        if mngr is self._latest:
            # the latest checkpoint holds the full state: restore only the variables
            state = self._restore_latest_variables(step, target_tree)
            meta = self._latest.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        else:
            restore_args = (ocp.args.StandardRestore(_abstract(target_tree))
                            if target_tree is not None else ocp.args.StandardRestore())
            out = mngr.restore(step, args=ocp.args.Composite(state=restore_args,
                                                             meta=ocp.args.JsonRestore()))
            state, meta = dict(out.state), out.meta
        variables = {k: v for k, v in state.items() if v or k == "params"}
        variables.update(empty)
        return variables, meta

    def _restore_latest_variables(self, step: int, target: dict | None) -> dict:
        if target is None:
            out = self._latest.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore())).state
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
