"""jaxspec.data: builder loading, data_source, make_loader, normalize_rgb."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaxspec.data as D

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return D.builder("spectral_scenes", config="tiny", data_dir=tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def train_src(tiny):
    return D.data_source(tiny, "train")


class ArraySource:
    """Minimal in-memory random-access source (len + getitem)."""

    def __init__(self, n, h=12, w=10, c=4):
        rng = np.random.default_rng(0)
        self.items = [{"rgb": rng.random((h, w, 3), dtype=np.float32) * 255,
                       "hsi": rng.random((h, w, c), dtype=np.float32),
                       "name": f"ex{i:03d}".encode(), "idx": np.int64(i)} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ----------------------------------------------------------------------------- builders

def test_list_and_load_builder_module_is_cached():
    assert "spectral_scenes" in D.list_datasets()
    m1 = D.load_builder_module("spectral_scenes")
    m2 = D.load_builder_module("spectral_scenes")
    assert m1 is m2 and m1.__name__ in sys.modules
    assert m1.Builder.name == "spectral_scenes"
    assert not (REPO / "datasets" / "__init__.py").exists()


def test_unknown_dataset_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*spectral_scenes"):
        D.load_builder_module("nope")
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        D.builder("spectral_scenes/huge", data_dir=tmp_path)
    with pytest.raises(ValueError, match="config given twice"):
        D.builder("spectral_scenes/tiny", config="clean", data_dir=tmp_path)


def test_datasets_dir_env_override(tmp_path, monkeypatch):
    d = tmp_path / "myds" / "toy"
    d.mkdir(parents=True)
    (d / "toy_dataset_builder.py").write_text("Builder = object\n")
    monkeypatch.setenv("JAXSPEC_DATASETS_DIR", str(tmp_path / "myds"))
    assert D.list_datasets() == ["toy"]
    assert D.datasets_dir() == tmp_path / "myds"


def test_datasets_dir_does_not_shadow_pypi_datasets(tmp_path):
    """A regular package named `datasets` later on sys.path must win over the repo's folder."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'fake-pypi-datasets'\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(tmp_path / 'site')!r}]
        import datasets
        print(datasets.MARKER, datasets.__file__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fake-pypi-datasets")


def test_data_source_and_bad_split(tiny, train_src):
    assert len(train_src) == 8
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        D.data_source(tiny, "dev")
    # name-based access reuses the prepared files
    src = D.data_source("spectral_scenes/tiny", "validation", data_dir=tiny.data_dir.rsplit("/spectral_scenes", 1)[0])
    assert len(src) == 4


# ----------------------------------------------------------------------------- normalisation

def test_normalize_rgb_modes_numpy_and_jax():
    import jax.numpy as jnp
    x = np.stack([np.linspace(10, 200, 48, dtype=np.float32).reshape(4, 4, 3),
                  np.linspace(0, 50, 48, dtype=np.float32).reshape(4, 4, 3)])
    np.testing.assert_array_equal(D.normalize_rgb(x, "none"), x)
    np.testing.assert_allclose(D.normalize_rgb(x, "div255"), x / 255)
    mm = D.normalize_rgb(x, "minmax")
    assert isinstance(mm, np.ndarray)
    for b in range(2):  # one min/max per image over all channels
        ref = (x[b] - x[b].min()) / (x[b].max() - x[b].min())
        np.testing.assert_allclose(mm[b], ref, rtol=1e-6)
    mj = D.normalize_rgb(jnp.asarray(x), "minmax")
    assert not isinstance(mj, np.ndarray)
    np.testing.assert_allclose(np.asarray(mj), mm, rtol=1e-6)
    # single image; channels share the range (not per-channel)
    img = x[0].copy()
    img[..., 2] *= 0.5
    out = D.normalize_rgb(img, "minmax")
    assert out[..., 2].max() < 1.0 and out.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        D.normalize_rgb(x, "zscore")
    with pytest.raises(ValueError, match="normalization must be one of"):
        D.make_loader(ArraySource(4), batch_size=2, crop=4, normalization="max")


# ----------------------------------------------------------------------------- loader

def _take(it, n):
    return [next(it) for _ in range(n)]


def test_loader_shapes_and_determinism(train_src):
    kw = dict(batch_size=3, crop=16, seed=5, normalization="minmax", prefetch=0, shard=(0, 1))
    a = _take(D.make_loader(train_src, **kw), 4)
    b = _take(D.make_loader(train_src, **kw), 4)
    c = _take(D.make_loader(train_src, **{**kw, "seed": 6}), 4)
    for x in a:
        assert set(x) == {"rgb", "hsi"}
        assert x["rgb"].shape == (3, 16, 16, 3) and x["hsi"].shape == (3, 16, 16, 31)
        assert x["rgb"].dtype == np.float32 and x["hsi"].dtype == np.float32
        np.testing.assert_allclose(x["rgb"].min(axis=(1, 2, 3)), 0, atol=1e-6)
        np.testing.assert_allclose(x["rgb"].max(axis=(1, 2, 3)), 1, atol=1e-6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["hsi"], y["hsi"]) for x, y in zip(a, c))


