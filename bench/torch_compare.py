"""Same-machine speed of the official PyTorch MST++ and jaxspec's MST++.

    taskset -c 0-1 python bench/torch_compare.py                   # 2 threads, both models
    python bench/torch_compare.py --threads 2 --repeats 7 --what infer
    python bench/torch_compare.py --what train --batch 20 --crop 128   # the paper's train step

Both models run in this one process on the same random input, with the same weights (the
PyTorch model's random init converted by ``jaxspec.convert``; outputs are checked to agree):

* **threads**: ``--threads N`` pins the process to N CPUs (``os.sched_setaffinity`` before
  jax/torch are imported; XLA:CPU sizes its thread pool from the affinity mask) and sets
  ``torch.set_num_threads(N)``; the XLA flag ``--xla_cpu_multi_thread_eigen`` stays at its
  default (true). Run under ``taskset -c ...`` for the same effect from outside.
* **inference**: one ``(1, 3, 482, 512)`` image (``--height/--width``), ``torch.no_grad()`` +
  ``eval()`` against ``jax.jit(model.apply)`` (compiled before timing).
* **train step**: forward + MRAE loss (``mean(|pred - gt| / gt)``, the official ``Loss_MRAE``)
  + backward + Adam(4e-4) update, at ``--crop`` x ``--crop`` x ``--batch``; the JAX step is
  ``jax.jit(value_and_grad + optax.adam)`` with the state donated (the same work as the torch
  step; the engine's step adds only norms for logging); ``--jax-microbatches N`` makes it the
  engine's ``config.microbatches=N`` step (the same update; the batch in N parts, one after
  the other in a ``lax.scan``, so 1/N of the activations are alive). Each framework's step runs in a worker
  process of its own (at the paper's batch each needs 12-14 GiB at its peak, more than one
  process can hold on a 24 GiB machine); by default each worker runs alone, in rounds that
  alternate the order (``--train-order``, ``--train-rounds``); peak RSS of each is printed.
* **allocator**: both frameworks allocate their large temporaries afresh on every call; glibc's
  malloc serves blocks over 32 MiB by mmap, so each call page-faults them in again. Which
  allocator ran (``LD_PRELOAD``, e.g. ``libtcmalloc_minimal.so.4``) is printed and recorded;
  compare like with like. So are ``GLIBC_TUNABLES``: with ``glibc.malloc.hugetlb=1`` (glibc
  >= 2.35) malloc asks for transparent huge pages on those blocks (THP mode ``madvise``, the
  usual default), 512x fewer page faults (MST++ step at 20 x 128 x 128: ~10 -> ~2.5 s of
  kernel time); the THP mode is printed. The CPU model and its matmul peak are printed too:
  ratios differ between machines (oneDNN and XLA:CPU do not gain alike).
* **GPU**: ``--device cuda`` runs both on the first GPU (PyTorch CUDA build, jax with the
  CUDA plugin): torch with ``cudnn.benchmark`` (autotuned convolutions, as XLA autotunes) and
  ``torch.cuda.synchronize()`` in every timed call; jax without preallocating 75 % of the GPU
  (the inference process and the train workers share it). ``--precision tf32`` (default)
  gives both frameworks TF32 matmuls and convolutions (JAX's default on GPU; torch's
  ``allow_tf32`` flags set), ``fp32`` full float32 in both (``jax_default_matmul_precision``
  ``highest``). Peak memory is then the device's (``torch.cuda.max_memory_allocated``, XLA's
  ``peak_bytes_in_use``) instead of the process's RSS.
* **alternating**: each repeat times torch then jax (order flipped every repeat), with a pause
  between so OpenMP spin-waiting does not overlap; medians, min/max and the ratio
  ``torch / jax`` (> 1: jaxspec faster) are printed. The machine may be shared: the 1-minute
  load average before and after is printed too.

Needs torch and einops (``pip install "jaxspec[convert]" einops``) and the official code in
``../shared/reference/mstpp`` (``JAXSPEC_REFERENCE`` overrides the folder); exits with a
message when they are absent. ``--json PATH`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _thp_mode() -> str:
    """The bracketed transparent-huge-page mode (``always`` / ``madvise`` / ``never``)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stats(ts):
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts),
            "all_s": ts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-repeats", type=int, default=3,
                   help="timed steps per worker (per round when isolated)")
    p.add_argument("--train-rounds", type=int, default=2,
                   help="isolated: rounds of one worker alone per framework")
    p.add_argument("--train-order", choices=("isolated", "interleaved"), default="isolated")
    p.add_argument("--what", choices=("infer", "train", "both"), default="both")
    p.add_argument("--height", type=int, default=482)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between timed runs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("tf32", "fp32"), default="tf32",
                   help="--device cuda: TF32 (both frameworks) or full float32")
    p.add_argument("--jax-microbatches", type=int, default=1,
                   help="the JAX train step as the engine's config.microbatches=N: the same "
                        "update from N micro-batches in a lax.scan (1/N of the activation "
                        "memory); must divide --batch")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import _cli
    for opt in ("threads", "repeats", "train_repeats", "train_rounds", "height", "width", "crop",
                "batch", "jax_microbatches"):
        _cli.positive("--" + opt.replace("_", "-"), getattr(a, opt))
    if a.batch % a.jax_microbatches:
        from jaxspec.errors import UsageError
        raise UsageError(f"--jax-microbatches {a.jax_microbatches} must divide --batch "
                         f"{a.batch}")
    if a.json:
        _cli.output_file(a.json, "--json")

    cpus = sorted(os.sched_getaffinity(0))
    if a.threads > len(cpus):
        print(f"only {len(cpus)} CPUs available, using them all", file=sys.stderr)
    os.sched_setaffinity(0, cpus[:a.threads])
    if a.device == "cuda":
        # the train workers are separate processes on the same GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(REPO))
    try:
        import torch
        import einops  # noqa: F401  (the reference imports it)
    except ImportError as e:
        print(f"skipped: {e} (pip install 'torch==2.13.0+cpu' einops)")
        return 0
    from jaxspec import convert
    ref = convert.reference_code("mstpp/MST_Plus_Plus.py")
    if ref is None:
        print("skipped: official MST++ code not found (../shared/reference/mstpp)")
        return 0
    dev = _setup_frameworks(a.device, a.precision, a.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxspec.models.mstpp import MSTPlusPlus

    torch.manual_seed(0)
    official = convert.load_module_from_file(ref).MST_Plus_Plus()
    sd = {k: v.detach().numpy() for k, v in official.state_dict().items()}
    _, variables = convert.convert_checkpoint("mstpp", sd)
    model = MSTPlusPlus()
    official.to(dev)
    res = {"jax": jax.__version__, "torch": torch.__version__, "threads": a.threads,
           "device": a.device, "precision": a.precision if a.device == "cuda" else "fp32",
           "accelerator": (torch.cuda.get_device_name(0) if a.device == "cuda" else ""),
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "thp": _thp_mode(),
           "cpu_model": _cpu_model(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()[0]}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({a.device}{' ' + res['accelerator'] if res['accelerator'] else ''}, "
          f"{res['precision']}), "
          f"{a.threads} thread(s) on CPUs {cpus[:a.threads]}, load avg {os.getloadavg()}, "
          f"allocator: {res['ld_preload'] or 'glibc malloc (no LD_PRELOAD)'}, GLIBC_TUNABLES="
          f"{res['glibc_tunables'] or '(unset)'}, THP {res['thp']}, CPU {res['cpu_model']}")

    def alternate(run_torch, run_jax, n):
        tt, tj = [], []
        for i in range(n):
            order = [(run_torch, tt), (run_jax, tj)]
            for fn, acc in (order if i % 2 == 0 else order[::-1]):
                time.sleep(a.pause)
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        return _stats(tt), _stats(tj)

    def report(name, st, sj, how="alternating repeats"):
        ratio = st["median_s"] / sj["median_s"]
        print(f"{name}: torch median {st['median_s']:.3f} s [{st['min_s']:.3f}, "
              f"{st['max_s']:.3f}], jax median {sj['median_s']:.3f} s [{sj['min_s']:.3f}, "
              f"{sj['max_s']:.3f}] over {st['n']} {how} -> torch/jax = "
              f"{ratio:.2f}x")
        res[name] = {"torch": st, "jax": sj, "ratio_torch_over_jax": ratio}

    rng = np.random.default_rng(0)
    if a.what in ("infer", "both"):
        x = rng.uniform(0, 1, (1, a.height, a.width, 3)).astype(np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
        official.eval()
        xj = jnp.asarray(x)
        t = time.perf_counter()
        fwd = jax.jit(model.apply).lower(variables, xj).compile()
        yj = np.asarray(fwd(variables, xj).block_until_ready())
        res["infer_jax_first_call_s"] = time.perf_counter() - t
        cost = fwd.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        res["infer_xla_gflop"] = float(cost["flops"]) / 1e9

        def run_torch():
            with torch.no_grad():
                y = official(xt)
            _sync(torch, dev)
            return y

        yt = run_torch().cpu().numpy().transpose(0, 2, 3, 1)
        res["infer_max_abs_diff"] = float(np.abs(yt - yj).max())
        print(f"inference {a.height}x{a.width}: outputs agree to {res['infer_max_abs_diff']:.1e}"
              f" (jax compile + first call {res['infer_jax_first_call_s']:.1f} s)")
        st, sj = alternate(run_torch, lambda: fwd(variables, xj).block_until_ready(), a.repeats)
        report("infer", st, sj)
        a2 = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
        mm = jax.jit(lambda m: m @ m).lower(a2).compile()
        mm(a2).block_until_ready()
        tmm = []
        for _ in range(5):
            t = time.perf_counter()
            mm(a2).block_until_ready()
            tmm.append(time.perf_counter() - t)
        res["matmul_peak_gflops"] = 2 * 2048 ** 3 / min(tmm) / 1e9
        res["infer_jax_gflops_per_s"] = res["infer_xla_gflop"] / sj["median_s"]
        print(f"XLA {res['infer_xla_gflop']:.1f} GFLOP -> {res['infer_jax_gflops_per_s']:.1f} "
              f"GFLOP/s at the median; fp32 2048^2 matmul peak (best of 5) "
              f"{res['matmul_peak_gflops']:.1f} GFLOP/s")

    if a.what in ("train", "both"):
        # worker processes per framework: the two train steps at the paper's batch need
        # ~12-14 GiB each at their peak, more than fits in one process here
        del official
        st, sj, first, compile_s = _train_alternating(a, cpus)
        res["train_first_loss"] = first
        res["train_jax_compile_s"] = compile_s
        print(f"train step {a.batch}x{a.crop}x{a.crop}: first MRAE torch {first['torch']:.6f} "
              f"jax {first['jax']:.6f} (jax compile {compile_s:.1f} s; one worker process each; "
              f"jax micro-batches {a.jax_microbatches})")
        report("train", st, sj, "steps, " + ("each worker alone, order alternating per round"
                                             if a.train_order == "isolated" else "interleaved"))
        res["train_batch"], res["train_crop"] = a.batch, a.crop
        res["train_jax_microbatches"] = a.jax_microbatches
        res["train_order"], res["train_rounds"] = a.train_order, a.train_rounds
        res["train_peak_mib"] = {k: v for k, v in first.items() if k.endswith("peak_mib")}
        res["train_peak_kind"] = "device" if a.device == "cuda" else "process RSS"
        print(f"train peak memory ({res['train_peak_kind']}): torch "
              f"{first['torch_peak_mib']:.0f} MiB, jax {first['jax_peak_mib']:.0f} MiB")

    res["load_after"] = os.getloadavg()[0]
    try:
        import resource
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        pass
    print(f"load avg after: {os.getloadavg()}, peak RSS {res.get('peak_rss_mib', 0):.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


def _setup_frameworks(device: str, precision: str, threads: int):
    """Torch threads and, on a GPU, both frameworks' matmul/convolution precision
    (``tf32``/``fp32``) and torch's autotuned convolutions; returns the torch device."""
    import torch
    torch.set_num_threads(threads)
    if device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU (a CPU-only torch build?)")
    import jax
    if jax.default_backend() != "gpu":
        raise SystemExit(f"--device cuda: jax runs on {jax.default_backend()!r}, not a GPU "
                         "(install jax with its CUDA plugin)")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    return torch.device("cuda")


def _sync(torch, dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(side: str, dev) -> float:
    """Device peak on a GPU, else the process's peak RSS (MiB)."""
    if dev.type == "cuda":
        if side == "torch":
            import torch
            return torch.cuda.max_memory_allocated() / 2 ** 20
        import jax
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_worker(side: str, conn, batch: int, crop: int, threads: int, cpus, device: str,
                  precision: str, microbatches: int = 1) -> None:
    """Child process: build one framework's MST++ train step (same weights and data in both:
    torch seed 0, numpy seed 1), then answer each ``"step"`` message with the seconds one step
    took; the first answer is ``(first loss, JAX compile seconds or 0, peak memory in MiB)``."""
    os.sched_setaffinity(0, cpus)
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from jaxspec import convert
    dev = _setup_frameworks(device, precision, threads)
    torch.manual_seed(0)
    official = convert.load_module_from_file(
        convert.reference_code("mstpp/MST_Plus_Plus.py")).MST_Plus_Plus()
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 1, (batch, crop, crop, 3)).astype(np.float32)
    hsi = rng.uniform(0.1, 0.9, (batch, crop, crop, 31)).astype(np.float32)
    compile_s = 0.0
    if side == "torch":
        rgb_t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))).to(dev)
        hsi_t = torch.from_numpy(np.ascontiguousarray(hsi.transpose(0, 3, 1, 2))).to(dev)
        official.to(dev).train()
        opt_t = torch.optim.Adam(official.parameters(), lr=4e-4, betas=(0.9, 0.999))

        def run():
            opt_t.zero_grad()
            loss = torch.mean(torch.abs(official(rgb_t) - hsi_t) / hsi_t)
            loss.backward()
            opt_t.step()
            return loss.item()      # waits for the GPU
    else:
        import jax
        import jax.numpy as jnp
        import optax

        from jaxspec.models.mstpp import MSTPlusPlus
        sd = {k: v.detach().numpy() for k, v in official.state_dict().items()}
        _, variables = convert.convert_checkpoint("mstpp", sd)
        del official
        model = MSTPlusPlus()
        tx = optax.adam(4e-4, b1=0.9, b2=0.999)

        from jaxspec.train.steps import accumulate_gradients

        def step(state, rgb, hsi):
            params, opt = state

            def loss_fn(p, batch, _rngs):
                r, h = batch
                return jnp.mean(jnp.abs(model.apply({"params": p}, r) - h) / h), (None, {})

            # the engine's config.microbatches (1: value_and_grad on the whole batch)
            loss, _, g = accumulate_gradients(jax.value_and_grad(loss_fn, has_aux=True),
                                              params, (rgb, hsi), {}, microbatches)
            upd, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, upd), opt), loss

        holder = [(variables["params"], tx.init(variables["params"]))]
        rgb_j, hsi_j = jnp.asarray(rgb), jnp.asarray(hsi)
        t = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(holder[0], rgb_j, hsi_j).compile()
        compile_s = time.perf_counter() - t

        def run():
            holder[0], loss = compiled(holder[0], rgb_j, hsi_j)
            return float(loss)
    first = run()
    conn.send((first, compile_s, _peak_mib(side, dev)))
    while conn.recv() == "step":
        t = time.perf_counter()
        run()
        conn.send(time.perf_counter() - t)
    conn.close()


