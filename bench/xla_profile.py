"""Where a method's time goes: per-module and per-op self time of its compiled inference (or
train step) from a ``jax.profiler`` trace.

    python bench/xla_profile.py --method mcga                 # 482x512 inference, cpu preset
    python bench/xla_profile.py --method mstpp --train        # one train step at the preset's crop
    python bench/xla_profile.py --method acc --depth 4 --top 30

The program is compiled once, run ``--warmup`` times, then ``--reps`` times under
``jax.profiler.trace``. Every event of the trace whose name is an HLO instruction of the
compiled program (the runtime's thunks: fusions, convolutions, dots, YNNPACK fusions...;
not ``while``/``conditional``, whose bodies' thunks are listed themselves) is charged to the
Flax module path of its ``op_name`` metadata (``.../ganet/dec0_block0/gqa/...`` cut to
``--depth`` scopes below the model), and the script prints milliseconds per call by
module and the ``--top`` instructions with their source op, kind and shape. Times are wall
time of the thunk on its thread: with several threads they can add up to more than the wall
time of the call (the total line says how much of the call the listed thunks cover).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s"
                    r"(?P<op>[\w\-]+)\(.*?(?:op_name=\"(?P<op_name>[^\"]*)\")?")
_META = re.compile(r'op_name="([^"]*)"')
#: control flow whose thunk spans the thunks of its body (counted there, not twice)
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def hlo_index(hlo_text: str) -> dict[str, dict]:
    """Instruction name -> {op, shape, op_name} of every instruction of an HLO module text
    (fusions carry the op_name of their root, called computations their own)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        meta = _META.search(line)
        out[m["name"]] = {"op": m["op"], "shape": m["shape"].strip()[:60],
                          "op_name": meta.group(1) if meta else ""}
    return out


def module_path(op_name: str, depth: int) -> str:
    """``jit(step)/jvp(MCGA)/ganet/dec0_block0/gqa/dot_general`` -> the module scopes (Flax
    module names; transformation wrappers such as ``jvp(...)``/``transpose(...)`` dropped,
    ``transpose`` kept as a marker of the backward pass), cut to ``depth``."""
    if not op_name:
        return "(no op_name)"
    parts = op_name.split("/")[1:-1]        # drop jit(...) and the primitive
    backward = any(p.startswith("transpose(") for p in op_name.split("/"))
    scopes = []
    for p in parts:
        inner = p
        while re.match(r"^\w+\(.*\)$", inner):      # transpose(jvp(Net)) -> Net
            inner = re.sub(r"^\w+\((.*)\)$", r"\1", inner)
        if inner and not inner.startswith(("jit", "pjit", "vmap", "remat", "checkpoint",
                                            "while", "body", "cond", "scan")):
            scopes.append(inner)
    path = "/".join(scopes[:depth]) or "(top level)"
    return path + (" [bwd]" if backward else "")


def trace_events(logdir: str) -> list[dict]:
    files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no trace written under {logdir}")
    data = json.load(gzip.open(max(files, key=os.path.getmtime)))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def profile(fn, args, *, reps: int, warmup: int, depth: int) -> dict:
    """Run the jitted ``fn(*args)`` under the profiler; per-module and per-instruction self
    time (ms per call)."""
    import jax

    compiled = fn.lower(*args).compile()
    index = hlo_index(compiled.as_text())
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(compiled(*args))
        wall = (time.perf_counter() - t0) / reps
        jax.profiler.stop_trace()
        events = trace_events(logdir)
    by_module: dict[str, float] = collections.defaultdict(float)
    by_instr: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e["name"]
        if name not in index or index[name]["op"] in _CONTAINERS:
            continue
        ms = e["dur"] / 1e3 / reps
        by_instr[name] += ms
        by_module[module_path(index[name]["op_name"], depth)] += ms
    return {"wall_ms": wall * 1e3, "thunk_ms": sum(by_instr.values()), "modules": by_module,
            "instructions": by_instr, "index": index}


def report(r: dict, top: int) -> str:
    lines = [f"wall {r['wall_ms']:.1f} ms per call; thunks listed: {r['thunk_ms']:.1f} ms "
             f"(summed over threads)", "", "ms/call  share  module"]
    total = r["thunk_ms"] or 1.0
    for mod, ms in sorted(r["modules"].items(), key=lambda kv: -kv[1]):
        if ms / total < 0.005:
            continue
        lines.append(f"{ms:8.2f} {100 * ms / total:5.1f}%  {mod}")
    lines += ["", f"top {top} instructions:", "ms/call  share  kind            shape / source op"]
    for name, ms in sorted(r["instructions"].items(), key=lambda kv: -kv[1])[:top]:
        i = r["index"][name]
        src = "/".join(i["op_name"].split("/")[-4:])
        lines.append(f"{ms:8.2f} {100 * ms / total:5.1f}%  {i['op']:<15} {i['shape']}  {src}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--preset", default=None, help="default: cpu on the CPU backend, else paper")
    p.add_argument("--train", action="store_true", help="profile one train step instead")
    p.add_argument("--height", type=int, default=482)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--depth", type=int, default=3, help="module scopes to group by")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)

    import jax

    from benchmark import build_inference
    setup = build_inference(args.method, args.preset, image=(args.height, args.width))
    if args.train:
        from benchmark import build_train
        state, batch, step_fn, rep = build_train(setup)
        cfg = setup["cfg"]
        fn = jax.jit(step_fn, out_shardings=(rep, rep))
        fargs = (state, batch)
        what = f"train step, crop {cfg.crop} x batch {cfg.batch_size}"
    else:
        fn, fargs = jax.jit(setup["apply"]), (setup["variables"], setup["x"])
        what = "inference {}x{}".format(*setup["input"])
    r = profile(fn, fargs, reps=args.reps, warmup=args.warmup, depth=args.depth)
    print(f"{args.method} ({setup['cfg'].preset} preset), {what}, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print(report(r, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
