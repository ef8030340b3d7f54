"""Loader throughput: random ``crop``x``crop`` training crops per second from ARAD-size examples.

Builds a temporary ``arad1k`` TFDS dataset (array_record) with the project's real builder on
fixture files in the native format (MATLAB v7.3 cubes of 482x512x31 float32 + 8-bit JPEGs,
written by ``tests/real_fixtures.py``), then times ``jaxspec.data.make_loader`` over the train
split for each loader configuration:

* ``cache_bytes``: decoded examples kept in RAM (LRU, bounded by bytes; 0 = off);
* ``crops_per_example``: crops cut from each decoded example before the next read;
* ``worker_count``: grain worker processes.

Each configuration runs ``--warmup`` batches (not timed: the first epoch fills the cache),
then ``--batches`` timed batches. Printed per configuration: crops/s (wall), the CPU seconds
the loader used (this process + its worker processes, psutil) and crops per CPU-second
("per core": what one fully used host core delivers). The machine may be shared with other
processes, so wall-clock numbers are lower bounds; crops per CPU-second is less sensitive.

    nice -n 10 python bench/loader.py                    # the default grid
    nice -n 10 python bench/loader.py --configs 0:1:0 512:1:0 --batches 30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

H, W, C = 482, 512, 31  # ARAD-1K cube size


def write_fixtures(manual: Path, n: int, seed: int = 0) -> None:
    """``n`` train scenes (ARAD_1K_0001..) and one validation scene (ARAD_1K_0901)."""
    import real_fixtures as rf
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1)) + [901]
    for i in ids:
        cube = rng.random((H, W, C), dtype=np.float32)
        sub = "Train" if i <= 900 else "Valid"
        rf.write_mat_v73(manual / f"{sub}_Spec" / f"ARAD_1K_{i:04d}.mat", {"cube": cube})
        rgb = (rng.random((H, W, 3)) * 255).astype(np.uint8)
        rf.write_rgb(manual / f"{sub}_RGB" / f"ARAD_1K_{i:04d}.jpg", rgb, quality=95)


def prepare(data_dir: Path, n: int):
    from jaxspec import data as D
    manual = data_dir / "manual"
    if not (manual / "Train_Spec").is_dir():
        write_fixtures(manual, n)
    b = D.builder("arad1k", data_dir=data_dir / "tfds", manual_dir=manual)
    return D.data_source(b, "train")


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live child processes (psutil), or
    of this process and its reaped children (``os.times``) without psutil."""
    try:
        import psutil
    except ImportError:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def run_config(source, *, crop, batch_size, cache_bytes, crops_per_example, worker_count,
               warmup, batches, seed=0):
    from jaxspec import data as D
    it = D.make_loader(source, batch_size=batch_size, crop=crop, seed=seed,
                       cache_bytes=cache_bytes, crops_per_example=crops_per_example,
                       worker_count=worker_count, shard=(0, 1))
    for _ in range(warmup):
        next(it)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        b = next(it)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert b["hsi"].shape == (batch_size, crop, crop, C), b["hsi"].shape
    n = batches * batch_size
    del it
    return {"cache_mib": cache_bytes >> 20, "crops_per_example": crops_per_example,
            "worker_count": worker_count, "crops": n, "wall_s": round(wall, 2),
            "crops_per_s": round(n / wall, 1), "cpu_s": round(cpu, 2),
            "crops_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=16, help="train examples (default 16)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=20, help="default 20 (MST++ preset)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (default: with a cache, enough for every "
                        "process to read every example once; else 1)")
    p.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    p.add_argument("--configs", nargs="+", default=None, metavar="MiB:K:W",
                   help="cache MiB : crops_per_example : worker_count (default: a grid)")
    p.add_argument("--data-dir", default=None, help="keep the generated dataset here")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    configs = a.configs or ["0:1:0", "0:4:0", "0:1:2", "256:1:0", "256:4:0", "1024:1:0",
                            "1024:4:0", "1024:1:2"]
    with tempfile.TemporaryDirectory(prefix="jaxspec_loader_bench_") as tmp:
        data_dir = Path(a.data_dir) if a.data_dir else Path(tmp)
        t0 = time.perf_counter()
        source = prepare(data_dir, a.examples)
        print(f"# dataset: {len(source)} train examples {H}x{W}x{C} float32 "
              f"(prepared in {time.perf_counter() - t0:.0f}s); crop {a.crop}, "
              f"batch {a.batch_size}, host cores {os.cpu_count()}", flush=True)
        rows = []
        for spec in configs:
            mib, k, w = (int(x) for x in spec.split(":"))
            fill = (-(-a.examples * k // a.batch_size) + 1) * max(1, w) if mib else 1
            warm = a.warmup if a.warmup is not None else fill
            r = run_config(source, crop=a.crop, batch_size=a.batch_size, cache_bytes=mib << 20,
                           crops_per_example=k, worker_count=w, warmup=warm, batches=a.batches)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
