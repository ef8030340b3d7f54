"""Spectral physics for jaxspec: wavelength grids, the SRF library, projection, the NTIRE camera
pipelines (noise, exposure, Bayer/demosaic, JPEG) and spatial degradations for HSI-SR.

Everything applied to images is pure JAX (jit-able; differentiable where the operation is);
numpy inputs are accepted. Loaders and the SRF library are numpy. See docs/physics.md.
"""
from jaxspec.physics.camera import (
    apply_jpeg, bayer_mosaic, dark_noise, demosaic, expose_to_mean, ntire2020_clean_camera,
    ntire2020_realworld_camera, ntire2022_camera, quantize, shot_noise)
from jaxspec.physics.degrade import (
    DAEM_PSF_PARAMS, SR_PAIR_MODES, add_noise_snr, anisotropic_gaussian_psf, blur, daem_degrade,
    daem_psf, decimate, filter2d, gaussian_psf, make_sr_pair, normalize_psf, spatial_degrade)
from jaxspec.physics.grids import (
    CHIKUSEI_WAVELENGTHS, WAVELENGTHS_31, check_wavelengths, resample, wavelength_grid)
from jaxspec.physics.jpeg import jpeg, jpeg_pil, jpeg_quant_tables, rgb_to_ycbcr, ycbcr_to_rgb
from jaxspec.physics.render import make_consistent, project
from jaxspec.physics.srf import (
    NORMALIZATIONS, NTIRE2022_RGB_GAINS, get_srf, list_srfs, load_ntire2022_rgb_qe, load_srf_csv,
    normalize_srf, parse_camspec_database, register_srf, unregister_srf)

__all__ = [
    "WAVELENGTHS_31", "CHIKUSEI_WAVELENGTHS", "wavelength_grid", "resample", "check_wavelengths",
    "get_srf", "list_srfs", "register_srf", "unregister_srf", "normalize_srf", "load_srf_csv",
    "parse_camspec_database", "load_ntire2022_rgb_qe", "NORMALIZATIONS", "NTIRE2022_RGB_GAINS",
    "project", "make_consistent",
    "shot_noise", "dark_noise", "expose_to_mean", "quantize", "bayer_mosaic", "demosaic",
    "apply_jpeg", "ntire2022_camera", "ntire2020_realworld_camera", "ntire2020_clean_camera",
    "jpeg", "jpeg_pil", "jpeg_quant_tables", "rgb_to_ycbcr", "ycbcr_to_rgb",
    "gaussian_psf", "anisotropic_gaussian_psf", "normalize_psf", "blur", "decimate",
    "spatial_degrade", "add_noise_snr", "make_sr_pair", "filter2d",
    "DAEM_PSF_PARAMS", "daem_psf", "daem_degrade", "SR_PAIR_MODES",
]
