"""Robustness of trained rgb2hsi runs under the protocols of :mod:`jaxspec.robustness`.

Rows are methods (``--workdir NAME=PATH``, repeatable), plus a ``NAME + TTA`` row for each
method whose registry entry has an ``adapt_loss`` (MCGA); columns are the clean evaluation
and each protocol; cells are PSNR (dB) / SAM (deg) / MRAE, the mean over the images of
``jaxspec.evaluate`` (the run's own split, metrics and crop border). Each run is loaded
once (:func:`jaxspec.evaluate.prepare`) and scored under every protocol.

    nice -n 10 python bench/robustness.py --workdir acc=runs/acc --workdir mcga=runs/mcga \\
        --max-images 10 --adapt-steps 3

Prints the table, writes every number (and the command) to ``--json`` (default
``bench/robustness_results.json``) and the table into ``--results`` (default
``bench/RESULTS.md``) between its own markers, replacing an earlier table of this script and
keeping everything else in the file. The per-protocol eval JSONs go to ``--eval-dir`` (default:
a temporary directory), never into the workdirs. Exit codes (docs/reliability.md): 0 done, 2 a
bad option (one line naming it, before anything is loaded), 4 a workdir without a usable
checkpoint, 6 an output that cannot be written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- begin bench/robustness.py -->"
END = "<!-- end bench/robustness.py -->"
DEFAULT_PROTOCOLS = "brightness+10,brightness-10,mixed,noise,jpeg,srf:nikon_d5100"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/robustness.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="trained rgb2hsi run (repeatable); NAME labels its row")
    p.add_argument("--protocols", default=DEFAULT_PROTOCOLS,
                   help=f"comma-separated --perturb names (default {DEFAULT_PROTOCOLS})")
    p.add_argument("--max-images", type=int, default=None, help="first N images of the split")
    p.add_argument("--split", default=None, help="default: each run's eval split")
    p.add_argument("--seed", type=int, default=0, help="seed of the random protocols")
    p.add_argument("--adapt-steps", type=int, default=3,
                   help="TTA steps of the '+ TTA' rows (methods with an adapt_loss)")
    p.add_argument("--adapt-lr", type=float, default=None, help="default: each run's adapt_lr")
    p.add_argument("--no-tta", action="store_true", help="no '+ TTA' rows")
    p.add_argument("--json", default=str(HERE / "robustness_results.json"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"),
                   help="markdown file whose bench/robustness.py section is (re)written; '' = none")
    p.add_argument("--eval-dir", default=None, help="where the eval JSONs go (default: a tmp dir)")
    return p.parse_args(argv)


def _runs(specs) -> list[tuple[str, Path]]:
    from jaxspec.errors import InputNotFoundError, UsageError
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--workdir expects NAME=PATH, got {spec!r}")
        if not (Path(path) / "config.json").is_file():
            raise InputNotFoundError(f"--workdir {spec}: not a jaxspec workdir (no config.json)")
        if name in [n for n, _ in out]:
            raise UsageError(f"--workdir: the name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def measure(runs, protocols, *, max_images, split, seed, adapt_steps, adapt_lr, tta,
            eval_dir: Path) -> list[dict]:
    """One row per (method[, TTA]): ``{"row", "method", "workdir", "tta", "cells": {column:
    {"mean": metrics, "num_images", "seconds"}}}``."""
    from jaxspec import evaluate
    rows = []
    for name, workdir in runs:
        run = evaluate.prepare(workdir, split=split,
                               adapt_steps=adapt_steps if tta else None, adapt_lr=adapt_lr)
        variants = [False] + ([True] if tta and run.model.method.adapt_loss is not None else [])
        for adapt in variants:
            row = {"row": name + (" + TTA" if adapt else ""), "method": run.model.method.name,
                   "workdir": str(workdir), "tta": adapt, "cells": {}}
            if adapt:
                row["adapt"] = {"steps": run.cfg.adapt_steps, "lr": run.cfg.adapt_lr,
                                "params": list(run.cfg.adapt_params)}
            for col in ["clean"] + list(protocols):
                t = time.time()
                perturb = None if col == "clean" else col
                tag = f"{name}_{col.replace(':', '-')}{'_tta' if adapt else ''}"
                res = evaluate.evaluate_workdir(workdir, prepared=run, perturb=perturb,
                                                perturb_seed=seed, adapt=adapt,
                                                max_images=max_images, figures=0,
                                                out=eval_dir / f"{tag}.json")
                row["cells"][col] = {"mean": res["mean"], "num_images": res["num_images"],
                                     "seconds": round(time.time() - t, 2)}
                print(json.dumps({"row": row["row"], "column": col,
                                  **{k: round(res["mean"][k], 4) for k in
                                     ("psnr", "sam", "mrae")},
                                  "seconds": row["cells"][col]["seconds"]}), flush=True)
            row["split"], row["dataset"] = run.split, res["dataset"]
            rows.append(row)
    return rows


def table(rows, columns) -> str:
    """Markdown: rows x (clean + protocols), cells ``PSNR / SAM / MRAE``."""
    lines = ["| method | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            m = r["cells"][c]["mean"]
            cells.append(f"{m['psnr']:.2f} / {m['sam']:.2f} / {m['mrae']:.3f}")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(result: dict) -> str:
    """The RESULTS.md section (between :data:`BEGIN` and :data:`END`)."""
    rows, cols = result["rows"], result["columns"]
    n = sorted({c["num_images"] for r in rows for c in r["cells"].values()})
    ds = sorted({f"{r['dataset']} {r['split']}" for r in rows})
    tta = [r for r in rows if r["tta"]]
    lines = [BEGIN, f"## Robustness protocols (issue 14 item 5): `python bench/robustness.py`, "
             f"{result['date']}", "",
             f"{', '.join(ds)}, {'/'.join(map(str, n))} images per cell, seed {result['seed']}; "
             f"cells PSNR (dB) / SAM (deg) / MRAE, mean over images. Protocols: "
             f"docs/robustness.md. {result['machine']}.", "",
             "```", result["command"], "```", "", table(rows, cols), ""]
    if tta:
        lines += ["TTA rows: " + "; ".join(
            f"{r['row']}: {r['adapt']['steps']} Adam steps at lr {r['adapt']['lr']:g} on "
            f"{r['adapt']['params'] or 'all parameters'}" for r in tta) + ".", ""]
    lines.append(END)
    return "\n".join(lines)


def write_section(path: str | Path, text: str) -> None:
    """Replace this script's section of ``path`` (or append it); the rest of the file is kept."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text + tail
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    p.write_text(new)


