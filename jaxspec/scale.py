"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU machine.

``python -m jaxspec.scale --method mstpp --topology v5e:16x16 --global-batch 1024``

needs the ``tpu`` extra (``pip install 'jaxspec[tpu]'``: ``libtpu``, which compiles for a named
topology without the chips, through :mod:`jax.experimental.topologies`). The step is the one
:func:`jaxspec.train.loop.iterate` jits (``steps.build_train_step`` of the method's ``paper``
preset, state donated, replicated parameters, batch over ``'data'`` -- or ``('data', 'space')``
with ``--mesh-space``), lowered with abstract inputs of the preset's crop and the global batch,
and compiled by XLA:TPU for the topology. Printed per chip:

* HBM: ``compiled.memory_analysis()`` (arguments + outputs - donated aliases + temporaries +
  code) against the chip's HBM capacity;
* FLOPs and HBM bytes per step: ``compiled.cost_analysis()`` (per-device SPMD program);
* collective bytes: operand sizes of every ``all-reduce``, ``all-gather``, ``reduce-scatter``,
  ``collective-permute`` and ``all-to-all`` in the compiled HLO text (async ``-start`` forms
  counted once);
* a roofline step time: ``max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI
  bandwidth)`` with the peaks of :data:`CHIPS` (an all-reduce moves its operand twice: the
  reduce-scatter and all-gather halves of a ring).

``--max-batch`` also searches the largest per-chip batch whose step fits the chip's HBM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

#: Published per-chip peaks (Google Cloud TPU system-architecture pages,
#: cloud.google.com/tpu/docs/v5e, /v4, /v5p): bf16 FLOP/s, HBM bytes and bytes/s, and the
#: ICI bandwidth per chip used for collectives (v5e, v4: the pod's all-reduce bandwidth
#: divided by the pod's chips, 51.2 TB/s / 256 and 1.1 PB/s / 4096; v5p: 4800 Gbps).
CHIPS = {
    "v5e": dict(peak_flops=197e12, hbm_bytes=16e9, hbm_bw=819e9, ici_bw=51.2e12 / 256),
    "v4": dict(peak_flops=275e12, hbm_bytes=32 * 2**30, hbm_bw=1200e9, ici_bw=1.1e15 / 4096),
    "v5p": dict(peak_flops=459e12, hbm_bytes=95e9, hbm_bw=2765e9, ici_bw=4800e9 / 8),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(?P<out>.*?)\s(?P<op>" + "|".join(COLLECTIVES) +
                 r")(?P<start>-start)?\((?P<args>[^)]*)\)")


def _shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{op: {"count": n, "bytes": operand bytes}}`` of the collectives in HLO text (the
    ``-done`` halves of async collectives are not counted again)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        op = m.group("op")
        b = _shape_bytes(m.group("args"))
        if b == 0:   # operands printed without shapes: fall back on the result shape
            b = _shape_bytes(m.group("out"))
        out[op]["count"] += 1
        out[op]["bytes"] += b
    return out


def chip_of(topology: str) -> str:
    name = topology.split(":")[0].lower()
    for k in sorted(CHIPS, key=len, reverse=True):
        if name.startswith(k):
            return k
    raise ValueError(f"unknown chip in topology {topology!r}; known: {sorted(CHIPS)}")


def topology_devices(topology: str):
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as err:   # libtpu missing / unknown topology
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({err}); is the 'tpu' "
                           f"extra (libtpu) installed?") from err
    return list(topo.devices)


