"""Closed-form RGB -> HSI baselines on a jaxspec dataset (default: spectral_scenes).

Fits per-pixel linear and root-polynomial (degree 2 and 3) regressions on pixels sampled from
the train split, with the same RGB normalisation as the learned models (``Config.rgb_norm``),
and scores them on the full validation images (per-image metrics, mean over images).

    python bench/baselines.py                       # default config, prints a markdown table
    python bench/baselines.py --config real --pixels 400000 --out /tmp/b.json
    python bench/baselines.py --dataset cave --manual-dir DIR --consistent   # as evaluate's

``--consistent`` projects every prediction onto the spectra that reproduce its input RGB
through the example's SRF (``jaxspec.physics.make_consistent``), as ``python -m
jaxspec.evaluate --consistent`` does for a trained run.

Writes ``bench/baselines.json`` (per-method mean metrics + settings) by default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxspec import baselines as bl
from jaxspec import metrics
from jaxspec.tasks import mrae_pos
from jaxspec.configs.base import CPU_BUILTIN

# the cpu presets train on linear RGB (``none``): the baselines use the same input by default;
# ``--normalization minmax`` gives the MST++ per-image min-max variant
DEFAULT_NORM = CPU_BUILTIN["rgb_norm"]
TABLE_METRICS = ("mrae", "rmse", "psnr", "sam", "ssim", "ergas", "uiqi", "mrae_pos")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="spectral_scenes")
    p.add_argument("--config", default=None, help="builder config (default: the builder's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--manual-dir", default=None,
                   help="manually downloaded files of a real dataset (as train.py)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="validation")
    p.add_argument("--pixels", type=int, default=200_000, help="training pixels sampled")
    p.add_argument("--ridge", type=float, default=1e-6, help="per-pixel ridge lambda")
    p.add_argument("--normalization", default=DEFAULT_NORM, help="RGB normalisation mode")
    p.add_argument("--crop-border", type=int, default=0)
    p.add_argument("--max-eval-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--consistent", action="store_true",
                   help="make predictions reproduce their input RGB through the data's SRF "
                        "(linear RGB, --normalization none)")
    p.add_argument("--out", default=str(Path(__file__).with_name("baselines.json")))
    return p.parse_args(argv)


def _examples(source, limit=None):
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        yield source[i]


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxspec import data, physics
    if args.consistent and args.normalization != "none":
        raise SystemExit("--consistent needs the linear RGB itself (--normalization none), got "
                         f"{args.normalization!r}")

    name = args.dataset if args.config is None else f"{args.dataset}/{args.config}"
    t0 = time.perf_counter()
    builder = data.builder(name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    # datasets without a validation split evaluate on test, as train.py does (logged)
    args.eval_split = data.resolve_eval_split(builder, args.eval_split)
    train = data.data_source(builder, args.train_split)
    val = data.data_source(builder, args.eval_split)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    rgb, hsi = bl.sample_pixels(_examples(train), args.pixels, seed=args.seed,
                                normalization=args.normalization)
    t_sample = time.perf_counter() - t0

    fits = {
        "linear": lambda: bl.fit_linear(rgb, hsi, args.ridge, normalization=args.normalization),
        "root_poly2": lambda: bl.fit_root_polynomial(rgb, hsi, 2, args.ridge,
                                                     normalization=args.normalization),
        "root_poly3": lambda: bl.fit_root_polynomial(rgb, hsi, 3, args.ridge,
                                                     normalization=args.normalization),
    }
    val_examples = list(_examples(val, args.max_eval_images))
    results = {}
    for method, fit in fits.items():
        t0 = time.perf_counter()
        model = fit()
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_image = {k: [] for k in TABLE_METRICS}
        for ex in val_examples:
            pred = bl.predict(model, np.asarray(ex["rgb"], np.float32)[None])
            if args.consistent:
                if "srf" not in ex:
                    raise SystemExit(f"--consistent: {args.dataset} examples carry no 'srf'")
                pred = physics.make_consistent(pred, np.asarray(ex["rgb"], np.float32)[None],
                                               ex["srf"])
            m = metrics.evaluate_all(pred, np.asarray(ex["hsi"], np.float32)[None],
                                     crop_border=args.crop_border)
            c = args.crop_border
            gt = np.asarray(ex["hsi"], np.float32)[None]
            sl = (slice(None), slice(c, -c or None), slice(c, -c or None))
            m["mrae_pos"] = mrae_pos(np.asarray(pred)[sl], gt[sl])   # MRAE over gt > 0
            for k in TABLE_METRICS:
                per_image[k].append(float(m[k][0]))
        t_eval = time.perf_counter() - t0
        results[method] = {
            **{k: float(np.mean(v)) for k, v in per_image.items()},
            "median": {k: float(np.median(v)) for k, v in per_image.items()},
            "n_features": model.n_features, "fit_s": round(t_fit, 3),
            "eval_s": round(t_eval, 3),
        }

    report = {
        "dataset": name, "train_split": args.train_split, "eval_split": args.eval_split,
        "dataset_version": str(builder.version), "n_train_images": len(train), "n_eval_images": len(val_examples),
        "n_bands": int(hsi.shape[1]), "train_pixels": int(len(rgb)), "ridge": args.ridge,
        "normalization": args.normalization, "crop_border": args.crop_border,
        "consistent": args.consistent,
        "seed": args.seed, "prepare_s": round(t_data, 2), "sample_s": round(t_sample, 2),
        "metrics": "per-image values averaged over the eval images (jaxspec.metrics)",
        "results": results,
    }
    print(f"{name}: fit on {len(rgb)} pixels of {len(train)} {args.train_split} images, "
          f"scored on {len(val_examples)} full {args.eval_split} images "
          f"(RGB normalisation {args.normalization!r}, ridge {args.ridge:g}"
          f"{', predictions made consistent with the RGB' if args.consistent else ''})\n")
    print("| method | features | " + " | ".join(k.upper() for k in TABLE_METRICS) + " |")
    print("|---|---|" + "---|" * len(TABLE_METRICS))
    for method, r in results.items():
        print(f"| {method} | {r['n_features']} | "
              + " | ".join(f"{r[k]:.4f}" for k in TABLE_METRICS) + " |")
    print("\nmedian over images: " + "; ".join(
        f"{m} MRAE {r['median']['mrae']:.4f}, SAM {r['median']['sam']:.2f}"
        for m, r in results.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    from jaxspec.errors import run_cli

    def _cli(argv=None) -> int:   # main returns its results; the command exits 0
        main(argv)
        return 0
    sys.exit(run_cli(_cli, sys.argv[1:], prog="bench/baselines.py"))
