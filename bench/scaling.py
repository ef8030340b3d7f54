"""Scaling benchmark on simulated CPU devices: steps/s and per-device memory of the real train
step against the device count, weak scaling (per-device batch fixed) and strong scaling
(global batch fixed).

    python bench/scaling.py --method acc --preset smoke --devices 1,2,4,8 \
        --per-device-batch 2 --global-batch 8 --steps 5

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count
=n``). The step is the loop's (``jaxspec.scale.build``: ``steps.build_train_step`` jitted with
the state donated, batch over ``'data'``); memory is ``compiled.memory_analysis()`` of the
per-device program (arguments + outputs - aliases + temporaries). Simulated devices share the
host's cores, so on a CPU the steps/s of n devices measure the partitioning overhead, not a
speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from jaxspec import scale
    n = jax.device_count()
    gb = args.global_batch if args.mode == "strong" else args.per_device_batch * n
    step, state_spec, batch_spec, cfg = scale.build(args.method, jax.devices(), global_batch=gb,
                                                    preset=args.preset, crop=args.crop)
    rng = np.random.default_rng(0)

    def concrete(s):
        if np.issubdtype(s.dtype, np.floating):
            x = (rng.standard_normal(s.shape) * 0.02).astype(s.dtype)
        elif s.dtype == np.uint32 and s.shape == (2,):
            x = np.asarray([0, 1], np.uint32)
        else:
            x = np.zeros(s.shape, s.dtype)
        return jax.device_put(x, s.sharding)

    def batch_of(spec):
        def leaf(s):
            if np.issubdtype(s.dtype, np.floating):
                x = rng.uniform(0.1, 0.9, s.shape).astype(s.dtype)
            else:
                x = np.zeros(s.shape, s.dtype)
            return jax.device_put(x, s.sharding)
        return jax.tree.map(leaf, spec)

    t0 = time.perf_counter()
    compiled = step.lower(state_spec, batch_spec).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)
    state = jax.tree.map(concrete, state_spec)
    batches = [batch_of(batch_spec) for _ in range(2)]
    for i in range(2):   # warm-up
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return {"mode": args.mode, "devices": n, "global_batch": gb, "per_device_batch": gb / n,
            "steps_per_s": args.steps / dt, "examples_per_s": args.steps * gb / dt,
            "mem_per_device_mib": per_dev / 2**20, "compile_s": t_compile,
            "method": args.method, "preset": args.preset, "crop": cfg.crop}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="acc")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--per-device-batch", type=int, default=2, help="weak scaling")
    p.add_argument("--global-batch", type=int, default=8, help="strong scaling")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="weak,strong")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="weak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    print("| mode | devices | global batch | per-device batch | steps/s | examples/s | "
          "memory / device (MiB) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            if mode == "strong" and args.global_batch % n:
                continue
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--method", args.method,
                   "--preset", args.preset, "--per-device-batch", str(args.per_device_batch),
                   "--global-batch", str(args.global_batch), "--steps", str(args.steps)]
            if args.crop:
                cmd += ["--crop", str(args.crop)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {mode} | {n} | {row['global_batch']} | {row['per_device_batch']:g} | "
                  f"{row['steps_per_s']:.2f} | {row['examples_per_s']:.1f} | "
                  f"{row['mem_per_device_mib']:.1f} | {row['compile_s']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