def build(method_name: str, devices, *, global_batch: int, preset: str = "paper",
          mesh_space: int = 1, crop: int | None = None, bands: int = 31,
          overrides=()):
    """(jitted step, abstract state, abstract batch, config): the loop's train step and its
    inputs as ``ShapeDtypeStruct`` placed on a mesh of ``devices``."""
    import jax
    import jax.numpy as jnp

    from jaxspec import registry, tasks as tasks_lib
    from jaxspec.configs.base import apply_overrides
    from jaxspec.train import sharding, steps as steps_lib
    from jaxspec.train.loop import _loader_keys
    from jaxspec.train.state import create_train_state

    method = registry.get(method_name)
    task = tasks_lib.of(method)
    cfg = method.config(preset).replace(batch_size=int(global_batch), mesh_space=int(mesh_space))
    if crop is not None:
        cfg = cfg.replace(crop=int(crop))
    cfg = apply_overrides(cfg, list(overrides))
    cfg = tasks_lib.resolve_config(cfg, method, int(bands), where="--bands")
    model = method.model(cfg)
    mesh = sharding.make_mesh(devices, space=cfg.mesh_space)
    rep = sharding.replicated(mesh)
    sharding.local_batch_size(cfg.batch_size, mesh)
    info = tasks_lib.info_from_config(cfg, method)
    args, kwargs = task.example_inputs(info, cfg.crop, tuple(method.side_inputs))
    tx = steps_lib.make_optimizer_for(cfg, method)
    state = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.PRNGKey(cfg.seed),
                                                      inputs=args, kwargs=kwargs))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)

    def spec_of(keys, b):
        shapes = task.input_shapes(info, cfg.crop, batch=b)
        h = w = cfg.crop
        shapes.setdefault("hsi", (b, h, w, info.bands))
        shapes.setdefault("rgb", (b, h, w, info.msi_bands or 3))
        shapes.setdefault("bands", (b, info.bands))
        shapes.setdefault("label", (b, h, w))
        out = {}
        for k in keys:
            if k not in shapes:
                raise ValueError(f"{method_name}: no abstract shape for batch key {k!r}")
            dt = jnp.int32 if k == "label" else jnp.float32
            spatial = k in sharding.SPATIAL_KEYS and len(shapes[k]) >= 3
            out[k] = jax.ShapeDtypeStruct(shapes[k], dt,
                                          sharding=sharding.batch_sharding(mesh, spatial))
        return out

    if cfg.streams:
        batch = {}
        for name, spec in sorted(cfg.streams.items()):
            keys = tuple(spec.get("keys", _loader_keys(task)))
            batch[name] = spec_of(keys, int(spec.get("batch_size", cfg.batch_size)))
    else:
        keys = tuple(dict.fromkeys(tuple(task.input_keys) + (task.target_key,)
                                   + tuple(method.side_inputs)))
        batch = spec_of(keys, cfg.batch_size)
    step = jax.jit(steps_lib.build_train_step(model, cfg, method), donate_argnums=0,
                   out_shardings=(rep, rep))
    return step, state, batch, cfg


def analyse(method_name: str, topology: str, *, global_batch: int | None = None,
            per_chip_batch: int | None = None, preset: str = "paper", mesh_space: int = 1,
            crop: int | None = None, bands: int = 31, overrides=()) -> dict:
    """Compile the method's train step for ``topology`` and return the per-chip report."""
    devices = topology_devices(topology)
    n = len(devices)
    data = n // int(mesh_space)
    if global_batch is None:
        global_batch = int(per_chip_batch or 1) * data
    chip = CHIPS[chip_of(topology)]
    t0 = time.perf_counter()
    from jaxspec.layers import compiling_for
    with compiling_for(devices[0].platform):    # the TPU forms of the layers, not the CPU's
        step, state, batch, cfg = build(method_name, devices, global_batch=global_batch,
                                        preset=preset, mesh_space=mesh_space, crop=crop,
                                        bands=bands, overrides=overrides)
        lowered = step.lower(state, batch)
    head = {"method": method_name, "topology": topology, "chips": n, "preset": preset,
            "mesh": {"data": data, "space": int(mesh_space)}, "crop": cfg.crop,
            "global_batch": global_batch, "per_chip_batch": global_batch / data,
            "hbm_capacity": chip["hbm_bytes"]}
    try:
        compiled = lowered.compile()
    except Exception as err:     # XLA:TPU refuses a program larger than the chip's HBM
        need = out_of_hbm_bytes(str(err))
        if need is None:
            raise
        return dict(head, hbm_bytes=need, fits=False, out_of_hbm=str(err).strip()[:400],
                    compile_s=time.perf_counter() - t0)
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    coll = collective_bytes(compiled.as_text())
    ici = sum(v["bytes"] * (2 if op == "all-reduce" else 1) for op, v in coll.items())
    t_flops = flops / chip["peak_flops"]
    t_hbm = bytes_accessed / chip["hbm_bw"]
    t_ici = ici / chip["ici_bw"]
    t_step = max(t_flops, t_hbm, t_ici)
    return {
        **head, "hbm_bytes": int(hbm), "fits": bool(hbm <= chip["hbm_bytes"]),
        "memory": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                   "aliased": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
                   "code": mem.generated_code_size_in_bytes},
        "flops_per_chip": flops, "hbm_bytes_accessed": bytes_accessed,
        "collectives": coll, "ici_bytes": int(ici),
        "roofline": {"compute_s": t_flops, "hbm_s": t_hbm, "ici_s": t_ici, "step_s": t_step,
                     "bound": ("compute", "hbm", "ici")[[t_flops, t_hbm, t_ici].index(t_step)],
                     "images_per_s": global_batch / t_step if t_step > 0 else math.inf},
        "compile_s": t_compile,
    }


