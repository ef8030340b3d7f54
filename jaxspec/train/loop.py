"""``train_and_evaluate(config, workdir)``: the training loop shared by every method.

Order of things (big_vision / Flax-examples style):

1. ``config.json`` is written to the workdir (process 0); the method, model, mesh and optimiser
   are built from the config; the state is initialised replicated over the ``('data',)`` mesh.
2. Resume: if ``<workdir>/checkpoints/latest`` holds a checkpoint (and ``resume``), the full
   state (params, optimiser state, batch_stats, step, rng) is restored and the data iterator
   restarts at the saved position (``make_loader(start_step=step)``): a resumed run reproduces an
   uninterrupted one exactly.
3. The step (``jaxspec.train.steps``, by ``method.step_kind``) is jitted once with the state
   donated. Each step's diagnostics are fetched one step late (so the host prepares the next
   batch while the device computes); a non-finite loss or gradient norm stops the run with a
   ``FloatingPointError`` before anything non-finite is checkpointed.
4. Every ``log_every`` steps process 0 appends a line to ``metrics.jsonl`` (mean loss over the
   window, grad/param norm, lr, steps/s); every ``eval_every`` steps a validation pass (at most
   ``max_eval_images``) updates the best-by-MRAE checkpoint; every ``ckpt_every`` steps the full
   state is saved asynchronously (keep last ``keep_last``). SIGTERM saves and returns.
5. At the end: full validation of the final model (padded to the stride, optional tiles and x8
   ensemble), the best checkpoint is chosen by validation MRAE, ``eval.json`` and figures are
   written for it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from jaxspec import registry
from jaxspec.configs.base import Config
from jaxspec.train import checkpointing, sharding, steps as steps_lib
from jaxspec.train.state import TrainState, create_train_state, param_count

log = logging.getLogger("jaxspec.train")


class _Preemption:
    """Sets ``flag`` on SIGTERM (and SIGINT when asked) while active; restores the handlers."""

    def __init__(self, sigint: bool = False):
        self.flag = False
        self.signum = None
        self._sigs = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
        self._old = {}

    def _handler(self, signum, frame):
        self.flag, self.signum = True, signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self._sigs:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def dataset_name(config: Config) -> str:
    return config.dataset + (f"/{config.dataset_config}" if config.dataset_config else "")


def load_sources(config: Config, splits: Iterable[str]) -> dict[str, Any]:
    """Random-access sources of ``splits`` of the config's dataset (prepared on first use)."""
    from jaxspec import data as data_lib
    b = data_lib.builder(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
                         config=config.dataset_config)
    return {s: data_lib.data_source(b, s) for s in splits}


def protocol_crop_border(config: Config) -> int:
    """``config.eval_crop_border`` if set, else the dataset builder's ``EVAL_CROP_BORDER``
    (e.g. 128 for ARAD-1K), else 0."""
    if config.eval_crop_border:
        return int(config.eval_crop_border)
    try:
        from jaxspec import data as data_lib
        module = data_lib.load_builder_module(config.dataset)
        return int(getattr(module.Builder, "EVAL_CROP_BORDER", 0))
    except (ValueError, FileNotFoundError, ImportError, AttributeError):
        return 0


def eval_batches(config: Config, source, max_images: int | None = None):
    from jaxspec import data as data_lib
    return data_lib.make_loader(source, batch_size=1, crop=None, seed=config.seed, train=False,
                                normalization=config.rgb_norm, keys=("rgb", "hsi"))


def _is_main() -> bool:
    return jax.process_index() == 0


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _finite(x) -> bool:
    return bool(np.isfinite(x))


