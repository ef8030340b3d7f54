"""Input pipeline: RGB normalisation, random crops / dihedral augmentation, grain loaders.

Pattern (flax ``examples/gemma``): ``tfds`` data source -> ``grain.MapDataset.source`` ->
per-host slice -> seeded shuffle -> repeat -> per-example random crop + flips/rot90 ->
normalisation -> batch. Every stage is random-access, so the batch at global step ``t`` is a
pure function of ``(seed, t, process_index, process_count)`` and ``start_step=t`` replays
exactly what an uninterrupted run would have produced from step ``t`` on.

Throughput (``bench/loader.py``, numbers in bench/RESULTS.md): decoding a whole example per
crop is the bottleneck for large examples (an ARAD-size 482x512x31 float32 cube is 30 MB), so
the training loader keeps decoded examples in an in-RAM LRU cache (``cache_bytes``, default a
quarter of the host's memory, see :func:`auto_cache_bytes`) and can cut several crops from
each read (``crops_per_example``). Neither changes the determinism contract: the cache returns
the same arrays the source would, and ``crops_per_example=k`` is part of the stream's
definition (element ``i`` is a crop of shuffled example ``i // k``, its RNG keyed by ``i``).
"""
from __future__ import annotations

import collections
import os
import sys
import threading
from typing import Any, Iterator, Sequence

import numpy as np

NORMALIZATIONS = ("none", "div255", "minmax")
_SPATIAL_KEYS = ("rgb", "hsi", "label", "reflectance")


