"""USSR on real CAVE scenes: the unpaired baselines, least squares fitted with pairs, and
(optionally) a short unpaired USSR training, scored as the paper (PSNR per band, SSIM, SAM).

    python bench/ussr.py                          # baselines only (seconds)
    python bench/ussr.py --train-steps 300        # + unpaired USSR training on spectral_scenes
    python bench/ussr.py --workdir runs/ussr      # + a run trained by train.py --method ussr
    python bench/ussr.py --stability [--workdir W]  # ||J_ij|| of G (docs/lipschitz.md)

Data:

* test: the six CAVE scenes in ``../shared/data/cave`` (``JAXSPEC_SHARED_DATA`` overrides),
  reflectance = PNG / 65535, RGB rendered linearly through the **test camera** (``--test-srf``,
  default the paper's Nikon D700 from the Jiang 2013 database, columns normalised to sum 1 as
  the dictionary; nikon_d5100 when the database is absent);
* unpaired training data (only for the learned/selected parts): ``spectral_scenes`` (clean)
  ``train`` split, RGB stream = its first half rendered through random dictionary cameras
  (so the RGB camera is unknown to the method), HSI stream = the cubes of the second half.

Methods (none of the unpaired rows sees a CAVE scene or an RGB/HSI pair):

* ``min-norm (true SRF)`` / ``smooth (true SRF)``: ``min_norm_inverse`` / ``smooth_inverse``
  with the test camera's SRF (an oracle: an unsupervised method does not know it);
* ``min-norm (dictionary mean)`` / ``smooth (dictionary mean)``: the same with the mean SRF of
  the dictionary (no knowledge of the camera);
* the smooth inverse's lambda is chosen from the HSI stream alone (``select_smooth_lambda``);
* ``least squares (paired)``: RGB -> 31 linear map fitted on 200k pixels of spectral_scenes
  pairs rendered through the test camera (needs pairs; the paired reference);
* ``ussr`` (``--train-steps``): ``make_train_step`` for that many iterations at ``--crop`` /
  ``--batch``, E1 pre-trained on the RGB stream's material labels, then applied to the full
  CAVE images; ``--workdir`` scores the best checkpoint of a ``train.py --method ussr`` run
  the same way (plus its SRF estimates against the test camera).
Writes ``bench/ussr_results.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def shared_data_dir() -> Path:
    env = os.environ.get("JAXSPEC_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def camspec_path() -> Path | None:
    env = os.environ.get("JAXSPEC_CAMSPEC_DATABASE")
    p = Path(env) if env else shared_data_dir() / "camera_ssf" / "jiang2013_camspec" / \
        "camspec_database.txt"
    return p if p.is_file() else None


def load_cave_cubes(root: Path):
    from jaxspec.data import readers
    for f in sorted(root.glob("**/*_ms_01.png")):
        scene = f.name[:-len("_ms_01.png")]
        bands = [readers.collapse_channels(readers.read_png16(f.parent / f"{scene}_ms_{i:02d}.png"))
                 for i in range(1, 32)]
        yield scene, np.stack(bands, -1).astype(np.float32) / 65535.0


def score(pred_fn, cubes, srf) -> dict:
    import jax.numpy as jnp

    from jaxspec.models import ussr as U
    per = {}
    for name, hsi in cubes:
        rgb = (hsi @ srf).astype(np.float32)[None]
        pred = np.asarray(pred_fn(jnp.asarray(rgb)), np.float32)
        m = U.paper_metrics(jnp.asarray(pred), jnp.asarray(hsi[None]))
        per[name] = {k: float(v[0]) for k, v in m.items()}
    mean = {k: float(np.mean([p[k] for p in per.values()])) for k in ("psnr", "ssim", "sam")}
    return {"mean": mean, "per_image": per}


def spectral_scenes_streams(n_rgb: int | None = None):
    from jaxspec import data as D
    src = D.data_source(D.builder("spectral_scenes"), "train")
    n = len(src)
    half = n // 2
    rgb_ids = range(0, half if n_rgb is None else min(half, n_rgb))
    rgb_stream = [src[i] for i in rgb_ids]
    hsi_stream = [src[i]["hsi"] for i in range(half, n)]
    return rgb_stream, hsi_stream


def train_ussr(args, dictionary, rgb_stream, hsi_stream, log):
    import jax
    import jax.numpy as jnp

    from jaxspec.models import ussr as U
    rng = np.random.default_rng(args.seed)
    curves = dictionary.curves
    # the RGB stream: each scene through a random dictionary camera (camera unknown to USSR)
    cams = rng.integers(0, len(curves), len(rgb_stream))
    rgbs = np.stack([ex["hsi"] @ curves[c] for ex, c in zip(rgb_stream, cams)]).astype(np.float32)
    labels = np.stack([ex["label"] for ex in rgb_stream]).astype(np.int32)
    cubes = np.stack(hsi_stream).astype(np.float32)
    t0 = time.time()
    e1 = U.fit_segmenter(rgbs, labels, n_classes=13, steps=args.segmenter_steps,
                         crop=args.crop, seed=args.seed, log=log)
    log(f"E1 pre-training: {time.time() - t0:.0f} s")
    model = U.USSR(srf_dictionary=str(dictionary.source), n_classes=13)
    opts = U.make_optimizers(args.train_steps)
    c, b = args.crop, args.batch

    def batch_at():
        i = rng.integers(0, len(rgbs), b)
        j = rng.integers(0, len(cubes), b)
        ys, xs = rng.integers(0, rgbs.shape[1] - c + 1, (2, b))
        ys2, xs2 = rng.integers(0, cubes.shape[1] - c + 1, (2, b))
        return {"rgb": jnp.asarray(np.stack([rgbs[k, y:y + c, x:x + c] for k, y, x in zip(i, ys, xs)])),
                "label": jnp.asarray(np.stack([labels[k, y:y + c, x:x + c] for k, y, x in zip(i, ys, xs)])),
                "hsi_real": jnp.asarray(np.stack([cubes[k, y:y + c, x:x + c] for k, y, x in zip(j, ys2, xs2)]))}

    first = batch_at()
    state = U.init_train_state(model, opts, jax.random.PRNGKey(args.seed), first["rgb"],
                               first["hsi_real"], e1_variables=e1)
    step = jax.jit(U.make_train_step(model, opts, U.make_phase_losses()), donate_argnums=0)
    t0 = time.time()
    for t in range(args.train_steps):
        state, met = step(state, first if t == 0 else batch_at())
        if t == 0:
            jax.block_until_ready(met)
            log(f"first step (compile): {time.time() - t0:.0f} s")
            t0 = time.time()
        if t % 50 == 0 or t == args.train_steps - 1:
            m = {k: float(v) for k, v in met.items()}
            if not all(np.isfinite(list(m.values()))):
                raise FloatingPointError(f"non-finite loss at step {t}: {m}")
            log(f"step {t}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
    log(f"{args.train_steps - 1} steps after the first: {time.time() - t0:.0f} s")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    apply = jax.jit(lambda v, x: model.apply(v, x, method=U.USSR.reconstruct))
    return model, variables, apply


def stability(size: int = 10, seed: int = 0, workdir: str | None = None) -> str:
    """Exact Jacobian blocks of USSR's generator (docs/lipschitz.md): one back-projection
    refinement step ``Y -> Y + G_1(X - C_o Y)`` as a band-to-band map (31 x 31 blocks
    ``||J_ij||_2``, mean against ``|i - j|``), and the whole generator ``X -> Y`` (31 x 3
    blocks), on a smooth ``size x size`` 31-band map in [0, 1] rendered through the dictionary
    mean SRF (the generator is bias-free and positively homogeneous, so the input's scale does
    not change J). Seeded random initialisation, or the generator of a ``train.py --method
    ussr`` run (``workdir``, best checkpoint)."""
    import jax
    import jax.numpy as jnp

    from jaxspec.analysis import exact_block_norms, synthetic_feature_map
    from jaxspec.models import ussr as U

    y = jnp.asarray(synthetic_feature_map(size, size, 31, seed=seed, value_range=(0.0, 1.0)))
    db = camspec_path()
    c_o = jnp.asarray(U.load_srf_dictionary(str(db) if db else "builtin").curves.mean(0))
    x = jnp.einsum("bhwc,ck->bhwk", y, c_o)
    gen = U.Generator(31, 4)
    if workdir is None:
        gvars = gen.init(jax.random.PRNGKey(seed), x, c_o)
        what = f"seeded random init (seed {seed})"
    else:
        import jaxspec
        _, v = jaxspec.load(workdir)
        gvars = {"params": v["params"]["hsiG"]}
        what = f"the generator of {workdir} (best checkpoint)"
    stage = U.GeneratorStage(31, mean_sub=True)
    s1 = {"params": gvars["params"]["stages_1"]}
    refine = exact_block_norms(
        lambda z: z + stage.apply(s1, x - jnp.einsum("bhwc,ck->bhwk", z, c_o)), y)
    whole = exact_block_norms(lambda r: gen.apply(gvars, r, c_o)[0], x)     # (31, 3)
    i, j = np.indices(refine.shape)
    dists = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 30]
    off = refine[i != j]
    # the off-diagonal blocks pass through the camera's 3 channels: J_ij = -D_i C_o(j)^T, so
    # column j should scale with the SRF weight of band j
    col = np.array([refine[np.arange(31) != jj, jj].mean() for jj in range(31)])
    corr = float(np.corrcoef(col, np.asarray(c_o).sum(1))[0, 1])
    lines = [f"USSR generator, {what}; {size}x{size} smooth 31-band map in [0, 1] rendered "
             "through the dictionary-mean SRF (bench/ussr.py --stability).", "",
             "Refinement step Y -> Y + G_1(X - C_o Y), mean ||J_ij||_2 over |i - j| = d:", "",
             "| d | " + " | ".join(str(d) for d in dists) + " |",
             "|" + "---|" * (len(dists) + 1),
             "| mean | " + " | ".join(f"{refine[np.abs(i - j) == d].mean():.3g}"
                                     for d in dists) + " |", "",
             f"off-diagonal blocks: max {off.max():.3g}, mean {off.mean():.3g}; correlation of "
             f"a column's mean off-diagonal norm with the band's total SRF weight: {corr:.2f}",
             "", "Whole generator X -> Y, ||J_ic||_2 (rows: bands 400, 450, ..., 700 nm):", "",
             "| band | R | G | B |", "|---|---|---|---|"]
    for b in range(0, 31, 5):
        lines.append(f"| {400 + 10 * b} | " + " | ".join(f"{v:.3g}" for v in whole[b]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--test-srf", default=None, help="camera name in the Jiang 2013 database "
                   "(default Nikon D700) or a built-in SRF name")
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--workdir", default=None, help="a train.py --method ussr run to score")
    p.add_argument("--segmenter-steps", type=int, default=200)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baselines", action="store_true",
                   help="reuse the baseline rows of an earlier --out file")
    p.add_argument("--out", default=str(HERE / "ussr_results.json"))
    p.add_argument("--stability", action="store_true",
                   help="print the generator's Jacobian blocks (docs/lipschitz.md) and exit")
    args = p.parse_args(argv)
    import _cli
    from jaxspec.errors import DataNotFoundError, UsageError
    for opt in ("train_steps", "segmenter_steps", "seed"):
        _cli.positive("--" + opt.replace("_", "-"), getattr(args, opt), minimum=0)
    _cli.positive("--crop", args.crop)
    _cli.positive("--batch", args.batch)
    if args.workdir is not None and not (Path(args.workdir) / "config.json").is_file():
        raise UsageError(f"--workdir {args.workdir}: not a training workdir (no config.json)")
    if args.stability:
        print(stability(seed=args.seed, workdir=args.workdir))
        return 0
    _cli.output_file(args.out, "--out")

    import jax.numpy as jnp

    from jaxspec import baselines as B
    from jaxspec import physics
    from jaxspec.models import ussr as U

    log = lambda s: print(s, flush=True)
    cave_root = shared_data_dir() / "cave"
    if not cave_root.is_dir():
        raise DataNotFoundError(f"CAVE scenes not found under {cave_root} (set "
                                f"JAXSPEC_SHARED_DATA to the folder holding cave/)")
    db = camspec_path()
    dictionary = U.load_srf_dictionary(str(db) if db else "builtin")
    names = list(dictionary.names)
    test_name = args.test_srf or ("Nikon D700" if db else "nikon_d5100")
    if test_name in names:
        test_srf = dictionary.curves[names.index(test_name)]
    else:
        try:
            physics.get_srf(test_name)
        except (KeyError, ValueError) as e:
            raise UsageError(f"--test-srf {test_name!r}: not a camera of the dictionary "
                             f"({len(names)} cameras) nor a built-in SRF ({e})") from None
        test_srf = np.asarray(physics.get_srf(test_name), np.float32)
        test_srf = test_srf / test_srf.sum(axis=0, keepdims=True)
    log(f"dictionary: {dictionary.n_cameras} cameras from {dictionary.source}; test camera "
        f"{test_name}")
    cubes = list(load_cave_cubes(cave_root))
    rgb_stream, hsi_stream = spectral_scenes_streams()
    spectra = np.concatenate([h.reshape(-1, 31)[::97] for h in hsi_stream])
    mean_srf = dictionary.curves.mean(axis=0)
    results = {"test_srf": test_name, "dictionary": dictionary.source, "rows": {}}
    out_path = Path(args.out)
    if args.skip_baselines and out_path.is_file():
        old = json.loads(out_path.read_text())
        results["rows"] = {k: v for k, v in old["rows"].items() if not k.startswith("ussr")}
    for label, srf in (() if results["rows"] else (("true SRF", test_srf),
                                                   ("dictionary mean", mean_srf))):
        lam = U.select_smooth_lambda(spectra, srf)
        results["rows"][f"min-norm ({label})"] = score(lambda x: U.min_norm_inverse(x, srf),
                                                       cubes, test_srf)
        results["rows"][f"smooth lam={lam:.3g} ({label})"] = score(
            lambda x: U.smooth_inverse(x, srf, lam), cubes, test_srf)
    if "least squares (paired)" not in results["rows"]:
        pairs = [(ex["hsi"] @ test_srf, ex["hsi"]) for ex in rgb_stream + [{"hsi": h}
                                                                          for h in hsi_stream]]
        x, y = B.sample_pixels(pairs, 200_000, seed=0)
        ls = B.fit_linear(x, y)
        results["rows"]["least squares (paired)"] = score(lambda r: B.predict(ls, r), cubes,
                                                          test_srf)
    trained = []
    if args.train_steps > 0:
        model, variables, apply = train_ussr(args, dictionary, rgb_stream, hsi_stream, log)
        trained.append((f"ussr ({args.train_steps} it, bench step)", variables, apply))
    if args.workdir:
        import jax

        import jaxspec
        wrapped, variables = jaxspec.load(args.workdir)        # best validation checkpoint
        module = wrapped.module.clone(dw_impl="auto")   # shift-add on CPU: same parameters
        apply = jax.jit(lambda v, x: module.apply(v, x, method=U.USSR.reconstruct))
        cfg = wrapped.config
        trained.append((f"ussr ({cfg.preset} preset, {cfg.steps} it, best checkpoint)",
                        variables, apply))
    for label, variables, apply in trained:
        est = []

        def run(r):
            out = apply(variables, r)
            est.append(np.asarray(out["srf"][0]))
            return out["hsi"]

        results["rows"][label] = score(run, cubes, test_srf)
        acc = U.srf_accuracy(np.stack(est), test_srf)
        results.setdefault("srf_estimation", {})[label] = {k: float(np.mean(v))
                                                           for k, v in acc.items()}
        results["srf_dictionary_mean"] = {k: float(v[0]) for k, v in
                                          U.srf_accuracy(mean_srf, test_srf).items()}
    out_path.write_text(json.dumps(results, indent=1))
    log(f"\nCAVE (6 scenes, RGB through {test_name}), mean over images:")
    log(f"| method | PSNR | SSIM | SAM |\n|---|---|---|---|")
    for k, r in results["rows"].items():
        m = r["mean"]
        log(f"| {k} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['sam']:.2f} |")
    for k, v in results.get("srf_estimation", {}).items():
        log(f"SRF estimation vs {test_name}, {k}: {v}")
    if "srf_dictionary_mean" in results:
        log(f"SRF of the dictionary mean vs {test_name}: {results['srf_dictionary_mean']}")


def cli(argv=None) -> int:
    """``python bench/ussr.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/ussr.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