def train_and_evaluate(config: Config, workdir: str | os.PathLike, *, resume: bool = True,
                       train_source=None, eval_source=None, tensorboard: bool = False,
                       progress: bool | None = None, final_eval: bool = True,
                       figures: int = 2, devices=None, handle_sigint: bool = False) -> dict:
    """Train ``config.method`` per ``config`` in ``workdir``; returns a summary dict.

    ``train_source`` / ``eval_source`` (random-access sequences of example dicts with ``rgb``,
    ``hsi``, ``name``) replace the config's dataset, e.g. for user data in a notebook.
    Summary keys: ``step``, ``start_step``, ``preempted``, ``final_loss``, ``best_step``,
    ``eval`` (mean validation metrics of the best checkpoint), ``params``.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    method = registry.get(config.method)
    if config.steps < 1:
        raise ValueError(f"config.steps must be >= 1, got {config.steps}")
    for k in ("log_every", "ckpt_every"):
        if getattr(config, k) < 1:
            raise ValueError(f"config.{k} must be >= 1, got {getattr(config, k)}")
    if config.crop % method.stride:
        raise ValueError(f"crop={config.crop} must be a multiple of the {method.name} stride "
                         f"{method.stride}")
    model = method.model(config)
    mesh = sharding.make_mesh(devices)
    local_bs = sharding.local_batch_size(config.batch_size, mesh)
    rep = sharding.replicated(mesh)
    main = _is_main()
    progress = main if progress is None else (progress and main)

    if main:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    tx = steps_lib.make_optimizer_for(config, method)
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed),
                               (1, config.crop, config.crop, 3), out_sharding=rep)
    n_params = param_count(state.params)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep_last=config.keep_last)
    start = 0
    if ckpt.latest_step() is not None:
        if not resume:
            ckpt.close()
            raise ValueError(f"{workdir} already holds checkpoints (latest step "
                             f"{ckpt.latest_step()}); pass --resume or choose another --workdir")
        tree, meta = ckpt.restore(state.to_pytree())
        state = state.from_pytree(tree)
        start = int(meta["data_step"])
        log.info("resumed from step %d in %s", start, workdir)

    if train_source is None or eval_source is None:
        srcs = load_sources(config, [s for s, given in ((config.train_split, train_source),
                                                         (config.eval_split, eval_source))
                                     if given is None])
        train_source = train_source if train_source is not None else srcs[config.train_split]
        eval_source = eval_source if eval_source is not None else srcs[config.eval_split]

    from jaxspec import data as data_lib
    from jaxspec import inference

    if main:
        try:  # band centres of the data, for predict/figures
            bands = eval_source[0].get("bands")
        except (IndexError, KeyError, TypeError, AttributeError):
            bands = None
        if bands is not None:
            (workdir / "bands.json").write_text(json.dumps([float(b) for b in np.asarray(bands)]))

    step_fn = jax.jit(steps_lib.build_train_step(model, config, method), donate_argnums=0,
                      out_shardings=(rep, rep))
    apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(np.float32))
    crop_border = protocol_crop_border(config)

    def validate(st: TrainState, max_images, *, keep=0, full=False):
        variables = st.variables
        predict = lambda x: apply_eval(variables, x)  # noqa: E731
        return inference.evaluate_dataset(
            predict, eval_batches(config, eval_source), crop_border=crop_border,
            stride=method.stride, tile=config.eval_tile, overlap=config.eval_tile_overlap,
            ensemble=config.eval_ensemble and full, max_images=max_images, keep=keep)

    tb = None
    if tensorboard and main:
        from jaxspec.train.tensorboard import SummaryWriter
        tb = SummaryWriter(workdir / "tensorboard")

    meta_base = {"method": config.method, "preset": config.preset,
                 "dataset": dataset_name(config)}
    metrics_path = workdir / "metrics.jsonl"
    pbar = None
    if progress and start < config.steps:
        from tqdm.auto import tqdm
        pbar = tqdm(total=config.steps, initial=start, desc=config.method, dynamic_ncols=True)

    window: list[dict] = []
    last_rec: dict = {}
    last_good = {"step": start}
    pending: list[tuple[int, dict]] = []

    def drain():
        """Fetch pending step diagnostics; stop on non-finite values."""
        while pending:
            s, m = pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not (_finite(m["loss"]) and _finite(m["grad_norm"])):
                ckpt.wait()
                good = ckpt.latest_step()
                ckpt.close()
                if pbar is not None:
                    pbar.close()
                raise FloatingPointError(
                    f"non-finite training loss at step {s} (loss={m['loss']}, "
                    f"grad_norm={m['grad_norm']}); stopped. The last good checkpoint is step "
                    f"{good} in {workdir / 'checkpoints'} (resume with --resume). Consider a "
                    f"lower lr (--set lr=...), warm-up (--set warmup_steps=...) or clipping "
                    f"(--set grad_clip=1.0).")
            m["step"] = s
            window.append(m)
            last_good["step"] = s

    preempted = False
    t_window = time.perf_counter()
    step = start
    with _Preemption(sigint=handle_sigint) as stop:
        it = (data_lib.make_loader(train_source, batch_size=local_bs, crop=config.crop,
                                   seed=config.seed, train=True, normalization=config.rgb_norm,
                                   start_step=start)
              if start < config.steps else iter(()))
        while step < config.steps:
            batch = sharding.shard_batch(next(it), mesh)
            state, m = step_fn(state, batch)
            drain()                               # previous step's diagnostics (one-step lag)
            step += 1
            pending.append((step, m))
            if pbar is not None:
                pbar.update(1)
            boundary_log = step % config.log_every == 0 or step == config.steps
            boundary_eval = bool(config.eval_every) and step % config.eval_every == 0 \
                and step < config.steps
            boundary_ckpt = step % config.ckpt_every == 0 or step == config.steps or stop.flag
            if boundary_log or boundary_eval or boundary_ckpt:
                drain()
            if boundary_log and window:
                dt = time.perf_counter() - t_window
                rec = {"step": step,
                       **{k: float(np.mean([w[k] for w in window])) for k in window[0]
                          if k != "step"},
                       "steps_per_sec": len(window) / dt if dt > 0 else float("nan")}
                rec["lr"] = window[-1]["lr"]
                last_rec.clear()
                last_rec.update(rec)
                if main:
                    _append_jsonl(metrics_path, rec)
                    if tb is not None:
                        tb.scalars(step, {f"train/{k}": v for k, v in rec.items() if k != "step"})
                if pbar is not None:
                    pbar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['steps_per_sec']:.2f}")
                window.clear()
                t_window = time.perf_counter()
            if boundary_ckpt:
                ckpt.save(step, state.to_pytree(), {**meta_base, "data_step": step,
                                                    "config": config.to_dict()})
            if boundary_eval:
                res = validate(state, config.max_eval_images)
                ckpt.save_best(step, {"params": state.params, "batch_stats": state.batch_stats},
                               res["mean"], {**meta_base, "step": step})
                if main:
                    _append_jsonl(metrics_path, {"step": step, **{f"val/{k}": v for k, v in
                                                                  res["mean"].items()}})
                    if tb is not None:
                        tb.scalars(step, {f"val/{k}": v for k, v in res["mean"].items()})
                t_window = time.perf_counter()
            if stop.flag:
                preempted = True
                break
    drain()
    if pbar is not None:
        pbar.close()
    ckpt.wait()
    summary: dict[str, Any] = {"step": step, "start_step": start, "preempted": preempted,
                               "params": n_params, "final_loss": last_rec.get("loss")}
    if preempted:
        log.warning("received signal %s: saved step %d to %s", stop.signum, step, workdir)
        ckpt.close()
        if tb is not None:
            tb.close()
        return summary

    if final_eval:
        res = validate(state, None, keep=figures, full=True)
        ckpt.save_best(step, {"params": state.params, "batch_stats": state.batch_stats},
                       res["mean"], {**meta_base, "step": step})
        ckpt.wait()
        best = ckpt.best_step()
        if best is not None and best != step:
            variables, _ = ckpt.restore_variables(
                {"params": state.params, "batch_stats": state.batch_stats})
            res = validate(state.replace(params=variables["params"],
                                         batch_stats=variables["batch_stats"]),
                           None, keep=figures, full=True)
        summary.update(best_step=best, eval=res["mean"])
        if main:
            from jaxspec.train import report
            report.write_eval_json(workdir / "eval.json", res, method=config.method,
                                   dataset=dataset_name(config), split=config.eval_split,
                                   step=best, checkpoint="best", params=n_params)
            if figures and res["examples"]:
                report.save_figures(workdir / "figures", res["examples"])
            if tb is not None:
                tb.scalars(step, {f"final/{k}": v for k, v in res["mean"].items()})
    ckpt.close()
    if tb is not None:
        tb.close()
    return summary