def normalize_rgb(rgb, mode: str = "minmax", eps: float = 1e-12):
    """The RGB input normalisations used by the methods (numpy in -> numpy, jax in -> jax).

    * ``"none"``: unchanged (cast to float32).
    * ``"div255"``: ``x / 255`` (8-bit code values -> [0, 1]).
    * ``"minmax"`` (MST++, all NTIRE 2022 entries built on it): per image, with ONE minimum
      and ONE maximum over all pixels and all three channels,
      ``x' = (x - min(x)) / max(max(x) - min(x), eps)``.
      ``rgb`` may be (H, W, C) or batched (..., H, W, C); the reduction is over the last 3 axes.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    is_np = isinstance(rgb, (np.ndarray, np.generic, list, tuple, float, int))
    if is_np:
        xp = np
        x = np.asarray(rgb, dtype=np.float32)
    else:
        import jax.numpy as jnp
        xp = jnp
        x = jnp.asarray(rgb, dtype=jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"normalize_rgb: rgb must be (..., H, W, C), got shape {x.shape}")
    if mode == "none":
        return x
    if mode == "div255":
        return x / np.float32(255.0)
    lo = xp.min(x, axis=(-3, -2, -1), keepdims=True)
    hi = xp.max(x, axis=(-3, -2, -1), keepdims=True)
    return (x - lo) / xp.maximum(hi - lo, np.float32(eps))


def _hw(example: dict, keys: Sequence[str]) -> tuple[int, int]:
    k = next(k for k in keys if k in example and np.ndim(example[k]) >= 2)
    return int(np.shape(example[k])[0]), int(np.shape(example[k])[1])


def _check_crop(h, w, crop, name):
    if crop > h or crop > w:
        raise ValueError(f"crop size {crop} is larger than the image {h}x{w}"
                         f"{f' ({name})' if name else ''}; use a smaller crop")


AUGMENTS = ("dihedral", "flips", "none")


def _augment_mode(augment) -> str:
    if augment is True:
        return "dihedral"
    if augment is False or augment is None:
        return "none"
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    return augment


def _draw_transform(rng: np.random.Generator, mode: str) -> tuple[int, bool, bool]:
    """(k_rot90, flip_v, flip_h) for ``mode`` (dihedral draws rot90 first, then the flips)."""
    if mode == "none":
        return 0, False, False
    k_rot = int(rng.integers(4)) if mode == "dihedral" else 0
    return k_rot, bool(rng.integers(2)), bool(rng.integers(2))


def _transform(a: np.ndarray, t: tuple[int, bool, bool]) -> np.ndarray:
    k_rot, flip_v, flip_h = t
    if k_rot:
        a = np.rot90(a, k_rot, axes=(0, 1))
    if flip_v:
        a = a[::-1]
    if flip_h:
        a = a[:, ::-1]
    return a


def dihedral(a: np.ndarray, rng: np.random.Generator, augment="dihedral") -> np.ndarray:
    """A random transform of (H, W, ...) ``a``: ``"dihedral"`` (rot90 + flips), ``"flips"``
    (vertical / horizontal flips) or ``"none"``."""
    return np.ascontiguousarray(_transform(a, _draw_transform(rng, _augment_mode(augment))))


def random_crop_augment(example: dict, rng: np.random.Generator, crop: int | None,
                        augment="dihedral", keys: Sequence[str] = _SPATIAL_KEYS) -> dict:
    """Random ``crop``×``crop`` window + random transform, jointly for ``keys``.

    ``augment``: ``"dihedral"`` / ``True`` (``rot90`` by k ∈ {0,1,2,3}, vertical flip and
    horizontal flip, each p = 0.5, MST++'s ``arguement``), ``"flips"`` (the two flips only: the
    ACC paper) or ``"none"`` / ``False``. The same window and transform are applied to every
    spatial array in ``keys``; other entries pass through.
    """
    mode = _augment_mode(augment)
    spatial = [k for k in keys if k in example and np.ndim(example[k]) >= 2]
    if not spatial:
        raise ValueError(f"example has none of the spatial keys {list(keys)}")
    h, w = _hw(example, spatial)
    out = dict(example)
    if crop is not None:
        _check_crop(h, w, crop, _name_of(example))
        y0 = int(rng.integers(0, h - crop + 1))
        x0 = int(rng.integers(0, w - crop + 1))
    t = _draw_transform(rng, mode)
    for k in spatial:
        a = np.asarray(example[k])
        if a.shape[:2] != (h, w):
            raise ValueError(f"spatial size of {k!r} {a.shape[:2]} differs from {(h, w)}")
        if crop is not None:
            a = a[y0:y0 + crop, x0:x0 + crop]
        out[k] = np.ascontiguousarray(_transform(a, t))
    return out


def center_crop(example: dict, crop: int, keys: Sequence[str] = _SPATIAL_KEYS) -> dict:
    """Central ``crop``×``crop`` window of every spatial array in ``keys``."""
    spatial = [k for k in keys if k in example and np.ndim(example[k]) >= 2]
    h, w = _hw(example, spatial)
    _check_crop(h, w, crop, _name_of(example))
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    out = dict(example)
    for k in spatial:
        out[k] = np.ascontiguousarray(np.asarray(example[k])[y0:y0 + crop, x0:x0 + crop])
    return out


def _name_of(example) -> str:
    n = example.get("name", "")
    if isinstance(n, (bytes, np.bytes_)):
        n = n.decode("utf-8")
    return str(n)


def _to_numpy(v):
    if isinstance(v, (bytes, np.bytes_)):
        return np.asarray(v.decode("utf-8"))
    a = np.asarray(v)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    return a


def _select(example: dict, keys: Sequence[str]) -> dict:
    missing = [k for k in keys if k not in example]
    if missing:
        raise ValueError(f"example lacks keys {missing}; it has {sorted(example)}")
    return {k: _to_numpy(example[k]) for k in keys}


def _nbytes(example: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in example.values()))


def auto_cache_bytes(worker_count: int = 0) -> int:
    """The default decoded-example cache bound of :func:`make_loader`: a quarter of the host's
    memory (the smaller of physical RAM and a cgroup v2 ``memory.max`` limit), split evenly
    over the processes that each hold a cache (``worker_count`` workers, else this one)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total // 4 // max(1, int(worker_count)))


