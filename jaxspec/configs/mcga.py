"""MCGA presets: stage 1 (``mcga_vq``: ``vq_paper`` / ``vq_cpu`` / ``vq_smoke``) and stage 2
(``mcga``: ``paper`` / ``cpu`` / ``smoke``), plus :func:`stage2` which points a stage-2 config at
a stage-1 (or mixture-of-codebooks) workdir.

* Optimiser [P]: AdamW lr 4e-4 with the VQ-VAE-2 "CycleScheduler" read as linear warm-up over
  5 % of the steps then cosine (methods.md §3b); weight decay 1e-2, batch 16, 128x128 crops and
  the step counts are [I] (the paper gives none).
* Stage-1 loss (Eq. 1): Charbonnier + beta (L_1 + L_2), L_i = embed + beta commit. In stage 1
  L_2 == L_1 (same vectors, same codebook), so the weights are ``vq_embed: 2 beta`` and
  ``vq_commit: 2 beta^2``. Stage-2 loss: Charbonnier only (no VQ loss: the codebooks are frozen).
* Stage 2 freezes ``moc`` (codebooks) and ``decoder`` (Alg. 2); test-time adaptation (off by
  default, ``adapt_steps``) updates only the GA attention Linear layers (Eq. 6).
* Ablations (Tables 3-5): :data:`ABLATIONS` (stage-2 model options, :func:`ablation`) and
  :data:`MIXTURES` (extra stage-1 datasets whose codebooks join the reference's); options in
  :data:`SHARED_MODEL_KEYS` (``scales``, ``min_code_dim``) need their own stage-1 run
  (:func:`stage1_config`). ``python bench/mcga_ablations.py`` trains them all.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jaxspec.configs.base import (CPU_BUILTIN, PAPER_ARAD1K, SMOKE, Config, ablation_of,
                                  make_preset)

log = logging.getLogger("jaxspec.mcga")

BETA = 0.25
SCALES = 2
WIDTH = 32          # stage-1 encoder/decoder width (stage 2 reuses the decoder: keep equal)

VQ_MODEL = dict(scales=SCALES, num_codes=512, width=WIDTH, random_mask=True, min_code_dim=0)
MODEL = dict(scales=SCALES, num_codes=512, width=WIDTH, ganet_width=29, enc_blocks=0,
             dec_blocks=1, top_k=256, full_attention=False, use_moc=True, attention=True,
             ga=True, min_code_dim=0)

VQ_LOSS = dict(loss="charbonnier", aux_loss_weights={"vq_embed": 2 * BETA,
                                                     "vq_commit": 2 * BETA * BETA})
STAGE2 = dict(loss="charbonnier", frozen=("^moc/", "^decoder/"), adapt_params=("ga_linear/",),
              adapt_lr=1e-4, adapt_optimizer="adam")
# cpu presets, both stages: 3000 steps each, ~13 min together on 2 cores (budget 15 min). At
# 600 steps each (3 min) stage 2 lost to least squares by 1.8 dB; at 3000 it beats it
# (docs/methods/mcga.md, "Measured").
CPU_SCHEDULE = dict(crop=32, batch_size=8, steps=3000, lr=2e-3, warmup_steps=150,
                    eval_every=1000, ckpt_every=1000)
# model options stage 2 must share with the stage-1 (or mixture) run whose parts it freezes
SHARED_MODEL_KEYS = ("num_codes", "width", "scales", "interface_width", "min_code_dim")
PAPER = dict(PAPER_ARAD1K, optimizer="adamw", lr=4e-4, weight_decay=1e-2, crop=128,
             batch_size=16, rgb_norm="minmax")


# ----------------------------------------------------------------------------- ablations
# The paper's Tables 3-5 (S = 2, top-K 16^2 = 256 and the full model are the reference
# "full") as options of jaxspec.models.mcga.MCGA. "Plain GANet" keeps GANet's convolutions,
# activations and flow: no codebook query in the decoder (use_moc), no GA operations (ga: the
# identity in their place), no attention in the GABlocks (attention); the frozen stage-1 Alg. 2
# decoder stays (it is the output head). 31 bands give C^m = 8, so S = 4 floors the code dim
# of the coarsest scale at 1 (min_code_dim) and needs H, W multiples of 16.
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "scales_1": {"scales": 1},                               # Table 3
    "scales_3": {"scales": 3},
    "scales_4": {"scales": 4, "min_code_dim": 1},
    "topk_64": {"top_k": 64},                                # Table 4: 8^2 (16^2 = full)
    "topk_512": {"top_k": 512},                              # all 512 codes (>= 32^2)
    "plain": {"use_moc": False, "ga": False, "attention": False},   # Table 5 ladder
    "moc": {"ga": False, "attention": False},                # + MoC
    "moc_ga": {"attention": False},                          # + GA  (+ QAttn = full)
    "full_attn": {"full_attention": True},                   # Table 5: full attention
    "mixture": {},                                           # + a second dataset's codebook
}
# the datasets of the further stage-1 runs whose codebooks are concatenated after the
# reference run's (python -m jaxspec.moc; the reference's encoder/decoder are kept)
MIXTURES: dict[str, tuple[dict[str, Any], ...]] = {
    "mixture": ({"dataset": "cave", "dataset_config": None},),
}


def ablation(name: str, base: Config | None = None, **model_overrides: Any) -> Config:
    """``base`` (default: the stage-2 ``cpu`` preset) with the model options of
    ``ABLATIONS[name]`` (and ``model_overrides``). Stage 2 still needs :func:`stage2` on the
    stage-1 run of :func:`stage1_config` of the result (or on a mixture, :data:`MIXTURES`)."""
    return ablation_of(base if base is not None else cpu(), ABLATIONS, name, "MCGA",
                       **model_overrides)


# ----------------------------------------------------------------------------- stage 1
def vq_paper() -> Config:
    return make_preset("mcga_vq", "paper", VQ_MODEL, PAPER, steps=100_000, warmup_steps=5_000,
                       **VQ_LOSS)


def vq_cpu() -> Config:
    return make_preset("mcga_vq", "cpu", VQ_MODEL, CPU_BUILTIN, **CPU_SCHEDULE, **VQ_LOSS)


def vq_smoke() -> Config:
    return make_preset("mcga_vq", "smoke", VQ_MODEL, SMOKE, rgb_norm="none", **VQ_LOSS)


# ----------------------------------------------------------------------------- stage 2
def paper() -> Config:
    return make_preset("mcga", "paper", MODEL, PAPER, steps=100_000, warmup_steps=5_000,
                       **STAGE2)


def cpu() -> Config:
    return make_preset("mcga", "cpu", MODEL, CPU_BUILTIN, **CPU_SCHEDULE, **STAGE2)


def smoke() -> Config:
    return make_preset("mcga", "smoke", MODEL, SMOKE, rgb_norm="none", **STAGE2)


def stage2(config: Config, stage1_workdir: str, which: str = "best") -> Config:
    """``config`` with ``init_from`` copying the codebooks (``moc``) and the Alg. 2 decoder
    (``decoder``) from the stage-1 (or mixture) run in ``stage1_workdir``; the model options
    the two stages share (:data:`SHARED_MODEL_KEYS`; ``num_codes`` is 512 N for a mixture of
    N) are taken from that run's ``config.json`` so the frozen parts fit."""
    from jaxspec.api import load_config
    model = dict(config.model)
    if (Path(stage1_workdir) / "config.json").is_file():
        s1 = load_config(stage1_workdir).model
        for k in SHARED_MODEL_KEYS:     # a key the stage-1 run did not set: the module default
            if k in s1:
                model[k] = s1[k]
            else:
                model.pop(k, None)
    return config.replace(model=model, init_from=tuple(
        {"workdir": str(stage1_workdir), "subtree": sub, "target": sub, "which": which}
        for sub in ("moc", "decoder")))


