"""Property-based tests: malformed files fed to every reader raise only the project's typed
errors (``DataError`` / ``DataNotFoundError`` for dataset readers, ``InputError`` for photos).

Each reader gets a valid seed file written in its native format (tests/real_fixtures.py) and
hypothesis mutates it: truncation, byte flips, inserted / deleted byte runs, a zeroed block, a
zero-byte file, random bytes. A reader may succeed (the mutation hit padding or pixel data) or
raise a typed error; anything else (``struct.error``, ``KeyError``, ``OSError``, a raw
``ValueError``...) fails the test. Counts per reader are printed (``pytest -s``) and written to
``$JAXSPEC_FUZZ_REPORT`` (JSON) when set: docs/reliability.md quotes them.

Rerun: ``JAXSPEC_FUZZ_REPORT=/tmp/fuzz.json python -m pytest -q -s tests/test_readers_fuzz.py``
"""
from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import real_fixtures as F  # noqa: E402

from jaxspec.data import photos, readers  # noqa: E402
from jaxspec.errors import JaxspecError  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("JAXSPEC_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    total = collections.Counter()
    for c in COUNTS.values():
        total.update(c)
    lines = [f"{k}: tried {c['tried']}, typed errors {c['typed']}, read ok {c['ok']}"
             for k, c in sorted(COUNTS.items())]
    lines.append(f"TOTAL: tried {total['tried']}, typed errors {total['typed']}, read ok "
                 f"{total['ok']}, other exceptions {total['other']}")
    print("\n" + "\n".join(lines))
    out = os.environ.get("JAXSPEC_FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps({k: dict(c) for k, c in COUNTS.items()}, indent=1))


# ------------------------------------------------------------------------- mutations
@st.composite
def mutated(draw, seed: bytes):
    data = bytearray(seed)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "zero", "empty",
                                 "random", "combo"]))
    n = len(data)

    def flip():
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, max(n - 1, 0)))
            data[i] = draw(st.integers(0, 255))

    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, max(n - 1, 0)))])
    if kind == "flip":
        flip()
    elif kind == "insert":
        i = draw(st.integers(0, n))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        i = draw(st.integers(0, max(n - 1, 0)))
        del data[i: i + draw(st.integers(1, 64))]
    elif kind == "zero":
        i = draw(st.integers(0, max(n - 1, 0)))
        k = draw(st.integers(1, 256))
        data[i: i + k] = bytes(len(data[i: i + k]))
    elif kind == "empty":
        return b""
    elif kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    else:  # flip the header region and truncate
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, min(n - 1, 200)))
            data[i] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(n // 4, n))])
    return bytes(data)


def _check(key: str, fn, path: Path, allowed=(JaxspecError,)):
    COUNTS[key]["tried"] += 1
    try:
        fn(path)
    except allowed:
        COUNTS[key]["typed"] += 1
        return
    except Exception:
        COUNTS[key]["other"] += 1
        raise
    COUNTS[key]["ok"] += 1


# ------------------------------------------------------------------------- seed files
RNG = np.random.default_rng(0)
CUBE = F.smooth_cube(RNG, 6, 5, 4)
SEEDS: dict[str, bytes] = {}


def _seed(name: str, writer) -> bytes:
    if name not in SEEDS:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            writer(p)
            SEEDS[name] = p.read_bytes()
    return SEEDS[name]


def _png16_rgb(p):
    F.write_png16_multichannel(p, (CUBE[..., :3] * 65535).astype(np.uint16))


def _png16_grey(p):
    F.write_png16_grey(p, (CUBE[..., 0] * 65535).astype(np.uint16))


def _rgb8(fmt):
    def w(p):
        F.write_rgb(p, (CUBE[..., :3] * 255).astype(np.uint8), format=fmt)
    return w


def _tiff_float(p):
    import tifffile
    tifffile.imwrite(p, CUBE[..., :3].astype(np.float32))


def _exr_spectral(p):
    F.write_exr(p, CUBE.astype(np.float32), [450, 500, 550, 600])


def _exr_rgb(p):
    import OpenEXR
    chans = {c: np.ascontiguousarray(CUBE[..., i], np.float32) for i, c in enumerate("RGB")}
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION,
                       "type": OpenEXR.scanlineimage}, chans) as f:
        f.write(str(p))


def _geotiff(p):
    F.write_geotiff_int16(p, (CUBE * 1000).astype(np.int16))