def test_loader_resume_at_step(train_src):
    kw = dict(batch_size=3, crop=8, seed=1, prefetch=2, shard=(0, 1))
    full = _take(D.make_loader(train_src, **kw), 7)  # crosses epoch boundaries (8 examples)
    resumed = _take(D.make_loader(train_src, start_step=4, **kw), 3)
    for x, y in zip(full[4:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_loader_epochs_cover_dataset():
    src = ArraySource(6)
    it = D.make_loader(src, batch_size=3, crop=4, seed=0, keys=("idx",) + ("rgb",),
                       num_epochs=2, prefetch=0, shard=(0, 1))
    batches = list(it)
    assert len(batches) == 4
    ids = np.concatenate([b["idx"] for b in batches])
    assert sorted(ids[:6].tolist()) == list(range(6)) and sorted(ids[6:].tolist()) == list(range(6))
    assert ids[:6].tolist() != ids[6:].tolist()  # reshuffled per epoch


def test_augmentation_is_joint(train_src):
    """Crop + rot90/flips applied identically: rgb == project(hsi) still holds (clean data)."""
    from jaxspec import physics
    srf = physics.get_srf("cie1964").astype(np.float64)
    it = D.make_loader(train_src, batch_size=4, crop=12, seed=3, normalization="none",
                       prefetch=0, shard=(0, 1))
    for batch in _take(it, 3):
        np.testing.assert_allclose(batch["rgb"], batch["hsi"].astype(np.float64) @ srf,
                                   rtol=1e-6, atol=1e-7)


def test_augmentation_uses_all_dihedral_ops():
    rng = np.random.default_rng(0)
    base = {"rgb": np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3),
            "hsi": np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)}
    seen = set()
    for _ in range(200):
        out = D.random_crop_augment(base, rng, crop=None)
        seen.add(out["rgb"].tobytes())
        # same transform on both: the hsi pixel that moved with rgb pixel (0, 0)
        i, j = np.argwhere(out["rgb"][..., 0] == 0)[0]
        assert out["hsi"][i, j, 0] == 0
    assert len(seen) == 8


def test_sharding_is_disjoint():
    src = ArraySource(10)
    got = []
    for i in range(3):
        it = D.make_loader(src, batch_size=1, seed=0, train=False, keys=("idx",), shard=(i, 3),
                           prefetch=0)
        got.append([int(b["idx"][0]) for b in it])
    assert sorted(sum(got, [])) == list(range(10))
    assert all(not (set(a) & set(b)) for a in got for b in got if a is not b)
    # default sharding = jax.process_index()/process_count() (single process here)
    assert len(list(D.make_loader(src, train=False, keys=("idx",), prefetch=0))) == 10


def test_eval_loader(tiny):
    src = D.data_source(tiny, "test")
    batches = list(D.make_loader(src, train=False, normalization="none", prefetch=0))
    assert len(batches) == 4
    b = batches[0]
    assert b["rgb"].shape == (1, 32, 32, 3) and b["hsi"].shape == (1, 32, 32, 31)
    assert [x["name"][0] for x in batches] == [f"tiny/test/{i:05d}" for i in range(4)]
    np.testing.assert_array_equal(b["hsi"][0], src[0]["hsi"])
    cropped = next(D.make_loader(src, train=False, crop=16, batch_size=2, prefetch=0))
    np.testing.assert_array_equal(cropped["hsi"][0], src[0]["hsi"][8:24, 8:24])
    assert len(list(D.make_loader(src, split_kind="eval", batch_size=3, prefetch=0))) == 2


def test_loader_errors(train_src):
    with pytest.raises(ValueError, match="crop size 64 is larger than the image 32x32"):
        next(D.make_loader(train_src, batch_size=2, crop=64, seed=0, prefetch=0, shard=(0, 1)))
    with pytest.raises(ValueError, match="batch_size is required"):
        D.make_loader(train_src, crop=8)
    with pytest.raises(ValueError, match="split_kind"):
        D.make_loader(train_src, batch_size=1, split_kind="test")
    with pytest.raises(ValueError, match="lacks keys"):
        next(D.make_loader(ArraySource(2), batch_size=1, crop=4, keys=("rgb", "hsi", "label"),
                           prefetch=0, shard=(0, 1)))


# ----------------------------------------------------------------------------- cache / multi-crop

