"""Classical HSI-MSI fusion baselines (bicubic, GSA, CNMF) under the DAEM degradation protocol.

For every HR cube (the six CAVE scenes in ``../shared/data/cave`` when present, and the
``spectral_scenes`` validation split), at each scale s and PSF protocol:

1. the cube is min-max normalised to [0, 1] (DAEM ``ProcessCave.py``: one min and max per
   cube) -- all metrics are on this [0, 1] data (PSNR peak 1 = the papers' x255 / peak 255);
2. LR-HSI = ``physics.daem_degrade`` with a DAEM PSF of size k = s (zero-free valid
   correlation, stride s), HR-MSI = cube @ the ``daem_nikon`` SRF (31 x 3); no noise;
   protocol ``consistent``: PSF 5 for every image (DAEM ``setting.json``: ``hsi_5``);
   ``image-wise``: PSF ``i mod 6`` for image i;
3. each method fuses the pair knowing the SRF and the PSF (GSA, CNMF) -- bicubic uses only the
   PSF centroid for alignment;
4. per-image PSNR, SAM (deg), ERGAS (100/s), UIQI (8x8), SSIM from ``jaxspec.metrics``; the
   table shows the mean over images and the seconds per image (after compilation).

    python bench/fusion.py                          # full table (CPU: ~15 min)
    python bench/fusion.py --scales 8 --max-images 2 --methods bicubic,gsa
    python bench/fusion.py --engine                 # through the fusion task (see below)

``--engine`` measures the registered methods (``jaxspec.models.fusion_classical``) the way
learned fusion methods are measured: ``jaxspec.train.train_and_evaluate`` (``step_kind="none"``:
evaluation only) on the same cubes, with the pairs synthesised by the fusion task
(``jaxspec.data.fusion``: ``config.fusion = {scale, psf="daem", daem_index=5, srf, protocol}``,
its min-max normalisation, DAEM kernels of size s with U(-0.2, 0.2) pixel noise, padded to
the odd size s+1 and applied as reflect blur + phase-0 decimation) and scored by the task's
metrics; the table reads ``eval.json``.

Results go to ``bench/fusion_results.json`` (``--out``; ``--engine``:
``bench/fusion_results_engine.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxspec import fusion_baselines as fb
from jaxspec import metrics, physics

METRICS = ("psnr", "sam", "ergas", "uiqi", "ssim")
METHODS = ("bicubic", "gsa", "cnmf", "lr_regression")
ENGINE_METHODS = ("bicubic", "gsa", "cnmf")      # registered (--method NAME) fusion baselines
PROTOCOLS = ("consistent", "image-wise")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="8,32")
    p.add_argument("--methods", default=None,
                   help=f"default {','.join(METHODS)} ({','.join(ENGINE_METHODS)} with --engine)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--datasets", default="cave,spectral_scenes")
    p.add_argument("--cave-dir", default=None, help="default: <shared>/data/cave")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--srf", default="daem_nikon")
    p.add_argument("--cnmf-iters", type=int, default=200)
    p.add_argument("--cnmf-endmembers", type=int, default=30)
    p.add_argument("--engine", action="store_true",
                   help="evaluate the registered methods through the fusion task")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _shared_data() -> Path | None:
    env = os.environ.get("JAXSPEC_SHARED_DATA")
    here = Path(__file__).resolve()
    # ../shared/data beside the checkout, or one level up (worktrees under <root>/wt/<name>)
    for c in ([Path(env)] if env else []) + [here.parents[2] / "shared" / "data",
                                              here.parents[3] / "shared" / "data"]:
        if c.is_dir():
            return c
    return None


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def cave_cubes(root: Path, limit=None, raw=False):
    from jaxspec.data import load_builder_module

    cave = load_builder_module("cave")
    scenes = sorted(cave.find_scenes(root).items())[:limit]
    for name, folder in scenes:
        cube = cave.load_scene(folder, name)
        yield name, (cube if raw else minmax(cube))


def scenes_cubes(limit=None, raw=False):
    from jaxspec import data

    src = data.data_source("spectral_scenes", "validation")
    n = len(src) if limit is None else min(limit, len(src))
    for i in range(n):
        ex = src[i]
        yield ex["name"].decode() if isinstance(ex["name"], bytes) else str(ex["name"]), \
            (ex["hsi"] if raw else minmax(ex["hsi"]))


def evaluate_engine(cubes, scales, methods, protocols, srf_name, args):
    """The same table through ``train_and_evaluate`` of the registered methods."""
    import tempfile

    from jaxspec import registry
    from jaxspec.train import train_and_evaluate

    cubes = list(cubes)
    bands = physics.WAVELENGTHS_31
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in scales:
            src = [{"hsi": np.asarray(z[:(z.shape[0] // s) * s, :(z.shape[1] // s) * s],
                                      np.float32), "bands": bands, "name": name}
                   for name, z in cubes]
            for prot in protocols:
                fusion = dict(scale=s, psf="daem", daem_index=5, srf=srf_name,
                              protocol="consistent" if prot == "consistent" else "imagewise",
                              normalize="minmax")
                for m in methods:
                    model = {"iters": args.cnmf_iters,
                             "n_endmembers": args.cnmf_endmembers} if m == "cnmf" else {}
                    cfg = registry.get(m).config("cpu", max_eval_images=None, eval_tile=None,
                                                 eval_crop_border=0, fusion=fusion)
                    cfg = cfg.replace(model={**dict(cfg.model), **model})
                    wd = Path(tmp) / f"{m}_x{s}_{prot}"
                    t = time.perf_counter()
                    train_and_evaluate(cfg, str(wd), train_source=src, eval_source=src,
                                       figures=0, progress=False)
                    dt = (time.perf_counter() - t) / len(src)
                    ev = json.loads((wd / "eval.json").read_text())
                    per = ev["per_image"]
                    r = {k: [float(per[n][k]) for n in per] for k in METRICS}
                    r["names"] = list(per)
                    r["seconds"] = [dt]
                    res[(s, prot, m)] = r
                    print(f"  x{s} {prot} {m}: psnr {np.mean(r['psnr']):.2f}", file=sys.stderr,
                          flush=True)
    return res


def run_method(method, lr, msi, s, srf, psf, args):
    center = fb.psf_lr_center(psf, s)
    if method == "bicubic":
        return fb.bicubic(lr, s, lr_center=center)
    if method == "gsa":
        return fb.gsa(lr, msi, s, psf)
    if method == "lr_regression":
        return fb.lr_regression(lr, msi, s, psf)
    if method == "cnmf":
        return fb.cnmf(lr, msi, s, srf, psf, n_endmembers=args.cnmf_endmembers,
                       iters=args.cnmf_iters)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def evaluate(cubes, scales, methods, protocols, srf, args):
    """{(scale, protocol, method): {metric: [per image], "seconds": [...]}}"""
    res: dict = {}
    warm: set = set()
    for i, (name, z) in enumerate(cubes):
        for s in scales:
            h, w = (z.shape[0] // s) * s, (z.shape[1] // s) * s
            zc = z[None, :h, :w]
            for prot in protocols:
                idx = 5 if prot == "consistent" else i % 6
                psf = np.asarray(physics.daem_psf(idx, s))
                lr, msi = physics.make_sr_pair(zc, psf, s, srf, mode="daem")
                for m in methods:
                    key = (s, prot, m)
                    if (s, m, zc.shape) not in warm:       # compile outside the timing
                        run_method(m, lr, msi, s, srf, psf, args).block_until_ready()
                        warm.add((s, m, zc.shape))
                    t = time.perf_counter()
                    out = run_method(m, lr, msi, s, srf, psf, args).block_until_ready()
                    dt = time.perf_counter() - t
                    sc = metrics.evaluate_all(out, zc, scale=float(s))
                    r = res.setdefault(key, {k: [] for k in METRICS + ("seconds", "names")})
                    for k in METRICS:
                        r[k].append(float(sc[k][0]))
                    r["seconds"].append(dt)
                    r["names"].append(name)
        print(f"  {name} done", file=sys.stderr, flush=True)
    return res


def table(title, res) -> str:
    lines = [f"**{title}**", "",
             "| scale | PSF protocol | method | PSNR | SAM | ERGAS | UIQI | SSIM | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (s, prot, m), r in sorted(res.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                METHODS.index(kv[0][2]))):
        vals = [np.mean(r[k]) for k in METRICS]
        lines.append(f"| x{s} | {prot} | {m} | {vals[0]:.2f} | {vals[1]:.2f} | {vals[2]:.3f} | "
                     f"{vals[3]:.3f} | {vals[4]:.3f} | {np.mean(r['seconds']):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import _cli
    args = parse_args(argv)
    # every option checked before the first image is loaded
    scales = _cli.ints("--scales", args.scales, minimum=2)
    choices = ENGINE_METHODS if args.engine else METHODS
    methods = _cli.names("--methods", args.methods or ",".join(choices), choices)
    protocols = _cli.names("--protocols", args.protocols, PROTOCOLS)
    _cli.names("--datasets", args.datasets, ("cave", "spectral_scenes"))
    _cli.positive("--max-images", args.max_images)
    _cli.positive("--cnmf-iters", args.cnmf_iters)
    _cli.positive("--cnmf-endmembers", args.cnmf_endmembers)
    srf = physics.get_srf(args.srf)
    dest = args.out or str(Path(__file__).with_name(
        "fusion_results_engine.json" if args.engine else "fusion_results.json"))
    _cli.output_file(dest, "--out")
    out: dict = {"settings": vars(args), "results": {}}
    for ds in args.datasets.split(","):
        if ds == "cave":
            root = Path(args.cave_dir) if args.cave_dir else (
                (_shared_data() or Path("/nonexistent")) / "cave")
            if not root.is_dir():
                print(f"CAVE scenes not found at {root}: skipped (pass --cave-dir)")
                continue
            cubes, title = cave_cubes(root, args.max_images, args.engine), f"CAVE ({root})"
        elif ds == "spectral_scenes":
            cubes, title = (scenes_cubes(args.max_images, args.engine),
                            "spectral_scenes validation")
        else:
            raise AssertionError(ds)  # checked above
        if args.engine:
            res = evaluate_engine(cubes, scales, methods, protocols, args.srf, args)
            title += ", fusion task (train_and_evaluate)"
        else:
            res = evaluate(cubes, scales, methods, protocols, srf, args)
        n = len(next(iter(res.values()))["names"]) if res else 0
        print(table(f"{title}, {n} images, SRF {args.srf}, known PSF/SRF", res), flush=True)
        print()
        out["results"][ds] = {f"x{s}/{p}/{m}": r for (s, p, m), r in res.items()}
    Path(dest).write_text(json.dumps(out, indent=1))
    return out


def cli(argv=None) -> int:
    """``python bench/fusion.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/fusion.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
