"""MCGA's mixture of codebooks (MoC): several stage-1 runs -> one stage-1 checkpoint.

    python -m jaxspec.moc --workdir runs/moc runs/vq_builtin runs/vq_cave [...]
    python train.py --method mcga --init-from runs/moc

The paper trains one multi-scale VQ-VAE per dataset and concatenates their codebooks along the
code axis (``B_i^mixed``, ``512 N`` codes per scale; methods.md section 3). The mixture is written
as a stage-1 workdir like any other: ``config.json`` (the first run's, with
``model.num_codes = sum``), ``bands.json`` of the first run, ``mixture.json`` (the sources) and
one ``best`` checkpoint whose codebooks are the concatenation and whose other parameters (the
Alg. 1 encoder and the Alg. 2 decoder that stage 2 freezes) are the **first** run's: list the
run trained on the data stage 2 targets first. Runs mix only when their code dimensions agree
(the same ``C^m``, e.g. 31 and 28 bands both give 8); the decoder's band count is the first's.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

QUANTIZERS = "quantizers_"


def _codebooks(params) -> dict[str, np.ndarray]:
    moc = params.get("moc")
    if not isinstance(moc, dict) or not moc:
        raise ValueError("no 'moc' codebooks")
    return {k: np.asarray(v["codebook"]) for k, v in moc.items() if k.startswith(QUANTIZERS)}


def build_mixture(workdirs: Sequence[str | Path], which: str = "best"):
    """``(config, variables, meta)`` of the mixture of the stage-1 runs in ``workdirs``."""
    import jaxspec
    from jaxspec.api import load_config
    from jaxspec.errors import UsageError
    if len(workdirs) < 2:
        raise UsageError("a mixture needs at least two stage-1 workdirs")
    cfgs, params = [], []
    for wd in workdirs:
        cfg = load_config(wd)
        if cfg.method != "mcga_vq":
            raise UsageError(f"{wd} is a {cfg.method!r} run; a mixture is built from MCGA "
                             f"stage-1 runs (--method mcga_vq)")
        _, v = jaxspec.load(wd, which=which)
        cfgs.append(cfg)
        params.append(v["params"])
    first, books = cfgs[0], [_codebooks(p) for p in params]
    from jaxspec.configs.mcga import SHARED_MODEL_KEYS
    for key in (k for k in SHARED_MODEL_KEYS if k != "num_codes"):   # num_codes: summed
        vals = {str(c.model.get(key)) for c in cfgs}
        if len(vals) > 1:
            raise UsageError(f"stage-1 runs differ in model.{key} ({sorted(vals)}); the "
                             f"mixture's runs need the same architecture")
    for wd, b in zip(workdirs[1:], books[1:]):
        for k, cb in books[0].items():
            if k not in b or b[k].shape[1] != cb.shape[1]:
                got = b[k].shape[1] if k in b else None
                raise UsageError(f"{wd}: codebook {k} has code dimension {got}, {workdirs[0]} "
                                 f"has {cb.shape[1]} (only runs with the same C^m mix)")
    mixed = {k: np.concatenate([b[k] for b in books], axis=0) for k in books[0]}
    moc0 = dict(params[0]["moc"])          # the first run's projections (interface_width > 0)
    out = {**params[0], "moc": {**moc0, **{k: {**moc0[k], "codebook": mixed[k]} for k in mixed}}}
    num_codes = int(next(iter(mixed.values())).shape[0])
    cfg = first.replace(model={**first.model, "num_codes": num_codes})
    meta = {"mixture_of": [str(Path(w).absolute()) for w in workdirs],
            "codes_per_run": [int(next(iter(b.values())).shape[0]) for b in books],
            "datasets": [c.dataset + (f"/{c.dataset_config}" if c.dataset_config else "")
                         for c in cfgs], "which": which}
    return cfg, {"params": out}, meta


def write_mixture(workdir: str | Path, workdirs: Sequence[str | Path], which: str = "best"
                  ) -> tuple[Path, dict]:
    """Write the mixture as a new workdir; returns ``(workdir, meta)``."""
    from jaxspec.convert import write_workdir
    from jaxspec.fs import write_json_atomic
    cfg, variables, meta = build_mixture(workdirs, which)
    wd = write_workdir(workdir, cfg, variables, meta)
    write_json_atomic(wd / "mixture.json", meta)
    for name in ("bands.json", "input.json"):
        src = Path(workdirs[0]) / name
        if src.is_file():
            shutil.copyfile(src, wd / name)
    return wd, meta


def main(argv=None) -> int:
    """``python -m jaxspec.moc``: one-line errors and exit codes (docs/reliability.md)."""
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="jaxspec.moc")


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.moc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="stage-1 (mcga_vq) workdirs; the first one's "
                                           "encoder/decoder are kept")
    p.add_argument("--workdir", required=True, help="new workdir for the mixture")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    a = p.parse_args(argv)
    from jaxspec.errors import InputNotFoundError, UsageError
    from jaxspec.train import checkpointing
    from jaxspec.train.workdir import check_output_writable
    for r in a.runs:
        if not (Path(r) / "config.json").is_file():
            raise InputNotFoundError(f"{r} is not a jaxspec workdir (no config.json)")
    out = Path(a.workdir).absolute()
    if checkpointing.has_checkpoint(out):
        raise UsageError(f"{out} already holds checkpoints; choose a new --workdir")
    check_output_writable(out, what="--workdir")
    wd, meta = write_mixture(out, a.runs, a.which)
    print(f"mixture of {len(a.runs)} codebooks ({' + '.join(map(str, meta['codes_per_run']))} "
          f"codes per scale) -> {wd}\n  next: python train.py --method mcga --init-from {wd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