def _mat_v5(p):
    F.write_mat_v5(p, {"cube": CUBE.astype(np.float32), "bands": np.arange(4.0)})


def _mat_v73(p):
    F.write_mat_v73(p, {"cube": CUBE.astype(np.float32), "bands": np.arange(4.0)})


READERS = {
    # key: (seed file name, seed writer, reader, allowed error classes)
    "png16_rgb/read_png16": ("a.png", _png16_rgb, readers.read_png16),
    "png16_grey/read_png16": ("g.png", _png16_grey, readers.read_png16),
    "png8/read_rgb_image": ("b.png", _rgb8("PNG"), readers.read_rgb_image),
    "jpeg/read_rgb_image": ("c.jpg", _rgb8("JPEG"), readers.read_rgb_image),
    "bmp/read_rgb_image": ("d.bmp", _rgb8("BMP"), readers.read_rgb_image),
    "exr/read_exr": ("e.exr", _exr_spectral, readers.read_exr),
    "geotiff/read_geotiff_int16": ("f.tif", _geotiff, readers.read_geotiff_int16),
    "mat_v5/read_mat": ("h.mat", _mat_v5, lambda p: readers.read_mat(p, "cube", ["bands"])),
    "mat_v73/read_mat": ("i.mat", _mat_v73, lambda p: readers.read_mat(p, "cube", ["bands"])),
    "mat_v73/open_mat_array": ("j.mat", _mat_v73,
                               lambda p: readers.open_mat_array(p, "cube")[0:3, 1:4, :]),
    "png16_rgb/read_photo": ("k.png", _png16_rgb, photos.read_photo),
    "png8/read_photo": ("l.png", _rgb8("PNG"), photos.read_photo),
    "jpeg/read_photo": ("m.jpg", _rgb8("JPEG"), photos.read_photo),
    "bmp/read_photo": ("n.bmp", _rgb8("BMP"), photos.read_photo),
    "tiff_float/read_photo": ("o.tif", _tiff_float, photos.read_photo),
    "exr_rgb/read_photo": ("q.exr", _exr_rgb, photos.read_photo),
}


@pytest.mark.parametrize("key", sorted(READERS))
def test_malformed_file_raises_only_typed_errors(key, tmp_path):
    name, writer, reader = READERS[key]
    seed = _seed(name, writer)
    reader(_write(tmp_path / name, seed))          # the seed itself is valid

    @FUZZ
    @given(blob=mutated(seed))
    def run(blob):
        _check(key, reader, _write(tmp_path / name, blob))

    run()


def _write(p: Path, blob: bytes) -> Path:
    p.write_bytes(blob)
    return p


def test_missing_files_raise_typed_not_found(tmp_path):
    from jaxspec.errors import DataNotFoundError, InputNotFoundError
    missing = tmp_path / "nope.png"
    for fn in (readers.read_png16, readers.read_rgb_image, readers.read_exr,
               readers.read_geotiff_int16, readers.read_envi,
               lambda p: readers.read_mat(p, "cube")):
        with pytest.raises(DataNotFoundError):
            fn(missing)
    with pytest.raises(InputNotFoundError):
        photos.read_photo(missing)


# ------------------------------------------------------------------------- ENVI (header + raw)
_ENVI_CUBE = (CUBE * 1000).astype(np.uint16)


def _envi_seed(tmp: Path) -> tuple[bytes, bytes]:
    hdr = F.write_envi(tmp / "seed" / "x.hdr", _ENVI_CUBE, wavelengths=[450, 500, 550, 600])
    return hdr.read_bytes(), hdr.with_suffix(".dat").read_bytes()


def test_envi_malformed_header_and_data(tmp_path):
    hdr_seed, dat_seed = _envi_seed(tmp_path)
    d = tmp_path / "run"
    d.mkdir()

    def read(p):
        img = readers.read_envi(p)
        np.asarray(img.data[:2, :2, :])

    @FUZZ
    @given(hdr=mutated(hdr_seed), cut=st.integers(0, len(dat_seed)),
           which=st.sampled_from(["header", "data", "both"]))
    def run(hdr, cut, which):
        (d / "x.hdr").write_bytes(hdr if which != "data" else hdr_seed)
        (d / "x.dat").write_bytes(dat_seed[:cut] if which != "header" else dat_seed)
        _check("envi/read_envi", read, d / "x.hdr")

    run()
