"""``train_and_evaluate(config, workdir)``: the training loop shared by every method and task.

It is assembled from reusable pieces (each importable; the step kinds share them):

1. :func:`prepare` -> :class:`Run`: the config validated (optimizer, schedule, loss, warm-up,
   crop, select metric) and the workdir checked writable before any data work; the method,
   its task (:mod:`jaxspec.tasks`), the data sources, the config resolved against the data
   (band count, fusion scale: a mismatch stops here), model and mesh. Nothing is written yet:
   under the :class:`~jaxspec.train.workdir.WorkdirLock` (process 0), :func:`check_workdir`
   refuses a resume whose config would change the run, then :func:`write_run_files` writes
   ``config.json`` (the resolved config), ``bands.json`` and ``input.json`` atomically.
2. :func:`init_state`: the state initialised replicated over the ``('data',)`` mesh from the
   task's example inputs, then the ``config.init_from`` subtrees copied in from other runs'
   checkpoints (staged training).
3. :func:`restore`: if ``<workdir>/checkpoints/latest`` holds a checkpoint (and ``resume``), the
   full state (params, optimiser state, model state, step, rng) is restored and the data
   iterators restart at the saved position (``make_loader(start_step=step)``): a resumed run
   reproduces an uninterrupted one exactly.
4. :func:`iterate`: the step (``jaxspec.train.steps``, by ``method.step_kind``) jitted once with
   the state donated; diagnostics fetched one step late (the host prepares the next batch while
   the device computes); a non-finite loss, gradient norm or parameter norm stops the run with
   a :class:`~jaxspec.errors.DivergenceError` before anything non-finite is checkpointed, and
   at each checkpoint boundary a :class:`~checkpointing.HealthMonitor` refuses parameters more
   than 10x away from the last healthy checkpoint (named in the message). Checkpoint metas
   carry the run's ``run_id`` and ``param_norm``; ``best/`` of another run is set aside. At the boundaries
   :func:`periodic`: a ``metrics.jsonl`` line every ``log_every`` steps, a validation every
   ``eval_every`` steps that offers the best checkpoint, a full-state save every
   ``ckpt_every`` steps (keep last ``keep_last``). SIGTERM saves and returns.
5. :func:`final`: the final model is validated exactly like the periodic validations (same
   images: at most ``max_eval_images``; same ``select_metric``) and offered as best; the best
   checkpoint is then evaluated with the final-only options (x8 ensemble, test-time
   adaptation) and ``eval.json`` and figures are written for it.

``step_kind="none"`` (parameter-free methods) runs 1 and 5 only: no training, no checkpoint.
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
import optax

from jaxspec import registry, tasks as tasks_lib
from jaxspec.configs.base import Config
from jaxspec.errors import DivergenceError, UsageError
from jaxspec.fs import write_json_atomic
from jaxspec.train import checkpointing, sharding, steps as steps_lib
from jaxspec.train.workdir import WorkdirLock, check_output_writable, check_resume_compatible
from jaxspec.train.state import TrainState, create_train_state, param_count, variables_of

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


def load_sources(config: Config, splits: Iterable[str], dataset: str | None = None
                 ) -> dict[str, Any]:
    """Random-access sources of ``splits`` of the config's dataset (or ``dataset``
    "name[/config]"), prepared on first use. Splits may be TFDS slices ("train[:50%]")."""
    from jaxspec import data as data_lib
    name, cfg = config.dataset, config.dataset_config
    if dataset is not None:
        name, _, sub = dataset.partition("/")
        cfg = sub or None
    b = data_lib.builder(name, data_dir=config.data_dir, manual_dir=config.manual_dir,
                         config=cfg)
    # the eval split of a dataset without 'validation' is its 'test' split (logged)
    return {s: data_lib.data_source(b, data_lib.resolve_eval_split(b, s)
                                    if s == config.eval_split else s) for s in splits}


def protocol_crop_border(config: Config) -> int:
    """``config.eval_crop_border`` if set (0 included), else (None) the dataset builder's
    ``EVAL_CROP_BORDER`` (e.g. 128 for ARAD-1K), else 0."""
    if config.eval_crop_border is not None:
        return int(config.eval_crop_border)
    try:
        from jaxspec import data as data_lib
        module = data_lib.load_builder_module(config.dataset)
        return int(getattr(module.Builder, "EVAL_CROP_BORDER", 0))
    except (ValueError, FileNotFoundError, ImportError, AttributeError):
        return 0


def _task_and_method(config: Config, method=None):
    method = method if method is not None else registry.get(config.method)
    return tasks_lib.of(method), method


def _loader_keys(task) -> tuple[str, ...]:
    return tuple(dict.fromkeys(tuple(task.input_keys) + (task.target_key,)))


def eval_batches(config: Config, source, max_images: int | None = None, *, method=None):
    """Full-image evaluation batches (batch 1) of the method's task: rgb2hsi ``rgb``/``hsi``,
    hsi2hsi ``hsi``, fusion pairs synthesised by ``config.fusion``."""
    from jaxspec import data as data_lib
    task, method = _task_and_method(config, method)
    deg = None
    if task.name == "fusion":
        from jaxspec.data import fusion as fusion_data
        deg = fusion_data.degradation_from_config(config)
    # every process evaluates every image (shard (0, 1)): the metrics, and so the best
    # checkpoint's selection, are the same on all processes of a multi-process run
    return data_lib.make_loader(source, batch_size=1, crop=None, seed=config.seed, train=False,
                                normalization=config.rgb_norm, keys=_loader_keys(task),
                                fusion=deg, shard=(0, 1))


def train_iterator(config: Config, task, sources, local_bs: int, start: int, mesh=None):
    """The training batches from step ``start``: one stream of the task's keys, or with
    ``config.streams`` a dict ``{stream: batch}`` of independent streams (each with its own
    split/keys/seed/batch size; each deterministic in (seed, t), so resumable at t)."""
    from jaxspec import data as data_lib
    deg = None
    if task.name == "fusion":
        from jaxspec.data import fusion as fusion_data
        deg = fusion_data.degradation_from_config(config)
    common = dict(crop=config.crop, train=True, normalization=config.rgb_norm,
                  start_step=start, augment=config.augment)
    if mesh is not None:
        # one global batch order whatever the process count: every process walks the
        # unsharded stream and reads only its rows of each global batch
        common["shard"] = (0, 1)

    def sized(global_bs):
        if mesh is None:
            return dict(batch_size=global_bs // jax.process_count())
        return dict(batch_size=global_bs, rows=sharding.process_rows(global_bs, mesh))

    if not config.streams:
        size = sized(config.batch_size) if mesh is not None else dict(batch_size=local_bs)
        return data_lib.make_loader(sources, seed=config.seed, keys=_loader_keys(task),
                                    fusion=deg, **size, **common)
    its = {}
    for i, (name, spec) in enumerate(sorted(config.streams.items())):
        spec = dict(spec)
        bs = int(spec.get("batch_size", config.batch_size))
        size = sized(bs) if mesh is not None or bs != config.batch_size else \
            dict(batch_size=local_bs)
        its[name] = data_lib.make_loader(
            sources[name], **size, seed=int(spec.get("seed", config.seed + 1000 * (i + 1))),
            keys=tuple(spec.get("keys", _loader_keys(task))),
            fusion=deg if spec.get("fusion", False) else None, **common)

    def gen():
        while True:
            yield {name: next(it) for name, it in its.items()}
    return gen()


def _stream_sources(config: Config, train_source):
    """{stream: source} for ``config.streams`` (given dict entries win over the dataset)."""
    given = dict(train_source) if isinstance(train_source, Mapping) else {}
    out = {}
    for name, spec in config.streams.items():
        if name in given:
            out[name] = given[name]
            continue
        spec = dict(spec)
        split = spec.get("split", config.train_split)
        out[name] = load_sources(config, [split], dataset=spec.get("dataset"))[split]
    return out


def shard_nested(batch: Mapping[str, Any], mesh) -> dict:
    """:func:`sharding.shard_batch` on a batch or a dict of stream batches (``config.streams``):
    every numeric leaf becomes a global array sharded over ``'data'``."""
    if any(isinstance(v, Mapping) for v in batch.values()):
        return {k: shard_nested(v, mesh) if isinstance(v, Mapping) else v
                for k, v in batch.items() if isinstance(v, Mapping)}
    return sharding.shard_batch(batch, mesh)


def _is_main() -> bool:
    return jax.process_index() == 0


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _finite(x) -> bool:
    return bool(np.isfinite(x))


# ----------------------------------------------------------------------------- pieces
class Run:
    """Everything a run builds once (see :func:`prepare`)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def trains(self) -> bool:
        return self.method.step_kind != steps_lib.NO_TRAINING

    def meta_base(self) -> dict:
        return {"method": self.config.method, "preset": self.config.preset,
                "dataset": dataset_name(self.config), "run_id": getattr(self, "run_id", None)}


