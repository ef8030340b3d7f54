"""Reliability machinery: typed errors and the one-line CLI contract, the workdir lock, atomic
JSON, resume compatibility, output checks, photo reading at full depth, sRGB conversion,
unique output names, dataset fingerprints and concurrent dataset preparation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import real_fixtures as F  # noqa: E402

from jaxspec import errors  # noqa: E402
from jaxspec.data import photos  # noqa: E402
from jaxspec.errors import (  # noqa: E402
    DataError, InputError, InputNotFoundError, OutputError, UsageError, WorkdirBusyError,
    WorkdirMismatchError, run_cli)
from jaxspec.train.workdir import (  # noqa: E402
    WorkdirLock, check_output_writable, check_resume_compatible, write_json_atomic)

REPO = Path(__file__).resolve().parents[1]


def _env(**kw):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO), **kw)


# ------------------------------------------------------------------------- errors / run_cli
def test_typed_errors_keep_builtin_bases():
    assert issubclass(UsageError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(InputNotFoundError, FileNotFoundError)
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(WorkdirBusyError, OSError) and issubclass(OutputError, OSError)
    assert issubclass(errors.DivergenceError, FloatingPointError)
    codes = {c.exit_code for c in (UsageError, DataError, errors.CheckpointError,
                                   WorkdirBusyError, OutputError, errors.DivergenceError)}
    assert codes == {2, 3, 4, 5, 6, 7}


@pytest.mark.parametrize("exc,code,text", [
    (UsageError("--tile must be a positive multiple of 8, got -3"), 2, "--tile must"),
    (ValueError("unknown dataset 'nosuch'; available: [...]"), 2, "unknown dataset"),
    (FileNotFoundError("manual_dir does not exist: /x"), 2, "manual_dir does not exist"),
    (DataError("cave: x.png:\ncorrupt"), 3, "cave: x.png: | corrupt"),
    (errors.CheckpointError("corrupt checkpoint latest/3"), 4, "latest/3"),
    (WorkdirMismatchError("cannot resume: model.n_feat"), 5, "model.n_feat"),
    (OSError(28, "No space left on device"), 6, "No space left on device"),
    (PermissionError(13, "Permission denied", "/out/a.npy"), 6, "Permission denied: /out/a.npy"),
    (FloatingPointError("non-finite training loss"), 7, "non-finite"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_run_cli_one_line_and_exit_code(capsys, exc, code, text):
    def main():
        raise exc
    assert run_cli(main) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxspec: error: ") and text in err


def test_run_cli_finds_enospc_wrapped_by_a_library(capsys):
    def main():
        try:
            raise OSError(28, "No space left on device", "/ckpt/x")
        except OSError as e:
            raise RuntimeError("tensorstore write failed") from e
    assert run_cli(main) == errors.EXIT_OUTPUT
    assert "No space left on device: /ckpt/x" in capsys.readouterr().err


def test_run_cli_bugs_keep_traceback_and_debug_reraises(monkeypatch):
    def bug():
        raise TypeError("a bug")
    with pytest.raises(TypeError):
        run_cli(bug)
    monkeypatch.setenv("JAXSPEC_DEBUG", "1")
    with pytest.raises(UsageError):
        run_cli(lambda: (_ for _ in ()).throw(UsageError("x")))
    assert run_cli(lambda argv: 0, ["a"]) == 0
    assert errors.cli_main(lambda argv=None: 3)() == 3


def test_readonly_checkpoint_logs_no_absl_noise(tmp_path):
    """orbax warns 'Given directory is read only=...' via absl on every read-only manager
    (evaluate/predict); the filter drops it (this failed before)."""
    code = textwrap.dedent(f"""
        import jax.numpy as jnp
        from jaxspec.train.checkpointing import Checkpointer
        with Checkpointer({str(tmp_path / 'c')!r}) as ck:
            ck.save(1, {{"params": {{"w": jnp.ones(3)}}}}, {{"data_step": 1}})
        with Checkpointer({str(tmp_path / 'c')!r}, read_only=True) as ck:
            v, _ = ck.restore_variables(which="latest")
        print("OK", float(v["params"]["w"].sum()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       timeout=120, cwd=REPO)
    assert r.returncode == 0 and "OK 3.0" in r.stdout, r.stderr[-2000:]
    assert "read only" not in r.stderr, r.stderr


# ------------------------------------------------------------------------- workdir
def test_workdir_lock_in_process(tmp_path):
    w = tmp_path / "run"
    with WorkdirLock(w) as lock:
        rec = json.loads((w / ".lock").read_text())
        assert rec["pid"] == os.getpid() and rec["host"] and rec["started"] and rec["command"]
        with WorkdirLock(w):            # re-entrant in the holding process
            pass
        assert lock.held and "pid" in lock.holder()
    assert (w / ".lock").read_text() == ""
    with WorkdirLock(w, enabled=False):
        pass


def test_workdir_lock_refuses_second_process(tmp_path):
    w = tmp_path / "run"
    code = textwrap.dedent(f"""
        from jaxspec.errors import run_cli
        from jaxspec.train.workdir import WorkdirLock
        import sys
        def main():
            with WorkdirLock({str(w)!r}):
                print("GOT IT")
        sys.exit(run_cli(main))
    """)
    with WorkdirLock(w, command="python train.py --workdir run"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=_env(), timeout=60)
    assert r.returncode == errors.EXIT_WORKDIR and "GOT IT" not in r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and f"pid {os.getpid()}" in line
    assert "command: python train.py --workdir run" in line and str(w) in line
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 0 and "GOT IT" in r.stdout


def test_write_json_atomic(tmp_path):
    p = tmp_path / "config.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})        # not serialisable: nothing written
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["config.json"]


def test_check_resume_compatible():
    old = {"method": "acc", "model": {"n_feat": 32, "depth": 3}, "steps": 100, "lr": 4e-4,
           "dataset": "spectral_scenes", "optimizer": "adam", "eval_every": 50}
    allowed = check_resume_compatible(old, {**old, "steps": 500, "lr": 1e-4, "eval_every": 10})
    assert set(allowed) == {"steps", "lr", "eval_every"}
    with pytest.raises(WorkdirMismatchError, match=r"model\.n_feat: 32 -> 16") as e:
        check_resume_compatible(old, {**old, "model": {"n_feat": 16, "depth": 3}})
    assert "steps" not in str(e.value).split("(keys that may")[0]
    with pytest.raises(WorkdirMismatchError, match="dataset: 'spectral_scenes' -> 'cave'; method: 'acc' -> 'mstpp'"):
        check_resume_compatible(old, {**old, "method": "mstpp", "dataset": "cave"})
    with pytest.raises(WorkdirMismatchError, match=r"n_bands \(dataset\): 31 -> 28"):
        check_resume_compatible(old, old, old_n_bands=31, new_n_bands=28)
    # tuples from a live config compare equal to the lists read back from config.json
    check_resume_compatible({**old, "model": {"k": [1, 2]}}, {**old, "model": {"k": (1, 2)}})
    assert errors.classify(WorkdirMismatchError("x"))[0] == errors.EXIT_WORKDIR


def test_check_output_writable(tmp_path):
    assert check_output_writable(tmp_path / "new" / "out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_writable(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot be created"):
        check_output_writable(tmp_path / "file" / "sub")
    assert not [p for p in (tmp_path / "new" / "out").iterdir()]   # the probe is gone


# ------------------------------------------------------------------------- photos
def _img(h=5, w=7, c=3, seed=0):
    return np.random.default_rng(seed).random((h, w, c))


def test_read_photo_16bit_png_full_depth(tmp_path):
    """16-bit RGB PNG at full depth (Pillow alone gives the high byte: predict's old reader
    returned the same values as the 8-bit file)."""
    img16 = (_img() * 65535).astype(np.uint16)
    F.write_png16_multichannel(tmp_path / "a.png", img16)
    rgb, info = photos.read_photo(tmp_path / "a.png")
    np.testing.assert_array_equal(rgb, img16.astype(np.float32))
    assert info.bit_depth == 16 and info.max_code == 65535.0 and info.format == "png"
    from PIL import Image
    with Image.open(tmp_path / "a.png") as im:
        pil = np.asarray(im.convert("RGB")).astype(np.float32)
    assert np.abs(pil * 257 - rgb).max() > 1        # what the low byte adds
    rgba = np.dstack([img16, np.full(img16.shape[:2], 65535, np.uint16)])
    F.write_png16_multichannel(tmp_path / "b.png", rgba)
    rgb2, info2 = photos.read_photo(tmp_path / "b.png")
    np.testing.assert_array_equal(rgb2, rgb)
    assert info2.alpha_dropped and info2.channels == 4


def test_read_photo_8bit_formats(tmp_path):
    img8 = (_img() * 255).astype(np.uint8)
    for name, kw in (("a.png", {}), ("a.bmp", {}), ("q.jpg", {"quality": 100})):
        F.write_rgb(tmp_path / name, img8, **kw)
        rgb, info = photos.read_photo(tmp_path / name)
        assert rgb.shape == (5, 7, 3) and rgb.dtype == np.float32
        assert info.bit_depth == 8 and info.max_code == 255.0
        from PIL import Image
        with Image.open(tmp_path / name) as im:     # lossy JPEG: what the decoder gives
            np.testing.assert_array_equal(rgb, np.asarray(im.convert("RGB"), np.float32))
        if name != "q.jpg":
            np.testing.assert_array_equal(rgb, img8.astype(np.float32))


def test_read_photo_grey_rejected_or_replicated(tmp_path):
    grey = (_img(c=1)[..., 0] * 255).astype(np.uint8)
    F.write_rgb(tmp_path / "g.png", grey)
    with pytest.raises(InputError, match=r"g\.png: greyscale image"):
        photos.read_photo(tmp_path / "g.png")
    rgb, info = photos.read_photo(tmp_path / "g.png", grey="replicate")
    assert info.grey_replicated and np.all(rgb == grey[..., None].astype(np.float32))
    F.write_png16_grey(tmp_path / "g16.png", (grey.astype(np.uint16) * 257))
    with pytest.raises(InputError, match="greyscale"):
        photos.read_photo(tmp_path / "g16.png")
    F.write_rgb(tmp_path / "g.jpg", grey)
    with pytest.raises(InputError, match="greyscale"):
        photos.read_photo(tmp_path / "g.jpg")


def test_read_photo_tiff_scales(tmp_path):
    import tifffile
    base = _img()
    tifffile.imwrite(tmp_path / "f01.tif", base.astype(np.float32))
    rgb, info = photos.read_photo(tmp_path / "f01.tif")
    assert info.max_code == 1.0 and not info.float_scale_inferred and info.bit_depth == 32
    np.testing.assert_allclose(rgb, base, rtol=1e-6)
    tifffile.imwrite(tmp_path / "f255.tif", (base * 255).astype(np.float32))
    rgb, info = photos.read_photo(tmp_path / "f255.tif")
    assert info.max_code == 255.0 and info.float_scale_inferred
    np.testing.assert_allclose(rgb / info.max_code, base, rtol=1e-5)
    tifffile.imwrite(tmp_path / "hdr.tif", (base * 4000).astype(np.float32))
    with pytest.raises(InputError, match="float_scale"):
        photos.read_photo(tmp_path / "hdr.tif")
    rgb, info = photos.read_photo(tmp_path / "hdr.tif", float_scale=4000.0)
    np.testing.assert_allclose(rgb / info.max_code, base, rtol=1e-5)
    u16 = (base * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", np.moveaxis(u16, -1, 0), planarconfig="separate")
    rgb, info = photos.read_photo(tmp_path / "u16.tif")
    assert info.max_code == 65535.0
    np.testing.assert_array_equal(rgb, u16.astype(np.float32))


def test_read_photo_exr_linear(tmp_path):
    pytest.importorskip("OpenEXR")
    import OpenEXR
    base = _img().astype(np.float32) * 3           # scene-linear, may exceed 1
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                      {c: np.ascontiguousarray(base[..., i]) for i, c in enumerate("RGB")}) as f:
        f.write(str(tmp_path / "a.exr"))
    rgb, info = photos.read_photo(tmp_path / "a.exr")
    np.testing.assert_allclose(rgb, base)
    assert info.transfer == "linear" and info.max_code == 1.0


def test_read_photo_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("hello, not an image")
    F.write_rgb(tmp_path / "t.jpg", (_img(64, 64) * 255).astype(np.uint8))
    F.truncate(tmp_path / "t.jpg", keep=300)
    F.write_png16_multichannel(tmp_path / "t.png", (_img(16, 16) * 65535).astype(np.uint16))
    F.truncate(tmp_path / "t.png")
    for name, pat in (("empty.png", "empty file"), ("notes.png", "not an image"),
                      ("t.jpg", "truncated"), ("t.png", "truncated")):
        with pytest.raises(InputError, match=pat) as e:
            photos.read_photo(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
        assert errors.classify(e.value)[0] == errors.EXIT_USAGE
    with pytest.raises(InputNotFoundError, match="nope.png"):
        photos.read_photo(tmp_path / "nope.png")


def test_unique_output_stems():
    assert photos.unique_output_stems(["a.png", "b.jpg"]) == ["a", "b"]
    assert photos.unique_output_stems(["x/a.png", "x/a.jpg", "c.tif"]) == ["a_png", "a_jpg", "c"]
    assert photos.unique_output_stems(["x/a.png", "y/a.png"]) == ["x_a_png", "y_a_png"]
    with pytest.raises(InputError, match="given twice"):
        photos.unique_output_stems(["a.png", "./a.png"])


def test_srgb_transfer_exact_numbers():
    # IEC 61966-2-1: linear = c / 12.92 (c <= 0.04045), ((c + 0.055) / 1.055) ** 2.4 else
    v = np.array([0.0, 0.04045, 0.5, 128 / 255, 1.0])
    want = np.array([0.0, 0.0031308049535603713, 0.21404114048223255, 0.21586050011389923,
                     1.0])
    np.testing.assert_allclose(photos.srgb_to_linear(v), want, rtol=1e-6, atol=1e-9)
    x = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(photos.linear_to_srgb(photos.srgb_to_linear(x)), x, atol=2e-6)
    np.testing.assert_allclose(photos.linear_to_srgb([0.0031308, 0.18]),
                               [0.040449936, 0.46135612950044164], rtol=1e-6)


def test_to_model_encoding(tmp_path):
    img8 = np.full((2, 2, 3), 128, np.uint8)
    F.write_rgb(tmp_path / "p.png", img8)
    rgb, info = photos.read_photo(tmp_path / "p.png")
    lin = photos.to_model_encoding(rgb / info.max_code, info)          # default: srgb -> linear
    np.testing.assert_allclose(lin, 0.21586050011389923, rtol=1e-6)
    np.testing.assert_allclose(
        photos.to_model_encoding(rgb / info.max_code, info, encoding="linear"), 128 / 255,
        rtol=1e-6)
    np.testing.assert_allclose(                                        # 8-bit sRGB training data
        photos.to_model_encoding(rgb / info.max_code, info, expects="srgb", native_scale=255),
        128.0, rtol=1e-6)
    np.testing.assert_allclose(
        photos.to_model_encoding(np.full((1, 1, 3), 0.18), None, encoding="linear",
                                 expects="srgb"), 0.46135612950044164, rtol=1e-6)
    with pytest.raises(InputError, match="encoding must be one of"):
        photos.to_model_encoding(rgb / 255, info, encoding="gamma22")


# ------------------------------------------------------------------------- datasets
def _cave_scene(root: Path, name: str, rng, size=6):
    cube = (F.smooth_cube(rng, size, size, 31) * 65535).astype(np.uint16)
    for k in range(31):
        F.write_png16_grey(root / f"{name}_ms" / f"{name}_ms_{k + 1:02d}.png", cube[..., k])


def _names(b, split):
    from jaxspec import data
    src = data.data_source(b, split)
    return sorted(src[i]["name"].decode() for i in range(len(src)))


def test_changed_manual_dir_rebuilds(tmp_path, caplog):
    """A CAVE build is keyed by its manual_dir: adding scenes rebuilds (before: the 2-scene
    build was silently served for the 4-scene directory)."""
    from jaxspec import data
    rng = np.random.default_rng(0)
    m = tmp_path / "m"
    for s in ("balloons", "beads"):
        _cave_scene(m, s, rng)
    b = data.builder("cave", data_dir=tmp_path / "tfds", manual_dir=m)
    assert _names(b, "train") + _names(b, "test") == ["balloons", "beads"]
    for s in ("cd", "clay"):
        _cave_scene(m, s, rng)
    with caplog.at_level("WARNING", logger="jaxspec.data"):
        b = data.builder("cave", data_dir=tmp_path / "tfds", manual_dir=m)
    assert sorted(_names(b, "train") + _names(b, "test")) == ["balloons", "beads", "cd", "clay"]
    assert any("manual_dir changed" in r.getMessage() for r in caplog.records)
    stored = data.builders.prepared_source(b)
    assert stored["n_files"] == 4 * 31 and stored["sha256"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxspec.data"):
        data.builder("cave", data_dir=tmp_path / "tfds", manual_dir=m)      # unchanged: reused
    assert not caplog.records
    # the same data in another place (copied): same fingerprint, no rebuild
    import shutil
    shutil.copytree(m, tmp_path / "m2")
    assert (data.builders.manual_dir_fingerprint(tmp_path / "m2")["sha256"]
            == data.builders.prepared_source(b)["sha256"])


_PREPARE = textwrap.dedent("""
    import json, sys, time
    start = float(sys.argv[2])
    while time.time() < start:      # both processes start preparing at the same moment
        time.sleep(0.005)
    from jaxspec import data
    b = data.builder("spectral_scenes/tiny", data_dir=sys.argv[1])
    src = data.data_source(b, "validation")
    print("NAMES " + json.dumps([src[i]["name"].decode() for i in range(len(src))]), flush=True)
""")


def test_concurrent_preparation_one_builds_others_wait(tmp_path):
    """Two processes preparing the same dataset in a fresh data_dir at once: both succeed and
    read the same data (before: FileExistsError 'Cannot rename .../incomplete...')."""
    start = time.time() + 8.0
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(tmp_path / "tfds"),
                               str(start)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    names = [json.loads([l for l in out.splitlines() if l.startswith("NAMES ")][0][6:])
             for out, _ in outs]
    assert names[0] == names[1] and len(names[0]) > 0
    assert sum("is being prepared by pid" in err for _, err in outs) == 1
    leftovers = [p.name for p in (tmp_path / "tfds" / "spectral_scenes" / "tiny").iterdir()
                 if "incomplete" in p.name]
    assert leftovers == []
