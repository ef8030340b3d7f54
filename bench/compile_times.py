"""Compile time of every registered RGB->HSI method: full-size inference and the train step.

    python bench/compile_times.py                      # every method, paper crop/batch
    python bench/compile_times.py --methods mstpp acc --preset cpu

Per method, ahead-of-time (``jax.jit(f).lower(...).compile()``, nothing executed):

* ``infer``: ``model.apply`` on one 482x512 RGB image (``--height/--width``), padded to the
  method's stride as inference does;
* ``train``: the engine's train step (``jaxspec.train.steps.build_train_step``, state donated)
  at the preset's crop and batch (``--preset paper``: the papers' 128x128x20 for MST++,
  64x64x20 for ACC).

Lowering (tracing to StableHLO) and XLA compilation are timed separately (the compiled
inference's XLA FLOP count is printed too; XLA counts a loop body once, so for models with
``lax.map``/``scan`` loops it is a lower bound); the target is
< 60 s each on a 2-core CPU. The 1-minute load average is printed with each line, since
compile time scales with contention on a shared machine. ``--json PATH`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compile_times(name: str, preset: str, height: int, width: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxspec import registry
    from jaxspec.train import steps as steps_lib
    from jaxspec.train.state import TrainState, init_variables

    method = registry.get(name)
    cfg = method.config(preset)
    model = method.model(cfg)
    s = method.stride
    h, w = -(-height // s) * s, -(-width // s) * s
    out = {"method": name, "preset": preset, "infer_input": [h, w],
           "train_crop": cfg.crop, "train_batch": cfg.batch_size}

    def timed(fn, args, **jit_kw):
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = jax.jit(fn, **jit_kw).lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        timed.gflops = float((cost or {}).get("flops", float("nan"))) / 1e9
        timed.cpu_s = time.process_time() - c0   # CPU time: less sensitive to contention
        return t1 - t0, t2 - t1

    variables = jax.eval_shape(lambda k: init_variables(model, k, (1, s * 8, s * 8, 3)),
                               jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    out["infer_lower_s"], out["infer_compile_s"] = timed(
        lambda v, x: model.apply(v, x, train=False), (variables, x))
    out["infer_xla_gflops"] = timed.gflops   # loops (lax.map/scan) are counted once by XLA
    out["infer_cpu_s"] = timed.cpu_s

    tx = steps_lib.make_optimizer_for(cfg, method)
    params = variables["params"]
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params),
                       model_state={k: v for k, v in variables.items() if k != "params"},
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32), apply_fn=model.apply, tx=tx)
    b, c = cfg.batch_size, cfg.crop
    batch = {"rgb": jax.ShapeDtypeStruct((b, c, c, 3), jnp.float32),
             "hsi": jax.ShapeDtypeStruct((b, c, c, 31), jnp.float32)}
    out["train_lower_s"], out["train_compile_s"] = timed(
        steps_lib.build_train_step(model, cfg, method), (state, batch), donate_argnums=0)
    out["train_cpu_s"] = timed.cpu_s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--preset", default="paper")
    p.add_argument("--height", type=int, default=482)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import _cli
    import jax

    from jaxspec import registry, tasks
    rgb2hsi = [n for n in registry.names() if tasks.of(registry.get(n)).name == "rgb2hsi"]
    names = a.methods or rgb2hsi
    for name in names:                      # names and presets checked before compiling
        registry.get(name).config(a.preset)
        if name not in rgb2hsi:
            raise _cli.UsageError(f"--methods: {name!r} is not an RGB->HSI method; this bench "
                                  f"times the rgb2hsi ones: {', '.join(rgb2hsi)}")
    _cli.positive("--height", a.height)
    _cli.positive("--width", a.width)
    if a.json:
        _cli.output_file(a.json, "--json")
    rows = []
    print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs")
    for name in names:
        r = compile_times(name, a.preset, a.height, a.width)
        r["load"] = os.getloadavg()[0]
        rows.append(r)
        print(f"{name:8s} infer {r['infer_input'][0]}x{r['infer_input'][1]}: lower "
              f"{r['infer_lower_s']:.1f} s + compile {r['infer_compile_s']:.1f} s "
              f"({r['infer_xla_gflops']:.1f} XLA GFLOP) | train "
              f"{r['train_batch']}x{r['train_crop']}x{r['train_crop']}: lower "
              f"{r['train_lower_s']:.1f} s + compile {r['train_compile_s']:.1f} s "
              f"(CPU time infer {r['infer_cpu_s']:.1f} s, train {r['train_cpu_s']:.1f} s; "
              f"load {r['load']:.1f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=2))
    return 0


def cli(argv=None) -> int:
    """``python bench/compile_times.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/compile_times.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
