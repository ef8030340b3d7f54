"""Train every CCNet ablation (paper Tables II-V) on the same budget and data; print the table
beside the paper's NTIRE-2022 numbers with a column saying whether the direction of each effect
agrees with the paper.

    python bench/ccnet_ablations.py                         # reduced budget (see --help)
    python bench/ccnet_ablations.py --steps 1000 --stage 3  # the cpu preset's schedule
    python bench/ccnet_ablations.py --only full,mha,no_global
    python bench/ccnet_ablations.py --stability          # ||J_ij|| vs |i - j| (docs/lipschitz.md)
    python bench/ccnet_ablations.py --flops              # XLA FLOPs (Table II FLOPs_s column)

Each variant is ``jaxspec.configs.ccnet.ablation(name, base)`` -- the ``cpu`` preset (built-in
``spectral_scenes``, linear RGB) with its ``model`` options updated -- trained by
``jaxspec.train.train_and_evaluate`` in ``<out>/<name>`` (a finished variant is reused, so an
interrupted run resumes) and scored on the validation split (``--eval-images`` images, full
size). A row "agrees" when the sign of its MRAE and PSNR difference to the reference row (the
full model; r = 16 for the patch rows) is the paper's. Differences smaller than
``--tolerance`` (relative MRAE) are reported as "tie". Writes ``<out>/ablations.json`` and the
markdown table to stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# paper (NTIRE-2022 val): MRAE, RMSE, PSNR; Table II "MHA" = MST++
PAPER = {
    "full": (0.1556, 0.0231, 35.13),
    "mha": (0.1645, 0.0248, 34.32),
    "no_global": (0.1887, 0.0265, 33.42),
    "b_convlstm": (0.1759, 0.0245, 34.27),
    "b_convgru": (0.1701, 0.0248, 34.27),
    "fusion_add": (0.1863, 0.0260, 33.72),
    "fusion_concat": (0.1801, 0.0263, 34.11),
    "fusion_cattn": (0.1698, 0.0248, 34.56),
    "patch_4": (0.2396, 0.0324, 32.08),
    "patch_8": (0.1871, 0.0267, 33.70),
    "patch_32": (0.1699, 0.0237, 34.72),
    "patch_64": (0.1704, 0.0233, 34.46),
    "window_5": None,                    # not in the paper's tables
}
TABLE = {"full": "II-V", "mha": "II", "no_global": "III", "b_convlstm": "III",
         "b_convgru": "III", "fusion_add": "IV", "fusion_concat": "IV", "fusion_cattn": "IV",
         "patch_4": "V", "patch_8": "V", "patch_32": "V", "patch_64": "V", "window_5": "-"}


def stability(size: int = 10, seed: int = 0) -> str:
    """Mean exact ``||J_ij||_2`` against ``|i - j|`` of CCNet's inter-spectral modules at the
    first U-Net level (32 channels = 32 bands, one NeSCM feature channel), seeded random
    initialisation, on a smooth ``size x size`` 32-band feature map scaled to [0, 255] (the
    setting of docs/lipschitz.md), with ACC's recurrent coupling on the same input."""
    import jax
    import jax.numpy as jnp

    from jaxspec import layers
    from jaxspec.analysis import exact_block_norms, synthetic_feature_map
    from jaxspec.models import acc, ccnet

    x = jnp.asarray(synthetic_feature_map(size, size, 32, seed=seed))
    key = jax.random.PRNGKey(seed)
    mods = {
        "NeSCM (CMU chains, s = 3)": ccnet.NeSCM(32, 1, 3),
        "NeSCM b-convLSTM": ccnet.NeSCM(32, 1, 3, "convlstm"),
        "GrSCM (k = 4)": ccnet.GrSCM(32, 1, 4),
        "MHA (MST++ S-MSA)": layers.SpectralMSA(32, 1),
        "ACC (recurrent)": acc.ACC(),
    }
    rows = {}
    for name, mod in mods.items():
        v = mod.init(key, x)
        rows[name] = exact_block_norms(lambda z, m=mod, v=v: m.apply(v, z), x)

    # the CSRM inter-spectral part GrSCM + NeSCM + PAF (before the block residual)
    class Inter(ccnet.nn.Module):
        @ccnet.nn.compact
        def __call__(self, z):
            f_att = ccnet.GrSCM(32, 1, 4, name="grscm")(z)
            f_p = ccnet.NeSCM(32, 1, 3, name="nescm")(z)
            return ccnet.PAF(32, 4, 16, name="paf")(f_att, f_p)

    inter = Inter()
    v = inter.init(key, x)
    rows["GrSCM + NeSCM + PAF"] = exact_block_norms(lambda z: inter.apply(v, z), x)
    from _ablations import decay_table
    lines = [f"Mean exact ||J_ij||_2 over pairs with |i - j| = d; {size}x{size} smooth 32-band "
             "map in [0, 255], seeded random init (bench/ccnet_ablations.py --stability).", ""]
    return "\n".join(lines + decay_table(rows, [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 31]))


