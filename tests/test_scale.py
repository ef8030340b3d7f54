"""Scale-out pieces that run on one machine: the ('data', 'space') mesh (H split over
'space') gives the 1-axis mesh's losses on 4 simulated devices, and the TPU AOT compile
(``python -m jaxspec.scale``) for v5e:2x2 when libtpu is importable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

_SPACE_SCRIPT = textwrap.dedent("""
    import json, sys
    import flax.linen as nn, jax, numpy as np
    from jaxspec import registry
    from jaxspec.configs.base import Config
    from jaxspec.train import train_and_evaluate

    class Net(nn.Module):          # 3x3 convs (halo exchange over H) + BatchNorm (global)
        @nn.compact
        def __call__(self, rgb, train=False):
            x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.gelu(nn.Conv(8, (3, 3), strides=2)(x))
            x = nn.ConvTranspose(8, (2, 2), strides=(2, 2))(x)
            return jax.nn.softplus(nn.Conv(31, (3, 3))(x)) + 0.01

    def smoke():
        return Config(method="sp_tiny", preset="smoke", crop=16, batch_size=4, steps=4,
                      lr=3e-3, log_every=1, eval_every=0, ckpt_every=4, rgb_norm="none",
                      max_eval_images=1)

    registry.register(registry.Method(name="sp_tiny", make_model=lambda m: Net(),
                                      presets={"smoke": smoke}, stride=2))
    rng = np.random.default_rng(0)
    def ex(i):
        hsi = (rng.random((24, 24, 31)) * 0.8 + 0.1).astype(np.float32)
        rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
        return {"hsi": hsi, "rgb": rgb, "name": f"x{i}",
                "bands": np.linspace(400, 700, 31).astype(np.float32)}
    src = [ex(i) for i in range(8)]
    out = {}
    for space in (1, 2):
        w = sys.argv[1] + f"/space{space}"
        cfg = smoke().replace(mesh_space=space)
        train_and_evaluate(cfg, w, train_source=src, eval_source=src[:1], final_eval=False,
                           progress=False)
        out[space] = [json.loads(l)["loss"] for l in open(w + "/metrics.jsonl")]
    from jaxspec.train import sharding
    mesh = sharding.make_mesh(space=2)
    b = sharding.shard_batch({"rgb": np.zeros((4, 16, 16, 3), np.float32),
                              "srf": np.zeros((4, 31, 3), np.float32)}, mesh)
    out["specs"] = [str(b["rgb"].sharding.spec), str(b["srf"].sharding.spec)]
    out["mesh"] = dict(mesh.shape)
    print(json.dumps(out))
""")


def test_space_mesh_same_losses_as_data_mesh(tmp_path):
    script = tmp_path / "space.py"
    script.write_text(_SPACE_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 2, "space": 2}
    assert "space" in out["specs"][0] and "space" not in out["specs"][1]
    assert len(out["1"]) == 4
    np.testing.assert_allclose(out["2"], out["1"], rtol=1e-5, atol=0)
    assert out["1"][-1] < out["1"][0]


def test_space_mesh_errors():
    import jax
    from jaxspec.train import sharding
    with pytest.raises(ValueError, match="mesh_space=3"):
        sharding.make_mesh(space=3 if jax.device_count() % 3 else 7)
    mesh = sharding.make_mesh()
    assert sharding.space_size(mesh) == 1 and sharding.data_size(mesh) == jax.device_count()


_HLO = """
  %all-reduce.1 = f32[64,31]{1,0} all-reduce(f32[64,31]{1,0} %p.1), channel_id=1, to_apply=%add
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %p.2), dimensions={0}
  %agd = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %ags)
  %cp = bf16[2,16]{1,0} collective-permute(bf16[2,16]{1,0} %x), source_target_pairs={{0,1}}
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %y), dimensions={0}, to_apply=%add
  %add.3 = f32[64,31]{1,0} add(f32[64,31]{1,0} %a, f32[64,31]{1,0} %b)