def _same_stream(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_cached_loader_gives_the_uncached_stream(train_src):
    """The LRU cache (on by default for training) returns exactly the crops of cache_bytes=0,
    across epochs (8 examples, 3 per batch, 9 batches) and with an LRU that evicts."""
    kw = dict(batch_size=3, crop=8, seed=2, prefetch=2, shard=(0, 1))
    ref = _take(D.make_loader(train_src, cache_bytes=0, **kw), 9)
    _same_stream(ref, _take(D.make_loader(train_src, **kw), 9))               # auto bound
    one = int(train_src[0]["hsi"].nbytes + train_src[0]["rgb"].nbytes)
    _same_stream(ref, _take(D.make_loader(train_src, cache_bytes=3 * one, **kw), 9))
    _same_stream(ref[5:], _take(D.make_loader(train_src, cache_bytes=1 << 30, start_step=5,
                                              **kw), 4))


def test_crops_per_example_stream_cached_equals_uncached_and_resumes(train_src):
    kw = dict(batch_size=4, crop=8, seed=3, prefetch=2, shard=(0, 1), crops_per_example=3,
              keys=("rgb", "hsi"))
    ref = _take(D.make_loader(train_src, cache_bytes=0, **kw), 8)   # 32 crops > 24 = 1 epoch
    _same_stream(ref, _take(D.make_loader(train_src, cache_bytes=1 << 30, **kw), 8))
    _same_stream(ref[3:], _take(D.make_loader(train_src, start_step=3, **kw), 5))
    _same_stream(ref[6:], _take(D.make_loader(train_src, start_step=6, cache_bytes=0, **kw), 2))
    # a different stream than one crop per example, with the crops of one example distinct
    one = _take(D.make_loader(train_src, cache_bytes=0, **{**kw, "crops_per_example": 1}), 8)
    assert any(not np.array_equal(x["hsi"], y["hsi"]) for x, y in zip(ref, one))
    crops = np.concatenate([b["hsi"] for b in ref])
    assert not np.array_equal(crops[0], crops[1])


def test_crops_per_example_structure():
    """Element i is a crop of shuffled example i // k; every epoch reads each example k times
    in a row, reshuffled per epoch."""
    src = ArraySource(5)
    it = D.make_loader(src, batch_size=3, crop=4, seed=0, keys=("idx", "rgb"),
                       crops_per_example=3, num_epochs=2, prefetch=0, shard=(0, 1))
    ids = np.concatenate([b["idx"] for b in it])
    assert len(ids) == 30
    runs = ids.reshape(10, 3)
    assert (runs == runs[:, :1]).all()
    e0, e1 = runs[:5, 0].tolist(), runs[5:, 0].tolist()
    assert sorted(e0) == sorted(e1) == list(range(5)) and e0 != e1


class CountingSource(ArraySource):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_example_cache_lru_bound_readonly_and_threads():
    import threading
    from jaxspec.data.pipeline import ExampleCache
    src = CountingSource(6)
    size = src.items[0]["rgb"].nbytes + src.items[0]["hsi"].nbytes
    c = ExampleCache(src, ("rgb", "hsi"), max_bytes=2 * size)
    for i in (0, 1, 0, 2):           # 2 evicts 1 (0 was used more recently)
        c[i]
    assert src.reads == 3 and sorted(c._items) == [0, 2] and c.nbytes == 2 * size
    c[0]
    assert src.reads == 3
    c[1]
    assert src.reads == 4 and sorted(c._items) == [0, 1]
    ex = c[0]
    with pytest.raises(ValueError, match="read-only"):
        ex["hsi"][0, 0, 0] = 1.0
    assert src.items[0]["hsi"].flags.writeable            # the source's arrays untouched
    np.testing.assert_array_equal(ex["hsi"], src.items[0]["hsi"])
    # too large for the bound: returned, not kept; keep_last keeps it anyway
    small = ExampleCache(src, ("rgb", "hsi"), max_bytes=size // 2)
    small[3], small[3]
    assert not small._items and src.reads == 6
    last = ExampleCache(src, ("rgb", "hsi"), max_bytes=0, keep_last=2)
    for i in (3, 4, 3, 5, 5):
        last[i]
    assert sorted(last._items) == [3, 5] and src.reads == 9
    # concurrent reads of one index decode it once
    src.reads = 0
    shared = ExampleCache(src, ("hsi",), max_bytes=1 << 20)
    ts = [threading.Thread(target=lambda: [shared[j % 3] for j in range(30)]) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert src.reads == 3 and shared.hits == 120 - 3
    import pickle
    clone = pickle.loads(pickle.dumps(shared))
    assert not clone._items and clone.max_bytes == 1 << 20
    np.testing.assert_array_equal(clone[1]["hsi"], src.items[1]["hsi"])


def test_worker_processes_give_the_same_stream(train_src):
    """grain worker processes (spawned: the TFDS source's builder module is re-imported there)
    deliver the in-process stream."""
    kw = dict(batch_size=2, crop=8, seed=4, shard=(0, 1), crops_per_example=2)
    ref = _take(D.make_loader(train_src, **kw), 3)
    _same_stream(ref, _take(D.make_loader(train_src, worker_count=1, **kw), 3))


def test_cache_and_multicrop_argument_errors(train_src):
    with pytest.raises(ValueError, match="crops_per_example must be an int >= 1"):
        D.make_loader(train_src, batch_size=2, crop=8, crops_per_example=0)
    with pytest.raises(ValueError, match="crops_per_example must be an int >= 1"):
        D.make_loader(train_src, batch_size=2, crop=8, crops_per_example=1.5)
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        D.make_loader(train_src, batch_size=2, crop=8, cache_bytes=-1)
    with pytest.raises(ValueError, match="training loaders only"):
        D.make_loader(train_src, train=False, crops_per_example=2)
    assert D.pipeline.auto_cache_bytes(4) * 4 <= D.pipeline.auto_cache_bytes(0) + 4