def prepare(config: Config, workdir, *, train_source=None, eval_source=None, devices=None,
            need_train: bool = True) -> Run:
    """Validate the config, check the workdir is writable, load the data, resolve the config
    against it, build the model and mesh. Nothing is written to the workdir here (see
    :func:`write_run_files`, called under the workdir lock after :func:`check_workdir`)."""
    workdir = Path(workdir).absolute()
    task, method = _task_and_method(config)
    trains = method.step_kind != steps_lib.NO_TRAINING and need_train
    if trains:
        if config.steps < 1:
            raise ValueError(f"config.steps must be >= 1, got {config.steps}")
        for k in ("log_every", "ckpt_every"):
            if getattr(config, k) < 1:
                raise ValueError(f"config.{k} must be >= 1, got {getattr(config, k)}")
    unit = task.unit(config, method.stride)
    if trains and config.crop % unit:
        what = (f"the {method.name} stride {method.stride}" if unit == method.stride else
                f"scale x stride = {task.scale(config)} x {method.stride} of {method.name}")
        raise ValueError(f"crop={config.crop} must be a multiple of {what}")
    select = config.select_metric or task.select_metric
    if select not in task.metric_names:
        raise ValueError(f"select_metric={select!r} is not a metric of the {task.name!r} task "
                         f"({list(task.metric_names)})")
    tasks_lib.metric_mode(select)
    if trains:   # optimizer, schedule and loss names, warm-up < steps: before any data work
        from jaxspec.train import losses as losses_lib, optim
        optim.make_schedule(config)
        steps_lib.make_optimizer_for(config, method)
        if isinstance(config.loss, str):
            losses_lib.get_loss(config.loss)
    if _is_main():
        check_output_writable(workdir, what="workdir")

    # data
    missing = []
    if eval_source is None:
        missing.append(config.eval_split)
    streams = bool(config.streams)
    if trains and train_source is None and not streams:
        missing.append(config.train_split)
    srcs = load_sources(config, sorted(set(missing))) if missing else {}
    if eval_source is None:   # the split load_sources resolved (no 'validation': 'test')
        eval_source = srcs[config.eval_split]
        config = config.replace(eval_split=str(getattr(eval_source, "split", config.eval_split)))
    if trains:
        if streams:
            train_source = _stream_sources(config, train_source)
        elif train_source is None:
            train_source = srcs[config.train_split]
    n_bands, bands = tasks_lib.source_bands(eval_source)
    config = tasks_lib.resolve_config(config, method, n_bands,
                                      where=f"dataset {dataset_name(config)!r}")
    main = _is_main()
    model = method.model(config)
    mesh = sharding.make_mesh(devices, space=config.mesh_space)
    return Run(config=config, method=method, task=task, model=model, workdir=workdir,
               mesh=mesh, rep=sharding.replicated(mesh), main=main,
               train_source=train_source, eval_source=eval_source,
               info=tasks_lib.info_from_config(config, method), select=select,
               select_mode=tasks_lib.metric_mode(select),
               side_inputs=tuple(method.side_inputs), scale=task.scale(config),
               crop_border=protocol_crop_border(config),
               predict=None, n_bands=n_bands, bands=bands, run_id=None)


