"""Registered parameter-free HSI-MSI fusion methods: ``bicubic``, ``gsa``, ``cnmf``.

Thin Flax wrappers (no parameters) of :mod:`jaxspec.fusion_baselines` for the ``fusion`` task
with ``step_kind="none"``: ``apply({}, lr_hsi, hr_msi, train=False, srf=, psf=)`` with the
batch's known SRF (B, C, M) and PSF (B, k, k) as side inputs (docs/architecture.md, "Fusion
task and parameter-free methods"). ``degradation`` names the operator that made the LR-HSI:
``"same"`` (the engine's ``jaxspec.data.fusion``: reflect blur + phase-0 decimation, odd k) or
``"daem"`` (``physics.daem_degrade``). docs/methods/fusion_baselines.md has the measurements.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxspec import fusion_baselines as fb
from jaxspec import registry
from jaxspec.configs import fusion_classical as presets


def _zeros_like_output(lr_hsi, scale: int):
    b, h, w, c = lr_hsi.shape
    return jnp.zeros((b, h * scale, w * scale, c), jnp.float32)


class Bicubic(nn.Module):
    """Cubic interpolation of the LR-HSI, aligned with the PSF centroid."""
    scale: int = 8
    degradation: str = "same"

    @nn.compact
    def __call__(self, lr_hsi, hr_msi, train: bool = False, psf=None):
        if psf is None:
            return fb.bicubic(lr_hsi, self.scale)
        p = fb._check_psf(psf, lr_hsi.shape[0], self.scale, self.degradation, "bicubic")
        c = fb._centers(None, p, self.scale, self.degradation)
        return fb.bicubic(lr_hsi, self.scale, lr_center=jnp.mean(c, axis=0))


class GSA(nn.Module):
    """Gram-Schmidt adaptive fusion with the known PSF (:func:`fusion_baselines.gsa`)."""
    scale: int = 8
    mode: str = "grouped"
    degradation: str = "same"

    @nn.compact
    def __call__(self, lr_hsi, hr_msi, train: bool = False, psf=None):
        if self.is_initializing():
            return _zeros_like_output(lr_hsi, self.scale)
        return fb.gsa(lr_hsi, hr_msi, self.scale, psf, mode=self.mode,
                      degradation=self.degradation if psf is not None else "daem")


class CNMF(nn.Module):
    """Coupled NMF with the known SRF and PSF (:func:`fusion_baselines.cnmf`)."""
    scale: int = 8
    n_endmembers: int = 30
    iters: int = 200
    outer_iters: int = 1
    degradation: str = "same"

    @nn.compact
    def __call__(self, lr_hsi, hr_msi, train: bool = False, srf=None, psf=None):
        if self.is_initializing():
            return _zeros_like_output(lr_hsi, self.scale)
        if srf is None:
            raise ValueError("cnmf needs the SRF: declare it as a side input (srf=...)")
        return fb.cnmf(lr_hsi, hr_msi, self.scale, srf, psf, n_endmembers=self.n_endmembers,
                       iters=self.iters, outer_iters=self.outer_iters,
                       degradation=self.degradation if psf is not None else "daem")


_REFS = {
    "bicubic": "Keys, Cubic convolution interpolation for digital image processing, IEEE TASSP "
               "1981",
    "gsa": "Aiazzi, Baronti, Selva, Improving component substitution pansharpening through "
           "multivariate regression of MS+Pan data, IEEE TGRS 2007; HS-MS adaptation of Yokoya, "
           "Grohnfeldt, Chanussot, IEEE GRSM 2017",
    "cnmf": "Yokoya, Yairi, Iwasaki, Coupled nonnegative matrix factorization unmixing for "
            "hyperspectral and multispectral data fusion, IEEE TGRS 2012",
}
for _name, _cls, _side, _desc in (
        ("bicubic", Bicubic, ("psf",), "cubic upsampling of the LR-HSI (no MSI)"),
        ("gsa", GSA, ("psf",), "Gram-Schmidt adaptive component substitution, known PSF"),
        ("cnmf", CNMF, ("srf", "psf"), "coupled NMF unmixing, known SRF and PSF")):
    registry.register(registry.Method(
        name=_name, make_model=registry.module_factory(_cls, _name),
        presets=presets.presets(_name), step_kind="none", task="fusion", side_inputs=_side,
        description=_desc, reference=_REFS[_name]))