class ExampleCache:
    """Random-access source of ``{key: np.ndarray}`` (``keys`` of ``source[i]``, plus
    ``"_index"`` = ``i`` with ``with_index``) that keeps decoded examples in RAM: an LRU bounded
    by ``max_bytes`` (sum of the arrays' ``nbytes``; an example larger than the bound is
    returned but not kept; ``0`` disables caching), except that the ``keep_last`` most recently
    decoded examples are kept whatever their size (``crops_per_example`` reads each example
    ``k`` times in a row). Cached arrays are read-only, so a caller
    that would modify one in place fails instead of corrupting later reads. Thread-safe: reads
    of the same index by several threads decode it once. Each process (grain worker) holds its
    own cache; pickling drops the contents."""

    def __init__(self, source, keys: Sequence[str], max_bytes: int = 0, with_index: bool = False,
                 keep_last: int = 0):
        if max_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {max_bytes}")
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.source, self.keys = source, tuple(keys)
        self.max_bytes, self.with_index = int(max_bytes), bool(with_index)
        self.keep_last = int(keep_last)
        self._init_state()

    def _init_state(self):
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._pending: dict[int, threading.Event] = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    def __reduce__(self):
        # grain worker processes are spawned: a TFDS source refers to its builder class, whose
        # module (``datasets/<name>/``, imported by path under a private name) must be loaded
        # in the worker before the source can be unpickled.
        import cloudpickle
        builders = sorted(m[len(_BUILDER_PREFIX):-len(_BUILDER_SUFFIX)] for m in sys.modules
                          if m.startswith(_BUILDER_PREFIX) and m.endswith(_BUILDER_SUFFIX))
        state = (self.keys, self.max_bytes, self.with_index, self.keep_last)
        return _rebuild_cache, (builders, cloudpickle.dumps(self.source), state)

    def __len__(self):
        return len(self.source)

    def _decode(self, i: int) -> dict:
        ex = _select(self.source[i], self.keys)
        if self.with_index:
            ex["_index"] = np.asarray(i)
        return ex

    def __getitem__(self, i):
        i = int(i)
        if self.max_bytes == 0 and self.keep_last == 0:
            return self._decode(i)
        while True:
            with self._lock:
                ex = self._items.get(i)
                if ex is not None:
                    self._items.move_to_end(i)
                    self.hits += 1
                    return ex
                wait = self._pending.get(i)
                if wait is None:
                    done = self._pending[i] = threading.Event()
                    self.misses += 1
                    break
            wait.wait()  # another thread is decoding i: take its result (or decode if too big)
        try:
            ex = self._decode(i)
            size = _nbytes(ex)
            if size <= self.max_bytes or self.keep_last:
                ex = {k: v.view() for k, v in ex.items()}  # read-only views: the source's
                for v in ex.values():                     # own arrays keep their flags
                    v.flags.writeable = False
                with self._lock:
                    self._items[i] = ex
                    self.nbytes += size
                    while (len(self._items) > self.keep_last
                           and self.nbytes > self.max_bytes):
                        _, old = self._items.popitem(last=False)
                        self.nbytes -= _nbytes(old)
            return ex
        finally:
            with self._lock:
                del self._pending[i]
            done.set()


_BUILDER_PREFIX, _BUILDER_SUFFIX = "_jaxspec_builders_", "_dataset_builder"


def _rebuild_cache(builders, source_bytes, state):
    import pickle

    from jaxspec.data.builders import load_builder_module
    for name in builders:
        load_builder_module(name)
    return ExampleCache(pickle.loads(source_bytes), *state)