def flops(full_model: bool = True) -> str:
    """XLA FLOPs (compile only, nothing runs) of one inter-spectral module on a 256x256x32
    input (the paper's ``FLOPs_s`` of Table II) for every variant, and of the whole network on
    one 482x512 image padded to 496x512. A multiply-add is 2 XLA FLOPs; the paper's figures
    are MAC counts, so compare them with XLA / 2."""
    import jax
    import jax.numpy as jnp

    from jaxspec import layers
    from jaxspec.configs import ccnet as presets
    from jaxspec.flops import count_flops
    from jaxspec.models import ccnet

    x = jax.ShapeDtypeStruct((1, 256, 256, 32), jnp.float32)
    lines = ["| inter-spectral module @ 256x256x32 | XLA GFLOPs | / 2 | paper FLOPs_s (G) |",
             "|---|---|---|---|"]

    # a CSRM block minus its FFN half (LayerNorm + FFN + the two residual additions) is the
    # inter-spectral module GrSCM + NeSCM + fusion (or MST++'s S-MSA for "mha")
    def block_flops(name):
        opts = ccnet.CSRMOptions(**presets.ABLATIONS[name], impl="lax").validate()
        blk = ccnet.csrm_block(32, 1, base_dim=32, opts=opts)
        shapes = jax.eval_shape(blk.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 32)))
        return count_flops(blk.apply, shapes, x)

    class FFNHalf(ccnet.nn.Module):
        @ccnet.nn.compact
        def __call__(self, z):
            return layers.FeedForward(32, impl="lax")(layers.LayerNorm()(z)) + z + z

    shapes = jax.eval_shape(FFNHalf().init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 32)))
    ffn = count_flops(FFNHalf().apply, shapes, x)
    for name in ("full", "mha", "no_global", "b_convlstm", "b_convgru", "fusion_cattn"):
        g = (block_flops(name) - ffn) / 1e9
        paper = {"full": "0.42", "mha": "0.44"}.get(name, "-")
        lines.append(f"| {name} | {g:.3f} | {g / 2:.3f} | {paper} |")
    if full_model:
        model = ccnet.CCNet(**presets.MODEL, dw_impl="lax")
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
        g = count_flops(model.apply, shapes,
                        jax.ShapeDtypeStruct((1, 496, 512, 3), jnp.float32)) / 1e9
        lines += ["", f"Whole CCNet, one 482x512 image (padded to 496x512): {g:.1f} XLA GFLOPs "
                  f"({g / 2:.1f} G multiply-adds)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from _ablations import add_common_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ccnet_ablations")
    p.add_argument("--steps", type=int, default=150, help="train steps per variant")
    p.add_argument("--stage", type=int, default=1, help="spectrum reconstruction units "
                   "(the paper's 3 is the cpu preset; 1 keeps the reduced budget short)")
    add_common_args(p, crop=16, eval_images=50)
    p.add_argument("--loss", default=None, help="default: the cpu preset's")
    p.add_argument("--stability", action="store_true",
                   help="print the Jacobian-block decay table instead of training")
    p.add_argument("--flops", action="store_true", help="print XLA FLOPs instead of training")
    args = p.parse_args(argv)
    if args.stability:
        print(stability(seed=args.seed))
        return 0
    if args.flops:
        print(flops())
        return 0

    from _ablations import direction, load_results, train_variant

    from jaxspec import registry
    from jaxspec.configs import ccnet as presets

    names = args.only.split(",") if args.only else list(presets.ABLATIONS)
    for n in names:
        if n not in presets.ABLATIONS:
            raise SystemExit(f"unknown variant {n!r}; available: {list(presets.ABLATIONS)}")
    if "full" not in names:
        names = ["full"] + names
    if any(n.startswith("patch_") for n in names) and args.crop < 64:
        print(f"note: crop {args.crop} < 64: patch sizes >= crop/2^level fall back to "
              "one patch per map (image-level fusion) at the deeper levels", file=sys.stderr)
    base = registry.get("ccnet").config("cpu")
    over = dict(steps=args.steps, crop=args.crop, batch_size=args.batch, seed=args.seed,
                max_eval_images=args.eval_images, eval_every=0,
                ckpt_every=max(args.steps, 1), log_every=max(args.steps // 5, 1),
                warmup_steps=min(base.warmup_steps, max(args.steps // 10, 0)))
    if args.lr is not None:
        over["lr"] = args.lr
    if args.loss is not None:
        over["loss"] = args.loss
    base = base.replace(**over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "ablations.json"
    results = load_results(res_file)
    for n in names:
        train_variant(n, presets.ablation(n, base, stage=args.stage), out / n, results,
                      res_file, vars(args))

    print(f"Budget: {args.steps} steps, crop {args.crop}, batch {args.batch}, stage "
          f"{args.stage}, loss {base.loss}, lr {base.lr}; spectral_scenes validation "
          f"({args.eval_images} images). Paper: NTIRE-2022 val, 200k iterations.\n")
    print("| variant | table | params | MRAE | RMSE | PSNR | SAM | paper MRAE | paper RMSE | "
          "paper PSNR | direction agrees |")
    print("|" + "---|" * 11)
    for n in names:
        if n not in results:
            continue
        e = results[n]["eval"]
        ref_name = "full"
        ref = results[ref_name]["eval"]
        pp = PAPER.get(n)
        agree = "reference" if n == "full" else direction(
            e, ref, pp[0] if pp else None, PAPER[ref_name][0], args.tolerance)
        paper_cols = " | ".join(f"{v}" for v in pp) if pp else "- | - | -"
        print(f"| {n} | {TABLE[n]} | {results[n]['params']:,} | {e['mrae']:.4f} | "
              f"{e['rmse']:.4f} | {e['psnr']:.2f} | {e['sam']:.2f} | {paper_cols} | {agree} |")
    return 0


if __name__ == "__main__":
    from jaxspec.errors import run_cli
    sys.exit(run_cli(main, prog="bench/ccnet_ablations.py"))