def _start_worker(ctx, side, a, cpus):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_train_worker, args=(side, child, a.batch, a.crop, a.threads,
                                                   cpus[:a.threads], a.device, a.precision,
                                                   a.jax_microbatches))
    proc.start()
    first, compile_s, peak = parent.recv()
    return proc, parent, first, compile_s, peak


def _stop_worker(proc, conn) -> None:
    conn.send("stop")
    proc.join(timeout=60)


def _train_alternating(a, cpus):
    """Torch and JAX train steps in worker processes. ``--train-order isolated`` (default):
    ``--train-rounds`` rounds, each running one framework's worker **alone** (the other's
    process has exited) for ``--train-repeats`` timed steps after its first, then the other's,
    the order flipped every round. ``interleaved``: both workers alive, one step each in turn
    (order flipped every repeat) - at the paper's batch the two processes together need more
    than this machine's memory, and the step that follows the other framework's pays for the
    kernel reclaiming and compacting its freed pages (JAX's one ~12 GiB temporary more than
    PyTorch's many blocks: 13.7-21.9 s interleaved vs 10.1-11.5 s alone, 2026-12-06). ``a.pause`` seconds
    between runs. Returns the stats, first losses, peak RSS and the JAX compile time."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    times = {"torch": [], "jax": []}
    info = {}

    def order(i):
        return ("torch", "jax") if i % 2 == 0 else ("jax", "torch")

    def timed_step(side, conn):
        time.sleep(a.pause)
        conn.send("step")
        times[side].append(conn.recv())

    if a.train_order == "isolated":
        for r in range(a.train_rounds):
            for side in order(r):
                w = _start_worker(ctx, side, a, cpus)
                info.setdefault(side, w[2:])
                try:
                    for _ in range(a.train_repeats):
                        timed_step(side, w[1])
                finally:
                    _stop_worker(*w[:2])
    else:
        workers = {}
        for side in ("torch", "jax"):  # one at a time, so the set-ups do not overlap either
            workers[side] = _start_worker(ctx, side, a, cpus)
            info[side] = workers[side][2:]
        try:
            for i in range(a.train_repeats):
                for side in order(i):
                    timed_step(side, workers[side][1])
        finally:
            for proc, conn, *_ in workers.values():
                _stop_worker(proc, conn)
    first = {side: v[0] for side, v in info.items()}
    first.update({f"{side}_peak_mib": v[2] for side, v in info.items()})
    return _stats(times["torch"]), _stats(times["jax"]), first, info["jax"][1]


def cli(argv=None) -> int:
    """``python bench/torch_compare.py``: :func:`main` with one-line errors and exit codes."""
    import _cli
    return _cli.entry(main, "bench/torch_compare.py")(argv)


if __name__ == "__main__":
    sys.exit(cli())