_OOM = re.compile(r"(?:required for [^(]*\(|Used )(?P<num>[\d.]+)(?P<unit>[KMGT]?)i?B?\b")


def out_of_hbm_bytes(message: str) -> int | None:
    """The memory XLA:TPU says a program needs when it refuses it for lack of HBM (``Ran out of
    memory ... the total memory required for HLO temporaries (75.80G) exceeds available HBM
    (15.75G)``), in bytes (XLA's G is 2^30); None when ``message`` is not an out-of-HBM error.
    The figure is a lower bound of the step's HBM (temporaries only, in the first form)."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m = _OOM.search(message)
    if m is None:
        return 0
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m["unit"]]
    return int(float(m["num"]) * scale)


def max_per_chip_batch(method_name: str, topology: str, *, start: int = 1, limit: int = 4096,
                       probe=None, log=None, **kw) -> tuple[int, dict | None]:
    """Largest per-chip batch whose step fits HBM (exact, or within 12.5 % above 8), and its
    report (0 and None when even ``start`` does not fit).

    Each probe is a full compile (minutes for a pod topology on a CPU), so the search does not
    bisect blindly: per-chip HBM is close to affine in the batch (parameters, optimiser state
    and code, plus activations per example), so the next probe is where the line through the
    two largest probes that fit meets the chip's capacity, kept strictly between the largest
    batch that fits and the smallest that does not, and at least a quarter of the way from
    either (XLA's layouts can make HBM jump); doubling (no line yet) and bisection
    (prediction outside that interval) are the fallbacks. A correct prediction ends the search
    in two more compiles (``b`` fits, ``b + 1`` does not). ``probe(b)`` replaces the compile
    (tests); it returns the report of :func:`analyse`. ``log(line)``, when given, hears one line
    per probe (batch, HBM, verdict, seconds), as a search can take an hour on a CPU."""
    if probe is None:
        def probe(b):
            return analyse(method_name, topology, per_chip_batch=b, **kw)
    samples: dict[int, int] = {}
    fit_batches: set[int] = set()     # by the report's verdict (an unparsed refusal reads 0)
    lo, hi, best, cap = 0, None, None, None
    b = int(start)
    while True:
        t0 = time.perf_counter()
        r = probe(b)
        samples[b] = int(r["hbm_bytes"])
        if log is not None:
            log(f"{method_name} {topology} per-chip batch {b}: {_fmt_bytes(samples[b])} of "
                f"{_fmt_bytes(r['hbm_capacity'])}, {'fits' if r['fits'] else 'does not fit'} "
                f"({time.perf_counter() - t0:.0f} s)")
        if r["fits"]:
            fit_batches.add(b)
        cap = int(r["hbm_capacity"])
        if r["fits"]:
            if b > lo:
                lo, best = b, r
        else:
            hi = b if hi is None else min(hi, b)
        if lo == 0:                                   # even ``start`` does not fit
            return 0, None
        if lo >= limit or (hi is not None and hi - lo <= max(1, lo // 8)):
            best = dict(best, max_per_chip_batch=lo, probes=sorted(samples.items()))
            return lo, best
        upper = min(limit, (hi - 1) if hi is not None else limit)
        guess = None
        fitting = sorted((k, m) for k, m in samples.items() if k in fit_batches)
        if len(fitting) >= 2:                 # the line through the two largest that fit
            (b1, m1), (b2, m2) = fitting[-2:]
            slope = (m2 - m1) / (b2 - b1)
            if slope > 0:
                guess = int(b2 + (cap - m2) // slope)
        if guess is not None and guess <= lo:
            guess = lo + 1                            # the line says ``lo`` is the largest
        if guess is None or guess > upper or guess in samples:
            guess = min(2 * lo, upper) if hi is None else (lo + hi) // 2
        if hi is not None:                    # safeguard: move at least a quarter of the gap
            q = max(1, (hi - lo) // 4)        # (a line through two nearby points that fit can
            if lo + q <= hi - q:              # creep towards the boundary a few % a compile)
                guess = min(max(guess, lo + q), hi - q)
        if guess <= lo or guess in samples:
            guess = lo + 1
        b = guess


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _probes(r: dict) -> str:
    return ", ".join(f"{b}: {m / 2**30:.2f} GiB" for b, m in r["probes"]) + \
        f"; {len(r['probes'])} compiles"


def format_report(r: dict) -> str:
    if "out_of_hbm" in r:
        return (f"{r['method']} ({r['preset']} preset, crop {r['crop']}) on {r['topology']}: "
                f"{r['chips']} chips, mesh data={r['mesh']['data']} space={r['mesh']['space']}, "
                f"global batch {r['global_batch']} ({r['per_chip_batch']:g} per data shard)\n"
                f"  DOES NOT FIT: XLA:TPU needs >= {_fmt_bytes(r['hbm_bytes'])} per chip of "
                f"{_fmt_bytes(r['hbm_capacity'])} and refuses the program:\n  {r['out_of_hbm']}")
    rf = r["roofline"]
    lines = [
        f"{r['method']} ({r['preset']} preset, crop {r['crop']}) on {r['topology']}: "
        f"{r['chips']} chips, mesh data={r['mesh']['data']} space={r['mesh']['space']}, "
        f"global batch {r['global_batch']} ({r['per_chip_batch']:g} per data shard)",
        f"  HBM per chip     {_fmt_bytes(r['hbm_bytes'])} of {_fmt_bytes(r['hbm_capacity'])}"
        f" ({'fits' if r['fits'] else 'DOES NOT FIT'}); temp "
        f"{_fmt_bytes(r['memory']['temp'])}, arguments {_fmt_bytes(r['memory']['arguments'])}",
        f"  FLOPs per chip   {r['flops_per_chip']:.4g} per step",
        f"  HBM traffic      {r['hbm_bytes_accessed']:.4g} bytes per step",
        "  collectives      " + ", ".join(f"{op} x{v['count']} {v['bytes'] / 2**20:.2f} MiB"
                                          for op, v in r["collectives"].items() if v["count"])
        + (" (none)" if not any(v["count"] for v in r["collectives"].values()) else ""),
        f"  roofline         {rf['step_s'] * 1e3:.3f} ms/step ({rf['bound']}-bound: compute "
        f"{rf['compute_s'] * 1e3:.3f} ms, HBM {rf['hbm_s'] * 1e3:.3f} ms, ICI "
        f"{rf['ici_s'] * 1e3:.3f} ms) = {rf['images_per_s']:.4g} crops/s",
        f"  compiled in      {r['compile_s']:.1f} s",
    ]
    if "probes" in r:
        lines.append(f"  largest per-chip batch that fits: {r['max_per_chip_batch']} "
                     f"({_probes(r)})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxspec.scale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default=None, help="registered method (or --table)")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:16x16, v4:4x4x4")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--global-batch", type=int, default=None)
    g.add_argument("--per-chip-batch", type=int, default=None,
                   help="batch per data shard (global = this x data devices)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--mesh-space", type=int, default=1, help="devices splitting H")
    p.add_argument("--crop", type=int, default=None, help="training crop (default: preset's)")
    p.add_argument("--bands", type=int, default=31, help="spectral bands of the data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-batch", action="store_true",
                   help="search the largest per-chip batch that fits HBM (with --table: one row "
                        "per method at that batch)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--table", default=None, metavar="METHODS",
                   help="comma-separated methods: print a markdown row per (topology, method); "
                        "--topology may then be a comma-separated list")
    return p


TABLE_HEADER = ("| method | topology | chips | mesh (data x space) | crop | per-chip batch | "
                "HBM / chip | fits | GFLOP / chip / step | collectives MiB / step | "
                "roofline ms / step (bound) | crops/s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    if "out_of_hbm" in r:
        return (f"| {r['method']} | {r['topology']} | {r['chips']} | {r['mesh']['data']} x "
                f"{r['mesh']['space']} | {r['crop']} | {r['per_chip_batch']:g} | "
                f"> {r['hbm_bytes'] / 2**30:.2f} GiB (XLA: out of HBM) | no | | | | |")
    rf = r["roofline"]
    coll = sum(v["bytes"] for v in r["collectives"].values()) / 2**20
    return (f"| {r['method']} | {r['topology']} | {r['chips']} | {r['mesh']['data']} x "
            f"{r['mesh']['space']} | {r['crop']} | {r['per_chip_batch']:g} | "
            f"{r['hbm_bytes'] / 2**30:.2f} GiB | {'yes' if r['fits'] else 'no'} | "
            f"{r['flops_per_chip'] / 1e9:.1f} | {coll:.1f} | {rf['step_s'] * 1e3:.2f} "
            f"({rf['bound']}) | {rf['images_per_s']:.4g} |")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="python -m jaxspec.scale")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")   # no TPU VM metadata here
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")     # several AOT runs at once
    kw = dict(preset=args.preset, mesh_space=args.mesh_space, crop=args.crop, bands=args.bands,
              overrides=args.overrides)
    from jaxspec.errors import UsageError
    try:
        for topo in args.topology.split(","):
            chip_of(topo)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.table:
        print(TABLE_HEADER, flush=True)
        for topo in args.topology.split(","):
            for m in args.table.split(","):
                if args.max_batch:        # the row at the largest per-chip batch that fits
                    b, r = max_per_chip_batch(m, topo, log=_stderr, **kw)
                    if r is None:
                        print(f"| {m} | {topo} | even per-chip batch 1 does not fit |")
                        continue
                    print(f"{m} {topo} probes (per-chip batch: HBM) {_probes(r)}",
                          file=sys.stderr, flush=True)
                else:
                    r = analyse(m, topo, global_batch=args.global_batch,
                                per_chip_batch=args.per_chip_batch or 1, **kw)
                print(table_row(r), flush=True)
        return 0
    if args.method is None:
        raise UsageError("give --method (or --table METHODS)")
    if args.max_batch:
        b, r = max_per_chip_batch(args.method, args.topology, log=_stderr, **kw)
        if r is None:
            print(f"{args.method}: even per-chip batch 1 does not fit {args.topology}")
            return 1
    else:
        if args.global_batch is None and args.per_chip_batch is None:
            raise UsageError("give --global-batch or --per-chip-batch (or --max-batch)")
        r = analyse(args.method, args.topology, global_batch=args.global_batch,
                    per_chip_batch=args.per_chip_batch, **kw)
    print(json.dumps(r, indent=2, default=float) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
