"""Run a small grid of training variants of one method and tabulate their validation metrics.

Each trial is ``python train.py --method M --preset P --set k=v ...`` in its own workdir, so a
trial is exactly what a user would run; trials run ``--jobs`` at a time (on an accelerator
several small trials share the device). Prints a markdown table (final validation metrics of
each trial's best checkpoint, from its ``eval.json``, plus wall time) and writes
``<out>/sweep.json``.

    python bench/sweep.py --method mstpp --preset cpu \\
        --trial "base:" --trial "none-l1:rgb_norm=none,loss=l1" --trial "lr2e-3:lr=2e-3"

A trial is ``NAME:key=value,key=value`` (keys as in ``--set``; use ``;`` instead of ``,`` if a
value contains commas). ``--common k=v`` applies to every trial.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxspec.errors import UsageError  # noqa: E402
TABLE = ("mrae", "rmse", "psnr", "sam", "ssim")


def parse_trial(spec: str) -> tuple[str, list[str]]:
    if ":" not in spec:
        raise UsageError(f"--trial expects NAME:key=value,..., got {spec!r}")
    name, rest = spec.split(":", 1)
    sep = ";" if ";" in rest else ","
    sets = [s.strip() for s in rest.split(sep) if s.strip()]
    for s in sets:
        if "=" not in s:
            raise UsageError(f"trial {name!r}: {s!r} is not key=value")
    return name.strip(), sets


def run_trial(name: str, sets: list[str], args) -> dict:
    workdir = Path(args.out) / name
    cmd = [sys.executable, str(REPO / "train.py"), "--method", args.method, "--no-progress",
           "--workdir", str(workdir)]
    if args.preset:
        cmd += ["--preset", args.preset]
    for s in list(args.common) + sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    with open(Path(args.out) / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    rec = {"name": name, "sets": sets, "rc": rc, "wall_s": round(wall, 1)}
    ev = workdir / "eval.json"
    if rc == 0 and ev.exists():
        e = json.loads(ev.read_text())
        rec["metrics"] = e["mean"]
        rec["best_step"] = e.get("step")
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--preset", default=None)
    p.add_argument("--trial", action="append", default=[], required=True)
    p.add_argument("--common", action="append", default=[], help="key=value for every trial")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    import _cli

    from jaxspec import registry
    from jaxspec.configs.base import apply_overrides
    trials = [parse_trial(t) for t in args.trial]
    if len({n for n, _ in trials}) != len(trials):
        raise UsageError("trial names must be unique")
    _cli.positive("--jobs", args.jobs)
    # the method, preset and every trial's overrides are checked before the first trial runs
    method = registry.get(args.method)
    base = method.config(args.preset or "cpu")
    for name, sets in trials:
        apply_overrides(base, list(args.common) + list(sets))
    _cli.output_dir(args.out, "--out")
    if args.jobs > 1:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    done: dict[str, dict] = {}

    def dump():  # after every finished trial, so a killed sweep keeps what it measured
        recs = [done[n] for n, _ in trials if n in done]
        out = {"method": args.method, "preset": args.preset, "common": args.common,
               "trials": recs}
        (Path(args.out) / "sweep.json").write_text(json.dumps(out, indent=2))
        return recs

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_trial, n, sets, args) for n, sets in trials]
        for f in as_completed(futures):
            rec = f.result()
            done[rec["name"]] = rec
            dump()
            print(json.dumps(rec), flush=True)
    recs = dump()
    print(f"| trial | overrides | best step | " + " | ".join(TABLE) + " | wall s |")
    print("|" + "---|" * (len(TABLE) + 4))
    for r in recs:
        m = r.get("metrics")
        vals = (" | ".join(f"{m[k]:.4f}" for k in TABLE) if m
                else " | ".join(["failed (rc %d)" % r["rc"]] + [""] * (len(TABLE) - 1)))
        print(f"| {r['name']} | {', '.join(r['sets']) or '(preset)'} | {r.get('best_step', '')} "
              f"| {vals} | {r['wall_s']} |")
    return 0 if all(r["rc"] == 0 for r in recs) else 1


def cli(argv=None) -> int:
    """``python bench/sweep.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/sweep.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