def check_workdir(run: Run, resume: bool = True) -> dict:
    """Before anything is written: a workdir holding checkpoints is resumed only with
    ``resume`` and a compatible config (:func:`check_resume_compatible` against its
    ``config.json`` and ``bands.json``). Returns the allowed differences (logged)."""
    if not (run.trains and checkpointing.has_checkpoint(run.workdir)):
        return {}
    if not resume:
        raise UsageError(f"{run.workdir} already holds checkpoints; pass --resume or choose "
                         f"another --workdir")
    cfg_path = run.workdir / "config.json"
    if not cfg_path.is_file():
        return {}
    old = json.loads(cfg_path.read_text())
    bands_path = run.workdir / "bands.json"
    old_n = len(json.loads(bands_path.read_text())) if bands_path.is_file() else None
    allowed = check_resume_compatible(old, run.config.to_dict(), old_n_bands=old_n,
                                      new_n_bands=run.n_bands, workdir=run.workdir)
    for k, (o, n) in allowed.items():
        log.info("resume with %s: %r -> %r", k, o, n)
    return allowed


def input_record(run: Run) -> dict:
    """What the model's RGB input is (``input.json``): the encoding of the training RGB
    (``linear`` for the rendered/measured cubes' RGB, else the builder's ``RGB_ENCODING``,
    default ``srgb``) and its native scale (the code of full white the loader saw: 1 for
    float sources, 255 for 8-bit ones), so predict converts a photo the same way."""
    from jaxspec import data as data_lib
    enc, scale = "linear", 1.0
    try:
        module = data_lib.load_builder_module(run.config.dataset)
        enc = str(getattr(module.Builder, "RGB_ENCODING", enc))
        scale = float(getattr(module.Builder, "RGB_SCALE", scale))
    except (ValueError, FileNotFoundError, ImportError, AttributeError):
        pass
    rec = {"encoding": enc, "native_scale": scale, "rgb_norm": run.config.rgb_norm}
    rec.update(_rgb_camera_record(run))
    return rec


