"""Wavelength grids, resampling, the SRF library and the real-file SRF parsers."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import physics as P

SHARED = Path(os.environ.get("JAXSPEC_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
SSF = SHARED / "camera_ssf"
CAMSPEC = SSF / "jiang2013_camspec" / "camspec_database.txt"
BUTCHERG = SSF / "butcherg_ssf_data"
NTIRE_QE = SSF / "ntire2022" / "RGB_Camera_QE.csv"
needs_shared = pytest.mark.skipif(not CAMSPEC.exists(), reason=f"shared data absent: {SSF}")


# ----------------------------------------------------------------------------- grids
def test_wavelengths_31():
    wl = P.WAVELENGTHS_31
    assert wl.dtype == np.float32 and wl.shape == (31,)
    assert wl[0] == 400 and wl[-1] == 700 and np.all(np.diff(wl) == 10)
    np.testing.assert_array_equal(P.wavelength_grid(400, 700, 10), wl)
    assert P.wavelength_grid(420, 720, 10).shape == (31,)
    assert P.wavelength_grid(500, 500, 5).tolist() == [500.0]


@pytest.mark.parametrize("args,msg", [((400, 700, 0), "step"), ((700, 400, 10), "stop"),
                                      ((400, 705, 10), "not an integer")])
def test_wavelength_grid_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        P.wavelength_grid(*args)


def test_resample_linear_and_extrapolation():
    src = np.array([400.0, 500.0, 600.0])
    v = np.array([[0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    dst = np.array([380.0, 450.0, 500.0, 575.0, 650.0])
    out = P.resample(v, src, dst)
    np.testing.assert_allclose(out[0], [0.0, 0.5, 1.0, 2.5, 3.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], 1.0)
    out0 = P.resample(v, src, dst, extrapolate="zero")
    np.testing.assert_allclose(out0[0], [0.0, 0.5, 1.0, 2.5, 0.0], rtol=1e-6)
    # other axis, and identity on the same grid
    np.testing.assert_allclose(P.resample(v.T, src, dst, axis=0), out.T)
    np.testing.assert_allclose(P.resample(v, src, src), v)
    assert out.dtype == np.float32


def test_resample_errors():
    with pytest.raises(ValueError, match="does not match"):
        P.resample(np.ones((2, 4)), [1, 2, 3], [1.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        P.resample(np.ones(3), [1, 3, 2], [1.5])
    with pytest.raises(ValueError, match="NaN"):
        P.resample(np.array([1.0, np.nan]), [1, 2], [1.5])
    with pytest.raises(ValueError, match="extrapolate"):
        P.resample(np.ones(2), [1, 2], [1.5], extrapolate="linear")


# ----------------------------------------------------------------------------- library
@pytest.mark.parametrize("name", ["cie1964", "cie1931", "nikon_d5100", "sigma_sd_merrill",
                                  "canon_5d_mk2"])
def test_builtin_srfs_shape_and_normalisation(name):
    s = P.get_srf(name)
    assert s.shape == (31, 3) and s.dtype == np.float32
    assert np.all(s >= 0) and np.all(np.isfinite(s))
    # default "sum_g": a flat unit spectrum gives G = 1
    np.testing.assert_allclose(np.ones(31) @ s, [s[:, 0].sum(), 1.0, s[:, 2].sum()], rtol=1e-5)
    np.testing.assert_allclose(s[:, 1].sum(), 1.0, rtol=1e-5)
    assert P.get_srf(name, normalize="peak").max() == pytest.approx(1.0)
    raw = P.get_srf(name, normalize=None)
    # normalisations are one scalar: channel ratios kept
    np.testing.assert_allclose(s * raw[:, 1].sum(), raw, rtol=1e-4, atol=1e-7)
    # peaks sit where they physically should (R > G > B in wavelength)
    peaks = P.WAVELENGTHS_31[np.argmax(raw, axis=0)]
    assert peaks[0] > peaks[1] > peaks[2] or name.startswith("cie")


def test_cie_srfs_match_colour_cmfs():
    import colour
    cmfs = colour.MSDS_CMFS["CIE 1964 10 Degree Standard Observer"]
    raw = P.get_srf("cie1964", normalize=None)
    ybar_555 = cmfs[550.0][1]
    assert raw[15, 1] == pytest.approx(ybar_555, rel=1e-5)  # 550 nm is index 15
    # CIE 1964 xbar has its secondary blue lobe: R(440) > R(500)
    assert raw[4, 0] > raw[10, 0]
    assert not np.allclose(P.get_srf("cie1931"), P.get_srf("cie1964"))


def test_sigma_constant_extrapolation_above_680():
    raw = P.get_srf("sigma_sd_merrill", normalize=None)
    np.testing.assert_array_equal(raw[29], raw[28])  # 690 nm == 680 nm
    np.testing.assert_array_equal(raw[30], raw[28])


def test_get_srf_other_grid_and_errors():
    wl = P.wavelength_grid(420, 720, 5)
    s = P.get_srf("nikon_d5100", wavelengths=wl)
    assert s.shape == (61, 3)
    np.testing.assert_allclose(s[:, 1].sum(), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown SRF"):
        P.get_srf("nope")
    with pytest.raises(ValueError, match="normalize"):
        P.get_srf("cie1964", normalize="l2")


def test_register_srf_roundtrip():
    name = "_test_camera"
    arr = np.stack([np.linspace(0, 1, 31), np.ones(31), np.linspace(1, 0, 31)], 1)
    try:
        P.register_srf(name, arr)
        assert name in P.list_srfs()
        np.testing.assert_allclose(P.get_srf(name, normalize=None), arr, rtol=1e-6)
        np.testing.assert_allclose(P.get_srf(name), arr / 31.0, rtol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            P.register_srf(name, arr)
        P.register_srf(name, 2 * arr, overwrite=True)
        np.testing.assert_allclose(P.get_srf(name), arr / 31.0, rtol=1e-6)
    finally:
        P.unregister_srf(name)
    assert name not in P.list_srfs()
    with pytest.raises(ValueError, match="built-in"):
        P.register_srf("cie1964", arr)
    with pytest.raises(ValueError, match=r"\(n_bands, 3\)"):
        P.register_srf(name, arr[:, :2])
    with pytest.raises(ValueError, match="31 bands but wavelengths has 30"):
        P.register_srf(name, arr, wavelengths=np.arange(30.0))
    with pytest.raises(ValueError, match="negative"):
        P.register_srf(name, -arr)


# ----------------------------------------------------------------------------- projection
def test_project_shapes_and_values():
    srf = P.get_srf("cie1931")
    hsi = np.random.default_rng(0).uniform(size=(2, 4, 5, 31)).astype(np.float32)
    rgb = P.project(hsi, srf)
    assert rgb.shape == (2, 4, 5, 3) and rgb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(rgb), hsi @ srf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(P.project(np.ones(31), srf))[1], 1.0, rtol=1e-5)
    jitted = jax.jit(P.project)(hsi, srf)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(rgb), rtol=1e-6)


def test_make_consistent_is_the_nearest_spectrum_reproducing_the_rgb():
    """Its output reproduces the RGB, leaves spectra that already do unchanged, moves each
    spectrum only within the span of the SRF (the nearest such spectrum: the null-space part
    is kept), and names a shape mismatch."""
    rng = np.random.default_rng(3)
    srf = P.get_srf("cie1964")
    hsi = rng.uniform(size=(2, 4, 5, 31)).astype(np.float32)
    rgb = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32) * 0.5
    out = np.asarray(P.make_consistent(hsi, rgb, srf), np.float64)
    assert out.shape == hsi.shape and out.dtype == np.float64
    np.testing.assert_allclose(out @ srf, rgb, atol=2e-6)
    q, _ = np.linalg.qr(srf.astype(np.float64))                  # orthonormal basis of span(S)
    null = np.eye(31) - q @ q.T
    np.testing.assert_allclose((out - hsi) @ null, 0.0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(P.make_consistent(hsi, hsi @ srf, srf)), hsi,
                               atol=2e-6)
    with pytest.raises(ValueError, match=r"rgb has shape \(5, 3\).*\(2, 4, 5, 3\)"):
        P.make_consistent(hsi, rgb[0, 0], srf)


def test_project_errors_name_shapes():
    srf = P.get_srf("cie1931")
    with pytest.raises(ValueError, match=r"hsi has 30 bands .*\(4, 4, 30\).*\(31, 3\)"):
        P.project(np.ones((4, 4, 30)), srf)
    with pytest.raises(ValueError, match=r"srf must have shape \(C, K\)"):
        P.project(np.ones((4, 31)), srf[None])
    with pytest.raises(ValueError, match="band axis"):
        P.project(np.float32(1.0), srf)
    bad = np.ones((2, 31))
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="hsi contains NaN"):
        P.project(bad, srf)


def test_project_grad_wrt_srf_parameters():
    """Gradient through a parametric SRF (Gaussian bands with learnable centres/widths)."""
    wl = jnp.asarray(P.WAVELENGTHS_31)
    hsi = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 3, 31)), jnp.float32)
    target = P.project(hsi, P.get_srf("nikon_d5100"))

    def loss(params):
        mu, log_sig = params
        srf = jnp.exp(-0.5 * ((wl[:, None] - mu) / jnp.exp(log_sig)) ** 2)
        srf = srf / srf[:, 1].sum()
        return jnp.mean((P.project(hsi, srf) - target) ** 2)

    params = (jnp.array([600.0, 530.0, 460.0]), jnp.log(jnp.array([30.0, 30.0, 30.0])))
    g_mu, g_sig = jax.grad(loss)(params)
    assert np.all(np.isfinite(g_mu)) and np.any(np.abs(g_mu) > 0)
    assert np.all(np.isfinite(g_sig)) and np.any(np.abs(g_sig) > 0)
    # finite-difference check on one centre
    eps = 0.05
    fd = (loss((params[0].at[1].add(eps), params[1])) - loss((params[0].at[1].add(-eps), params[1]))) / (2 * eps)
    assert float(g_mu[1]) == pytest.approx(float(fd), rel=2e-2, abs=1e-9)


# ----------------------------------------------------------------------------- loaders
def test_load_srf_csv_formats(tmp_path):
    wl = np.arange(400, 701, 10)
    vals = np.stack([np.linspace(0, 1, 31), np.linspace(1, 2, 31), np.linspace(2, 0, 31)], 1)
    body_c = "\n".join(f"{w},{r},{g},{b}" for w, (r, g, b) in zip(wl, vals))
    body_w = "\n".join(f"{w}\t{r} {g}   {b}" for w, (r, g, b) in zip(wl, vals))
    (tmp_path / "a.csv").write_text("# comment\nwl,R,G,B\n" + body_c + "\n\n")
    (tmp_path / "b.txt").write_text(body_w)
    for f in ("a.csv", "b.txt"):
        np.testing.assert_allclose(P.load_srf_csv(tmp_path / f, normalize=None), vals, rtol=1e-6)
    np.testing.assert_allclose(P.load_srf_csv(tmp_path / "a.csv")[:, 1].sum(), 1.0, rtol=1e-5)
    (tmp_path / "bad.csv").write_text("wl,R,G,B\n400,1,2,3\n410,1,x,3\n")
    with pytest.raises(ValueError, match=r"bad.csv:3"):
        P.load_srf_csv(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("400,1,2,3\n410,1,2\n")
    with pytest.raises(ValueError, match=r"short.csv:2: expected 4 columns"):
        P.load_srf_csv(tmp_path / "short.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        P.load_srf_csv(tmp_path / "missing.csv")


def _camspec_text(n_values=33, drop_row=False):
    lines = ["", "http://example.org/db.html", "400nm-720nm, step 10nm", "---------", ""]
    for cam in ("Cam A", "Cam B"):
        lines.append(cam)
        for c in range(3 - int(drop_row and cam == "Cam B")):
            lines.append("\t".join(f"{(c + 1) * 0.01 * i:.4f}" for i in range(n_values)))
        lines.append("")
    return "\n".join(lines)


def test_parse_camspec_synthetic(tmp_path):
    p = tmp_path / "camspec_database.txt"
    p.write_text(_camspec_text())
    d = P.parse_camspec_database(p, normalize=None)
    assert list(d) == ["Cam A", "Cam B"]
    assert d["Cam A"].shape == (31, 3)
    np.testing.assert_allclose(d["Cam A"][:, 2], 0.03 * np.arange(31), rtol=1e-5, atol=1e-7)
    p.write_text(_camspec_text(n_values=32))
    with pytest.raises(ValueError, match=r"camspec_database.txt:7: expected 33 values"):
        P.parse_camspec_database(p)
    p.write_text(_camspec_text(drop_row=True))
    with pytest.raises(ValueError, match=r"camspec_database.txt:11: camera 'Cam B' has 2"):
        P.parse_camspec_database(p)
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        P.parse_camspec_database(tmp_path / "nothere.txt")


@needs_shared
def test_parse_camspec_real_matches_butcherg():
    d = P.parse_camspec_database(CAMSPEC, normalize=None)
    assert len(d) == 28
    for s in d.values():
        assert s.shape == (31, 3) and s.dtype == np.float32
        assert 0.99 <= s.max() <= 1.0001  # per-channel peak-normalised data
    # every camera equals the butcherg CSV of the same camera
    checked = 0
    for f in sorted(BUTCHERG.glob("*_camspec_*.csv")):
        key = f.stem.split("_camspec_")[1]  # e.g. "SONY_NEX-5N", "Phase_One"
        match = [n for n in d if n.replace(" ", "_").lower() == key.lower()]
        assert len(match) == 1, (key, list(d))
        np.testing.assert_allclose(P.load_srf_csv(f, normalize=None), d[match[0]], atol=1e-6)
        checked += 1
    assert checked == 28
    # default normalisation applies to the parser too
    dn = P.parse_camspec_database(CAMSPEC)
    np.testing.assert_allclose(dn["Nikon D5100"][:, 1].sum(), 1.0, rtol=1e-5)


@needs_shared
def test_ntire2022_rgb_qe_real():
    raw = P.load_ntire2022_rgb_qe(NTIRE_QE, normalize=None, apply_gains=False)
    gained = P.load_ntire2022_rgb_qe(NTIRE_QE, normalize=None)
    assert raw.shape == gained.shape == (31, 3)
    np.testing.assert_allclose(gained, raw * P.NTIRE2022_RGB_GAINS, rtol=1e-6)
    # the first data row of the file is 360 nm; 400 nm equals the 400 nm row of the CSV
    import csv
    with open(NTIRE_QE) as fh:
        rows = {int(float(r["Wavelength[nm]"])): r for r in csv.DictReader(fh)}
    r400 = rows[400]
    np.testing.assert_allclose(
        raw[0], [float(r400["R"]), (float(r400["G1"]) + float(r400["G2"])) / 2, float(r400["B"])],
        rtol=1e-6)
    g1 = P.load_ntire2022_rgb_qe(NTIRE_QE, normalize=None, green="G1")
    assert np.abs(g1[:, 1] - gained[:, 1]).max() < 1e-2 * gained.max()
    # the gains white-balance the camera: R, G, B sums within 10%
    sums = gained.sum(0)
    assert np.all(np.abs(sums / sums[1] - 1) < 0.1)
    np.testing.assert_allclose(P.load_ntire2022_rgb_qe(NTIRE_QE)[:, 1].sum(), 1.0, rtol=1e-5)


def test_ntire2022_qe_malformed(tmp_path):
    p = tmp_path / "qe.csv"
    p.write_text("Wavelength[nm],R,G1,G2,B\n400,1,1,1,1\n401,1,oops,1,1\n")
    with pytest.raises(ValueError, match=r"qe.csv:3: malformed"):
        P.load_ntire2022_rgb_qe(p)
    p.write_text("nm,R,G,B\n400,1,1,1\n")
    with pytest.raises(ValueError, match=r"qe.csv:1: header .* lacks"):
        P.load_ntire2022_rgb_qe(p)
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        P.load_ntire2022_rgb_qe(tmp_path / "absent.csv")
