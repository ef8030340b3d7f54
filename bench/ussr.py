"""USSR on real CAVE scenes: the unpaired baselines, least squares fitted with pairs, and
(optionally) a short unpaired USSR training, scored as the paper (PSNR per band, SSIM, SAM).

    python bench/ussr.py                          # baselines only (seconds)
    python bench/ussr.py --train-steps 3000       # + unpaired USSR training on spectral_scenes
    python bench/ussr.py --hsi-stream cave --train-steps 3000 --figure F.png
                                                  # HSI stream = the other CAVE fold
    python bench/ussr.py --hsi-stream cave --fold 0 --train-steps 1000 --ablation all
                                                  # Table 3 ladder + Table 5 regularisers
    python bench/ussr.py --workdir runs/ussr      # + a run trained by train.py --method ussr
    python bench/ussr.py --stability [--workdir W]  # ||J_ij|| of G (docs/lipschitz.md)

Data:

* test: the six CAVE scenes in ``../shared/data/cave`` (``JAXSPEC_SHARED_DATA`` overrides),
  reflectance = PNG / 65535, RGB rendered linearly through the **test camera** (``--test-srf``,
  default the paper's Nikon D700 from the Jiang 2013 database, columns normalised to sum 1 as
  the dictionary; nikon_d5100 when the database is absent);
* unpaired training data (only for the learned/selected parts): RGB stream = the first half
  of ``spectral_scenes`` (clean) ``train`` rendered through random dictionary cameras (so the
  RGB camera is unknown to the method) with its material labels (the semantic branch); HSI
  stream (``--hsi-stream``) = the cubes of that split's second half (every CAVE scene is then
  a test image), or ``cave``: the sorted CAVE scenes in two folds of three, each fold the HSI
  stream of the models tested on the other (the paper's protocol: PASCAL RGB photos + ICVL
  training cubes, ICVL test cubes); every scene is tested once and means are over all six.

Methods (none of the unpaired rows sees a CAVE scene or an RGB/HSI pair):

* ``min-norm (true SRF)`` / ``smooth (true SRF)``: ``min_norm_inverse`` / ``smooth_inverse``
  with the test camera's SRF (an oracle: an unsupervised method does not know it);
* ``min-norm (dictionary mean)`` / ``smooth (dictionary mean)``: the same with the mean SRF of
  the dictionary (no knowledge of the camera);
* the smooth inverse's lambda is chosen from the HSI stream alone (``select_smooth_lambda``);
* ``least squares (paired, ...)``: RGB -> 31 linear map fitted on 200k pixels of pairs of the
  stream's cubes rendered through the test camera (needs pairs; the paired reference);
* ``ussr (code loss)`` (``--train-steps``): ``make_train_step`` for that many iterations at
  ``--crop`` / ``--batch``, E1 pre-trained on the RGB stream's material labels, then applied
  to the full CAVE images; ``--ablation`` trains the Table 3 / Table 5 rows instead (paper loss
  forms, ``jaxspec.configs.ussr``) and prints them beside the paper's numbers with the
  direction of each step; ``--workdir`` scores the best checkpoint of a ``train.py --method
  ussr`` run the same way (on all six scenes);
* SRF estimation of each trained row: against the test camera on the CAVE renders, and over
  renders of the test scenes (area-averaged to 128 x 128) through **every** dictionary camera
  (the camera is known: AUC, angle, how often it ranks first), beside the dictionary mean;
  ``--figure`` draws both.
Writes ``--out`` (default ``bench/ussr_results.json``) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def train_ussr(args, dictionary, rgb_stream, hsi_stream, log, weights=None,
               prior_lambda: float = 0.0):
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
    model = U.USSR(srf_dictionary=str(dictionary.source), n_classes=13,
                   prior_lambda=prior_lambda)
    opts = U.make_optimizers(args.train_steps, lr_gen=args.lr_gen)
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
    step = jax.jit(U.make_train_step(model, opts, U.make_phase_losses(weights or U.LossWeights())),
                   donate_argnums=0)
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


STREAM_TEXT = {"spectral_scenes": "spectral_scenes train[50%:] (every CAVE scene is a test "
                                   "image)",
               "cave": "the other CAVE fold (two folds of three scenes; each scene is tested "
                       "once, by the models that never saw it)"}
PAIRED_LS = {"spectral_scenes": "least squares (paired, spectral_scenes)",
             "cave": "least squares (paired, the other CAVE fold)"}


SYNTHETIC_LS = "least squares (HSI stream through random dictionary cameras)"


def synthetic_pairs(hsi_cubes, curves, per_cube: int = 4, seed: int = 0):
    """``[(rgb, hsi)]``: every HSI-stream cube rendered through ``per_cube`` cameras drawn as
    the ``syn`` term of USSR draws them (``random_dictionary_srf``: a random mix of two
    dictionary cameras). Unpaired: no cube of the test scenes or camera is involved."""
    import jax

    from jaxspec.models import ussr as U
    srfs = np.asarray(U.random_dictionary_srf(jax.random.PRNGKey(seed), curves,
                                              per_cube * len(hsi_cubes)))
    return [(h @ srfs[per_cube * i + k], h) for i, h in enumerate(hsi_cubes)
            for k in range(per_cube)]


def unpaired_folds(stream: str, cubes, ss_hsi, fold: int | None):
    """``[(name, HSI-stream cubes, test [(scene, cube)])]``: ``spectral_scenes`` = one fold
    testing on every CAVE scene; ``cave`` = the sorted scenes in two halves, each the HSI
    stream of the model tested on the other (``fold`` picks one of the two)."""
    if stream == "spectral_scenes":
        if fold is not None:
            from jaxspec.errors import UsageError
            raise UsageError("--fold needs --hsi-stream cave (spectral_scenes is one fold)")
        return [("spectral_scenes", list(ss_hsi), cubes)]
    half = len(cubes) // 2
    both = [("cave fold 0", [c for _, c in cubes[:half]], cubes[half:]),
            ("cave fold 1", [c for _, c in cubes[half:]], cubes[:half])]
    if fold is None:
        return both
    if fold not in (0, 1):
        from jaxspec.errors import UsageError
        raise UsageError(f"--fold must be 0 or 1, got {fold}")
    return [both[fold]]


def is_baseline(row: str) -> bool:
    return not row.startswith(("ussr", "ablation", "regulariser"))


def training_rows(ablation: str, d_pixels: bool = False):
    """``[(row name, LossWeights)]`` trained per fold: the code's objective (default), or the
    Table 3 ladder / Table 5 regularisers in the paper's loss forms
    (``jaxspec.configs.ussr``; the L1-GC regulariser row is the ladder's last row).
    ``d_pixels``: every row with ``LossWeights.d_pixels`` (pixel-shuffled discriminator
    inputs), named with a ``+ pixel-shuffled D`` suffix."""
    rows = _training_rows(ablation)
    if not d_pixels:
        return rows
    return [(f"{n} + pixel-shuffled D", dataclasses.replace(w, d_pixels=True)) for n, w in rows]


def _training_rows(ablation: str):
    from jaxspec.configs import ussr as C
    from jaxspec.models import ussr as U
    if ablation == "none":
        return [("ussr (code loss)", U.LossWeights())]
    rows = []
    if ablation in ("ladder", "all"):
        rows += [(f"ablation {n}", U.LossWeights.paper(**o)) for n, o, _ in C.ABLATION_LADDER]
    if ablation in ("regularisers", "all"):
        rows += [(f"regulariser {n}", U.LossWeights.paper(**o)) for n, o, _ in C.REGULARISERS
                 if not (n == "L1-GC" and ablation == "all")]
    if ablation == "all":       # not a paper row: what the adversarial term adds to the code's
        rows.append(("ablation code loss without the adversarial term", U.LossWeights(adv=0.0)))
    return rows


def ablation_table(rows: dict, which: str) -> str:
    """Our rows beside the paper's Table 3 / Table 5 (ICVL) numbers, with whether each step's
    PSNR and SAM move the way the paper's do."""
    from jaxspec.configs import ussr as C
    out = []
    tables = []
    if which in ("ladder", "all"):
        tables.append(("Table 3 ablation ladder", "ablation", C.ABLATION_LADDER))
    if which in ("regularisers", "all"):
        tables.append(("Table 5 GAN regularisers", "regulariser", C.REGULARISERS))
    for title, prefix, spec in tables:
        out += [f"**{title}** (paper: ICVL; ours: CAVE test scenes)", "",
                "| row | paper PSNR | paper SAM | ours PSNR | ours SSIM | ours SAM | "
                "same direction as the paper (PSNR, SAM) |", "|---|---|---|---|---|---|---|"]
        prev = None
        for name, _, (ppsnr, _pssim, psam) in spec:
            key = f"{prefix} {name}"
            if key not in rows and name == "L1-GC":
                key = f"ablation {C.ABLATION_LADDER[-1][0]}"
            if key not in rows:
                continue
            m = rows[key]["mean"]
            agree = "-"                 # each row against the one above it, as in the paper
            if prev is not None:
                rp, rs, pp, ps = prev
                agree = ", ".join("yes" if (a - b) * (c - d) > 0 else "no" for a, b, c, d in
                                  ((m["psnr"], rp, ppsnr, pp), (m["sam"], rs, psam, ps)))
            out.append(f"| {name} | {ppsnr:.2f} | {psam:.2f} | {m['psnr']:.2f} | "
                       f"{m['ssim']:.3f} | {m['sam']:.2f} | {agree} |")
            prev = (m["psnr"], m["sam"], ppsnr, psam)
        out.append("")
    return "\n".join(out)


def camera_sweep(apply, variables, test_cubes, dictionary, side: int = 128, chunk: int = 7):
    """SRF estimation when the camera is known: every test cube (area-averaged to ``side``)
    rendered through each dictionary camera; per render the estimated SRF's accuracy against
    that camera's, the dictionary mean's, and whether the camera ranks first."""
    import jax.numpy as jnp

    from jaxspec.models import ussr as U
    curves = np.asarray(dictionary.curves, np.float32)
    n = len(curves)
    mean_srf = curves.mean(axis=0)
    rec = {"auc": [], "angle": [], "auc_mean_srf": [], "angle_mean_srf": [], "top1": [],
           "frac": [], "frac_mean_srf": []}
    # the dictionary mean against each camera: the same for every scene, so computed once
    mean_acc = [U.srf_accuracy(mean_srf, c, curve=True) for c in curves]
    for _, cube in test_cubes:
        f = cube.shape[0] // side
        small = cube[:f * side, :f * side].reshape(side, f, side, f, 31).mean(axis=(1, 3))
        for lo in range(0, n, chunk):
            ids = list(range(lo, min(lo + chunk, n)))
            ids += ids[-1:] * (chunk - len(ids))                 # one shape: one compile
            rgb = np.einsum("hwc,nck->nhwk", small, curves[ids]).astype(np.float32)
            out = apply(variables, jnp.asarray(rgb))
            est = np.asarray(out["srf"])
            top = np.asarray(out["weights"]).mean(axis=2).argmax(axis=1)
            for k, j in enumerate(ids[:min(lo + chunk, n) - lo]):
                a = U.srf_accuracy(est[k], curves[j], curve=True)
                rec["auc"].append(float(a["auc"][0]))
                rec["angle"].append(float(a["angle"][0]))
                rec["auc_mean_srf"].append(float(mean_acc[j]["auc"][0]))
                rec["angle_mean_srf"].append(float(mean_acc[j]["angle"][0]))
                rec["top1"].append(float(top[k] == j))
                rec["frac"].append(a["within"][0].tolist())
                rec["frac_mean_srf"].append(mean_acc[j]["within"][0].tolist())
    return rec


def merge_sweeps(sweeps, n_cameras: int):
    """One summary of :func:`camera_sweep` records (folds pooled)."""
    pooled = {k: sum((s[k] for s in sweeps), []) for k in sweeps[0]}
    out = {k: float(np.mean(pooled[k])) for k in ("auc", "angle", "auc_mean_srf",
                                                  "angle_mean_srf", "top1")}
    out["frac"] = np.mean(pooled["frac"], axis=0).round(4).tolist()
    out["frac_mean_srf"] = np.mean(pooled["frac_mean_srf"], axis=0).round(4).tolist()
    out["renders"] = len(pooled["auc"])
    out["cameras"] = n_cameras
    return out


def srf_figure(path, row, est, test_srf, test_name, mean_srf, sweep):
    """Left: the estimated SRFs on the test scenes (RGB through ``test_name``) against the true
    curves and the dictionary mean. Right: fraction of SRF samples within relative error t over
    renders through every dictionary camera (area under it = the AUC), estimate vs mean."""
    from jaxspec.analysis.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    wl = np.arange(400, 701, 10)
    ax = axes[0]
    t = test_srf / test_srf.sum(axis=0, keepdims=True)
    m = mean_srf / mean_srf.sum(axis=0, keepdims=True)
    e = est / est.sum(axis=1, keepdims=True)
    for c, col in enumerate("rgb"):
        ax.plot(wl, t[:, c], col + "-", lw=1.5, label="true" if c == 0 else None)
        ax.plot(wl, m[:, c], col + ":", lw=1, label="dictionary mean" if c == 0 else None)
        for k in range(e.shape[0]):
            ax.plot(wl, e[k, :, c], col + "--", lw=0.6, alpha=0.6,
                    label="estimated (per scene)" if c == 0 and k == 0 else None)
    ax.set_xlabel("wavelength (nm)")
    ax.set_title(f"{row}: SRF on CAVE through {test_name}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ths = np.linspace(0, 1, 101)
    ax.plot(ths, sweep["frac"], "k-", label=f"estimated (AUC {sweep['auc']:.3f})")
    ax.plot(ths, sweep["frac_mean_srf"], "k:",
            label=f"dictionary mean (AUC {sweep['auc_mean_srf']:.3f})")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("relative error t (to the channel peak)")
    ax.set_ylabel("fraction of SRF samples within t")
    ax.set_title(f"{sweep['renders']} renders (test scenes x dictionary cameras); camera "
                 f"ranked first {sweep['top1']:.1%}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


WEIGHTS = ("adv", "bp", "smooth", "pos", "sem", "syn", "syn_srf")


def weight_overrides(items) -> dict[str, float]:
    """``["adv=0", "sem=0.5"]`` -> ``{"adv": 0.0, "sem": 0.5}`` (``--weight``), checked."""
    from jaxspec.errors import UsageError
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in WEIGHTS:
            raise UsageError(f"--weight {item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(WEIGHTS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--weight {item!r}: {value!r} is not a number") from None
        if not np.isfinite(out[name]) or out[name] < 0:
            raise UsageError(f"--weight {item!r}: the weight must be finite and >= 0")
    return out


def main(argv=None):
    from jaxspec.configs.ussr import OPTIM
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--test-srf", default=None, help="camera name in the Jiang 2013 database "
                   "(default Nikon D700) or a built-in SRF name")
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--hsi-stream", choices=("spectral_scenes", "cave"), default="spectral_scenes",
                   help="the unpaired real cubes: spectral_scenes train[50%%:] (default) or the "
                        "other CAVE fold (two folds; each CAVE scene is tested once)")
    p.add_argument("--fold", type=int, default=None, help="with --hsi-stream cave: one fold only")
    p.add_argument("--ablation", choices=("none", "ladder", "regularisers", "all"),
                   default="none", help="train the Table 3 ladder and/or the Table 5 "
                   "regulariser rows (paper loss forms) instead of the code objective")
    p.add_argument("--d-pixels", action="store_true",
                   help="train with pixel-shuffled discriminator inputs (LossWeights.d_pixels)")
    p.add_argument("--weight", action="append", default=[], metavar="NAME=VALUE",
                   help="override a LossWeights weight (adv, bp, smooth, pos, sem) of every "
                        "trained row, e.g. --weight adv=0 --weight sem=0; repeatable")
    p.add_argument("--prior", action="store_true",
                   help="start the generator at the smooth inverse of its estimated SRF "
                        "(USSR prior_lambda, ours): lambda selected from the HSI stream with the "
                        "dictionary-mean SRF, as the unpaired baseline row")
    p.add_argument("--syn-squared", action="store_true",
                   help="the synthetic-pair term (--weight syn=...) on squared errors, not L1")
    p.add_argument("--figure", default=None, help="PNG of the SRF estimates (first trained row)")
    p.add_argument("--workdir", default=None, help="a train.py --method ussr run to score")
    p.add_argument("--segmenter-steps", type=int, default=200)
    p.add_argument("--lr-gen", type=float, default=OPTIM["lr_gen"],
                   help=f"Adam learning rate of G + M (the authors': {OPTIM['lr_gen']:g})")
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
    overrides = weight_overrides(args.weight)
    if not (np.isfinite(args.lr_gen) and args.lr_gen > 0):
        raise UsageError(f"--lr-gen must be a positive number, got {args.lr_gen}")
    _cli.positive("--crop", args.crop)
    _cli.positive("--batch", args.batch)
    if args.syn_squared and not overrides.get("syn"):
        raise UsageError("--syn-squared changes the synthetic-pair term: give it a weight with "
                         "--weight syn=VALUE")
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
    rgb_stream, ss_hsi = spectral_scenes_streams()
    mean_srf = dictionary.curves.mean(axis=0)
    folds = unpaired_folds(args.hsi_stream, cubes, ss_hsi, args.fold)
    results = {"test_srf": test_name, "dictionary": dictionary.source,
               "hsi_stream": args.hsi_stream, "fold": args.fold,
               "train_steps": args.train_steps, "rows": {}}
    out_path = Path(args.out)
    per_image = {}                      # row -> {scene: metrics}, over every fold's test scenes

    def add(row, scored):
        per_image.setdefault(row, {}).update(scored)

    reuse = {}
    if args.skip_baselines and out_path.is_file():
        old = json.loads(out_path.read_text())
        was = (old.get("hsi_stream", "spectral_scenes"), old.get("fold"))
        if was != (args.hsi_stream, args.fold):        # baselines of other test scenes
            raise UsageError(f"--skip-baselines: {out_path} holds the rows of --hsi-stream "
                             f"{was[0]} --fold {was[1]}, not --hsi-stream {args.hsi_stream} "
                             f"--fold {args.fold}")
        reuse = {k: v for k, v in old["rows"].items() if is_baseline(k)}
    trained_models = []
    for fold_name, hsi_cubes, test_cubes in folds:
        spectra = np.concatenate([h.reshape(-1, 31)[::97] for h in hsi_cubes])
        if not reuse:
            for label, srf in (("true SRF", test_srf), ("dictionary mean", mean_srf)):
                lam = U.select_smooth_lambda(spectra, srf)
                results.setdefault("lambda", {})[f"{fold_name}/{label}"] = lam
                add(f"min-norm ({label})", score(lambda x: U.min_norm_inverse(x, srf),
                                                 test_cubes, test_srf)["per_image"])
                add(f"smooth ({label}, lambda from the HSI stream)", score(
                    lambda x: U.smooth_inverse(x, srf, lam), test_cubes, test_srf)["per_image"])
            pairs = [(h @ test_srf, h) for h in
                     ([ex["hsi"] for ex in rgb_stream] + list(ss_hsi)
                      if args.hsi_stream == "spectral_scenes" else hsi_cubes)]
            x, y = B.sample_pixels(pairs, 200_000, seed=0)
            ls = B.fit_linear(x, y)
            add(PAIRED_LS[args.hsi_stream], score(lambda r: B.predict(ls, r), test_cubes,
                                                  test_srf)["per_image"])
            x, y = B.sample_pixels(synthetic_pairs(hsi_cubes, dictionary.curves), 200_000,
                                   seed=0)
            ls_syn = B.fit_linear(x, y)
            add(SYNTHETIC_LS, score(lambda r: B.predict(ls_syn, r), test_cubes,
                                    test_srf)["per_image"])
        if args.train_steps > 0:
            prior = U.select_smooth_lambda(spectra, mean_srf) if args.prior else 0.0
            if args.prior:
                results.setdefault("prior_lambda", {})[fold_name] = prior
            for row, weights in training_rows(args.ablation, args.d_pixels):
                if args.lr_gen != OPTIM["lr_gen"]:
                    row = f"{row} + G lr {args.lr_gen:g}"
                if args.syn_squared:
                    weights = dataclasses.replace(weights, syn_kind="squared")
                    row = f"{row} + squared syn"
                if overrides:
                    row = f"{row} + " + ", ".join(f"{k} {v:g}" for k, v in overrides.items())
                    weights = dataclasses.replace(weights, **overrides)
                if args.prior:
                    row = f"{row} + smooth-inverse start"
                log(f"{fold_name}: training {row} ({args.train_steps} iterations, HSI stream "
                    f"{len(hsi_cubes)} cubes)")
                model, variables, apply = train_ussr(args, dictionary, rgb_stream, hsi_cubes,
                                                     log, weights, prior)
                trained_models.append((row, fold_name, variables, apply, test_cubes))
    if args.workdir:
        import jax

        import jaxspec
        wrapped, variables = jaxspec.load(args.workdir)        # best validation checkpoint
        module = wrapped.module.clone(dw_impl="auto")   # shift-add on CPU: same parameters
        apply = jax.jit(lambda v, x: module.apply(v, x, method=U.USSR.reconstruct))
        cfg = wrapped.config
        trained_models.append((f"ussr ({cfg.preset} preset, {cfg.steps} it, best checkpoint)",
                               "all", variables, apply, cubes))
    estimates = {}
    for row, fold_name, variables, apply, test_cubes in trained_models:
        est = []

        def run(r):
            out = apply(variables, r)
            est.append(np.asarray(out["srf"][0]))
            return out["hsi"]

        add(row, score(run, test_cubes, test_srf)["per_image"])
        estimates.setdefault(row, []).extend(est)
        cams = camera_sweep(apply, variables, test_cubes, dictionary)
        results.setdefault("srf_all_cameras", {}).setdefault(row, []).append(cams)
    results["rows"] = dict(reuse)
    for row, per in per_image.items():
        results["rows"][row] = {"mean": {k: float(np.mean([p[k] for p in per.values()]))
                                         for k in ("psnr", "ssim", "sam")},
                                "per_image": per}
    for row, est in estimates.items():
        acc = U.srf_accuracy(np.stack(est), test_srf)
        results.setdefault("srf_estimation", {})[row] = {k: float(np.mean(v))
                                                         for k, v in acc.items()}
    if estimates:
        results["srf_dictionary_mean"] = {k: float(v[0]) for k, v in
                                          U.srf_accuracy(mean_srf, test_srf).items()}
        results["srf_all_cameras"] = {row: merge_sweeps(s, dictionary.n_cameras)
                                      for row, s in
                                      results["srf_all_cameras"].items()}
        if args.figure:
            row0 = next(iter(estimates))
            srf_figure(args.figure, row0, np.stack(estimates[row0]), test_srf, test_name,
                       mean_srf, results["srf_all_cameras"][row0])
            log(f"figure: {args.figure}")
    out_path.write_text(json.dumps(results, indent=1))
    n_test = sum(len(test) for _, _, test in folds)
    log(f"\nCAVE ({n_test} test scenes, RGB through {test_name}; unpaired HSI stream: "
        f"{STREAM_TEXT[args.hsi_stream]}), mean over the test images:")
    log("| method | PSNR | SSIM | SAM |\n|---|---|---|---|")
    for k, r in results["rows"].items():
        m = r["mean"]
        log(f"| {k} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['sam']:.2f} |")
    if args.ablation != "none" and args.train_steps > 0:
        log("\n" + ablation_table(results["rows"], args.ablation))
    for k, v in results.get("srf_estimation", {}).items():
        log(f"SRF estimation vs {test_name}, {k}: {v}")
    if "srf_dictionary_mean" in results:
        log(f"SRF of the dictionary mean vs {test_name}: {results['srf_dictionary_mean']}")
    for k, v in results.get("srf_all_cameras", {}).items():
        log(f"SRF estimation over renders through each of the {v['cameras']} dictionary "
            f"cameras, {k}: AUC {v['auc']:.4f} (dictionary mean {v['auc_mean_srf']:.4f}), "
            f"angle {v['angle']:.2f} deg (mean {v['angle_mean_srf']:.2f}), the right camera "
            f"ranked first in {v['top1']:.1%} of renders")
    return 0


def cli(argv=None) -> int:
    """``python bench/ussr.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/ussr.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
