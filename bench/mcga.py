"""MCGA, both stages on one budget: train stage 1 (``mcga_vq``) then stage 2 (``mcga``, codebooks
and decoder copied from stage 1 and frozen), print the validation metrics beside the
least-squares baseline (bench/baselines.json), parameter counts and the codebook usage of the
stage-1 model over the validation images (dead codes = codewords no validation pixel uses).

    python bench/mcga.py --workdir /tmp/mcga                # cpu presets (built-in data)
    python bench/mcga.py --workdir /tmp/mcga --preset smoke --set steps=20
    python bench/mcga.py --workdir /tmp/mcga --adapt-steps 3  # + test-time adaptation at the end

Nothing is cached: rerunning trains again (resuming the workdirs if they exist).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from jaxspec import registry
from jaxspec.configs import mcga as mcga_cfg
from jaxspec.configs.base import apply_overrides
from jaxspec.train import train_and_evaluate

METRICS = ("mrae", "rmse", "psnr", "sam")


def param_count(variables) -> dict:
    p = variables["params"]
    out = {k: int(sum(np.size(a) for a in jax.tree.leaves(v))) for k, v in p.items()}
    out["total"] = int(sum(out.values()))
    return out


def codebook_usage(workdir, max_images: int | None = None) -> list[dict]:
    """Per scale: codes used by the stage-1 encoder over the validation images, perplexity."""
    import jaxspec
    from jaxspec.train import loop
    model, variables = jaxspec.load(workdir)
    cfg = model.config
    src = loop.load_sources(cfg, [cfg.eval_split])[cfg.eval_split]
    net = model.module
    num = cfg.model["num_codes"]
    counts = None

    @jax.jit
    def codes(v, hsi):
        def f(mod, x):
            _, infos = mod.encoder(mod.mask(x, False), mod.moc)
            return [inf["idx"] for inf in infos]
        return net.apply(v, hsi, method=f)

    n = len(src) if max_images is None else min(len(src), max_images)
    for i in range(n):
        hsi = np.asarray(src[i]["hsi"], np.float32)[None]
        m = 2 ** cfg.model["scales"]
        hsi = hsi[:, : hsi.shape[1] // m * m, : hsi.shape[2] // m * m]
        idx = codes(variables, hsi)
        c = [np.bincount(np.asarray(a).reshape(-1), minlength=num) for a in idx]
        counts = c if counts is None else [a + b for a, b in zip(counts, c)]
    out = []
    for s, c in enumerate(counts, start=1):
        p = c / c.sum()
        out.append({"scale": s, "used": int((c > 0).sum()), "dead": int((c == 0).sum()),
                    "perplexity": float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--preset", default="cpu", help="cpu | smoke | paper (both stages)")
    ap.add_argument("--set", action="append", default=[], help="override for both stages")
    ap.add_argument("--adapt-steps", type=int, default=0, help="TTA steps in stage 2's eval")
    args = ap.parse_args(argv)
    import _cli
    wd = Path(args.workdir)
    registry.get("mcga").config(args.preset)       # unknown preset: one line, exit 2
    _cli.positive("--adapt-steps", args.adapt_steps, minimum=0)
    _cli.output_dir(wd, "--workdir")
    cfg1 = apply_overrides(registry.get("mcga_vq").config(args.preset), args.set)
    if train_and_evaluate(cfg1, wd / "stage1").get("preempted"):
        print("interrupted in stage 1; run the same command again to resume", file=sys.stderr)
        return 143
    cfg2 = apply_overrides(registry.get("mcga").config(args.preset), args.set)
    cfg2 = mcga_cfg.stage2(cfg2, wd / "stage1").replace(adapt_steps=args.adapt_steps)
    if train_and_evaluate(cfg2, wd / "stage2").get("preempted"):
        print("interrupted in stage 2; run the same command again to resume", file=sys.stderr)
        return 143

    import jaxspec
    ev1 = json.loads((wd / "stage1" / "eval.json").read_text())["mean"]
    ev2 = json.loads((wd / "stage2" / "eval.json").read_text())["mean"]
    base = json.loads((Path(__file__).parent / "baselines.json").read_text())["results"]["linear"]
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    print("| least squares (bench/baselines.json) | "
          + " | ".join(f"{base[k]:.4g}" for k in METRICS) + " |")
    print(f"| MCGA stage 2 ({args.preset}{', TTA' if args.adapt_steps else ''}) | "
          + " | ".join(f"{ev2[k]:.4g}" for k in METRICS) + " |")
    print(f"| stage-1 autoencoder (HSI -> HSI, not comparable) | "
          + " | ".join(f"{ev1[k]:.4g}" for k in METRICS) + " |")
    for name in ("stage1", "stage2"):
        _, v = jaxspec.load(wd / name)
        print(f"params {name}: {param_count(v)}")
    for row in codebook_usage(wd / "stage1"):
        print(f"codebook scale {row['scale']}: {row['used']} used, {row['dead']} dead, "
              f"perplexity {row['perplexity']:.1f}")
    return 0


def cli(argv=None) -> int:
    """``python bench/mcga.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/mcga.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
