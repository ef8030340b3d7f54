"""Benchmark every registered method: params, FLOPs, inference time, train throughput, memory.

    python bench/benchmark.py                       # all methods, preset cpu|paper by backend
    python bench/benchmark.py --methods mstpp --preset smoke
    python bench/benchmark.py --workdir mstpp=runs/mstpp   # + metrics of a trained run on CAVE
    python bench/benchmark.py --fusion-only --fusion bicubic --scales 8,32   # fusion table

Per method (each in a fresh subprocess so peak memory is its own):

* ``params``: entries of ``variables["params"]``.
* ``GFLOPs``: XLA ``cost_analysis()`` of one forward pass (multiply-add = 2 FLOPs) on a
  482x512 RGB image (padded to the method's stride, as inference does) and at the paper's
  FLOP input size (halved to compare with papers' MAC-based "FLOPs").
* ``infer ms``: median wall time of the jitted forward on one 482x512 image (after warm-up).
* ``train steps/s``: jitted train step at the preset's crop and batch on fixed random data
  (input pipeline excluded); ``train GFLOP/s`` = XLA FLOPs of the step x steps/s.
* ``peak mem``: ``peak_bytes_in_use`` of the accelerator, or the process's peak RSS on CPU.
* ``% of peak``: achieved forward GFLOP/s over the measured fp32 2048^2 matmul rate.

With ``--workdir method=path`` the best checkpoint of a trained run is evaluated on the real
CAVE scenes in ``../shared/data/cave/`` (beside the checkout; ``JAXSPEC_SHARED_DATA``
overrides) when present: reflectance = 16-bit PNG / 65535, RGB rendered linearly through the
SRF named by ``--srf`` (default ``cie1964``, the NTIRE 2020 Clean convention), then normalised
as the method was trained (``config.rgb_norm``); full 512x512 images, no crop border.
Every method goes through its task (``jaxspec.tasks``): the inputs are the task's (fusion:
LR-HSI + HR-MSI at the config's scale, output 482x512); parameter-free methods have no train
numbers. ``--fusion NAME`` (parameter-free) or ``--fusion NAME=WORKDIR`` scores a fusion method
at each of ``--scales`` on the CAVE scenes and on ``--fusion-dataset`` (validation split), pairs
synthesised by the method config's degradation (:func:`fusion_scores`).
Writes ``bench/results_<backend>.json`` and re-renders ``bench/RESULTS.md`` from every
``results_*.json`` there (one section per machine). A run without ``--workdir`` keeps the
earlier file's CAVE scores (with the environment they were measured in), one without
``--fusion`` its fusion rows. ``--worker-timeout S`` bounds each method's subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE = (482, 512)


def _timeit(fn, n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured fp32 GFLOP/s of an n x n matmul (2 n^3 FLOPs)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    dt = _timeit(lambda: f(a).block_until_ready(), reps, warmup=2)
    return 2 * n ** 3 / dt / 1e9


def peak_memory_bytes() -> tuple[int, str]:
    import jax
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _random_inputs(task, info, size, side_inputs, batch, seed):
    """Task inputs of output size ``size`` ((H, W) or int) with uniform values (srf/psf rows
    normalised like real ones)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shapes = task.input_shapes(info, size, batch=batch)
    out = {}
    for k in tuple(task.input_keys) + tuple(side_inputs):
        x = rng.random(shapes[k]).astype(np.float32)
        if k in ("srf", "psf"):
            x /= x.sum(axis=(1, 2) if k == "psf" else 1, keepdims=True)
        out[k] = x
    return out