def _text(v) -> str:
    v = np.asarray(v).item()
    return v.decode() if isinstance(v, bytes) else str(v)


def _rgb_camera_record(run: Run, n: int = 16) -> dict:
    """From up to ``n`` evenly spaced training examples: the SRF the RGB was rendered with
    (``srf``, (C, 3) on ``bands``; the mean when the examples' cameras differ, listed in
    ``cameras``) when the data carries an ``srf`` feature, and ``rgb_p99``: the median over
    the examples of each image's 99th percentile of its RGB (native scale), the reference
    level of ``predict --exposure normalise``. Empty for data without random access or
    without an ``rgb`` feature."""
    src = run.train_source if run.train_source is not None else run.eval_source
    try:
        size = len(src)
        idx = sorted({int(i) for i in np.linspace(0, size - 1, num=min(n, size))})
        exs = [src[i] for i in idx]
    except Exception:   # noqa: BLE001 - streams and custom sources without random access
        return {}
    if not exs or any("rgb" not in ex for ex in exs):
        return {}
    rec: dict = {"rgb_p99": float(np.median([np.percentile(np.asarray(ex["rgb"], np.float32), 99)
                                              for ex in exs]))}
    srfs = [np.asarray(ex["srf"], np.float64) for ex in exs if "srf" in ex]
    if srfs and all(f.shape == srfs[0].shape and f.ndim == 2 and f.shape[1] == 3 for f in srfs):
        rec["srf"] = np.mean(srfs, axis=0).round(8).tolist()
        cams = sorted({_text(ex["camera"]) for ex in exs if "camera" in ex})
        if cams:
            rec["cameras"] = cams
    return rec


def write_run_files(run: Run) -> None:
    """``config.json``, ``bands.json`` and ``input.json`` (atomically; process 0)."""
    if not run.main:
        return
    write_json_atomic(run.workdir / "config.json", run.config.to_dict())
    if run.bands is not None:
        write_json_atomic(run.workdir / "bands.json", [float(b) for b in run.bands], indent=None)
    if run.task.name == "rgb2hsi":
        write_json_atomic(run.workdir / "input.json", input_record(run))


def init_state(run: Run) -> TrainState:
    """Fresh state from the task's example inputs (train crop), then ``config.init_from``."""
    cfg = run.config
    tx = (steps_lib.make_optimizer_for(cfg, run.method) if run.trains
          else optax.set_to_zero())
    args, kwargs = run.task.example_inputs(run.info, cfg.crop, run.side_inputs)
    state = create_train_state(run.model, tx, jax.random.PRNGKey(cfg.seed),
                               out_sharding=run.rep, inputs=args, kwargs=kwargs)
    if cfg.init_from:
        state = apply_init_from(run, state)
    return state


def _path_get(tree, path: str, what: str):
    node = tree
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, Mapping) or part not in node:
            keys = sorted(node) if isinstance(node, Mapping) else []
            raise ValueError(f"init_from: {what} has no subtree {path!r} (at {part!r}; "
                             f"available: {keys})")
        node = node[part]
    return node


