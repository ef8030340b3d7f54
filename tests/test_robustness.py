"""Robustness protocols (:mod:`jaxspec.robustness`): each operation against its formula, the
mixed protocol's shared permutation, determinism under the seed, and ``evaluate --perturb``
end to end on a tiny run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxspec import physics, registry, robustness
from jaxspec.errors import UsageError

import test_cli as TC  # noqa: E402  (the tiny CLI model and its smoke preset)


def _example(h=40, w=56, name="scene/validation/00001", seed=0):
    rng = np.random.default_rng(seed)
    hsi = rng.uniform(0.02, 0.9, (h, w, 31)).astype(np.float32)
    rgb = np.asarray(physics.project(hsi, physics.get_srf("cie1964")), np.float32)
    return {"rgb": rgb, "hsi": hsi, "name": name}


def test_parse_every_name_and_reject_the_rest():
    for n in robustness.names():
        p = robustness.parse(n)
        assert p.name == n and ":" not in p.tag
    assert robustness.parse("srf:nikon_d5100").srf == "nikon_d5100"
    assert robustness.parse("srf:nikon_d5100").tag == "srf-nikon_d5100"
    for bad in ("brightness+20", "srf:nope", "srf:", "JPEG", ""):
        with pytest.raises(UsageError, match="choose from"):
            robustness.parse(bad)


@pytest.mark.parametrize("name,gamma", [("brightness+10", 1.1), ("brightness-10", 0.9)])
@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_brightness_is_the_gamma_formula(name, gamma, scale):
    ex = _example()
    ex["rgb"] = ex["rgb"] * np.float32(scale)
    out = robustness.apply(robustness.parse(name), ex, full_scale=scale)
    want = scale * (ex["rgb"].astype(np.float64) / scale) ** (1.0 / gamma)
    np.testing.assert_allclose(out["rgb"], want, rtol=2e-6)
    assert out["rgb"].dtype == np.float32
    assert np.array_equal(out["hsi"], ex["hsi"])           # the target is unchanged
    # +10 brightens and -10 darkens every pixel below full scale
    inside = ex["rgb"] < scale
    assert np.all((out["rgb"] > ex["rgb"])[inside] == (gamma > 1))


def _patches(x, p):
    h, w = x.shape[0] // p, x.shape[1] // p
    return [x[i * p:(i + 1) * p, j * p:(j + 1) * p] for i in range(h) for j in range(w)]


def test_mixed_shuffles_rgb_and_hsi_patches_with_one_permutation():
    ex = _example(h=40, w=56)           # 2 x 3 grid of 16x16 patches, 8 rows / 8 cols left over
    p = robustness.parse("mixed")
    out = robustness.apply(p, ex, seed=3)
    # the same permutation: the shuffled RGB is still the shuffled HSI's projection
    np.testing.assert_allclose(out["rgb"], physics.project(out["hsi"],
                                                           physics.get_srf("cie1964")),
                               rtol=1e-5, atol=1e-6)
    for key in ("rgb", "hsi"):
        src, dst = _patches(ex[key], 16), _patches(out[key], 16)
        # a permutation of whole patches: each output patch is exactly one input patch
        idx = [next(i for i, s in enumerate(src) if np.array_equal(s, d)) for d in dst]
        assert sorted(idx) == list(range(6)) and idx != list(range(6))
        # the pixels beyond the last full patch stay where they were
        assert np.array_equal(out[key][32:], ex[key][32:])
        assert np.array_equal(out[key][:, 48:], ex[key][:, 48:])
    again = robustness.apply(p, ex, seed=3)
    assert np.array_equal(again["rgb"], out["rgb"]) and np.array_equal(again["hsi"], out["hsi"])
    others = [robustness.apply(p, ex, seed=s)["rgb"] for s in range(4, 8)]
    assert any(not np.array_equal(o, out["rgb"]) for o in others)


def test_noise_is_seeded_and_of_the_documented_level():
    ex = _example(h=64, w=64)
    p = robustness.parse("noise")
    a = robustness.apply(p, ex, seed=1)["rgb"]
    assert np.array_equal(a, robustness.apply(p, ex, seed=1)["rgb"])
    assert not np.array_equal(a, robustness.apply(p, ex, seed=2)["rgb"])
    other = dict(ex, name="scene/validation/00002")    # the key depends on the image too
    assert not np.array_equal(a, robustness.apply(p, other, seed=1)["rgb"])
    assert np.all(a >= 0)
    # shot + read noise: variance u / npe + (r / npe)^2 per pixel
    u = ex["rgb"]
    var = u / p.npe + (p.read_std / p.npe) ** 2
    d = a - u
    assert abs(np.mean(d)) < 4 * np.sqrt(np.mean(var) / d.size)
    assert np.sqrt(np.mean(d ** 2)) == pytest.approx(np.sqrt(np.mean(var)), rel=0.05)
    assert np.max(np.abs(d) / np.sqrt(var)) < 6.5


def test_jpeg_is_the_libjpeg_round_trip_of_the_8bit_codes():
    ex = _example(h=48, w=48)
    # a smooth image (JPEG's regime), so the round trip error is small
    yy, xx = np.mgrid[0:48, 0:48] / 48.0
    ex["rgb"] = np.stack([0.2 + 0.5 * yy, 0.3 + 0.4 * xx, 0.5 - 0.3 * yy * xx], -1).astype(
        np.float32)
    p = robustness.parse("jpeg")
    out = robustness.apply(p, ex)["rgb"]
    codes = np.round(np.clip(ex["rgb"], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_allclose(out * 255, physics.jpeg_pil(codes, 75).astype(np.float32),
                               rtol=0, atol=1e-4)
    assert np.array_equal(out, robustness.apply(p, ex, seed=9)["rgb"])   # no randomness
    err = out - ex["rgb"]
    assert 0 < np.sqrt(np.mean(err ** 2)) < 3 / 255 and np.max(np.abs(err)) < 12 / 255


def test_srf_rerenders_the_hsi():
    ex = _example()
    for cam in ("nikon_d5100", "canon_5d_mk2"):
        out = robustness.apply(robustness.parse(f"srf:{cam}"), ex,
                               srf=physics.get_srf(cam), full_scale=2.0)
        np.testing.assert_allclose(out["rgb"], 2.0 * np.asarray(physics.project(
            ex["hsi"], physics.get_srf(cam))), rtol=1e-6)
        assert not np.allclose(out["rgb"], 2.0 * ex["rgb"], rtol=1e-2)
    same = robustness.apply(robustness.parse("srf:cie1964"), ex,
                            srf=physics.get_srf("cie1964"))
    np.testing.assert_allclose(same["rgb"], ex["rgb"], rtol=1e-6)
    with pytest.raises(ValueError, match="SRF matrix"):
        robustness.apply(robustness.parse("srf:cie1964"), ex)


def test_batches_are_perturbed_image_by_image():
    """A batch's images get what each gets alone (pure in example and seed, not position)."""
    exs = [_example(seed=i, name=f"s/validation/{i:05d}") for i in range(3)]
    batch = {k: np.stack([e[k] for e in exs]) for k in ("rgb", "hsi")}
    batch["name"] = np.array([e["name"].encode() for e in exs], dtype=object)
    for name in ("mixed", "noise"):
        p = robustness.parse(name)
        (got,) = robustness.perturb_batches([batch], p, seed=5)
        for i, e in enumerate(exs):
            alone = robustness.apply(p, e, seed=5)
            assert np.array_equal(got["rgb"][i], alone["rgb"])
            assert np.array_equal(got["hsi"][i], alone["hsi"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from jaxspec import cli, data
    d = tmp_path_factory.mktemp("tfds")
    data.builder("spectral_scenes/tiny", data_dir=d)
    registry.register(registry.Method(name="rob_tiny", make_model=lambda m: TC.CliNet(),
                                      presets={"smoke": lambda: TC._smoke().replace(
                                          method="rob_tiny")}, stride=2))
    w = tmp_path_factory.mktemp("run") / "w"
    try:
        assert cli.main(["--method", "rob_tiny", "--preset", "smoke", "--dataset",
                         "spectral_scenes/tiny", "--data-dir", str(d), "--workdir", str(w),
                         "--no-progress"]) == 0
        yield w
    finally:
        registry.unregister("rob_tiny")


def test_evaluate_perturb_end_to_end(tiny_run, capsys):
    from jaxspec import evaluate
    w = tiny_run
    capsys.readouterr()

    def run(*extra):
        assert evaluate.main(["--workdir", str(w), "--figures", "0", "--max-images", "3",
                              *extra]) == 0
        path = Path(json.loads(capsys.readouterr().out)["path"])
        return path, json.loads(path.read_text())

    _, clean = run()
    path, dark = run("--perturb", "brightness-10")
    assert path.name == "eval_spectral_scenes-tiny_validation_brightness-10.json"
    assert dark["perturb"]["name"] == "brightness-10" and dark["perturb"]["gamma"] == 0.9
    assert dark["num_images"] == 3 and dark["per_image"].keys() == clean["per_image"].keys()
    assert dark["mean"]["mrae"] != clean["mean"]["mrae"]
    # re-rendering through the training camera (the tiny data's CIE 1964) is the clean eval
    path, same = run("--perturb", "srf:cie1964")
    assert path.name.endswith("_srf-cie1964.json")
    assert same["perturb"]["training_srf"] == "input.json"
    for k, v in clean["mean"].items():
        assert same["mean"][k] == pytest.approx(v, rel=1e-5)
    _, nikon = run("--perturb", "srf:nikon_d5100")
    assert nikon["per_image"] != clean["per_image"]
    # the model sees exactly robustness.apply of each example: recompute the noise protocol
    _, noisy = run("--perturb", "noise", "--perturb-seed", "2")
    import jaxspec
    model, variables = jaxspec.load(w)
    src = evaluate.prepare(w).source
    for i, (name, metrics) in enumerate(noisy["per_image"].items()):
        ex = {k: np.asarray(src[i][k]) for k in ("rgb", "hsi")}
        ex["name"] = name
        rgb = robustness.apply(robustness.parse("noise"), ex, seed=2)["rgb"]
        pred = jaxspec.reconstruct(model, variables, rgb)
        want = model.task.metrics(np.asarray(pred)[None], ex["hsi"][None],
                                  crop_border=noisy["crop_border"])
        for k in ("mrae", "rmse", "psnr", "sam"):
            assert metrics[k] == pytest.approx(float(want[k][0]), rel=1e-4), (name, k)
        assert metrics["mrae"] != clean["per_image"][name]["mrae"]
    # mixed: seeded, deterministic, and the seed is recorded
    _, m1 = run("--perturb", "mixed", "--perturb-seed", "4")
    _, m2 = run("--perturb", "mixed", "--perturb-seed", "4")
    assert m1["per_image"] == m2["per_image"] and m1["perturb"]["seed"] == 4
    # a bad name: one line and the usage exit code, before the run is loaded
    assert evaluate.main(["--workdir", str(w), "--perturb", "gamma"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--perturb: unknown protocol 'gamma'" in err[0]
    # TTA with a perturbation on a method without an adapt_loss: a usage error too
    assert evaluate.main(["--workdir", str(w), "--perturb", "jpeg", "--tta",
                          "--adapt-steps", "1"]) == 2
    assert "adapt_loss" in capsys.readouterr().err


def test_evaluate_consistent_projects_predictions_onto_the_input_rgb(tiny_run, tmp_path,
                                                                    capsys):
    """--consistent: each prediction made to reproduce its linear input RGB through the data's
    SRF (the per-image metrics are those of physics.make_consistent of the plain
    prediction); refused for a normalised input (the tiny run's min-max), a non-linear
    encoding and together with --perturb, each with a one-line message."""
    from jaxspec import cli, evaluate
    import jaxspec
    w = tmp_path / "lin"
    d = Path(json.loads((tiny_run / "config.json").read_text())["data_dir"])
    assert cli.main(["--method", "rob_tiny", "--preset", "smoke", "--dataset",
                     "spectral_scenes/tiny", "--data-dir", str(d), "--workdir", str(w),
                     "--no-progress", "--set", "rgb_norm=none"]) == 0
    capsys.readouterr()

    def run(*extra, workdir=w):
        code = evaluate.main(["--workdir", str(workdir), "--figures", "0", "--max-images", "3",
                              *extra])
        out = capsys.readouterr()
        if code != 0:
            return code, out.err
        path = Path(json.loads(out.out)["path"])
        return path, json.loads(path.read_text())

    _, plain = run()
    path, cons = run("--consistent")
    assert path.name == "eval_spectral_scenes-tiny_validation_consistent.json"
    assert cons["consistent"] == {"srf_from": "evaluation data srf feature"}
    model, variables = jaxspec.load(w)
    src = evaluate.prepare(w).source
    for i, (name, got) in enumerate(cons["per_image"].items()):
        rgb, hsi, srf = (np.asarray(src[i][k], np.float32) for k in ("rgb", "hsi", "srf"))
        pred = physics.make_consistent(jaxspec.reconstruct(model, variables, rgb), rgb, srf)
        np.testing.assert_allclose(np.asarray(pred) @ srf, rgb, atol=1e-5)
        want = model.task.metrics(np.asarray(pred)[None], hsi[None],
                                  crop_border=cons["crop_border"])
        for k in ("mrae", "rmse", "psnr", "sam"):
            assert got[k] == pytest.approx(float(want[k][0]), rel=1e-4), (name, k)
        assert got["rmse"] != plain["per_image"][name]["rmse"]
    code, err = run("--consistent", "--perturb", "jpeg")
    assert code == 2 and "--consistent with --perturb" in err
    code, err = run("--consistent", workdir=tiny_run)
    assert code == 2 and "rgb_norm='minmax'" in err.strip().splitlines()[-1]
    # predict --consistent on a 16-bit linear camera-RGB TIFF: the written cube reproduces
    # the photo's RGB (where the non-negativity clip leaves it alone), the sidecar says so
    import tifffile
    from jaxspec import predict
    rgb = np.asarray(src[0]["rgb"], np.float32)
    png = tmp_path / "photo.tif"
    tifffile.imwrite(png, np.round(np.clip(rgb, 0, 1) * 65535).astype(np.uint16))
    common = ["--workdir", str(w), str(png), "--out", str(tmp_path / "pred"),
              "--input-encoding", "linear", "--input-space", "camera", "--no-progress"]
    assert predict.main(common + ["--consistent"]) == 0
    cube = np.load(tmp_path / "pred" / "photo.npy")
    seen = np.round(np.clip(rgb, 0, 1) * 65535) / 65535
    ok = np.all(cube > 0, axis=-1)
    assert ok.mean() > 0.5
    np.testing.assert_allclose((cube @ np.asarray(src[0]["srf"]))[ok], seen[ok], atol=1e-5)
    assert json.loads((tmp_path / "pred" / "photo.json").read_text())["consistent"] == {
        "srf_from": "input.json"}
    assert predict.main(common[:1] + [str(tiny_run)] + common[2:] + ["--consistent"]) == 2
    assert "rgb_norm='minmax'" in capsys.readouterr().err
    spec = json.loads((w / "input.json").read_text())
    (w / "input.json").write_text(json.dumps(dict(spec, encoding="srgb")))
    code, err = run("--consistent")
    assert code == 2 and "input encoding is 'srgb'" in err


def test_evaluate_perturb_refuses_data_it_cannot_perturb(tiny_run, capsys):
    """RGB beyond the recorded full scale (jpeg / noise / brightness) and an RGB that is not
    the HSI through the recorded training SRF (srf:NAME): one-line usage errors."""
    from jaxspec import evaluate
    spec_path = tiny_run / "input.json"
    orig = spec_path.read_text()
    try:
        spec = json.loads(orig)
        spec_path.write_text(json.dumps(dict(spec, native_scale=0.01)))
        capsys.readouterr()
        assert evaluate.main(["--workdir", str(tiny_run), "--perturb", "jpeg",
                              "--figures", "0"]) == 2
        assert "exceeds the run's full scale 0.01" in capsys.readouterr().err
        nikon = physics.get_srf("nikon_d5100").tolist()
        spec_path.write_text(json.dumps(dict(spec, srf=nikon)))
        assert evaluate.main(["--workdir", str(tiny_run), "--perturb", "srf:canon_5d_mk2",
                              "--figures", "0"]) == 2
        assert "not its HSI projected through the training SRF" in capsys.readouterr().err
    finally:
        spec_path.write_text(orig)


def test_bench_robustness_section_and_errors(tiny_run, tmp_path, capsys):
    """bench/robustness.py on the tiny run: the table's cells are the eval JSON means, the
    RESULTS.md section replaces only itself; bad options exit 2 with one line."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import robustness as bench
    md = tmp_path / "RESULTS.md"
    md.write_text("# head\n\nkept text\n")
    args = ["--workdir", f"tiny={tiny_run}", "--protocols", "jpeg,mixed", "--max-images", "2",
            "--json", str(tmp_path / "r.json"), "--results", str(md), "--eval-dir",
            str(tmp_path / "ev")]
    assert bench.cli(args) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["columns"] == ["clean", "jpeg", "mixed"] and [r["row"] for r in res["rows"]] == \
        ["tiny"]
    ev = json.loads((tmp_path / "ev" / "tiny_jpeg.json").read_text())
    assert res["rows"][0]["cells"]["jpeg"]["mean"] == ev["mean"]
    text = md.read_text()
    assert text.startswith("# head\n\nkept text\n") and text.count(bench.BEGIN) == 1
    assert f"{ev['mean']['psnr']:.2f} / {ev['mean']['sam']:.2f} / {ev['mean']['mrae']:.3f}" \
        in text
    md.write_text(text + "\n## after\n")
    bench.write_section(md, bench.BEGIN + "\nnew\n" + bench.END)
    assert md.read_text() == "# head\n\nkept text\n\n" + bench.BEGIN + "\nnew\n" + bench.END + \
        "\n\n## after\n"
    capsys.readouterr()
    for bad, msg in ((["--protocols", "jpeg,blur"], "unknown protocol 'blur'"),
                     (["--workdir", "nope"], "NAME=PATH"),
                     (["--max-images", "0"], "--max-images must be >= 1")):
        argv = (["--workdir", f"tiny={tiny_run}"] if bad[0] != "--workdir" else []) + bad
        assert bench.cli(argv + ["--results", ""]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
