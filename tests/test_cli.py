"""CLI: flags -> config, a full train / resume / evaluate / predict cycle on the tiny
``spectral_scenes`` config with a tiny registered model (fast), and the real MST++ smoke
run through ``python train.py`` (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxspec import cli, registry
from jaxspec.configs.base import Config

REPO = Path(__file__).resolve().parents[1]


class CliNet(nn.Module):
    @nn.compact
    def __call__(self, rgb, train=False):
        x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
        x = nn.Conv(8, (2, 2), strides=2)(x)                     # stride-2 model
        x = nn.ConvTranspose(31, (2, 2), strides=(2, 2))(x)
        return jax.nn.softplus(x) + 1e-3


def _smoke():
    return Config(method="cli_tiny", preset="smoke", crop=16, batch_size=2, steps=4, lr=3e-3,
                  log_every=2, eval_every=2, ckpt_every=2, max_eval_images=2)


@pytest.fixture
def cli_tiny():
    registry.register(registry.Method(name="cli_tiny", make_model=lambda m: CliNet(),
                                      presets={"smoke": _smoke, "cpu": _smoke}, stride=2))
    yield "cli_tiny"
    registry.unregister("cli_tiny")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from jaxspec import data
    d = tmp_path_factory.mktemp("tfds")
    data.builder("spectral_scenes/tiny", data_dir=d)
    return d


def test_flags_to_config():
    p = cli.build_parser()
    a = p.parse_args(["--method", "mstpp", "--dataset", "spectral_scenes/real", "--steps", "9",
                      "--batch-size", "6", "--crop", "24", "--seed", "3", "--set", "lr=1e-3",
                      "--set", "grad_clip=0.5", "--data-dir", "/x"])
    cfg = cli.config_from_args(a)
    assert cfg.preset == ("cpu" if jax.default_backend() == "cpu" else "paper")
    assert (cfg.dataset, cfg.dataset_config, cfg.data_dir) == ("spectral_scenes", "real", "/x")
    assert (cfg.steps, cfg.batch_size, cfg.crop, cfg.seed) == (9, 6, 24, 3)
    assert cfg.lr == 1e-3 and cfg.grad_clip == 0.5
    a = p.parse_args(["--method", "mstpp", "--preset", "smoke", "--dataset", "arad1k"])
    cfg = cli.config_from_args(a)
    assert cfg.preset == "smoke" and cfg.dataset == "arad1k" and cfg.dataset_config is None
    assert p.parse_args(["--method", "m", "--no-resume"]).resume is False
    assert p.parse_args(["--method", "m"]).resume is True


def test_cli_errors_and_print_config(capsys):
    assert cli.main(["--method", "mstpp", "--set", "nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    assert cli.main(["--method", "not_a_method"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli.main(["--method", "mstpp", "--preset", "bogus"]) == 2
    assert cli.main(["--method", "mstpp", "--preset", "smoke", "--print-config",
                     "--set", "steps=5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 5 and out["method"] == "mstpp"


def test_init_from_flag(tmp_path, capsys):
    """``--init-from WORKDIR``: one whole-tree ``init_from`` entry; a directory that is not a
    workdir is refused before anything runs (usage error, exit 2, naming it)."""
    assert cli.main(["--method", "mstpp", "--preset", "smoke", "--init-from",
                     str(tmp_path / "nope"), "--print-config"]) == 2
    assert "--init-from" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    a = cli.build_parser().parse_args(["--method", "mstpp", "--init-from", str(tmp_path)])
    assert cli.config_from_args(a).init_from == ({"workdir": str(tmp_path.absolute())},)
    # FILE.npz:TARGET (user weights of one sub-network) and --freeze
    np.savez(tmp_path / "e1.npz", **{"params/w": np.zeros(2)})
    a = cli.build_parser().parse_args(["--method", "mstpp", "--init-from",
                                       f"{tmp_path / 'e1.npz'}:E1", "--freeze", "^E1/"])
    c = cli.config_from_args(a)
    assert c.init_from == ({"file": str(tmp_path / "e1.npz"), "target": "E1"},)
    assert c.frozen[-1] == "^E1/"
    for bad in (f"{tmp_path / 'missing.npz'}:E1", f"{tmp_path / 'e1.npz'}:"):
        assert cli.main(["--method", "mstpp", "--preset", "smoke", "--init-from", bad,
                         "--print-config"]) == 2
        assert "--init-from" in capsys.readouterr().err


def test_train_resume_evaluate_predict(cli_tiny, tiny_data, tmp_path, capsys):
    w = tmp_path / "run"
    args = ["--method", cli_tiny, "--preset", "smoke", "--dataset", "spectral_scenes/tiny",
            "--data-dir", str(tiny_data), "--workdir", str(w), "--no-progress"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and summary["start_step"] == 0
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["method"] == cli_tiny and cfg["dataset_config"] == "tiny"
    lines = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [2, 4]
    assert all(x["steps_per_sec"] > 0 and np.isfinite(x["grad_norm"]) for x in train)
    assert any("val/mrae" in x for x in lines)
    ev = json.loads((w / "eval.json").read_text())
    # the final evaluation scores the images the best checkpoint was selected on
    # (max_eval_images=2 of the 4 validation images); `evaluate` below scores all of them
    assert ev["num_images"] == 2 and len(ev["per_image"]) == 2
    assert ev["task"] == "rgb2hsi" and ev["select_metric"] == "mrae"
    assert set(ev["mean"]) >= {"mrae", "rmse", "psnr", "sam", "ssim", "mrae_pos"}
    assert ev["mean"]["mrae"] == pytest.approx(np.mean([v["mrae"] for v in
                                                        ev["per_image"].values()]))
    assert len(list((w / "figures").glob("*.png"))) == 2
    assert len(json.loads((w / "bands.json").read_text())) == 31

    # resume: same workdir, more steps -> continues from step 4
    assert cli.main(args + ["--steps", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["start_step"] == 4 and summary["step"] == 6
    capsys.readouterr()
    assert cli.main(args + ["--steps", "8", "--no-resume"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    # re-evaluate the best checkpoint with the x8 ensemble
    from jaxspec import evaluate
    assert evaluate.main(["--workdir", str(w), "--ensemble", "--figures", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    ens = json.loads(Path(out["path"]).read_text())
    assert ens["ensemble"] is True and ens["num_images"] == 4
    assert Path(out["path"]).name == "eval_spectral_scenes-tiny_validation_ens.json"

    # predict user images of odd sizes in every format
    from PIL import Image
    import scipy.io
    import tifffile
    from jaxspec import predict
    rng = np.random.default_rng(0)
    png, jpg, tif = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.tif"
    Image.fromarray((rng.random((21, 30, 3)) * 255).astype(np.uint8)).save(png)
    Image.fromarray((rng.random((17, 19, 3)) * 255).astype(np.uint8)).save(jpg)
    tifffile.imwrite(tif, (rng.random((13, 22, 3)) * 65535).astype(np.uint16))
    out_dir = tmp_path / "pred"
    for fmt in ("npy", "mat", "tif"):
        assert predict.main(["--workdir", str(w), str(png), str(jpg), str(tif), "--out",
                             str(out_dir), "--format", fmt]) == 0
    cube = np.load(out_dir / "a.npy")
    side = json.loads((out_dir / "a.json").read_text())
    assert cube.shape == (21, 30, 31) and side["bands"][0] == pytest.approx(400.0)
    m = scipy.io.loadmat(out_dir / "b.mat")
    assert m["cube"].shape == (17, 19, 31) and m["bands"].size == 31
    with tifffile.TiffFile(out_dir / "c.tif") as t:
        assert t.asarray().shape == (31, 13, 22)
        assert len(t.shaped_metadata[0]["bands"]) == 31
    np.testing.assert_allclose(scipy.io.loadmat(out_dir / "a.mat")["cube"], cube, rtol=1e-6)
    capsys.readouterr()
    assert predict.main(["--workdir", str(w), str(tmp_path / "missing.png")]) == 2
    assert "image not found" in capsys.readouterr().err


@pytest.mark.slow
def test_train_py_mstpp_smoke_subprocess(tiny_data, tmp_path):
    w = tmp_path / "mstpp"
    r = subprocess.run([sys.executable, "train.py", "--method", "mstpp", "--preset", "smoke",
                        "--dataset", "spectral_scenes/tiny", "--data-dir", str(tiny_data),
                        "--workdir", str(w), "--no-progress", "--set", "eval_every=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((w / "eval.json").read_text())
    assert ev["params"] == 1_619_625 and np.isfinite(ev["mean"]["mrae"])


def _output_energy(apply_fn, variables, inputs):
    """A self-supervised loss for the TTA test: it moves every parameter of CliNet."""
    return jax.numpy.mean(apply_fn(variables, inputs["rgb"], train=False) ** 2)


@pytest.mark.slow   # trains a tiny run: once (slow leg), not once per Python
def test_tta_is_adapt(tiny_data, tmp_path, capsys):
    """``--tta`` is ``--adapt`` in ``jaxspec.evaluate`` and ``jaxspec.predict``: the same eval
    JSON and the same cubes, and both differ from no adaptation (so the option is not
    ignored)."""
    name = "cli_tta"
    smoke = lambda: _smoke().replace(method=name, adapt_steps=2, adapt_lr=3e-2)  # noqa: E731
    registry.register(registry.Method(name=name, make_model=lambda m: CliNet(),
                                      presets={"smoke": smoke}, stride=2,
                                      adapt_loss=_output_energy))
    try:
        w = tmp_path / "run"
        assert cli.main(["--method", name, "--preset", "smoke", "--dataset",
                         "spectral_scenes/tiny", "--data-dir", str(tiny_data), "--workdir",
                         str(w), "--no-progress"]) == 0
        from jaxspec import evaluate, predict
        evals = {}
        for flag in ("--adapt", "--tta", None):
            out = tmp_path / f"eval_{flag}.json"
            assert evaluate.main(["--workdir", str(w), "--figures", "0", "--max-images", "2",
                                  "--out", str(out)] + ([flag] if flag else [])) == 0
            evals[flag] = json.loads(out.read_text())
        assert evals["--tta"]["per_image"] == evals["--adapt"]["per_image"]
        assert evals["--tta"]["adapt"] == evals["--adapt"]["adapt"] == {
            "steps": 2, "lr": 3e-2, "optimizer": "adam", "params": []}
        assert evals[None]["adapt"] is None
        assert evals[None]["per_image"] != evals["--adapt"]["per_image"]

        from PIL import Image
        png = tmp_path / "a.png"
        Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255)
                        .astype(np.uint8)).save(png)
        cubes = {}
        for flag in ("--adapt", "--tta", None):
            d = tmp_path / f"pred_{flag}"
            assert predict.main(["--workdir", str(w), str(png), "--out", str(d),
                                 "--no-progress"] + ([flag] if flag else [])) == 0
            cubes[flag] = np.load(d / "a.npy")
        np.testing.assert_array_equal(cubes["--tta"], cubes["--adapt"])
        assert np.abs(cubes[None] - cubes["--adapt"]).max() > 1e-4
        capsys.readouterr()
        for mod in (evaluate, predict):
            with pytest.raises(SystemExit):
                mod.main(["--help"])
            assert "--adapt, --tta" in capsys.readouterr().out
    finally:
        registry.unregister(name)