STAGE1_DIR = "stage1"
# what stage 1 takes from the stage-2 config: the data and the seed (the model keys the two
# stages share are copied too, so the frozen decoder fits)
_SHARED_FIELDS = ("dataset", "dataset_config", "data_dir", "manual_dir", "seed")


def stage1_config(config: Config) -> Config:
    """The stage-1 (``mcga_vq``) config that goes with the stage-2 ``config``: the same preset
    (its own step budget), data, seed and shared model options."""
    from jaxspec import registry
    vq = registry.get("mcga_vq")
    cfg1 = vq.config(config.preset if config.preset in vq.presets else "cpu")
    model = dict(cfg1.model)
    # the stage-1 preset's own model keys, and every key the stages share even when the
    # stage-1 preset leaves it at the module default (e.g. --set model.interface_width=32)
    model.update({k: v for k, v in config.model.items()
                  if (k in model or k in SHARED_MODEL_KEYS) and k != "random_mask"})
    return cfg1.replace(model=model, **{f: getattr(config, f) for f in _SHARED_FIELDS})


def train_stage1_first(config: Config, workdir: Path, **train_kwargs) -> Config | dict:
    """``python train.py --method mcga`` without ``init_from``: train stage 1 in
    ``<workdir>/stage1`` first (or reuse it when it has finished: it has its ``eval.json``),
    then train stage 2 on its codebooks and decoder. ``--init-from RUN`` (one whole-tree entry)
    naming a stage-1 or mixture run (``python -m jaxspec.moc``) uses that run's; any other
    ``init_from`` is returned unchanged. A stage 1 stopped by a signal returns its summary
    (stage 2 does not start; the same command resumes stage 1)."""
    from jaxspec.api import load_config
    if config.init_from:
        if len(config.init_from) == 1 and set(config.init_from[0]) <= {"workdir", "which"}:
            spec = config.init_from[0]
            if ((Path(spec["workdir"]) / "config.json").is_file()
                    and load_config(spec["workdir"]).method == "mcga_vq"):
                return stage2(config, spec["workdir"], spec.get("which", "best"))
        return config
    from jaxspec.train import loop
    wd1 = Path(workdir) / STAGE1_DIR
    if not (wd1 / "eval.json").is_file():
        log.info("MCGA stage 2 needs stage 1 (the codebooks and decoder it freezes): training "
                 "mcga_vq in %s first", wd1)
        summary = loop.train_and_evaluate(stage1_config(config), wd1, **train_kwargs)
        if summary.get("preempted"):     # SIGTERM/SIGINT: saved; the same command resumes it
            return summary
    else:
        log.info("MCGA: using the finished stage-1 run in %s", wd1)
    return stage2(config, str(wd1))
