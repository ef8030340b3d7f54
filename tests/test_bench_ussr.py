"""bench/ussr.py's protocol pieces: the unpaired folds (no test scene in its model's HSI
stream), the ablation rows and table, and the SRF-estimation sweep over known cameras."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bu():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_ussr", REPO / "bench" / "ussr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cubes(n=6):
    rng = np.random.default_rng(0)
    return [(f"scene{i}", rng.random((32, 32, 31)).astype(np.float32)) for i in range(n)]


def test_unpaired_folds_never_put_a_test_scene_in_its_hsi_stream(bu):
    from jaxspec.errors import UsageError
    cubes = _cubes()
    ss = [np.zeros((8, 8, 31), np.float32)] * 3
    (name, hsi, test), = bu.unpaired_folds("spectral_scenes", cubes, ss, None)
    assert len(hsi) == 3 and [s for s, _ in test] == [s for s, _ in cubes]
    folds = bu.unpaired_folds("cave", cubes, ss, None)
    assert len(folds) == 2
    tested = []
    for _, hsi, test in folds:
        for scene, cube in test:
            assert not any(np.array_equal(cube, h) for h in hsi), scene
            tested.append(scene)
        assert len(hsi) == 3
    assert sorted(tested) == sorted(s for s, _ in cubes)          # each scene tested once
    assert bu.unpaired_folds("cave", cubes, ss, 1) == [folds[1]]
    with pytest.raises(UsageError, match="--fold must be 0 or 1"):
        bu.unpaired_folds("cave", cubes, ss, 2)
    with pytest.raises(UsageError, match="--fold needs --hsi-stream cave"):
        bu.unpaired_folds("spectral_scenes", cubes, ss, 0)


def test_training_rows_are_the_config_ablation_rows(bu):
    from jaxspec.configs import ussr as C
    from jaxspec.models import ussr as U
    (name, w), = bu.training_rows("none")
    assert w == U.LossWeights()
    rows = dict(bu.training_rows("all"))
    # L1-GC = the ladder's last rung; plus the code objective without its adversarial term
    assert len(rows) == len(C.ABLATION_LADDER) + len(C.REGULARISERS)
    assert rows["ablation code loss without the adversarial term"] == U.LossWeights(adv=0.0)
    cfg = C.cpu()
    for n, _, _ in C.ABLATION_LADDER:
        assert rows[f"ablation {n}"] == C.loss_weights(C.ablation(cfg, n))
    for n in ("1-GP", "0-GP"):
        assert rows[f"regulariser {n}"] == C.loss_weights(C.ablation(cfg, n))
    assert "regulariser L1-GC" in dict(bu.training_rows("regularisers"))


def test_ablation_table_direction_against_the_paper(bu):
    from jaxspec.configs import ussr as C
    ladder = [n for n, _, _ in C.ABLATION_LADDER]
    # every rung better than the one above (as the paper's), except +S_pos, worse in both
    psnr = [14.0, 20.0, 19.0, 25.0, 30.0, 31.0]
    sam = [60.0, 40.0, 45.0, 20.0, 10.0, 9.0]
    rows = {f"ablation {n}": {"mean": {"psnr": p, "ssim": 0.5, "sam": s}}
            for n, p, s in zip(ladder, psnr, sam)}
    rows["regulariser 1-GP"] = {"mean": {"psnr": 35.0, "ssim": 0.5, "sam": 5.0}}
    rows["regulariser 0-GP"] = {"mean": {"psnr": 36.0, "ssim": 0.5, "sam": 8.0}}
    table = bu.ablation_table(rows, "all").splitlines()
    line = {ln.split("|")[1].strip(): ln for ln in table if ln.startswith("| ")}
    assert line["adversarial"].rstrip().endswith("| - |")
    assert line["+S_bp"].rstrip().endswith("| yes, yes |")
    assert line["+S_pos"].rstrip().endswith("| no, no |")
    assert line["+S_sem"].rstrip().endswith("| yes, yes |")
    assert line["0-GP"].rstrip().endswith("| yes, no |")           # SAM rose; paper's fell
    # the L1-GC regulariser row is the ladder's last rung (31 < 36: PSNR "no", SAM 9 > 8: "no")
    assert "| L1-GC |" in "\n".join(table) and line["L1-GC"].rstrip().endswith("| no, no |")


def test_srf_curve_area_is_srf_accuracy_auc():
    from jaxspec.models import ussr as U
    rng = np.random.default_rng(1)
    true = rng.random((31, 3)) + 0.1
    est = true + 0.05 * rng.standard_normal((31, 3))
    a = U.srf_accuracy(est, true, curve=True)
    ths, frac = a["thresholds"], a["within"][0]
    assert ths.shape == frac.shape == (101,) and ths[0] == 0 and ths[-1] == 1
    assert frac[-1] == 1.0 and frac[0] < 0.1 and np.all(np.diff(frac) >= 0)
    # by hand: relative error to each true curve's peak, after normalising both to sum 1
    e, t = est / est.sum(0), true / true.sum(0)
    rel = np.abs(e - t) / t.max(0)
    np.testing.assert_allclose(frac, [(rel <= th).mean() for th in ths])
    assert np.trapezoid(frac, ths) == pytest.approx(float(a["auc"][0]), abs=1e-12)
    assert np.all(U.srf_accuracy(true, true, curve=True)["within"] == 1.0)
    assert "within" not in U.srf_accuracy(est, true)


def test_camera_sweep_pads_chunks_and_scores_every_render(bu):
    from jaxspec.models import ussr as U
    rng = np.random.default_rng(2)
    curves = rng.random((5, 31, 3)).astype(np.float32) + 0.05
    curves /= curves.sum(axis=1, keepdims=True)
    d = SimpleNamespace(curves=curves, n_cameras=5)
    calls = []

    def fake_apply(variables, rgb):              # always "the dictionary mean, camera 0"
        calls.append(rgb.shape)
        b = rgb.shape[0]
        return {"srf": np.broadcast_to(curves.mean(0), (b, 31, 3)),
                "weights": np.zeros((b, 5, 3)) + np.eye(5)[0][None, :, None]}

    rec = bu.camera_sweep(fake_apply, None, _cubes(2), d, side=16, chunk=2)
    assert set(calls) == {(2, 16, 16, 3)}              # the last chunk padded to one shape
    assert len(calls) == 2 * 3 and len(rec["auc"]) == 2 * 5
    assert rec["auc"] == rec["auc_mean_srf"] and rec["angle"] == rec["angle_mean_srf"]
    assert np.mean(rec["top1"]) == pytest.approx(1 / 5)
    s = bu.merge_sweeps([rec, rec], 5)
    assert s["renders"] == 20 and s["cameras"] == 5 and s["top1"] == pytest.approx(0.2)
    assert s["auc"] == pytest.approx(np.mean([float(U.srf_accuracy(curves.mean(0), c)["auc"][0])
                                              for c in curves]))


def test_weight_overrides_are_checked(bu, tmp_path):
    from jaxspec.errors import UsageError
    assert bu.weight_overrides(["adv=0", "sem=0.5"]) == {"adv": 0.0, "sem": 0.5}
    assert bu.weight_overrides(["syn=10", "syn_srf=1"]) == {"syn": 10.0, "syn_srf": 1.0}
    for bad, msg in (("adv", "expected NAME=VALUE"), ("gp=1", "expected NAME=VALUE"),
                     ("adv=x", "not a number"), ("adv=-1", "finite and >= 0"),
                     ("sem=nan", "finite and >= 0")):
        with pytest.raises(UsageError, match=msg):
            bu.weight_overrides([bad])
    with pytest.raises(UsageError, match="--weight 'adv=-1'"):
        bu.main(["--weight", "adv=-1", "--out", str(tmp_path / "r.json")])
    with pytest.raises(UsageError, match="--syn-squared"):
        bu.main(["--syn-squared", "--out", str(tmp_path / "r.json")])


def test_synthetic_pairs_render_the_stream_through_dictionary_mixes(bu):
    """The unpaired least-squares baseline's pairs: every HSI-stream cube through ``per_cube``
    cameras drawn like USSR's ``syn`` term (mixes of two dictionary cameras)."""
    from jaxspec.models import ussr as U
    curves = np.asarray(U.load_srf_dictionary("builtin").curves)
    cubes = [c for _, c in _cubes(3)]
    pairs = bu.synthetic_pairs(cubes, curves, per_cube=2, seed=1)
    assert len(pairs) == 6
    for i, (rgb, hsi) in enumerate(pairs):
        assert hsi is cubes[i // 2] and rgb.shape == (32, 32, 3)
        srf = np.linalg.lstsq(hsi.reshape(-1, 31), rgb.reshape(-1, 3), rcond=None)[0]
        np.testing.assert_allclose(srf.sum(axis=0), 1.0, rtol=1e-3)     # a column-sum-1 SRF
    assert not np.allclose(pairs[0][0], pairs[1][0])                    # two cameras per cube
    again = bu.synthetic_pairs(cubes, curves, per_cube=2, seed=1)
    np.testing.assert_array_equal(again[3][0], pairs[3][0])
