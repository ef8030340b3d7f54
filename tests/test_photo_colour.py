"""Photo -> model camera space (``jaxspec.data.photos.srgb_to_camera_matrix``) and explicit
exposure (``apply_exposure``), the conversions ``predict`` applies to display-referred photos."""
from __future__ import annotations

import numpy as np
import pytest

from jaxspec.data import photos
from jaxspec.data.spectra import reflectance_pool
from jaxspec.errors import InputError
from jaxspec.physics import WAVELENGTHS_31, get_srf, resample


def _srgb_linear_of(refl):
    """Independent rendering: reflectance under D65 -> CIE 1931 XYZ (Y of white = 1) -> linear
    sRGB with the IEC 61966-2-1 matrix (typed in, not taken from colour-science)."""
    import colour
    wl = np.asarray(WAVELENGTHS_31, np.float64)
    cmf = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
    xyz_bar = np.stack([np.interp(wl, cmf.wavelengths, cmf.values[:, i]) for i in range(3)], 1)
    d65 = colour.SDS_ILLUMINANTS["D65"]
    e = np.interp(wl, d65.wavelengths, d65.values)
    xyz = (refl * e) @ xyz_bar / (e @ xyz_bar[:, 1])
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415],
                  [0.0557, -0.2040, 1.0570]])
    return xyz @ m.T


@pytest.mark.parametrize("camera", ["cie1964", "nikon_d5100", "canon_5d_mk2"])
def test_matrix_maps_srgb_photo_of_reflectances_to_the_camera(camera):
    srf = np.asarray(get_srf(camera), np.float64)
    a = photos.srgb_to_camera_matrix(srf)
    assert a.shape == (3, 3) and a.dtype == np.float32
    refl = np.asarray(reflectance_pool().spectra, np.float64)[::7]
    target = refl @ srf
    got = _srgb_linear_of(refl) @ a
    rel = np.linalg.norm(got - target) / np.linalg.norm(target)
    # a 3x3 map cannot be exact (Luther condition), but it must be close, and far better
    # than feeding the sRGB values unchanged
    plain = np.linalg.norm(_srgb_linear_of(refl) - target) / np.linalg.norm(target)
    assert rel < 0.03 and rel < 0.1 * plain, (rel, plain)
    # white-balanced: the photo's white is unit reflectance in the camera
    np.testing.assert_allclose(np.ones(3) @ a, np.ones(31) @ srf, rtol=0.02)


def test_matrix_other_band_grid_and_bad_input():
    srf = np.asarray(get_srf("cie1964"), np.float64)
    wl5 = np.arange(400.0, 701.0, 5.0)
    srf5 = resample(srf, WAVELENGTHS_31, wl5, axis=0)
    np.testing.assert_allclose(photos.srgb_to_camera_matrix(srf5, wl5),
                               photos.srgb_to_camera_matrix(srf), atol=2e-3)
    # repeated / unordered wavelengths (overlapping detectors, e.g. EnMAP) are merged
    wl_rep = np.concatenate([wl5[:40], wl5[35:]])
    srf_rep = np.concatenate([srf5[:40], srf5[35:]])
    perm = np.random.default_rng(0).permutation(len(wl_rep))
    np.testing.assert_allclose(photos.srgb_to_camera_matrix(srf_rep[perm], wl_rep[perm]),
                               photos.srgb_to_camera_matrix(srf5, wl5), atol=1e-5)
    with pytest.raises(InputError, match="no response in 400-700"):
        photos.srgb_to_camera_matrix(np.ones((5, 3)), np.arange(1000.0, 1050.0, 10.0))
    with pytest.raises(InputError, match="srf must be"):
        photos.srgb_to_camera_matrix(np.ones((31, 4)))
    with pytest.raises(InputError, match="wavelengths"):
        photos.srgb_to_camera_matrix(srf5)
    with pytest.raises(InputError, match="NaN"):
        photos.srgb_to_camera_matrix(np.full((31, 3), np.nan))


def test_to_model_encoding_applies_the_matrix_after_linearising():
    a = photos.srgb_to_camera_matrix(get_srf("cie1964"))
    img = np.random.default_rng(0).random((5, 6, 3)).astype(np.float32)
    got = photos.to_model_encoding(img, encoding="srgb", expects="linear", colour_matrix=a)
    want = np.maximum(photos.srgb_to_linear(img) @ a, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # a model that takes display-referred RGB gets no matrix
    np.testing.assert_array_equal(
        photos.to_model_encoding(img, encoding="srgb", expects="srgb", colour_matrix=a), img)
    with pytest.raises(InputError, match="3x3"):
        photos.to_model_encoding(img, encoding="srgb", colour_matrix=np.eye(2))


def test_apply_exposure():
    x = np.random.default_rng(1).random((20, 20, 3)).astype(np.float32) * 0.1
    same, g = photos.apply_exposure(x, "as-is")
    assert g == 1.0 and np.array_equal(same, x)
    y, g = photos.apply_exposure(x, "normalise", reference=0.5)
    assert np.percentile(y, 99) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(y, x * g, rtol=1e-6)
    assert photos.apply_exposure(np.zeros((4, 4, 3)), "normalise", 0.5)[1] == 1.0
    with pytest.raises(InputError, match="rgb_p99"):
        photos.apply_exposure(x, "normalise", None)
    with pytest.raises(InputError, match="exposure"):
        photos.apply_exposure(x, "auto")