def _path_set(tree, path: str, value):
    parts = [p for p in path.split("/") if p]
    if not parts:
        return value
    out = dict(tree)
    out[parts[0]] = _path_set(tree[parts[0]], "/".join(parts[1:]), value)
    return out


def apply_init_from(run: Run, state: TrainState) -> TrainState:
    """Copy ``{"workdir", "subtree" ("" = all), "target" (default = subtree), "which"
    ("best" | "latest")}`` entries of ``config.init_from`` into the fresh state: the params
    subtree and the same subtree of every model-state collection both runs have. An entry
    with ``"file"`` instead of ``"workdir"`` reads an ``.npz`` variable tree
    (:func:`jaxspec.train.state.save_variable_tree`: ``{"params": ..., "batch_stats": ...}``,
    e.g. user-provided weights of one sub-network, with ``"target"`` naming where they go).
    Structures and shapes must match (``ValueError`` otherwise); the optimiser state is
    re-initialised."""
    from jaxspec.train.state import load_variable_tree
    params, mstate = state.params, dict(state.model_state)
    for spec in run.config.init_from:
        spec = dict(spec)
        if ("workdir" in spec) == ("file" in spec):
            raise ValueError(f"init_from entry {spec} needs a 'workdir' or a 'file' (one)")
        sub = str(spec.get("subtree", ""))
        target = str(spec.get("target", sub))
        if "file" in spec:
            src = load_variable_tree(spec["file"])
            if "params" not in src:
                raise ValueError(f"init_from file {spec['file']}: no 'params' collection (keys "
                                 f"{sorted(src)[:5]}; write it with save_variable_tree("
                                 f"path, {{'params': ...}})")
            spec["workdir"] = spec["file"]          # the name used in messages below
        else:
            d = Path(spec["workdir"]) / "checkpoints"
            if not checkpointing.has_checkpoint(spec["workdir"]):
                raise FileNotFoundError(f"init_from: no checkpoint in {d}")
            with checkpointing.Checkpointer(d, read_only=True) as ck:
                src, _ = ck.restore_variables(which=spec.get("which", "best"))
        for coll in ["params"] + sorted(mstate):
            if coll != "params" and coll not in src:
                continue
            ours = params if coll == "params" else mstate[coll]
            try:
                dst = _path_get(ours, target, f"this model's {coll}")
            except ValueError:
                if coll == "params":
                    raise
                continue
            new = _path_get(src[coll], sub, f"{spec['workdir']} {coll}")
            s_def, d_def = jax.tree.structure(new), jax.tree.structure(dst)
            if s_def != d_def:
                raise ValueError(f"init_from {spec['workdir']}:{sub!r} -> {target!r}: {coll} "
                                 f"structures differ:\n  source {s_def}\n  target {d_def}")
            bad = [(a.shape, b.shape) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(dst))
                   if np.shape(a) != b.shape]
            if bad:
                raise ValueError(f"init_from {spec['workdir']}:{sub!r}: {coll} shapes differ "
                                 f"{bad[:3]}")
            new = jax.tree.map(lambda a, b: jax.device_put(np.asarray(a, b.dtype), b.sharding),
                               new, dst)
            if coll == "params":
                params = _path_set(params, target, new)
            else:
                mstate[coll] = _path_set(mstate[coll], target, new)
        log.info("init_from: %s %r -> %r", spec["workdir"], sub, target)
    opt_state = jax.jit(state.tx.init, out_shardings=run.rep)(params)
    return state.replace(params=params, model_state=mstate, opt_state=opt_state)


def make_checkpointer(run: Run) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(run.workdir / "checkpoints", keep_last=run.config.keep_last,
                                      select_metric=run.select, select_mode=run.select_mode)


def restore(run: Run, state: TrainState, ckpt, resume: bool = True) -> tuple[TrainState, int]:
    """(state, start step): the latest checkpoint's full state if there is one."""
    if ckpt.latest_step() is None:
        return state, 0
    if not resume:
        step = ckpt.latest_step()
        ckpt.close()
        raise ValueError(f"{run.workdir} already holds checkpoints (latest step {step}); pass "
                         f"--resume or choose another --workdir")
    tree, meta = ckpt.restore(state.to_pytree())   # falls back past a corrupt latest step
    start = int(meta["data_step"])
    log.info("resumed from step %d in %s", start, run.workdir)
    return state.from_pytree(tree), start