"""


def test_collective_bytes_from_hlo_text():
    from jaxspec import scale
    c = scale.collective_bytes(_HLO)
    assert c["all-reduce"] == {"count": 1, "bytes": 64 * 31 * 4}
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 4}          # -done not counted again
    assert c["collective-permute"] == {"count": 1, "bytes": 2 * 16 * 2}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 16 * 4}
    assert c["all-to-all"]["count"] == 0
    assert scale.chip_of("v5e:16x16") == "v5e" and scale.chip_of("v5p:4x4x4") == "v5p"
    with pytest.raises(ValueError, match="unknown chip"):
        scale.chip_of("h100:8")


def test_build_is_the_loop_step_and_compiles_on_cpu():
    """The AOT builder's step (abstract state and batch, from a registered method's preset)
    lowers and compiles for the local devices: the function the loop jits."""
    import jax
    from jaxspec import registry, scale

    name = _register_tiny()
    try:
        step, state, batch, cfg = scale.build(name, jax.devices(),
                                              global_batch=2 * jax.device_count())
    finally:
        registry.unregister(name)
    assert set(batch) == {"rgb", "hsi"} and batch["rgb"].shape == (2 * jax.device_count(),
                                                                   16, 16, 3)
    assert batch["hsi"].shape[-1] == 31 and cfg.batch_size == 2 * jax.device_count()
    compiled = step.lower(state, batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    text = compiled.as_text()
    assert "ENTRY" in text


def test_scale_cli_bad_topology(capsys):
    from jaxspec import scale
    assert scale.main(["--method", "acc", "--topology", "h100:8", "--per-chip-batch", "1"]) == 2
    assert "unknown chip" in capsys.readouterr().err


def _register_tiny():
    import flax.linen as nn
    import jax
    from jaxspec import registry
    from jaxspec.configs.base import Config

    class Net(nn.Module):
        @nn.compact
        def __call__(self, rgb, train=False):
            return jax.nn.softplus(nn.Conv(31, (3, 3))(nn.gelu(nn.Conv(8, (3, 3))(rgb))))

    def paper():
        return Config(method="aot_tiny", preset="paper", crop=16, batch_size=2, steps=2)

    registry.register(registry.Method(name="aot_tiny", make_model=lambda m: Net(),
                                      presets={"paper": paper}))
    return "aot_tiny"


def test_aot_compile_for_v5e_2x2():
    """Compile a train step for a v5e 2x2 slice on this CPU machine (needs libtpu, the 'tpu'
    extra, installed in a separate environment, see docs/scaling.md); skipped without it."""
    pytest.importorskip("libtpu")
    from jaxspec import registry, scale
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # another AOT run may hold it
    name = _register_tiny()
    try:
        rep = scale.analyse(name, "v5e:2x2", per_chip_batch=2)
        wide = scale.analyse(name, "v5e:2x4", per_chip_batch=2)
    finally:
        registry.unregister(name)
    assert rep["chips"] == 4 and rep["global_batch"] == 8 and rep["fits"]
    assert rep["flops_per_chip"] > 0 and 0 < rep["hbm_bytes"] < rep["hbm_capacity"]
    assert rep["collectives"]["all-reduce"]["count"] > 0      # the gradient mean
    assert rep["roofline"]["step_s"] > 0
    assert wide["chips"] == 8 and wide["global_batch"] == 16
    # weak scaling: the per-chip program does the same work
    assert wide["flops_per_chip"] == pytest.approx(rep["flops_per_chip"], rel=0.05)
    assert "v5e:2x2" in scale.format_report(rep) and scale.table_row(rep).startswith("| aot")


@pytest.mark.parametrize("fixed,per,bump", [(3.0, 0.7, 0.0), (0.5, 0.013, 0.0),
                                            (1.0, 0.2, 0.9), (17.0, 1.0, 0.0)])
def test_max_batch_search_finds_the_boundary_in_few_compiles(fixed, per, bump):
    """The search returns the largest batch whose HBM fits (exact up to 8, within 12.5 %
    above), with few probes when HBM is affine in the batch and still correctly when it is
    not (``bump``: a jump in HBM above batch 20, as when XLA changes a layout)."""
    from jaxspec import scale
    cap = 16e9
    calls = []

    def hbm(b):
        return (fixed + per * b + (bump if b > 20 else 0.0)) * 1e9

    def probe(b):
        calls.append(b)
        return {"hbm_bytes": hbm(b), "hbm_capacity": cap, "fits": hbm(b) <= cap}

    lines = []
    b, r = scale.max_per_chip_batch("m", "v5e:2x2", probe=probe, log=lines.append)
    assert len(lines) == len(calls) and f"per-chip batch {calls[0]}:" in lines[0]
    truth = max((k for k in range(1, 5000) if hbm(k) <= cap), default=0)
    if truth == 0:
        assert (b, r) == (0, None) and calls == [1]
        return
    assert hbm(b) <= cap and r["max_per_chip_batch"] == b
    assert truth - b <= max(0, b // 8)
    assert len(calls) == len(set(calls))                 # no batch compiled twice
    if bump == 0.0:
        assert len(calls) <= 5, calls                    # 1, 2, prediction, its check
    assert [k for k, _ in r["probes"]] == sorted(calls)


def test_out_of_hbm_message_is_a_report_not_a_crash():
    """XLA:TPU refuses a step larger than HBM at compile time (RESOURCE_EXHAUSTED): its
    message gives the memory needed, which the search and the table use."""
    from jaxspec import scale
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (75.80G) exceeds available HBM (15.75G).")
    assert scale.out_of_hbm_bytes(msg) == int(75.80 * 2**30)
    assert scale.out_of_hbm_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space "
                                  "hbm. Used 20.50G of 15.75G hbm.") == int(20.5 * 2**30)
    assert scale.out_of_hbm_bytes("INVALID_ARGUMENT: bad shape") is None
    r = {"method": "m", "topology": "v5e:2x2", "chips": 4, "preset": "paper",
         "mesh": {"data": 4, "space": 1}, "crop": 480, "global_batch": 4, "per_chip_batch": 1.0,
         "hbm_capacity": 16e9, "hbm_bytes": int(75.8 * 2**30), "fits": False,
         "out_of_hbm": msg, "compile_s": 1.0}
    assert "> 75.80 GiB (XLA: out of HBM) | no |" in scale.table_row(r)
    assert "DOES NOT FIT" in scale.format_report(r)


_NO_GATHER_SCRIPT = textwrap.dedent("""
    import json, jax
    from jaxspec import scale
    from jaxspec.layers import compiling_for
    CASES = [("acc", 64, ["model.window=32", "model.window_batch=2"]), ("mstpp", 32, []),
             ("ccnet", 32, []), ("mcga", 32, []), ("ussr", 32, []), ("daem", 32, [])]
    out = {}
    # the accelerator forms for every method; the CPU forms where they differ in structure
    # (ACC's row-blocked windows; the shifted depthwise conv is elementwise)
    for target, cases in (("tpu", CASES), ("cpu", CASES[:1])):
        for m, crop, extra in cases:
            with compiling_for(target):
                step, state, batch, _ = scale.build(m, jax.devices(), global_batch=8,
                                                    crop=crop, overrides=extra)
                txt = step.lower(state, batch).compile().as_text()
            c = scale.collective_bytes(txt)
            out[f"{m}/{target}"] = c["all-gather"]["bytes"] + c["all-to-all"]["bytes"]
    print(json.dumps(out))
