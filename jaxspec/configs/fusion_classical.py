"""Presets of the parameter-free fusion baselines (``bicubic``, ``gsa``, ``cnmf``;
:mod:`jaxspec.models.fusion_classical`). Nothing is trained (``step_kind="none"``): a run
synthesises the fusion pairs of ``config.fusion`` from the evaluation split and scores them.

* ``paper`` -- the DAEM CAVE protocol (specs/daem.md §1): the ``cave/fusion`` split (last 16
  scenes alphabetically are ``test``), scale 32, DAEM PSF 5 for every image ("consistent"),
  the ``daem_nikon`` SRF, cubes min-max normalised to [0, 1]; needs ``--manual_dir``.
* ``cpu`` -- the built-in ``spectral_scenes`` validation split at x8 with the same PSF / SRF
  (8 images).
* ``smoke`` -- x4, Gaussian PSF, 2 images, for tests.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from jaxspec.configs.base import CPU_BUILTIN, SMOKE, Config, make_preset

DAEM_CAVE = dict(scale=32, psf="daem", daem_index=5, srf="daem_nikon", protocol="consistent",
                 normalize="minmax")
# CNMF's defaults follow the authors' code: 30 endmembers, 200 inner iterations, 1 outer.
MODELS: dict[str, dict[str, Any]] = {
    "bicubic": {},
    "gsa": dict(mode="grouped"),
    "cnmf": dict(n_endmembers=30, iters=200, outer_iters=1),
}


def presets(method: str) -> Mapping[str, Callable[[], Config]]:
    """``{"paper", "cpu", "smoke"}`` preset functions of ``method``."""
    model = MODELS[method]

    def paper() -> Config:
        return make_preset(method, "paper", model, CPU_BUILTIN, dataset="cave",
                           dataset_config="fusion", eval_split="test", max_eval_images=None,
                           crop=64, batch_size=1, fusion=dict(DAEM_CAVE), steps=0)

    def cpu() -> Config:
        return make_preset(method, "cpu", model, CPU_BUILTIN, crop=32, batch_size=1,
                           fusion=dict(DAEM_CAVE, scale=8), steps=0)

    def smoke() -> Config:
        small = dict(model, **({"n_endmembers": 8, "iters": 20} if method == "cnmf" else {}))
        return make_preset(method, "smoke", small, SMOKE, fusion=dict(scale=4, srf="daem_nikon"),
                           steps=0)

    return {"paper": paper, "cpu": cpu, "smoke": smoke}