def validate(run: Run, variables, *, full: bool = False, keep: int = 0) -> dict:
    """Validation of ``variables`` on the eval split (at most ``max_eval_images``). ``full``
    adds the final-only options: x8 ensemble and test-time adaptation."""
    from jaxspec import inference
    cfg = run.config
    if run.predict is None:   # one jitted predict function per run (variables passed per call)
        run.predict = inference.make_task_predict_fn(run.task, run.model.apply, None,
                                                     side_inputs=run.side_inputs)
    adapt = None
    if full and cfg.adapt_steps:
        adapter = make_run_adapter(run)
        adapt = lambda inputs: adapter(variables, inputs)  # noqa: E731
    res = inference.evaluate_dataset(
        lambda d, v=None: run.predict(d, variables if v is None else v),
        eval_batches(cfg, run.eval_source, method=run.method), crop_border=run.crop_border,
        stride=run.method.stride, tile=cfg.eval_tile, overlap=cfg.eval_tile_overlap,
        ensemble=cfg.eval_ensemble and full, max_images=cfg.max_eval_images, keep=keep,
        task=run.task, scale=run.scale, side_inputs=run.side_inputs, adapt=adapt)
    res["adapt"] = adapt_settings(cfg) if adapt is not None else None
    return res


def make_run_adapter(run: Run):
    from jaxspec import inference
    cfg = run.config
    return inference.make_adapter(run.task, run.model.apply, run.method.adapt_loss,
                                  side_inputs=run.side_inputs, **adapter_options(cfg))


def adapter_options(config: Config) -> dict:
    """The config's adaptation settings as :func:`jaxspec.inference.make_adapter` keywords."""
    return dict(steps=config.adapt_steps, lr=config.adapt_lr, optimizer=config.adapt_optimizer,
                params=tuple(config.adapt_params),
                lr_milestones=tuple(config.adapt_lr_milestones), lr_gamma=config.adapt_lr_gamma)