""")


@pytest.mark.slow       # seven train-step compiles (~3 min on 2 cores)
def test_no_method_gathers_the_global_batch_on_a_data_mesh(tmp_path):
    """Every registered method's train step on 8 data-parallel devices moves only gradients
    and statistics between devices, in the CPU forms of the layers and in the accelerator
    forms (``compiling_for('tpu')``, what the TPU AOT table compiles): no all-gather /
    all-to-all. A loop over an axis that mixes in the batch (ACC's windows once were
    ``(batch x windows)``, CCNet's NeSCM once merged batch-minor) makes the partitioner
    gather the global batch: 75 GiB per chip for ACC on 256 v5e chips at batch 1."""
    script = tmp_path / "nogather.py"
    script.write_text(_NO_GATHER_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                         "--xla_backend_optimization_level=0")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out) == 7 and all(v == 0 for v in out.values()), out


def test_max_batch_search_through_a_jump_in_hbm():
    """DAEM's HBM jumps where XLA changes a layout (13.69 GiB at 3336, 29.27 GiB at 3715):
    a curve like it is searched in a handful of compiles, to within 12.5 %."""
    from jaxspec import scale
    calls = []

    def hbm(b):
        return (0.01 + 0.0041 * b if b < 3400 else 0.01 + 0.0078 * b) * 2**30

    def probe(b):
        calls.append(b)
        return {"hbm_bytes": hbm(b), "hbm_capacity": 16e9, "fits": hbm(b) <= 16e9}

    b, _ = scale.max_per_chip_batch("m", "v5e:2x2", probe=probe)
    assert hbm(b) <= 16e9 and 3399 - b <= b // 8 and len(calls) <= 8, calls


def test_max_batch_search_does_not_fit_a_line_through_an_unparsed_refusal():
    """A refusal whose message gives no size reads 0 bytes: it must count as 'does not fit'
    in the line fit too, not as a free batch."""
    from jaxspec import scale
    calls = []

    def probe(b):
        calls.append(b)
        fits = b <= 40
        return {"hbm_bytes": (0.3 * b * 2**30) if fits else 0, "hbm_capacity": 16e9,
                "fits": fits}

    b, _ = scale.max_per_chip_batch("m", "v5e:2x2", probe=probe)
    assert 40 - b <= b // 8 and b <= 40 and len(calls) <= 10, calls
