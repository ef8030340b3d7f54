"""Inference time of several methods on the same 482x512 input, timed alternately in one
process (method A, B, C, A, B, C, ...), and each one's ratio to the first: the speed goals
that are ratios (MCGA >= 2x faster than MST++, ACC <= 1.5x and CCNet <= 2x MST++'s time).

    python bench/infer_ratio.py --methods mstpp,mcga,acc,ccnet --reps 5

Each method is built as bench/benchmark.py builds it (its ``cpu`` preset on the CPU backend,
random weights and a random input; the time does not depend on the values), compiled and
run once before timing; the reported time is the median of ``--reps`` calls. Alternating
spreads any change of the machine's load over all methods alike, which back-to-back
benchmark rows do not.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="mstpp,mcga")
    p.add_argument("--preset", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--height", type=int, default=482)
    p.add_argument("--width", type=int, default=512)
    args = p.parse_args(argv)

    import jax

    from benchmark import build_inference
    names = [m for m in args.methods.split(",") if m]
    runs = {}
    for name in names:
        s = build_inference(name, args.preset, image=(args.height, args.width))
        fn = jax.jit(s["apply"]).lower(s["variables"], s["x"]).compile()
        jax.block_until_ready(fn(s["variables"], s["x"]))
        runs[name] = (fn, s["variables"], s["x"], s["input"])
    times = {n: [] for n in names}
    for _ in range(args.reps):
        for n in names:
            fn, v, x, _ = runs[n]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(v, x))
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    h, w = runs[names[0]][3]
    print(f"inference {h}x{w}, jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"median of {args.reps} alternating calls")
    print(f"{'method':<8} {'ms':>9} {'min ms':>9}  time / {names[0]}'s")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:<8} {med * 1e3:9.1f} {min(times[n]) * 1e3:9.1f}  {med / base:.3f}"
              + (f"  ({base / med:.2f}x faster)" if med < base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
