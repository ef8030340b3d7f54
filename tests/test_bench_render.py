"""bench/benchmark.py re-renders only its own part of RESULTS.md: sections written by other
bench commands or by hand survive, and rendering twice changes nothing."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_benchmark", REPO / "bench" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_keeps_other_sections_and_is_idempotent(tmp_path):
    bm = _benchmark()
    shutil.copy(REPO / "bench" / "results_cpu.json", tmp_path / "results_cpu.json")
    out = tmp_path / "RESULTS.md"
    # a file from before the end marker existed: a generated section, then a hand-written one
    out.write_text("# Benchmark results\n\n## jax 0.0.1, backend cpu, stale\n\nold rows\n\n"
                   "## Input pipeline: `python bench/loader.py`\n\n| a | b |\n|---|---|\n")
    bm.render(tmp_path, out)
    first = out.read_text()
    assert "stale" not in first and "old rows" not in first
    assert first.count("## Input pipeline") == 1 and "| a | b |" in first
    assert first.index(bm._GENERATED_END) < first.index("## Input pipeline")
    bm.render(tmp_path, out)
    assert out.read_text() == first


def _bench_module(name):
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_charges_thunks_to_flax_modules():
    """bench/xla_profile.py: a traced call's thunks are charged to the Flax module of their
    op_name (backward ops marked), control-flow containers not counted twice, and the
    report covers the call."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    prof = _bench_module("xla_profile")
    assert prof.module_path("jit(step)/jvp(Net)/enc/conv/conv_general_dilated", 2) == "Net/enc"
    assert prof.module_path("jit(step)/transpose(jvp(Net))/enc/dot_general", 3) == \
        "Net/enc [bwd]"
    assert prof.module_path("", 3) == "(no op_name)"

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(256, name="wide")(x)
            x = jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y) * 1.5, x)
            return nn.Dense(8, name="narrow")(jnp.sin(x))

    x = jnp.ones((512, 64))
    net = Net()
    v = net.init(jax.random.PRNGKey(0), x)
    r = prof.profile(jax.jit(net.apply), (v, x), reps=2, warmup=1, depth=2)
    assert r["wall_ms"] > 0 and r["thunk_ms"] > 0
    assert any(m.startswith("Net/wide") for m in r["modules"]), dict(r["modules"])
    assert all(r["index"][n]["op"] not in prof._CONTAINERS for n in r["instructions"])
    assert "ms/call" in prof.report(r, top=5)


def test_no_script_shadows_the_standard_library():
    """Running ``python bench/X.py`` puts bench/ first on sys.path (and spawned workers inherit
    it): a bench/profile.py once shadowed the stdlib ``profile``, so ``import cProfile`` (torch's
    optimiser imports it) failed in torch_compare's train workers. Same for the repo root."""
    import sys
    for folder in (REPO / "bench", REPO):
        clash = sorted(p.stem for p in folder.glob("*.py") if p.stem in sys.stdlib_module_names)
        assert not clash, f"{folder} has scripts named like stdlib modules: {clash}"


def test_benchmark_train_batch_of_an_unpaired_method():
    """bench/benchmark.py times USSR's phases step on a random ``{stream: batch}`` of its
    ``config.streams`` (it failed on a flat batch: the phases read ``batch["rgb"]["rgb"]``)."""
    import jax
    import numpy as np

    bm = _benchmark()
    setup = bm.build_inference("ussr", "smoke", image=(32, 32))
    cfg = setup["cfg"]
    state, batch, step_fn, _ = bm.build_train(setup)
    assert set(batch) == set(cfg.streams)
    for name, spec in cfg.streams.items():
        assert sorted(batch[name]) == sorted(spec["keys"])
    assert batch["rgb"]["rgb"].shape == (cfg.batch_size, cfg.crop, cfg.crop, 3)
    assert batch["hsi"]["hsi"].shape == (cfg.batch_size, cfg.crop, cfg.crop, 31)
    label = np.asarray(batch["rgb"]["label"])
    assert label.dtype == np.int32 and label.min() >= -1
    assert label.max() < dict(cfg.model)["n_classes"]
    new_state, metrics = jax.eval_shape(step_fn, state, batch)   # traces every phase's loss
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics


def test_compile_times_covers_fusion_and_parameter_free_methods():
    """bench/compile_times.py builds each method as bench/benchmark.py does (through its task):
    a parameter-free fusion method has an inference compile and no train step."""
    ct = _bench_module("compile_times")
    r = ct.compile_times("bicubic", "smoke", 32, 32)
    assert r["task"] == "fusion" and r["infer_compile_s"] >= 0 and "train_compile_s" not in r
    r = ct.compile_times("mcga_vq", "smoke", 32, 32)
    assert r["task"] == "hsi2hsi" and r["train_batch"] >= 1 and r["train_compile_s"] > 0