def adapt_settings(config: Config) -> dict:
    """:func:`adapter_options` as recorded in eval.json (lists; the lr schedule keys only
    when the config has milestones)."""
    opts = adapter_options(config)
    if not opts["lr_milestones"]:
        del opts["lr_milestones"], opts["lr_gamma"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


class _Logger:
    """metrics.jsonl / TensorBoard / progress bar of process 0."""

    def __init__(self, run: Run, tensorboard: bool, progress: bool, start: int):
        self.path = run.workdir / "metrics.jsonl"
        self.main = run.main
        self.tb = None
        if tensorboard and run.main:
            from jaxspec.train.tensorboard import SummaryWriter
            self.tb = SummaryWriter(run.workdir / "tensorboard")
        self.pbar = None
        if progress and run.main and start < run.config.steps:
            from tqdm.auto import tqdm
            self.pbar = tqdm(total=run.config.steps, initial=start, desc=run.config.method,
                             dynamic_ncols=True)

    def write(self, step: int, record: dict, prefix: str = "") -> None:
        if self.main:
            _append_jsonl(self.path, {"step": step, **{f"{prefix}{k}": v
                                                       for k, v in record.items()}})
            if self.tb is not None:
                self.tb.scalars(step, {f"{prefix or 'train/'}{k}": v for k, v in record.items()})

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def periodic(run: Run, state: TrainState, step: int, ckpt, logger: _Logger) -> None:
    """Validation at an ``eval_every`` boundary: offer the best checkpoint, log ``val/``."""
    res = validate(run, state.variables)
    ckpt.save_best(step, state.variables, res["mean"], {**run.meta_base(), "step": step})
    logger.write(step, res["mean"], "val/")


def iterate(run: Run, state: TrainState, start: int, ckpt, logger: _Logger, *,
            handle_sigint: bool = False) -> tuple[TrainState, int, bool, dict, Any]:
    """Train from ``start`` to ``config.steps`` (see module docstring). Returns (state, step,
    preempted, last logged record, signal number)."""
    cfg = run.config
    mesh = run.mesh
    local_bs = sharding.local_batch_size(cfg.batch_size, mesh)
    step_fn = jax.jit(steps_lib.build_train_step(run.model, cfg, run.method), donate_argnums=0,
                      out_shardings=(run.rep, run.rep))
    window: list[dict] = []
    last_rec: dict = {}
    last_m: dict = {}
    pending: list[tuple[int, dict]] = []
    pbar = logger.pbar
    mon = checkpointing.HealthMonitor(checkpointing.param_norm(state.params), factor=10.0,
                                      step=start or None, directory=run.workdir / "checkpoints")

    def stop_diverged(err: DivergenceError):
        ckpt.wait()       # the previous healthy (async) save must finish
        ckpt.close()
        logger.close()
        raise err

    def drain():
        """Fetch pending step diagnostics; stop on non-finite loss, grad norm or params."""
        while pending:
            s, m = pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not all(_finite(m[k]) for k in ("loss", "grad_norm", "param_norm") if k in m):
                good = mon.last_good_step
                where = (f"step {good} in {run.workdir / 'checkpoints'} (resume with --resume)"
                         if good is not None else "none (no healthy checkpoint was saved)")
                stop_diverged(DivergenceError(
                    f"non-finite training loss at step {s} (loss={m['loss']}, "
                    f"grad_norm={m['grad_norm']}, param_norm={m.get('param_norm')}); stopped. "
                    f"The last good checkpoint is {where}. Consider a lower lr (--set lr=...), "
                    f"warm-up (--set warmup_steps=...) or clipping (--set grad_clip=1.0)."))
            m["step"] = s
            last_m.clear()
            last_m.update(m)
            window.append(m)

    from jaxspec import distributed
    agree = distributed.StopAgreement()   # a signal seen by some processes stops all at one step
    preempted = False
    t_window = time.perf_counter()
    step = start
    with _Preemption(sigint=handle_sigint) as stop:
        it = (train_iterator(cfg, run.task, run.train_source, local_bs, start, mesh=mesh)
              if start < cfg.steps else iter(()))
        while step < cfg.steps:
            batch = shard_nested(next(it), mesh)
            state, m = step_fn(state, batch)
            drain()                               # previous step's diagnostics (one-step lag)
            step += 1
            pending.append((step, m))
            if pbar is not None:
                pbar.update(1)
            boundary_log = step % cfg.log_every == 0 or step == cfg.steps
            boundary_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0 \
                and step < cfg.steps
            stopping = agree.should_stop(stop.flag, step)
            boundary_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or stopping
            if boundary_log or boundary_eval or boundary_ckpt:
                drain()
            if boundary_log and window:
                dt = time.perf_counter() - t_window
                rec = {k: float(np.mean([w[k] for w in window])) for k in window[0]
                       if k != "step"}
                rec["steps_per_sec"] = len(window) / dt if dt > 0 else float("nan")
                rec["lr"] = window[-1]["lr"]
                last_rec = {"step": step, **rec}
                logger.write(step, rec)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['steps_per_sec']:.2f}")
                window.clear()
                t_window = time.perf_counter()
            if boundary_ckpt:
                pn = last_m.get("param_norm")
                if pn is None:
                    pn = checkpointing.param_norm(state.params)
                try:   # finite and not exploding relative to the last healthy checkpoint
                    mon.check(step, pn, loss=last_m.get("loss"), grad_norm=last_m.get("grad_norm"))
                except DivergenceError as err:
                    stop_diverged(err)
                ckpt.save(step, state.to_pytree(), {**run.meta_base(), "data_step": step,
                                                    "config": cfg.to_dict(), "param_norm": pn})
                mon.saved(step, pn)
            if boundary_eval:
                periodic(run, state, step, ckpt, logger)
                t_window = time.perf_counter()
            if stopping:
                preempted = True
                break
    drain()
    return state, step, preempted, last_rec, stop.signum


