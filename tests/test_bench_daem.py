"""bench/daem.py's baseline rows: the blind least-squares rows (PSF and, for CNMF, SRF
estimated per image from the observed pair) against the oracle and box-PSF rows, and the row
labels of the table."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bd():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_daem", REPO / "bench" / "daem.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_labels(bd):
    assert bd._label("cnmf", "box PSF") == "cnmf (box PSF, true SRF)"
    assert bd._label("cnmf", bd.LS_PSF) == "cnmf (LS-estimated PSF and SRF)"
    assert bd._label("gsa", bd.LS_PSF) == "gsa (LS-estimated PSF)"
    assert (bd._label("lr_regression" + bd.BP, "true PSF")
            == "lr_regression (true PSF) + back-projection")


def test_blind_least_squares_rows_match_the_oracle(bd):
    """Image-wise protocol at x8 (a different DAEM kernel per image): the rows with the
    per-image least-squares PSF (and SRF) score as the rows given the true ones, and far above
    the box-PSF rows; every row has one score and one time per image."""
    from jaxspec import physics
    rng = np.random.default_rng(0)
    cubes = [(f"s{i}", np.asarray(jax.image.resize(rng.random((12, 12, 31)), (96, 96, 31),
                                                   "cubic")).clip(0, 1).astype(np.float32))
             for i in range(2)]
    srf = physics.get_srf("daem_nikon")
    pairs = bd.make_pairs(cubes, 8, "image-wise", srf)
    args = bd.parse_args(["--cnmf-iters", "20", "--cnmf-endmembers", "5"])
    methods = ["lr_regression", "cnmf"]
    oracle = bd.evaluate_baselines(pairs, methods, srf, 8, args)
    blind = bd.evaluate_baselines(pairs, methods, srf, 8, args, psf="ls")
    box = bd.evaluate_baselines(pairs, methods, srf, 8, args,
                                psf=np.full((8, 8), 1 / 64, np.float32))
    assert set(blind) == set(oracle) == {"lr_regression", "lr_regression" + bd.BP, "cnmf"}
    for m in blind:
        scores, secs = blind[m]
        assert len(scores["psnr"]) == len(secs) == 2 and min(secs) > 0
        np.testing.assert_allclose(scores["psnr"], oracle[m][0]["psnr"], atol=0.1)
    bp = "lr_regression" + bd.BP
    assert np.mean(blind[bp][0]["psnr"]) > np.mean(box[bp][0]["psnr"]) + 3


def test_least_squares_rows_skipped_when_the_psf_is_not_identifiable(bd, capsys):
    """96 x 96 scenes at x32 leave 3 x 3 LR pixels, fewer than the 31 bands + 1 that the
    least-squares PSF needs: no LS-estimated rows (and a message), the other rows still run."""
    from jaxspec import physics
    rng = np.random.default_rng(0)
    cubes = [("s0", rng.random((96, 96, 31)).astype(np.float32))]
    srf = physics.get_srf("daem_nikon")
    pairs = bd.make_pairs(cubes, 32, "consistent", srf)
    args = bd.parse_args([])
    assert bd.evaluate_baselines(pairs, ["lr_regression"], srf, 32, args, psf="ls") == {}
    assert "LS-estimated rows skipped at x32: 9 LR pixels" in capsys.readouterr().err
    assert set(bd.evaluate_baselines(pairs, ["lr_regression"], srf, 32, args)) == {
        "lr_regression", "lr_regression" + bd.BP}