def main(argv=None) -> dict:
    import _cli

    from jaxspec import robustness
    args = parse_args(argv)
    runs = _runs(args.workdir)
    protocols = [v.strip() for v in args.protocols.split(",") if v.strip()]
    if not protocols:
        _cli.names("--protocols", "", robustness.names())
    for v in protocols:
        robustness.parse(v)
    if len(set(protocols)) != len(protocols):
        from jaxspec.errors import UsageError
        raise UsageError(f"--protocols: a protocol is given twice ({args.protocols!r})")
    _cli.positive("--max-images", args.max_images)
    _cli.positive("--adapt-steps", args.adapt_steps)
    json_path = _cli.output_file(args.json, "--json")
    if args.results:
        _cli.output_file(args.results, "--results")
    eval_dir = (_cli.output_dir(args.eval_dir, "--eval-dir") if args.eval_dir
                else Path(tempfile.mkdtemp(prefix="jaxspec_robustness_")))
    import os
    import platform

    import jax
    t0 = time.time()
    rows = measure(runs, protocols, max_images=args.max_images, split=args.split,
                   seed=args.seed, adapt_steps=args.adapt_steps, adapt_lr=args.adapt_lr,
                   tta=not args.no_tta, eval_dir=eval_dir)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/robustness.py " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "machine": f"jax {jax.__version__}, backend {jax.default_backend()}, "
                   f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "seed": args.seed, "columns": ["clean"] + protocols, "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "protocols": {p: robustness.parse(p).record(args.seed) for p in protocols},
    }
    print()
    print(table(rows, result["columns"]))
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if args.results:
        write_section(args.results, section(result))
    return result


def cli(argv=None) -> int:
    """``python bench/robustness.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/robustness.py")(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(cli())
