"""Compile time of every registered method: full-size inference and the train step.

    python bench/compile_times.py                      # every method, paper crop/batch
    python bench/compile_times.py --methods mstpp acc --preset cpu

Per method, ahead-of-time (``jax.jit(f).lower(...).compile()``, nothing executed), built as
``bench/benchmark.py`` times it (its ``build_inference``/``build_train``: through the method's
task, so fusion methods get their LR-HSI + HR-MSI inputs and unpaired ones their streams):

* ``infer``: the forward on one 482x512 output (``--height/--width``), rounded up to the
  task's unit as inference does (RGB->HSI: one RGB image padded to the model's stride);
* ``train``: the engine's train step (``jaxspec.train.steps.build_train_step``, state donated)
  at the preset's crop and batch (``--preset paper``: the papers' 128x128x20 for MST++,
  64x64x20 for ACC); parameter-free methods (``step_kind="none"``) have none.

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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def compile_times(name: str, preset: str, height: int, width: int) -> dict:
    import jax

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import benchmark as bm

    from jaxspec.train import steps as steps_lib

    setup = bm.build_inference(name, preset, image=(height, width))
    cfg = setup["cfg"]
    out = {"method": name, "preset": cfg.preset, "task": setup["task"].name,
           "infer_input": list(setup["input"])}

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

    out["infer_lower_s"], out["infer_compile_s"] = timed(setup["apply"],
                                                         (setup["variables"], setup["x"]))
    out["infer_xla_gflops"] = timed.gflops   # loops (lax.map/scan) are counted once by XLA
    out["infer_cpu_s"] = timed.cpu_s
    if setup["method"].step_kind == steps_lib.NO_TRAINING:
        return out
    state, batch, step_fn, _ = bm.build_train(setup)
    out["train_crop"], out["train_batch"] = cfg.crop, cfg.batch_size
    out["train_lower_s"], out["train_compile_s"] = timed(step_fn, (state, batch),
                                                         donate_argnums=0)
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

    from jaxspec import registry
    names = a.methods or registry.names()
    for name in names:                      # names and presets checked before compiling
        registry.get(name).config(a.preset)
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
        train = ("no train step (parameter-free)" if "train_crop" not in r else
                 f"train {r['train_batch']}x{r['train_crop']}x{r['train_crop']}: lower "
                 f"{r['train_lower_s']:.1f} s + compile {r['train_compile_s']:.1f} s")
        cpu = f"CPU time infer {r['infer_cpu_s']:.1f} s" + (
            f", train {r['train_cpu_s']:.1f} s" if "train_cpu_s" in r else "")
        print(f"{name:8s} infer {r['infer_input'][0]}x{r['infer_input'][1]}: lower "
              f"{r['infer_lower_s']:.1f} s + compile {r['infer_compile_s']:.1f} s "
              f"({r['infer_xla_gflops']:.1f} XLA GFLOP) | {train} ({cpu}; load "
              f"{r['load']:.1f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=2))
    return 0


def cli(argv=None) -> int:
    """``python bench/compile_times.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/compile_times.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
