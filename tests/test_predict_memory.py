"""``python -m jaxspec.predict`` on large photos: tiles chosen from ``--max-memory``, rows
streamed to the ``.npy`` output, peak resident memory measured (``VmHWM``) in a subprocess;
tiled == untiled on a small image; the tqdm bar over tiles and ``--no-progress``."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny stride-2 method (receptive-field radius 3 <= overlap // 4 for overlap 16, so tiled and
# untiled outputs agree to float rounding), registered in-process and in the subprocess.
SETUP = textwrap.dedent('''
    import flax.linen as nn
    import jax
    from jaxspec import api, convert, registry
    from jaxspec.configs.base import Config

    class PmNet(nn.Module):
        @nn.compact
        def __call__(self, rgb, train=False):
            x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
            x = nn.Conv(8, (2, 2), strides=2)(x)
            x = nn.ConvTranspose(31, (2, 2), strides=(2, 2))(x)
            return jax.nn.softplus(x) + 1e-3

    def _cfg():
        return Config(method="pm_tiny", preset="smoke", crop=16, batch_size=2, steps=1)

    def register():
        if "pm_tiny" not in registry.names():
            registry.register(registry.Method(name="pm_tiny", make_model=lambda m: PmNet(),
                                              presets={"smoke": _cfg, "cpu": _cfg}, stride=2))

    def make_workdir(workdir):
        register()
        m = api.create_model("pm_tiny", "smoke")
        convert.write_workdir(workdir, m.config, m.init(), {"source": "random init"})
''')

RUN = SETUP + textwrap.dedent('''
    import resource, sys
    from pathlib import Path
    register()
    from jaxspec import predict
    rc = predict.main(sys.argv[1:])
    # VmHWM: the peak RSS of this program's own address space. ru_maxrss is not used: Linux
    # carries it across exec, so a child of a large parent (a pytest worker) reports the
    # parent's size.
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    peak = int(hwm[0].split()[1]) * 1024 if hwm else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("PEAK_RSS_BYTES", peak)
    sys.exit(rc)
''')


@pytest.fixture(scope="module")
def setup_ns():
    ns: dict = {}
    exec(compile(SETUP, "pm_setup", "exec"), ns)
    ns["register"]()
    yield ns
    from jaxspec import registry
    registry.unregister("pm_tiny")


@pytest.fixture(scope="module")
def workdir(setup_ns, tmp_path_factory):
    w = tmp_path_factory.mktemp("pm") / "run"
    setup_ns["make_workdir"](w)
    return w


def _photo(path: Path, h: int, w: int, seed: int = 0) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    # smooth + noise: a photo-like image, cheap to generate at 12 MP
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.4 * np.sin(yy[..., None] / 97.0 + xx[..., None] / 131.0 + np.arange(3))
    img = np.clip(base * 255 + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def _predict_subprocess(tmp_path, workdir, photo, *args):
    script = tmp_path / "run_predict.py"
    script.write_text(RUN)
    r = subprocess.run([sys.executable, str(script), "--workdir", str(workdir), str(photo),
                        "--out", str(tmp_path / "out"), "--no-progress", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    peak = int(next(l for l in r.stdout.splitlines() if l.startswith("PEAK_RSS_BYTES")).split()[1])
    return peak, r


def _check_large(tmp_path, workdir, h, w, bound):
    photo = _photo(tmp_path / "big.png", h, w)
    peak, r = _predict_subprocess(tmp_path, workdir, photo, "--max-memory", bound)
    from jaxspec.inference import parse_bytes
    assert peak < parse_bytes(bound), f"peak RSS {peak / 2**30:.2f} GiB over {bound}"
    cube = np.load(tmp_path / "out" / "big.npy", mmap_mode="r")
    assert cube.shape == (h, w, 31) and cube.dtype == np.float32
    side = json.loads((tmp_path / "out" / "big.json").read_text())
    assert side["shape"] == [h, w, 31]
    rows = np.asarray(cube[::97])
    assert np.isfinite(rows).all() and (rows > 0).all()      # every row band was written
    return peak, side


def test_large_photo_within_memory_bound(tmp_path, workdir):
    """2000x1500 (the output alone is 0.35 GiB; held as several float copies it was > 1.4 GiB)."""
    peak, side = _check_large(tmp_path, workdir, 1500, 2000, "1GiB")
    assert side["tile"] is None or side["tile"] % 2 == 0


@pytest.mark.slow
def test_4000x3000_photo_under_4gib(tmp_path, workdir):
    _check_large(tmp_path, workdir, 3000, 4000, "4GiB")


def test_tiled_equals_untiled_and_progress(tmp_path, workdir, capsys):
    from jaxspec import predict
    photo = _photo(tmp_path / "small.png", 150, 206, seed=1)
    assert predict.main(["--workdir", str(workdir), str(photo), "--out", str(tmp_path / "full"),
                         "--no-progress"]) == 0
    full_err = capsys.readouterr().err
    assert predict.main(["--workdir", str(workdir), str(photo), "--out", str(tmp_path / "tiled"),
                         "--tile", "64", "--overlap", "16"]) == 0
    tiled_err = capsys.readouterr().err
    full = np.load(tmp_path / "full" / "small.npy")
    tiled = np.load(tmp_path / "tiled" / "small.npy")
    assert json.loads((tmp_path / "full" / "small.json").read_text())["tile"] is None
    assert json.loads((tmp_path / "tiled" / "small.json").read_text())["tile"] == 64
    assert full.shape == tiled.shape == (150, 206, 31)
    np.testing.assert_allclose(tiled, full, rtol=1e-5, atol=1e-5)
    assert "tiles" in tiled_err and "/12" in tiled_err         # 3 x 4 tiles of 64, step 48
    assert "tiles" not in full_err
    # the same bounded path writes .mat (held in RAM) with the same values
    import scipy.io
    assert predict.main(["--workdir", str(workdir), str(photo), "--out", str(tmp_path / "mat"),
                         "--format", "mat", "--tile", "64", "--overlap", "16",
                         "--no-progress"]) == 0
    np.testing.assert_allclose(scipy.io.loadmat(tmp_path / "mat" / "small.mat")["cube"], tiled,
                               rtol=1e-6)


def test_auto_tile_from_memory_bound(setup_ns, workdir):
    """tile_for_memory: the tile grows with the budget, is a multiple of the stride, and a
    budget below what is already resident is one clear UsageError."""
    from jaxspec import api, inference
    from jaxspec.errors import UsageError
    model, variables = api.load(workdir)
    fn = inference.make_predict_fn(model.module.apply, variables)
    shape = (1, 3000, 4000, 3)
    kw = dict(stride=2, overlap=32, reserved=100 << 20)
    t_small = inference.tile_for_memory(fn, shape, max_bytes=200 << 20, **kw)
    t_big = inference.tile_for_memory(fn, shape, max_bytes=600 << 20, **kw)
    assert t_small % 2 == 0 and t_big % 2 == 0 and 32 < t_small < t_big < 4000
    assert inference.tile_for_memory(fn, (1, 64, 64, 3), max_bytes=600 << 20, **kw) is None
    with pytest.raises(UsageError, match="leaves nothing for the tiles"):
        inference.tile_for_memory(fn, shape, max_bytes=50 << 20, **kw)
    with pytest.raises(UsageError, match="too small for this model"):
        inference.tile_for_memory(fn, shape, max_bytes=(100 << 20) + 200_000, **kw)
    assert inference.parse_bytes("4GiB") == 4 * 2**30
    assert inference.parse_bytes("1.5G") == 1_500_000_000
    with pytest.raises(ValueError, match="bad memory size 'lots'"):
        inference.parse_bytes("lots")


def test_bad_max_memory_is_one_line(workdir, tmp_path, capsys):
    from jaxspec import predict
    photo = _photo(tmp_path / "p.png", 20, 30)
    assert predict.main(["--workdir", str(workdir), str(photo), "--out", str(tmp_path),
                         "--max-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory" in err[0] and "bad memory size" in err[0]


def test_planned_shape_is_compiled_once():
    """An image small enough to be its own memory probe is compiled once: the program
    tile_for_memory compiles is the one that then predicts it (predict_fn.compile keeps it);
    one predict function serves several images of that shape without tracing again."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxspec import inference
    traces = []

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            traces.append(x.shape)
            return nn.Conv(31, (3, 3))(x)

    net = Net()
    x = np.random.default_rng(0).random((1, 40, 48, 3)).astype(np.float32)
    variables = net.init(jax.random.PRNGKey(0), jnp.asarray(x))
    traces.clear()
    fn = inference.make_predict_fn(net.apply, variables)
    assert inference.tile_for_memory(fn, x.shape, max_bytes=1 << 30) is None
    n = len(traces)
    assert n >= 1
    a = np.asarray(fn(x))
    b = np.asarray(fn(x[:, ::-1].copy()))
    assert len(traces) == n                  # no new trace: the planned program ran
    np.testing.assert_allclose(a, np.asarray(net.apply(variables, jnp.asarray(x))), rtol=1e-5,
                               atol=1e-6)
    assert b.shape == a.shape
