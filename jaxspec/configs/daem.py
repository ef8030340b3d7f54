"""DAEM presets (paper / cpu / smoke). The architecture (``MODEL``) is the released code's in all
of them (6-layer mean head); ``--set model.decoder=paper`` gives the paper's 2-layer heads. Band
counts and the scale come from the data (``config.fusion.scale``).

* ``paper`` -- the released code (``setting.json``, ``demo_cave.py``; specs/daem.md §5): CAVE
  ``fusion`` config (alphabetical 16 train / 16 test), x32, DAEM PSF 5 for every image
  ("consistent degradation"), Nikon SRF, no noise, HR patches 128 x 128 (LR 4 x 4), batch 32,
  Adam 1e-3 constant (the MultiStepLR milestones never trigger), 100 epochs x 73 iterations;
  per-image fine-tuning of the decoders (engine ``adapt``): 190 Adam updates at 1e-3 = the
  updates the code makes before its reported iteration t = 200.
* ``cpu`` -- built-in ``spectral_scenes``, x8, PSF 5, LR 4 x 4 blocks (HR 32), batch 32, 600
  steps; ``theta_lr_scale=10`` (theta's Adam steps x10, so the PSF converges in 600 steps instead
  of the code's thousands; measured in docs/methods/daem.md).
* ``smoke`` -- 2 steps, x4 on 16 x 16 crops, for tests.
"""
from __future__ import annotations

from jaxspec.configs.base import CPU_BUILTIN, SMOKE, Config, make_preset

MODEL = dict(n_endmembers=16, decoder="code", srf_components=4, psf_init=5.0, srf_init="code",
             consistency="paper", theta_weights=(0.5, 0.2, 0.2), beta=0.5)

FUSION_DAEM = dict(psf="daem", daem_index=5, srf="daem_nikon", protocol="consistent",
                   normalize="minmax")
ADAPT = dict(adapt_steps=190, adapt_lr=1e-3,
             adapt_params=(r"^fusion/decoder_mu/", r"^fusion/decoder_sigma/"))
COMMON = dict(optimizer="adam", schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
              weight_decay=0.0, grad_clip=None, select_metric="psnr", augment="none")


def paper() -> Config:
    return make_preset(
        "daem", "paper", MODEL, COMMON, dataset="cave", dataset_config="fusion",
        fusion={**FUSION_DAEM, "scale": 32}, crop=128, batch_size=32, steps=7300, lr=1e-3,
        eval_split="test", eval_every=730, ckpt_every=730, log_every=73, seed=123, **ADAPT)


def cpu() -> Config:
    return make_preset(
        "daem", "cpu", {**MODEL, "theta_lr_scale": 10.0}, {**CPU_BUILTIN, **COMMON},
        fusion={**FUSION_DAEM, "scale": 8}, crop=32, batch_size=32, steps=600, lr=1e-3,
        eval_every=200, ckpt_every=200, **ADAPT)


def smoke() -> Config:
    return make_preset(
        "daem", "smoke", MODEL, {**SMOKE, **COMMON},
        fusion={**FUSION_DAEM, "scale": 4}, crop=16, lr=1e-3,
        **{**ADAPT, "adapt_steps": 2})
