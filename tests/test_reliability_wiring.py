"""The reliability machinery as the engine's loop and CLIs use it (docs/reliability.md, "How
the loop and the CLIs use it"): workdir lock and resume compatibility around a real (tiny)
training run, predict's photo reading / encoding / output names, one-line CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import real_fixtures as F  # noqa: E402  (16-bit PNG writer)
import test_faults as TF  # noqa: E402  (the lock-holder subprocess)

from jaxspec import errors, registry  # noqa: E402
from jaxspec.configs.base import Config  # noqa: E402
from jaxspec.data.photos import srgb_to_linear  # noqa: E402
from jaxspec.train import train_and_evaluate  # noqa: E402


class _Net(nn.Module):
    @nn.compact
    def __call__(self, rgb, train=False):
        return jax.nn.softplus(nn.Conv(31, (1, 1))(rgb)) + 0.01


def _source(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hsi = (rng.random((12, 12, 31)) * 0.8 + 0.1).astype(np.float32)
        rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
        out.append({"rgb": rgb, "hsi": hsi, "name": f"s{seed}_{i}",
                    "bands": np.linspace(400, 700, 31).astype(np.float32)})
    return out


def _cfg(**kw):
    base = dict(method="wire_tiny", preset="smoke", crop=8, batch_size=2, steps=2, lr=1e-3,
                rgb_norm="none", log_every=1, eval_every=0, ckpt_every=2, keep_last=1,
                max_eval_images=1)
    base.update(kw)
    return Config(**base)


registry.register(registry.Method(name="wire_tiny", make_model=lambda m: _Net(),
                                  presets={"smoke": lambda: _cfg()}))


def _train(cfg, work):
    return train_and_evaluate(cfg, work, train_source=_source(4, 0), eval_source=_source(1, 1),
                              progress=False, figures=0)


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("wire") / "run"
    _train(_cfg(), work)
    return work


def test_busy_workdir_refused_in_one_line(tmp_path, capsys):
    work = tmp_path / "w"
    holder = TF._hold(work, 60)
    try:
        TF._wait_locked(holder)
        rc = errors.run_cli(lambda: _train(_cfg(), work))
        assert rc == 5
        line = _one_line(capsys.readouterr().err)
        assert "is in use by pid" in line and str(holder.pid) in line
        assert not (work / "config.json").exists()     # nothing written by the refused run
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_mismatched_resume_refused_and_config_kept(run_dir, capsys):
    before = (run_dir / "config.json").read_bytes()
    rc = errors.run_cli(lambda: _train(_cfg(loss="l1", steps=4), run_dir))
    assert rc == 5
    line = _one_line(capsys.readouterr().err)
    assert "cannot resume" in line and "loss: 'mrae' -> 'l1'" in line
    assert (run_dir / "config.json").read_bytes() == before


def test_checkpoint_metas_carry_run_id_and_param_norm(run_dir):
    from jaxspec.train import checkpointing as C
    with C.Checkpointer(run_dir / "checkpoints", read_only=True) as ck:
        meta = ck.read_meta(step=2)
        assert meta["run_id"] and ck.run_id("best") == meta["run_id"]
        assert np.isfinite(meta["param_norm"]) and meta["param_norm"] > 0
    assert json.loads((run_dir / "eval.json").read_text())["run_id"] == meta["run_id"]
    assert json.loads((run_dir / "input.json").read_text())["encoding"] == "linear"


def _png(path, arr, mode=None):
    from PIL import Image
    if arr.dtype == np.uint16:         # 16-bit RGB PNG (Pillow cannot write it)
        F.write_png16_multichannel(path, arr)
    else:
        Image.fromarray(arr, mode).save(path)


def _predict(run_dir, out, *files, extra=()):
    from jaxspec import predict
    return predict.main(["--workdir", str(run_dir), *map(str, files), "--out", str(out),
                         *extra])


def _side(out, stem):
    return json.loads((Path(out) / f"{stem}.json").read_text())


def test_predict_colliding_stems_distinct_outputs(run_dir, tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((9, 10, 3)) * 255).astype(np.uint8)
    _png(tmp_path / "a.png", img)
    from PIL import Image
    Image.fromarray(img[::-1]).save(tmp_path / "a.jpg")
    out = tmp_path / "pred"
    assert _predict(run_dir, out, tmp_path / "a.png", tmp_path / "a.jpg") == 0
    a, b = np.load(out / "a_png.npy"), np.load(out / "a_jpg.npy")
    assert a.shape == b.shape == (9, 10, 31) and not np.array_equal(a, b)
    assert (a >= 0).all() and _side(out, "a_jpg")["source"].endswith("a.jpg")


def test_predict_16bit_png_full_depth(run_dir, tmp_path):
    rng = np.random.default_rng(1)
    v16 = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    _png(tmp_path / "p16.png", v16)
    _png(tmp_path / "p8.png", (v16 >> 8).astype(np.uint8))
    out = tmp_path / "pred"
    args = ("--input-encoding", "linear")
    assert _predict(run_dir, out, tmp_path / "p16.png", tmp_path / "p8.png", extra=args) == 0
    m16, m8 = _side(out, "p16")["input"], _side(out, "p8")["input"]
    assert m16["photo"]["bit_depth"] == 16 and m8["photo"]["bit_depth"] == 8
    np.testing.assert_allclose(m16["model_input_mean"], (v16 / 65535).reshape(-1, 3).mean(0),
                               rtol=1e-5)
    assert not np.array_equal(np.load(out / "p16.npy"), np.load(out / "p8.npy"))


def test_predict_linearises_srgb_for_a_linear_model(run_dir, tmp_path):
    _png(tmp_path / "g.png", np.full((6, 7, 3), 128, np.uint8))
    out = tmp_path / "pred"
    assert _predict(run_dir, out, tmp_path / "g.png") == 0
    rec = _side(out, "g")["input"]
    assert rec["input_encoding"] == "srgb" and rec["model_expects"] == "linear"
    np.testing.assert_allclose(rec["model_input_mean"], [srgb_to_linear(128 / 255)] * 3,
                               rtol=1e-5)
    assert _predict(run_dir, out, tmp_path / "g.png", extra=("--input-encoding", "linear")) == 0
    np.testing.assert_allclose(_side(out, "g")["input"]["model_input_mean"], [128 / 255] * 3,
                               rtol=1e-5)


def test_predict_user_errors_one_line(run_dir, tmp_path, capsys):
    _png(tmp_path / "grey.png", np.full((6, 7), 100, np.uint8), "L")
    capsys.readouterr()
    assert _predict(run_dir, tmp_path / "o", tmp_path / "grey.png") == 2
    assert "grey" in _one_line(capsys.readouterr().err)
    assert _predict(run_dir, tmp_path / "o", tmp_path / "grey.png",
                    extra=("--grey", "replicate")) == 0
    capsys.readouterr()
    assert _predict(run_dir, tmp_path / "o", tmp_path / "grey.png", extra=("--tile", "0")) == 2
    assert "--tile" in _one_line(capsys.readouterr().err)
    (tmp_path / "afile").write_text("x")
    assert _predict(run_dir, tmp_path / "afile", tmp_path / "grey.png") == 6
    assert "--out directory" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "5", "--set", "warmup_steps=20"], "warmup_steps"),
    (["--set", "optimizer=nosuch"], "config.optimizer 'nosuch'"),
    (["--set", "loss=nosuch"], "config.loss 'nosuch'"),
])
def test_train_cli_user_errors_one_line(tmp_path, capsys, extra, needle):
    from jaxspec import cli
    work = tmp_path / "w"
    assert cli.main(["--method", "wire_tiny", "--preset", "smoke", "--workdir", str(work), *extra]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("train.py: error:") and needle in line
    assert not work.exists() or not any(work.iterdir())     # checked before anything is written


def test_evaluate_user_errors_one_line(run_dir, tmp_path, capsys):
    from jaxspec import evaluate
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(run_dir), "--tile", "0"]) == 2
    assert "--tile" in _one_line(capsys.readouterr().err)
    (tmp_path / "afile").write_text("x")
    assert evaluate.main(["--workdir", str(run_dir), "--out",
                          str(tmp_path / "afile" / "e.json")]) == 6
    assert "evaluation output directory" in _one_line(capsys.readouterr().err)


def test_convert_user_errors_one_line(tmp_path, capsys):
    """``python -m jaxspec.convert``: a missing / unreadable checkpoint, an unknown preset and an
    unwritable --workdir are one line and exit 2 / 2 / 2 / 6, checked before torch reads
    anything; nothing is written into the workdir."""
    from jaxspec import convert
    work = tmp_path / "w"
    assert convert.main(["mstpp", str(tmp_path / "nope.pth"), "--workdir", str(work)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("jaxspec.convert: error:") and "nope.pth" in line
    assert not work.exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file" * 8)
    assert convert.main(["mstpp", str(junk), "--workdir", str(work), "--preset", "nosuch"]) == 2
    assert "no preset 'nosuch'" in _one_line(capsys.readouterr().err)
    (tmp_path / "afile").write_text("x")
    assert convert.main(["mstpp", str(junk), "--workdir", str(tmp_path / "afile" / "w")]) == 6
    assert "--workdir" in _one_line(capsys.readouterr().err)
    pytest.importorskip("torch")
    assert convert.main(["mstpp", str(junk), "--workdir", str(work)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "junk.pth: not a readable PyTorch checkpoint" in line
    assert not any(work.rglob("*.json")) and not (work / "checkpoints").exists()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, code, needle", [
    (["bench/fusion.py", "--scales", "8,x"], 2, "--scales: 'x' is not an integer"),
    (["bench/daem.py", "--variants", "estimated,nosuch"], 2, "--variants: unknown 'nosuch'"),
    (["bench/daem.py", "--back-projection", "-1"], 2, "--back-projection must be >= 0"),
    (["bench/sweep.py", "--method", "mstpp", "--trial", "a:nosuch=1"], 2,
     "unknown config key 'nosuch'"),
    (["bench/fusion.py", "--out", "{tmp}/afile/out.json"], 6, "the directory of --out"),
])
def test_bench_user_errors_one_line(tmp_path, argv, code, needle):
    """Bench commands (``python bench/<name>.py``) check their options and output location
    before any data is loaded: one line ``bench/<name>.py: error: ...`` and the exit code."""
    import os
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == code, r.stderr
    line = _one_line(r.stderr)
    assert line.startswith(f"{argv[0]}: error:") and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # nothing written


def _srf_source(n, seed):
    """_source with the SRF feature a rendered dataset carries (``rgb = hsi @ srf``)."""
    from jaxspec.physics import get_srf
    srf = np.asarray(get_srf("cie1964"), np.float32)
    out = _source(n, seed)
    for ex in out:
        ex["rgb"] = (ex["hsi"] @ srf).astype(np.float32)
        ex["srf"], ex["camera"] = srf, b"cie1964"
    return out


@pytest.fixture(scope="module")
def srf_run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("wire_srf") / "run"
    train_and_evaluate(_cfg(), work, train_source=_srf_source(4, 0),
                       eval_source=_srf_source(1, 1), progress=False, figures=0)
    return work


def test_predict_converts_srgb_photo_to_the_recorded_camera(srf_run_dir, tmp_path):
    """A run on rendered data records its SRF and RGB level (input.json); predict then maps a
    white-balanced sRGB photo to that camera (colour matrix) by default, ``--input-space
    camera`` skips the matrix, ``--exposure normalise`` brings the photo's 99th percentile to
    the training RGB's."""
    from jaxspec.data.photos import srgb_to_camera_matrix
    from jaxspec.physics import get_srf
    spec = json.loads((srf_run_dir / "input.json").read_text())
    np.testing.assert_allclose(spec["srf"], get_srf("cie1964"), atol=1e-6)
    assert spec["cameras"] == ["cie1964"] and spec["rgb_p99"] > 0
    img = np.random.default_rng(3).integers(0, 256, (6, 7, 3)).astype(np.uint8)
    _png(tmp_path / "c.png", img)
    lin = srgb_to_linear(img / 255.0)
    a = srgb_to_camera_matrix(get_srf("cie1964"))
    out = tmp_path / "pred"
    assert _predict(srf_run_dir, out, tmp_path / "c.png") == 0
    rec = _side(out, "c")["input"]
    assert rec["input_space"] == "srgb" and rec["exposure_gain"] == 1.0
    np.testing.assert_allclose(rec["colour_matrix"], a, atol=1e-6)
    want = np.maximum(lin.reshape(-1, 3) @ a, 0).mean(0)
    np.testing.assert_allclose(rec["model_input_mean"], want, rtol=1e-5)
    assert _predict(srf_run_dir, out, tmp_path / "c.png", extra=("--input-space", "camera")) == 0
    rec = _side(out, "c")["input"]
    assert rec["input_space"] == "camera" and rec["colour_matrix"] is None
    np.testing.assert_allclose(rec["model_input_mean"], lin.reshape(-1, 3).mean(0), rtol=1e-5)
    assert _predict(srf_run_dir, out, tmp_path / "c.png", extra=("--exposure", "normalise")) == 0
    rec = _side(out, "c")["input"]
    g = spec["rgb_p99"] / np.percentile(np.maximum(lin @ a, 0), 99)
    assert rec["exposure"] == "normalise" and rec["exposure_gain"] == pytest.approx(g, rel=1e-4)


def test_predict_srgb_space_needs_a_recorded_srf(run_dir, tmp_path, capsys):
    _png(tmp_path / "g.png", np.full((6, 7, 3), 128, np.uint8))
    capsys.readouterr()
    assert _predict(run_dir, tmp_path / "o", tmp_path / "g.png",
                    extra=("--input-space", "srgb")) == 2
    assert "does not record the SRF" in _one_line(capsys.readouterr().err)
    assert _predict(run_dir, tmp_path / "o", tmp_path / "g.png") == 0   # default: camera
    assert _side(tmp_path / "o", "g")["input"]["input_space"] == "camera"