def build_inference(name: str, preset: str | None = None, image=None) -> dict:
    """A method's inference as :func:`bench_method` times it: its preset (``cpu`` on the CPU
    backend, ``paper`` elsewhere, unless given), model, initialised variables, the pure
    ``apply(variables, inputs)`` and random inputs of ``image`` (default :data:`IMAGE`)
    rounded up to the task's unit."""
    import jax
    import jax.numpy as jnp

    from jaxspec import registry, tasks
    from jaxspec.train.state import init_variables

    preset = preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    method = registry.get(name)
    task = tasks.of(method)
    cfg = method.config(preset)
    cfg = tasks.resolve_config(cfg, method, tasks.info_from_config(cfg, method).bands,
                               where="preset")
    model = method.model(cfg)
    info = tasks.info_from_config(cfg, method)
    side = tuple(method.side_inputs)
    unit = task.unit(cfg, method.stride)
    image = image or IMAGE
    h, w = (-(-image[0] // unit) * unit, -(-image[1] // unit) * unit)
    args0, kw0 = task.example_inputs(info, -(-64 // unit) * unit, side)
    variables = jax.jit(lambda k: init_variables(model, k, inputs=args0, kwargs=kw0))(
        jax.random.PRNGKey(0))

    def apply(v, x):
        return tasks.split_output(task.apply(model.apply, v, x, side_inputs=side,
                                             train=False))[0]

    x = {k: jnp.asarray(v) for k, v in _random_inputs(task, info, (h, w), side, 1, 1).items()}
    return dict(method=method, task=task, cfg=cfg, model=model, info=info, side=side,
                variables=variables, apply=apply, x=x, input=(h, w))


def build_train(setup: dict):
    """The train step of a :func:`build_inference` setup as bench_method times it: ``(state,
    batch, step_fn, replicated sharding)``, state and a random batch of the preset's crop and
    batch size placed on a mesh of all devices; ``step_fn`` not yet jitted."""
    import jax
    import numpy as np

    from jaxspec.train import sharding, steps as steps_lib
    from jaxspec.train.state import create_train_state

    method, task, cfg, model, info, side = (setup[k] for k in
                                            ("method", "task", "cfg", "model", "info", "side"))
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    tx = steps_lib.make_optimizer_for(cfg, method)
    args, kwargs = task.example_inputs(info, cfg.crop, side)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), out_sharding=rep,
                               inputs=args, kwargs=kwargs)
    rng = np.random.default_rng(0)
    if cfg.streams:
        from jaxspec.train.loop import shard_nested
        batch = shard_nested(_stream_batch(cfg, info, rng), mesh)
        return state, batch, steps_lib.build_train_step(model, cfg, method), rep
    host = _random_inputs(task, info, cfg.crop, side, cfg.batch_size, 3)
    host[task.target_key] = _random_hsi(rng, (cfg.batch_size, cfg.crop, cfg.crop, info.bands))
    batch = sharding.shard_batch(host, mesh)
    return state, batch, steps_lib.build_train_step(model, cfg, method), rep


def _stream_batch(cfg, info, rng) -> dict:
    """A random ``{stream: batch}`` of ``config.streams`` (unpaired methods such as USSR): each
    stream's ``keys`` at the crop and the stream's batch size; ``rgb`` uniform, ``label``
    integers in [-1, n_classes) (-1: ignored), any other key :func:`_random_hsi`."""
    import numpy as np
    out = {}
    for name, spec in sorted(cfg.streams.items()):
        shape = (int(spec.get("batch_size", cfg.batch_size)), cfg.crop, cfg.crop)
        out[name] = {}
        for k in spec.get("keys", ()):
            if k == "label":
                n = int(dict(cfg.model).get("n_classes", 2))
                out[name][k] = rng.integers(-1, n, shape).astype(np.int32)
            elif k == "rgb":
                out[name][k] = rng.random(shape + (3,)).astype(np.float32)
            else:
                out[name][k] = _random_hsi(rng, shape + (info.bands,))
    return out


def _random_hsi(rng, shape):
    """A random HSI cube in [0.1, 0.9] (targets stay away from 0 for MRAE)."""
    import numpy as np
    return (rng.random(shape) * 0.8 + 0.1).astype(np.float32)


def bench_method(name: str, preset: str | None, reps: int) -> dict:
    """Params, FLOPs, inference time per IMAGE-sized output and train steps/s of one method,
    through its task (rgb2hsi: RGB in; hsi2hsi: HSI in; fusion: LR-HSI + HR-MSI at the
    config's scale; parameter-free ``step_kind="none"`` methods: no train numbers)."""
    import jax
    import jax.numpy as jnp

    from jaxspec.flops import count_flops
    from jaxspec.train import steps as steps_lib
    from jaxspec.train.state import param_count

    setup = build_inference(name, preset)
    method, task, cfg, model, info, side, variables, apply, x = (
        setup[k] for k in ("method", "task", "cfg", "model", "info", "side", "variables",
                           "apply", "x"))
    preset, (h, w) = cfg.preset, setup["input"]

    def flops_of(fn, *a):
        try:
            return count_flops(fn, *a)
        except ValueError:      # no floating-point op at all (e.g. nearest upsampling)
            return 0.0

    fwd = jax.jit(apply)
    flops = flops_of(apply, variables, x)
    out = {"method": name, "preset": preset, "task": task.name,
           "params": param_count(variables.get("params", {})),
           "paper_params_m": method.paper_params_m, "input": [h, w], "gflops": flops / 1e9}
    if method.paper_gflops_input:
        ph, pw = method.paper_gflops_input
        xp = {k: jnp.asarray(v) for k, v in
              _random_inputs(task, info, (ph, pw), side, 1, 2).items()}
        out["gflops_paper_input"] = flops_of(apply, variables, xp) / 1e9
        out["paper_gflops"] = method.paper_gflops
        out["paper_gflops_input"] = [ph, pw]
    t_inf = _timeit(lambda: fwd(variables, x).block_until_ready(), reps, warmup=1)
    out["infer_ms"] = t_inf * 1e3
    out["infer_gflops_per_s"] = flops / t_inf / 1e9 if flops else 0.0
    if method.step_kind == steps_lib.NO_TRAINING:
        out["peak_mem_bytes"], out["peak_mem_kind"] = peak_memory_bytes()
        return out

    state, batch, step_fn, rep = build_train(setup)
    step_flops = count_flops(step_fn, state, batch)
    step = jax.jit(step_fn, donate_argnums=0, out_shardings=(rep, rep))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    n_steps = max(3, reps * 2)
    t = time.perf_counter()
    for _ in range(n_steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    sps = n_steps / (time.perf_counter() - t)
    out.update(train_crop=cfg.crop, train_batch=cfg.batch_size, train_steps_per_s=sps,
               train_gflops_per_s=step_flops * sps / 1e9)
    out["peak_mem_bytes"], out["peak_mem_kind"] = peak_memory_bytes()
    return out


def shared_data_dir() -> Path:
    env = os.environ.get("JAXSPEC_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_cave(root: Path, srf_name: str):
    """Yield (name, hsi (512,512,31) reflectance, rgb linear) of every CAVE scene under root."""
    import numpy as np

    from jaxspec.data import readers
    from jaxspec.physics import get_srf
    srf = np.asarray(get_srf(srf_name), np.float32)
    firsts = sorted(root.glob("**/*_ms_01.png"))
    for f in firsts:
        scene = f.name[:-len("_ms_01.png")]
        bands = [readers.collapse_channels(readers.read_png16(f.parent / f"{scene}_ms_{i:02d}.png"))
                 for i in range(1, 32)]
        hsi = np.stack(bands, -1).astype(np.float32) / 65535.0
        yield scene, hsi, hsi @ srf


def _score_cave(predict_fn, normalization: str, srf_name: str, max_images: int | None,
                label: str, stride: int = 1, tile: int | None = None) -> dict | None:
    """Every metric of ``inference.evaluate_dataset`` (full images, padded to ``stride``, tiled
    when ``tile``) of ``predict_fn(rgb (1,H,W,3) normalised) -> (1,H,W,C)`` on the CAVE scenes,
    plus ``mrae_gt>0``."""
    import numpy as np

    from jaxspec import inference
    from jaxspec.data import normalize_rgb
    root = shared_data_dir() / "cave"
    if not root.is_dir():
        return None
    batches = []
    for i, (name, hsi, rgb) in enumerate(load_cave(root, srf_name)):
        if max_images is not None and i >= max_images:
            break
        batches.append({"rgb": normalize_rgb(rgb[None], normalization), "hsi": hsi[None],
                        "name": [name]})
    if not batches:
        return None
    res = inference.evaluate_dataset(predict_fn, batches, stride=stride, tile=tile,
                                     keep=len(batches))
    # CAVE reflectance has exact zeros (dark pixels): MRAE (no epsilon, NTIRE) is then inf;
    # report MRAE over the pixels with gt > 0 beside it
    for name, _, gt, pred in res["examples"]:
        ok = gt > 0
        res["per_image"][name]["mrae_gt>0"] = float(np.mean(np.abs(pred - gt)[ok] / gt[ok]))
    res["mean"]["mrae_gt>0"] = float(np.mean([m["mrae_gt>0"] for m in res["per_image"].values()]))
    return {"workdir": label, "srf": srf_name, "num_images": res["num_images"],
            "mean": res["mean"], "per_image": res["per_image"], "root": str(root)}


def cave_metrics(workdir: str, srf_name: str, max_images: int | None) -> dict | None:
    """A trained run (best checkpoint) on CAVE, full images padded to the model's stride."""
    from jaxspec import api, inference
    if not (shared_data_dir() / "cave").is_dir():
        return None
    model, variables = api.load(workdir)
    predict = inference.make_predict_fn(model.module.apply, variables)
    return _score_cave(predict, model.config.rgb_norm, srf_name, max_images, workdir,
                       stride=model.stride, tile=model.config.eval_tile)


def cave_least_squares(srf_name: str, max_images: int | None, normalization: str = "none",
                       pixels: int = 200_000) -> dict | None:
    """Reference: the linear least-squares map fitted on ``spectral_scenes`` train pixels (as in
    ``bench/baselines.py``), applied to CAVE."""
    from jaxspec import baselines as bl
    from jaxspec import data
    if not (shared_data_dir() / "cave").is_dir():
        return None
    train = data.data_source(data.builder("spectral_scenes"), "train")
    rgb, hsi = bl.sample_pixels((train[i] for i in range(len(train))), pixels, seed=0,
                                normalization=normalization)
    model = bl.fit_linear(rgb, hsi, 1e-6, normalization=normalization)
    return _score_cave(lambda x: bl.predict(model, x), normalization, srf_name, max_images,
                       f"least squares fitted on spectral_scenes train ({normalization} RGB)")


def fusion_scores(spec: str, scale: int, max_images: int | None, dataset: str = "cave"
                  ) -> dict | None:
    """A fusion method (``NAME`` parameter-free, or ``NAME=WORKDIR`` trained) evaluated through
    the fusion task at ``scale`` on ``dataset``: ``"cave"`` (the real scenes in
    ../shared/data/cave, reflectance / 65535, 400-700 nm) or a TFDS name (its validation split).
    Pairs are synthesised by the method config's ``fusion`` degradation with ``scale``
    replaced; metrics per image and their mean (``inference.evaluate_dataset(task=...)``)."""
    import numpy as np

    from jaxspec import api, inference, registry, tasks
    from jaxspec.physics import WAVELENGTHS_31
    from jaxspec.train import loop
    name, _, workdir = spec.partition("=")
    if workdir:
        model, variables = api.load(workdir)
    else:
        model = api.create_model(name, preset="cpu")
        if model.method.step_kind != "none":
            raise SystemExit(f"--fusion {name}: a trained method needs NAME=WORKDIR")
        variables = None
    fusion_cfg = {**dict(model.config.fusion), "scale": int(scale)}
    if dataset == "cave":
        root = shared_data_dir() / "cave"
        if not root.is_dir():
            return None
        source = [{"hsi": hsi, "bands": WAVELENGTHS_31, "name": n}
                  for i, (n, hsi, _) in enumerate(load_cave(root, "cie1964"))
                  if max_images is None or i < max_images]
        cfg = model.config.replace(fusion=fusion_cfg, dataset="cave", eval_crop_border=0)
    else:
        cfg = model.config.replace(fusion=fusion_cfg, dataset=dataset)
        source = loop.load_sources(cfg, [cfg.eval_split])[cfg.eval_split]
    method = registry.get(cfg.method)
    n_bands, _ = tasks.source_bands(source)
    cfg = tasks.resolve_config(cfg.replace(model={k: v for k, v in cfg.model.items()
                                                  if k != "scale"}, bands=None),
                               method, n_bands)
    module = method.model(cfg)
    bundle = api.Model(method=method, config=cfg, module=module)
    if variables is None:
        variables = bundle.init()
    side = tuple(method.side_inputs)
    predict = inference.make_task_predict_fn(bundle.task, module.apply, variables,
                                             side_inputs=side)
    res = inference.evaluate_dataset(
        predict, loop.eval_batches(cfg, source, method=method), stride=method.stride,
        tile=cfg.eval_tile, overlap=max(cfg.eval_tile_overlap // scale, 1) * scale
        if cfg.eval_tile else 0, max_images=max_images, task=bundle.task, scale=scale,
        side_inputs=side, crop_border=loop.protocol_crop_border(cfg))
    return {"method": spec, "scale": scale, "dataset": dataset, "num_images": res["num_images"],
            "mean": res["mean"], "per_image": res["per_image"],
            "degradation": fusion_cfg}


def _fusion_md(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r]
    if not rows:
        return []
    keys = ["psnr", "sam", "ergas", "uiqi", "ssim"]
    md = ["### Fusion (HSI super-resolution) through the fusion task", "",
          "Pairs synthesised from each HR cube (min-max normalised to [0, 1]) by the method's "
          "`config.fusion` degradation at the given scale; metrics on the full image (PSNR peak "
          "1, SAM degrees, ERGAS with 100/s), mean over images.", "",
          "| method | dataset | scale | images | " + " | ".join(keys) + " |",
          "|" + "---|" * (4 + len(keys))]
    for r in rows:
        md.append(f"| {r['method']} | {r['dataset']} | x{r['scale']} | {r['num_images']} | "
                  + " | ".join(f"{r['mean'][k]:.4f}" for k in keys) + " |")
    return md + [""]


def _worker(args) -> int:
    res = bench_method(args.worker, args.preset, args.reps)
    print("RESULT:" + json.dumps(res))
    return 0


def _md_table(rows, peak) -> str:
    head = ("| method | preset | params | GFLOPs 482x512 (XLA) | GFLOPs at paper input (XLA / 2) "
            "| paper | infer ms | GFLOP/s (% of matmul peak) | train crop x batch | train steps/s "
            "| train GFLOP/s | peak mem |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        paper = ""
        if r.get("paper_gflops") is not None:
            paper = f"{r.get('paper_params_m')} M, {r['paper_gflops']} G @ " \
                    f"{r['paper_gflops_input'][0]}x{r['paper_gflops_input'][1]}"
        gp = (f"{r['gflops_paper_input']:.2f} / {r['gflops_paper_input'] / 2:.2f}"
              if "gflops_paper_input" in r else "")
        train = ("no training (parameter-free) | - | -" if "train_crop" not in r else
                 f"{r['train_crop']}x{r['train_batch']} | {r['train_steps_per_s']:.2f} | "
                 f"{r['train_gflops_per_s']:.1f}")
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['params']:,} | {r['gflops']:.2f} | {gp} | "
            f"{paper} | {r['infer_ms']:.1f} | {r['infer_gflops_per_s']:.1f} "
            f"({100 * r['infer_gflops_per_s'] / peak:.0f}%) | {train} "
            f"| {r['peak_mem_bytes'] / 2**20:.0f} MiB ({r['peak_mem_kind']}) |")
    return "\n".join(lines)


def _render_section(results: dict) -> list[str]:
    peak, rows, cave = results["matmul_peak_gflops"], results["methods"], results.get("cave") or {}
    md = [f"## {results['environment']}", "",
          f"Measured matmul peak (2048x2048, float32 inputs at the backend's default precision): "
          f"**{peak:.1f} GFLOP/s**.", "", _md_table(rows, peak), ""]
    if cave:
        md += ["### Trained runs on real CAVE scenes", ""]
        cave_env = results.get("cave_environment", results["environment"])
        if cave_env != results["environment"]:
            md += [f"Scored with {cave_env}.", ""]
        for m, res in cave.items():
            if res is None:
                md.append(f"* {m}: CAVE data not found under {shared_data_dir() / 'cave'}; "
                          "skipped.")
                continue
            md.append(f"* **{m}** (`{res['workdir']}`): {res['num_images']} scenes from "
                      f"`{res['root']}`, RGB rendered from reflectance through SRF "
                      f"`{res['srf']}`, full 512x512, no crop border.")
            md.append("")
            keys = list(res["mean"])
            md.append("| scene | " + " | ".join(keys) + " |")
            md.append("|" + "---|" * (len(keys) + 1))
            for name, vals in res["per_image"].items():
                md.append(f"| {name} | " + " | ".join(f"{vals.get(k, float('nan')):.4f}"
                                                      for k in keys) + " |")
            md.append("| **mean** | " + " | ".join(f"**{res['mean'][k]:.4f}**" for k in keys)
                      + " |")
            md.append("")
        md.append("MRAE uses the NTIRE definition without epsilon, so scenes with zero-valued "
                  "reflectance pixels give inf; `mrae_gt>0` averages over pixels with gt > 0.")
        md.append("")
    md += _fusion_md(results.get("fusion") or [])
    return md


def render(results_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write ``out`` with one section per ``results_<backend>.json`` found in ``results_dir``
    (a run on a CPU and a run on a GPU each keep their own file, so neither overwrites the
    other)."""
    files = sorted(Path(results_dir).glob("results_*.json"))
    if not files:
        raise SystemExit(f"no results_*.json in {results_dir}")
    md = ["# Benchmark results", "",
          "Generated by `python bench/benchmark.py` on each machine (see its docstring for "
          "definitions); each backend's numbers live in `bench/results_<backend>.json`. XLA FLOPs "
          "count a multiply-add as 2; papers' \"FLOPs\" are MACs, so compare the paper figure "
          "with XLA/2. Train steps/s exclude the input pipeline. On GPUs, JAX runs float32 "
          "matmuls and convolutions at its default precision (TF32 on NVIDIA tensor cores), "
          "which is what the peak and the model rows measure.", ""]
    for f in files:
        md += _render_section(json.loads(f.read_text()))
    md.append(_GENERATED_END)
    Path(out).write_text("\n".join(md).rstrip() + "\n" + _kept_sections(out))


# Everything after this line in RESULTS.md is written by other bench commands or by hand and is
# kept when the generated part above it is re-rendered.
_GENERATED_END = "<!-- end of the part generated by bench/benchmark.py -->"


def _kept_sections(out: str | os.PathLike) -> str:
    """The hand-written/other-bench tail of an existing ``out``: what follows the generated
    part's end marker, or (files written before the marker existed) every ``## `` section whose
    heading is not a backend section of this command (those start with ``## jax ``)."""
    p = Path(out)
    if not p.exists():
        return ""
    text = p.read_text()
    if _GENERATED_END in text:
        rest = text.split(_GENERATED_END, 1)[1].strip()
        return "\n" + rest + "\n" if rest else ""
    parts = text.split("\n## ")
    kept = [q for q in parts[1:] if not q.startswith("jax ")]
    return ("\n" + "\n".join("## " + q.strip() + "\n" for q in kept)) if kept else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--preset", default=None, help="default: cpu on CPU, paper otherwise")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds per method's subprocess (default: none); a method that runs "
                        "longer gets an error row and the next one starts")
    p.add_argument("--workdir", action="append", default=[], metavar="METHOD=PATH",
                   help="trained run to evaluate on CAVE (repeatable)")
    p.add_argument("--srf", default="cie1964", help="SRF used to render CAVE RGB")
    p.add_argument("--max-cave", type=int, default=None)
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cave-only", action="store_true",
                   help="only (re)score --workdir runs on CAVE; keep this backend's model rows")
    p.add_argument("--fusion", action="append", default=[], metavar="METHOD[=WORKDIR]",
                   help="fusion method to score on CAVE and --fusion-dataset (repeatable)")
    p.add_argument("--scales", default="8,32", help="fusion scales, comma-separated")
    p.add_argument("--fusion-dataset", default="spectral_scenes",
                   help="TFDS dataset scored beside CAVE ('' = CAVE only)")
    p.add_argument("--fusion-only", action="store_true",
                   help="only (re)score --fusion methods; keep this backend's other rows")
    p.add_argument("--render-only", action="store_true",
                   help="re-write the markdown from bench/results_*.json (no measurements)")
    args = p.parse_args(argv)
    if args.worker_timeout is not None and not args.worker_timeout > 0:
        raise SystemExit(f"--worker-timeout must be > 0 seconds, got {args.worker_timeout:g}")
    if args.worker:
        return _worker(args)
    if args.render_only:
        render(Path(args.out).parent, args.out)
        print(f"wrote {args.out}")
        return 0

    # the parent measures the matmul peak and each method runs in a subprocess: no process may
    # grab most of an accelerator's memory up front (XLA's default), or the next one cannot start
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from jaxspec import registry
    names = args.methods.split(",") if args.methods else registry.names()
    for n in names:
        registry.get(n)     # unknown names fail early with the list of methods
    results_file = Path(args.out).parent / f"results_{jax.default_backend()}.json"
    previous = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.cave_only or args.fusion_only:
        if not previous:
            raise SystemExit(f"--cave-only/--fusion-only need an earlier full run: "
                             f"{results_file} not found")
        peak, rows, names = previous["matmul_peak_gflops"], previous["methods"], []
    else:
        peak, rows = matmul_peak(), []
    for n in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", n,
               "--reps", str(args.reps)] + (["--preset", args.preset] if args.preset else [])
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                               timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            rows.append({"method": n, "error": f"timed out after {args.worker_timeout:g} s "
                                               f"(--worker-timeout)"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        res = [l for l in r.stdout.splitlines() if l.startswith("RESULT:")]
        if r.returncode or not res:
            rows.append({"method": n, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(res[-1][len("RESULT:"):]))
        print(json.dumps(rows[-1]), flush=True)
    cave = {}
    for spec in args.workdir:
        if "=" not in spec:
            raise SystemExit(f"--workdir expects METHOD=PATH, got {spec!r}")
        m, path = spec.split("=", 1)
        cave[m] = cave_metrics(path, args.srf, args.max_cave)
    if cave:
        cave["least squares"] = cave_least_squares(args.srf, args.max_cave)
    kept_cave = not cave and bool(previous.get("cave"))
    if kept_cave:   # no --workdir: the earlier run's CAVE scores stay, with their environment
        cave = previous["cave"]
    fusion = [] if args.fusion else list(previous.get("fusion") or [])
    for spec in args.fusion:
        for scale in (int(x) for x in args.scales.split(",") if x):
            for ds in ["cave"] + ([args.fusion_dataset] if args.fusion_dataset else []):
                r = fusion_scores(spec, scale, args.max_cave, ds)
                if r is not None:
                    fusion.append(r)
                    print(json.dumps({k: r[k] for k in ("method", "dataset", "scale",
                                                        "mean")}), flush=True)

    dev = jax.devices()[0]
    env = (f"jax {jax.__version__}, backend {jax.default_backend()} "
           f"({getattr(dev, 'device_kind', dev.platform)}), {os.cpu_count()} CPU cores, "
           f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    # --cave-only keeps the model rows of the earlier run, so their heading keeps its jax
    # version; the CAVE scores record the environment they were measured in
    results = {"environment": previous["environment"] if args.cave_only else env,
               "matmul_peak_gflops": peak, "methods": rows, "cave": cave,
               "cave_environment": (previous.get("cave_environment", previous.get("environment"))
                                    if kept_cave else env),
               "fusion": fusion}
    results_file.write_text(json.dumps(results, indent=2))
    render(Path(args.out).parent, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from jaxspec.errors import run_cli
    sys.exit(run_cli(main, prog="bench/benchmark.py"))