def _make_repeat_each_class():
    import grain

    class RepeatEachMapDataset(grain.MapDataset):
        """``parent`` with every element repeated ``k`` times in a row (element ``i`` is
        ``parent[i // k]``), random access; indices past the end pass through (the parent may be
        a shuffle, which maps epoch ``e``'s indices to its ``e``-th permutation)."""

        def __init__(self, parent, k: int):
            super().__init__(parent)
            self._k = int(k)

        def __len__(self):
            return len(self._parent) * self._k

        def __str__(self):
            return f"RepeatEachMapDataset(k={self._k})"

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            return self._parent[index // self._k]

    RepeatEachMapDataset.__module__ = __name__
    return RepeatEachMapDataset


def __getattr__(name):
    # grain is imported lazily; the grain.MapDataset subclass is built on first use (and found
    # by name when a grain worker process unpickles the pipeline).
    if name == "RepeatEachMapDataset":
        cls = _make_repeat_each_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _normalize(example: dict, mode: str) -> dict:
    if "rgb" in example:
        example = dict(example)
        example["rgb"] = normalize_rgb(example["rgb"], mode)
    return example


def make_loader(source, *, batch_size: int | None = None, crop: int | None = None,
                seed: int = 0, train: bool = True, normalization: str = "minmax",
                start_step: int = 0, num_epochs: int | None = None, drop_remainder: bool = True,
                worker_count: int = 0, prefetch: int = 2, keys: Sequence[str] = ("rgb", "hsi"),
                split_kind: str | None = None, shard: tuple[int, int] | None = None,
                augment="dihedral", fusion=None, cache_bytes: int | None = None,
                crops_per_example: int = 1,
                rows: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """Batches of numpy arrays from a random-access ``source`` (e.g. :func:`data_source`).

    Train (``train=True`` / ``split_kind="train"``): per-host slice ``source[i::n]`` with
    ``(i, n) = (jax.process_index(), jax.process_count())`` (or ``shard``), shuffle with
    ``seed`` (reshuffled every epoch), repeat ``num_epochs`` times (``None``: forever), random
    ``crop`` + joint rot90/flips (:func:`random_crop_augment`, RNG keyed by ``seed`` and the
    global example index), :func:`normalize_rgb` on ``rgb``, batch ``batch_size``. Batch ``t``
    depends only on ``(seed, t)`` (per shard); ``start_step=t`` resumes there.

    Eval (``train=False`` / ``split_kind="eval"``): same sharding, no shuffle, one pass in
    source order, full images (central ``crop`` if given), batch 1 unless ``batch_size`` is
    given, ``drop_remainder`` forced False, and ``"name"`` added to ``keys``.

    ``augment`` (train): ``"dihedral"`` (default), ``"flips"`` or ``"none"``.

    ``fusion`` (a :class:`jaxspec.data.fusion.Degradation`): fusion pairs are synthesised from
    ``hsi`` (+ ``bands``): train crops by :func:`jaxspec.data.fusion.train_pair` (``crop`` a
    multiple of the scale, PSF by source index, noise from the example RNG), eval full images
    cropped to multiples of the scale (:class:`jaxspec.data.fusion.FusionSource`, then the
    central ``crop``); batches hold ``hsi``, ``lr_hsi``, ``hr_msi``, ``srf``, ``psf``.

    Throughput (train; bench/loader.py, bench/RESULTS.md "Input pipeline"):

    * ``cache_bytes``: decoded examples (their ``keys`` only) are kept in an in-RAM LRU of at
      most this many bytes per process (:class:`ExampleCache`); ``None`` (default):
      :func:`auto_cache_bytes` (a quarter of the host's memory, split over the workers);
      ``0``: off. When the shard fits, every example is decoded once per process and a crop
      costs only its copy. Eval loaders do not cache (one pass) unless ``cache_bytes`` is given.
    * ``crops_per_example`` (default 1): ``k`` consecutive stream elements are crops of the same
      shuffled example (element ``i`` -> example ``i // k``, its own crop/transform RNG keyed by
      ``i``): one decode per ``k`` crops when the data do not fit the cache, at the price of
      ``k`` correlated crops per batch. Changing ``k`` changes the stream; the cache does not.
    * ``worker_count``: grain worker processes (each with its own cache).

    ``rows=(start, stop)`` (train, multi-process): with ``shard=(0, 1)`` the stream is the one
    global batch order and this process reads only rows ``start:stop`` of each global batch of
    ``batch_size`` (``stop - start`` examples per batch), so the global batches do not depend
    on the process count.

    Returns an iterator of dicts ``{key: np.ndarray}`` with a leading batch axis.
    """
    import grain

    if split_kind is not None:
        if split_kind not in ("train", "eval"):
            raise ValueError(f"split_kind must be 'train' or 'eval', got {split_kind!r}")
        train = split_kind == "train"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if batch_size is None:
        if train:
            raise ValueError("make_loader: batch_size is required for training")
        batch_size = 1
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if crop is not None and int(crop) < 1:
        raise ValueError(f"crop must be a positive int or None, got {crop}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if worker_count < 0 or prefetch < 0:
        raise ValueError("worker_count and prefetch must be >= 0")
    if isinstance(crops_per_example, bool) or int(crops_per_example) != crops_per_example \
            or crops_per_example < 1:
        raise ValueError(f"crops_per_example must be an int >= 1, got {crops_per_example!r}")
    if crops_per_example > 1 and not train:
        raise ValueError("crops_per_example applies to training loaders only")
    if cache_bytes is not None and (isinstance(cache_bytes, bool) or int(cache_bytes) < 0):
        raise ValueError(f"cache_bytes must be >= 0 or None, got {cache_bytes!r}")
    keys = tuple(keys)
    if not train and "name" not in keys:
        keys = keys + ("name",)
    if shard is None:
        import jax
        shard = (jax.process_index(), jax.process_count())
    s_idx, s_cnt = int(shard[0]), int(shard[1])
    if not 0 <= s_idx < s_cnt:
        raise ValueError(f"bad shard {shard}: need 0 <= index < count")
    if len(source) < s_cnt:
        raise ValueError(f"source has {len(source)} examples, fewer than {s_cnt} shards")

    mode = _augment_mode(augment)
    if fusion is not None and train and crop is None:
        raise ValueError("make_loader: fusion training needs a crop (a multiple of the scale)")
    if fusion is not None and not train and crop is not None:
        raise ValueError("make_loader: fusion evaluation runs on full images (crop=None)")
    base, with_index = source, False
    if fusion is not None:
        from jaxspec.data import fusion as fusion_lib
        if not train:
            base = fusion_lib.FusionSource(source, fusion, seed)
            keys = tuple(dict.fromkeys(("hsi", "lr_hsi", "hr_msi", "srf", "psf", "name")))
        else:
            keys, with_index = ("hsi", "bands"), True
    if cache_bytes is None:
        cache_bytes = auto_cache_bytes(worker_count) if train else 0
    # crops_per_example reads example j for k stream elements in a row, from up to
    # num_threads + 1 reader threads at once: keep that many last examples whatever the bound.
    keep = (min(prefetch, 2) + 2) if train and crops_per_example > 1 else 0
    ds = grain.MapDataset.source(ExampleCache(base, keys, int(cache_bytes), with_index, keep))
    if with_index:
        keys = keys + ("_index",)
    if s_cnt > 1:
        ds = ds[s_idx::s_cnt]
    if train:
        ds = ds.shuffle(seed=int(seed) % 2**32)
        if crops_per_example > 1:
            ds = __getattr__("RepeatEachMapDataset")(ds, int(crops_per_example))
        ds = ds.repeat(num_epochs)
        if fusion is not None:
            ds = ds.random_map(lambda ex, rng: fusion_lib.train_pair(
                ex, fusion, rng, crop=int(crop), seed=int(seed), augment=mode),
                seed=(int(seed) + 1) % 2**32)
        else:
            ds = ds.random_map(lambda ex, rng: random_crop_augment(ex, rng, crop, mode, keys),
                               seed=(int(seed) + 1) % 2**32)
    else:
        if num_epochs is not None and num_epochs > 1:
            ds = ds.repeat(num_epochs)
        if crop is not None:
            ds = ds.map(lambda ex: center_crop(ex, int(crop), keys))
        drop_remainder = False
    ds = ds.map(lambda ex: _normalize(ex, normalization))
    if rows is not None and tuple(rows) != (0, int(batch_size)):
        r0, r1 = int(rows[0]), int(rows[1])
        if not (train and 0 <= r0 < r1 <= int(batch_size)):
            raise ValueError(f"rows={rows}: need training and 0 <= start < stop <= batch_size")
        full, g, n_rows = ds, int(batch_size), r1 - r0
        ds = grain.MapDataset.range(len(full) // g * n_rows).map(
            lambda k: full[(k // n_rows) * g + r0 + k % n_rows])
        batch_size = n_rows
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    if start_step:
        ds = ds[int(start_step):]
    read = grain.ReadOptions(num_threads=min(prefetch, 2) if prefetch else 0,
                             prefetch_buffer_size=max(prefetch, 1))
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        # grain 0.2.x reads an absl flag when starting workers, which raises in programs that
        # never parsed absl flags (google/grain#1355): their defaults are what we want.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
    return iter(it_ds)