def final(run: Run, state: TrainState, step: int, ckpt, logger: _Logger, *,
          figures: int = 2) -> dict:
    """Final selection and evaluation (see module docstring); writes ``eval.json``."""
    cfg = run.config
    has_final_options = bool(cfg.eval_ensemble or cfg.adapt_steps)
    best = None
    variables = state.variables
    if ckpt is not None:
        res = validate(run, variables, keep=0 if has_final_options else figures)
        ckpt.save_best(step, variables, res["mean"], {**run.meta_base(), "step": step})
        ckpt.wait()
        best = ckpt.best_step()
        if best is not None and best != step:
            variables, _ = ckpt.restore_variables(variables)
            res = None
        if res is None or has_final_options:
            res = validate(run, variables, full=True, keep=figures)
    else:
        res = validate(run, variables, full=True, keep=figures)
    if run.main:
        from jaxspec.train import report
        report.write_eval_json(run.workdir / "eval.json", res, method=cfg.method,
                               dataset=dataset_name(cfg), split=cfg.eval_split, step=best,
                               checkpoint="best" if ckpt is not None else "none",
                               params=param_count(state.params), task=run.task.name,
                               select_metric=run.select, adapt=res.get("adapt"),
                               run_id=run.run_id)
        if figures and res["examples"]:
            report.save_figures(run.workdir / "figures", res["examples"])
        if logger.tb is not None:
            logger.tb.scalars(step, {f"final/{k}": v for k, v in res["mean"].items()})
    return {"best_step": best, "eval": res["mean"]}


def train_and_evaluate(config: Config, workdir: str | os.PathLike, *, resume: bool = True,
                       train_source=None, eval_source=None, tensorboard: bool = False,
                       progress: bool | None = None, final_eval: bool = True,
                       figures: int = 2, devices=None, handle_sigint: bool = False) -> dict:
    """Train ``config.method`` per ``config`` in ``workdir``; returns a summary dict.

    ``train_source`` / ``eval_source`` (random-access sequences of example dicts with the
    task's keys -- ``rgb``, ``hsi``, ``bands``, ``name`` -- or for ``config.streams`` a dict
    ``{stream: source}``) replace the config's dataset, e.g. for user data in a notebook.
    Summary keys: ``step``, ``start_step``, ``preempted``, ``final_loss``, ``best_step``,
    ``eval`` (mean validation metrics of the best checkpoint), ``params``.
    """
    hook = registry.get(config.method).before_training
    if hook is not None and train_source is None and eval_source is None:
        config = hook(config, Path(workdir), resume=resume, progress=progress, devices=devices,
                      handle_sigint=handle_sigint)
        if isinstance(config, dict):   # the hook's own run was interrupted: its summary
            return config
    run = prepare(config, workdir, train_source=train_source, eval_source=eval_source,
                  devices=devices)
    with WorkdirLock(run.workdir, enabled=run.main):
        check_workdir(run, resume)
        write_run_files(run)
        from jaxspec import distributed
        distributed.sync("jaxspec-run-files")   # no process starts before the checks passed
        return _train_locked(run, resume=resume, tensorboard=tensorboard, progress=progress,
                             final_eval=final_eval, figures=figures, handle_sigint=handle_sigint)


def _train_locked(run: Run, *, resume, tensorboard, progress, final_eval, figures,
                  handle_sigint) -> dict:
    state = init_state(run)
    summary: dict[str, Any] = {"params": param_count(state.params)}
    if not run.trains:   # parameter-free: evaluate only
        logger = _Logger(run, tensorboard, False, 0)
        summary.update(step=0, start_step=0, preempted=False, final_loss=None)
        if final_eval:
            summary.update(final(run, state, 0, None, logger, figures=figures))
        logger.close()
        return summary
    ckpt = make_checkpointer(run)
    from jaxspec import distributed
    # one run id for all processes (process 0's)
    run.run_id = distributed.broadcast_str(ckpt.run_id() or checkpointing.new_run_id())
    ckpt.reconcile(run.run_id)    # best/ of another (crashed, older) run is set aside
    state, start = restore(run, state, ckpt, resume)
    progress = run.main if progress is None else (progress and run.main)
    logger = _Logger(run, tensorboard, progress, start)
    state, step, preempted, last_rec, signum = iterate(run, state, start, ckpt, logger,
                                                       handle_sigint=handle_sigint)
    if logger.pbar is not None:
        logger.pbar.close()
        logger.pbar = None
    ckpt.wait()
    summary.update(step=step, start_step=start, preempted=preempted,
                   final_loss=last_rec.get("loss"))
    if preempted:
        log.warning("received signal %s: saved step %d to %s", signum, step, run.workdir)
    elif final_eval:
        summary.update(final(run, state, step, ckpt, logger, figures=figures))
    ckpt.close()
    logger.close()
    return summary
