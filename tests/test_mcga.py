"""MCGA (issue 14): VQ straight-through gradient, codebook/commitment losses against numpy,
static-shape top-K cluster means, stage 1 end to end, stage 2 with the stage-1 codebooks and
decoder copied by ``init_from`` and bitwise frozen, test-time adaptation of the GA parameters
only (episodic), parameter count near the paper's 0.76 M."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import registry
from jaxspec.configs import mcga as mcga_cfg
from jaxspec.models import mcga
from jaxspec.train import train_and_evaluate


def test_masked_band_count_and_code_dims():
    assert [mcga.masked_bands(c) for c in (31, 224, 191, 8)] == [8, 64, 64, 4]
    assert mcga.code_dims(31, 2) == (4, 2)
    with pytest.raises(ValueError, match="3 scales need C\\^m = 4"):
        mcga.code_dims(8, 3)


def _vq(z, n=16):
    q = mcga.VectorQuantizer(n, z.shape[-1])
    return q, jax.jit(q.init)(jax.random.PRNGKey(0), z)


def test_straight_through_gradient():
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
    q, v = _vq(z)
    w = jax.random.normal(jax.random.PRNGKey(2), z.shape)
    out, info = q.apply(v, z)
    np.testing.assert_array_equal(out, z + (info["q"] - z))        # forward: the codeword
    np.testing.assert_allclose(out, info["q"], atol=1e-6)
    f = lambda zz, vv: jnp.sum(w * q.apply(vv, zz)[0])  # noqa: E731
    gz, gv = jax.grad(f, argnums=(0, 1))(z, v)
    np.testing.assert_allclose(gz, w, rtol=1e-6)                   # identity to the encoder
    np.testing.assert_array_equal(gv["params"]["codebook"], 0.0)   # output moves no codeword


@pytest.mark.parametrize("d", [1, 4, 16, 20])
def test_nearest_code_is_the_argmin_of_the_distances(d):
    """The fused score form (d <= 16) and the matrix form pick the nearest codeword of a
    float64 numpy reference, the lower index on a tie (a duplicated codeword)."""
    rng = np.random.default_rng(d)
    cb = rng.normal(size=(64, d)).astype(np.float32)
    cb[40] = cb[7]                                        # a tie: code 7 must win
    z = rng.normal(size=(3, 50, d)).astype(np.float32)
    z[0, 0] = cb[7]
    ref = np.argmin(((z[..., None, :].astype(np.float64) - cb) ** 2).sum(-1), -1)
    got = np.asarray(jax.jit(mcga.nearest_code)(jnp.asarray(z), jnp.asarray(cb)))
    assert got[0, 0] == 7
    d2 = ((z[..., None, :].astype(np.float64) - cb) ** 2).sum(-1)
    # equal, or an exact tie in float64 terms up to float32 rounding
    picked = np.take_along_axis(d2, got[..., None], -1)[..., 0]
    assert np.all((got == ref) | (picked - d2.min(-1) <= 1e-5 * (1 + d2.min(-1))))
    assert np.mean(got == ref) > 0.99


def test_codebook_and_commitment_losses_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    q, v = _vq(jnp.asarray(z), n=8)
    cb = np.asarray(v["params"]["codebook"])
    zf = z.reshape(-1, 2)
    idx = np.argmin(((zf[:, None] - cb[None]) ** 2).sum(-1), -1)
    qn = cb[idx]
    _, info = q.apply(v, jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(info["idx"]).reshape(-1), idx)
    np.testing.assert_allclose(info["embed"], np.mean((zf - qn) ** 2), rtol=1e-5)
    np.testing.assert_allclose(info["commit"], np.mean((zf - qn) ** 2), rtol=1e-5)
    # embed moves only the codewords: d/de_n = 2 sum_{i -> n} (e_n - z_i) / numel
    ge = jax.grad(lambda vv, zz: q.apply(vv, zz)[1]["embed"])(v, jnp.asarray(z))
    ref = np.zeros_like(cb)
    np.add.at(ref, idx, 2 * (qn - zf) / zf.size)
    np.testing.assert_allclose(ge["params"]["codebook"], ref, rtol=1e-4, atol=1e-7)
    gz = jax.grad(lambda zz: q.apply(v, zz)[1]["embed"])(jnp.asarray(z))
    np.testing.assert_array_equal(gz, 0.0)
    # commitment moves only the encoder: d/dz = 2 (z - q) / numel
    gz = jax.grad(lambda zz: q.apply(v, zz)[1]["commit"])(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(gz).reshape(-1, 2), 2 * (zf - qn) / zf.size,
                               rtol=1e-4, atol=1e-7)
    gc = jax.grad(lambda vv: q.apply(vv, jnp.asarray(z))[1]["commit"])(v)
    np.testing.assert_array_equal(gc["params"]["codebook"], 0.0)
    st = mcga.code_statistics(jnp.asarray(idx), 8)
    p = np.bincount(idx, minlength=8) / idx.size
    np.testing.assert_allclose(st["perplexity"], np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))),
                               rtol=1e-5)
    np.testing.assert_allclose(st["usage"], np.mean(p > 0))


def test_top_k_cluster_means_static_shapes_and_reference():
    rng = np.random.default_rng(0)
    fn = jax.jit(mcga.top_k_cluster_means, static_argnums=(2, 3))
    for seed in range(2):
        x = rng.normal(size=(2, 20, 3)).astype(np.float32)
        idx = rng.integers(0, 5, size=(2, 20)).astype(np.int32)
        means, valid = fn(x, idx, 12, 8)
        assert means.shape == (2, 8, 3) and valid.shape == (2, 8)
        for b in range(2):
            counts = np.bincount(idx[b], minlength=12)
            order = np.argsort(-counts, kind="stable")[:8]
            for j, code in enumerate(order):
                assert bool(valid[b, j]) == (counts[code] > 0)
                if counts[code]:
                    np.testing.assert_allclose(means[b, j], x[b][idx[b] == code].mean(0),
                                               rtol=1e-5, atol=1e-6)
                else:
                    np.testing.assert_array_equal(means[b, j], 0.0)
    assert fn._cache_size() == 1    # compiled once for both inputs


def _sources(n, seed, c=8, size=16):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.random((size // 4, size // 4, c))
        hsi = (np.kron(base, np.ones((4, 4, 1))) * 0.6 + rng.random((size, size, c)) * 0.2
               + 0.1).astype(np.float32)
        out.append({"hsi": hsi, "rgb": (hsi @ np.full((c, 3), 1.0 / c)).astype(np.float32),
                    "bands": np.linspace(400, 700, c).astype(np.float32), "name": f"s{seed}_{i}"})
    return out


SMALL = dict(width=8)
DATA = dict(progress=False, figures=0)
FAST = dict(eval_every=0, max_eval_images=1)   # final evaluation only (compile once)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    wd = tmp_path_factory.mktemp("mcga") / "vq"
    cfg = registry.get("mcga_vq").config("smoke")
    cfg = cfg.replace(model={**cfg.model, **SMALL}, **FAST)
    train_and_evaluate(cfg, wd, train_source=_sources(3, 0), eval_source=_sources(2, 1), **DATA)
    return wd


def test_stage1_trains_with_vq_aux_losses_and_code_statistics(stage1):
    saved = json.loads((stage1 / "config.json").read_text())
    assert saved["model"]["in_channels"] == 8 and saved["model"]["out_channels"] == 8
    assert saved["aux_loss_weights"] == {"vq_embed": 0.5, "vq_commit": 0.125}
    lines = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in lines if "aux/vq_embed" in r)
    for k in ("aux/vq_commit", "aux/stat_perplexity_1", "aux/stat_usage_2", "data_loss"):
        assert k in rec and np.isfinite(rec[k])
    # the total is the Charbonnier data loss + 0.5 embed + 0.125 commit
    np.testing.assert_allclose(rec["loss"], rec["data_loss"] + 0.5 * rec["aux/vq_embed"]
                               + 0.125 * rec["aux/vq_commit"], rtol=1e-5)
    ev = json.loads((stage1 / "eval.json").read_text())
    assert ev["task"] == "hsi2hsi" and np.isfinite(ev["mean"]["psnr"])


def test_stage1_mask_random_at_train_fixed_at_eval():
    model = mcga.MCGAVQ(in_channels=8, out_channels=8, width=4)
    x = jnp.broadcast_to(jnp.arange(8.0), (2, 4, 4, 8))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 8)))
    v = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
    mask = jax.jit(lambda k, train: model.apply(v, x, train, method="mask",
                                                rngs={"mask": k}), static_argnums=1)
    m = lambda train, key=0: mask(jax.random.PRNGKey(key), train)  # noqa: E731
    np.testing.assert_array_equal(m(False)[0, 0, 0], [0, 2, 5, 7])
    a, b = np.asarray(m(True, 1)), np.asarray(m(True, 2))
    assert a.shape == (2, 4, 4, 4) and not np.array_equal(a, b)
    assert np.all(np.diff(a[0, 0, 0]) > 0) and len(set(a[0, 0, 0])) == 4


def _leaves(tree, prefix=""):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(a)
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow   # ~1 min of training: run once (slow leg), not once per Python
def test_stage2_frozen_codebooks_decoder_and_tta(stage1, tmp_path):
    import jaxspec
    from jaxspec import inference, tasks
    cfg = registry.get("mcga").config("smoke")
    cfg = mcga_cfg.stage2(cfg.replace(model={**cfg.model, **SMALL, "ganet_width": 8}, **FAST),
                          stage1)
    wd = tmp_path / "s2"
    train_and_evaluate(cfg, wd, train_source=_sources(3, 0), eval_source=_sources(2, 1), **DATA)
    _, v1 = jaxspec.load(stage1)
    model, v2 = jaxspec.load(wd, which="latest")
    for sub in ("moc", "decoder"):
        a, b = _leaves(v1["params"][sub]), _leaves(v2["params"][sub])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{sub}/{k}")
    ev = json.loads((wd / "eval.json").read_text())
    assert ev["task"] == "rgb2hsi" and np.isfinite(ev["mean"]["mrae"])

    method = registry.get("mcga")
    adapter = inference.make_adapter(tasks.get("rgb2hsi"), model.apply, method.adapt_loss,
                                     steps=2, lr=1e-2, params=tuple(cfg.adapt_params))
    img = [{"rgb": s["rgb"][None]} for s in _sources(2, 5)]
    first = adapter(v2, img[0])
    before, after = _leaves(v2["params"]), _leaves(first["params"])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("ga_linear/" in k for k in changed), sorted(changed)[:5]
    assert any("ga_linear/" in k for k in changed)
    adapter(v2, img[1])                       # another image in between ...
    again = _leaves(adapter(v2, img[0])["params"])
    for k in after:                          # ... episodic: reset to the trained weights
        np.testing.assert_array_equal(after[k], again[k])
    loss = lambda v: float(method.adapt_loss(model.apply, v, img[0]))  # noqa: E731
    assert loss(first) < loss(v2)            # entropy of the code queries went down


def test_full_attention_flag_and_paper_param_count():
    model = registry.get("mcga").model(registry.get("mcga").config("paper"))
    model = model.clone(out_channels=31)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
    assert 0.70e6 < n < 0.82e6, n             # paper: 0.76 M
    full = model.clone(full_attention=True, ganet_width=4, width=4, out_channels=8)
    x = jnp.ones((1, 8, 8, 3)) * 0.3
    v = jax.jit(full.init)(jax.random.PRNGKey(0), x)
    out, aux = jax.jit(full.apply)(v, x)
    assert out.shape == (1, 8, 8, 8) and np.all(np.isfinite(out))
    assert "code_proj" not in str(jax.tree_util.tree_structure(v["params"]))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from jaxspec import data
    d = tmp_path_factory.mktemp("tfds_mcga")
    data.builder("spectral_scenes/tiny", data_dir=d)
    return d


@pytest.mark.slow   # ~50 s of training: in the slow leg (run once, not once per Python)
def test_train_py_mcga_trains_stage1_first_then_reuses_it(tiny_data, tmp_path):
    """``train.py --method mcga`` with no ``init_from``: stage 1 runs in <workdir>/stage1 (the
    stage-2 options it shares, here the width, follow), stage 2 freezes its codebooks and
    decoder; a second call reuses the finished stage 1."""
    import jaxspec
    from jaxspec import cli
    w = tmp_path / "mcga"
    args = ["--method", "mcga", "--preset", "smoke", "--dataset", "spectral_scenes/tiny",
            "--data-dir", str(tiny_data), "--workdir", str(w), "--no-progress",
            "--set", "model.width=8", "--set", "model.ganet_width=8", "--set", "eval_every=0"]
    assert cli.main(args) == 0
    s1 = json.loads((w / "stage1" / "config.json").read_text())
    s2 = json.loads((w / "config.json").read_text())
    assert s1["method"] == "mcga_vq" and s1["model"]["width"] == 8
    assert s1["dataset_config"] == "tiny" and s1["data_dir"] == str(tiny_data)
    assert {i["workdir"] for i in s2["init_from"]} == {str(w / "stage1")}
    _, v1 = jaxspec.load(w / "stage1")
    _, v2 = jaxspec.load(w, which="latest")
    for sub in ("moc", "decoder"):
        a, b = _leaves(v1["params"][sub]), _leaves(v2["params"][sub])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{sub}/{k}")
    stamp = (w / "stage1" / "metrics.jsonl").stat().st_mtime_ns
    assert cli.main(args + ["--steps", "3"]) == 0                           # resumes stage 2
    assert (w / "stage1" / "metrics.jsonl").stat().st_mtime_ns == stamp   # not retrained
    lines = (w / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line).get("step", 0) for line in lines) == 3


@pytest.mark.slow   # ~1 min of training: run once (slow leg), not once per Python
def test_mixture_of_codebooks_command_and_stage2_on_it(stage1, tmp_path, capsys):
    """``python -m jaxspec.moc`` concatenates the codebooks of stage-1 runs (512 N codes per
    scale), keeps the first run's encoder/decoder, refuses runs that do not mix; stage 2
    trains on the mixture (``init_from`` via ``stage2``, num_codes read from the mixture)."""
    import jaxspec
    from jaxspec import moc
    second = tmp_path / "vq2"
    cfg = registry.get("mcga_vq").config("smoke")
    cfg = cfg.replace(model={**cfg.model, **SMALL}, seed=7, **FAST)
    train_and_evaluate(cfg, second, train_source=_sources(3, 3), eval_source=_sources(2, 4),
                       **DATA)
    out = tmp_path / "moc"
    assert moc.main(["--workdir", str(out), str(stage1), str(second)]) == 0
    assert "--init-from" in capsys.readouterr().out
    mcfg, mv = jaxspec.load(out)
    _, a = jaxspec.load(stage1)
    _, b = jaxspec.load(second)
    assert mcfg.config.model["num_codes"] == 2 * cfg.model["num_codes"]
    for k, q in mv["params"]["moc"].items():
        np.testing.assert_array_equal(q["codebook"], np.concatenate(
            [a["params"]["moc"][k]["codebook"], b["params"]["moc"][k]["codebook"]]))
    for k, v in _leaves(a["params"]["decoder"]).items():
        np.testing.assert_array_equal(_leaves(mv["params"]["decoder"])[k], v)
    assert json.loads((out / "mixture.json").read_text())["codes_per_run"] == [512, 512]

    assert moc.main(["--workdir", str(tmp_path / "x"), str(stage1)]) == 2        # one run
    assert moc.main(["--workdir", str(out), str(stage1), str(second)]) == 2      # exists
    assert moc.main(["--workdir", str(tmp_path / "y"), str(stage1), str(tmp_path)]) != 0
    assert "no config.json" in capsys.readouterr().err

    s2 = registry.get("mcga").config("smoke")
    s2 = s2.replace(model={**s2.model, **SMALL, "ganet_width": 8}, **FAST)
    s2 = mcga_cfg.train_stage1_first(s2.replace(init_from=({"workdir": str(out)},)), tmp_path)
    assert s2.model["num_codes"] == 1024 and {i["subtree"] for i in s2.init_from} == {
        "moc", "decoder"}
    wd = tmp_path / "s2moc"
    train_and_evaluate(s2, wd, train_source=_sources(3, 0), eval_source=_sources(2, 1), **DATA)
    _, v2 = jaxspec.load(wd, which="latest")
    for k, q in v2["params"]["moc"].items():
        np.testing.assert_array_equal(q["codebook"], mv["params"]["moc"][k]["codebook"])


@pytest.mark.slow
def test_interface_width_option():
    """``interface_width``: H_i^d has that many channels and the 1x1 projection to the code
    dim lives in ``moc`` (frozen and copied with the codebooks by stage 2)."""
    vq = mcga.MCGAVQ(in_channels=8, out_channels=8, width=8, interface_width=6)
    x = jnp.ones((1, 8, 8, 8)) * 0.3
    v = vq.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}, x)
    moc = v["params"]["moc"]
    dims = mcga.code_dims(8, 2)
    assert [moc[f"proj_{i}"]["kernel"].shape for i in (0, 1)] == [(6, d) for d in dims]
    assert v["params"]["encoder"]["down0_proj"]["kernel"].shape[-1] == 6
    out, _ = vq.apply(v, x)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    net = mcga.MCGA(out_channels=8, width=8, ganet_width=4, interface_width=6, top_k=4)
    rgb = jax.random.uniform(jax.random.PRNGKey(2), (1, 8, 8, 3))
    v2 = net.init(jax.random.PRNGKey(0), rgb)
    assert jax.tree.map(np.shape, v2["params"]["moc"]) == jax.tree.map(np.shape, moc)
    assert v2["params"]["ganet"]["out0"]["kernel"].shape[-1] == 6
    out, _ = net.apply(v2, rgb)
    assert out.shape == (1, 8, 8, 8) and np.all(np.isfinite(out))


def test_interrupted_stage1_stops_before_stage2(monkeypatch, tmp_path):
    """A signal during the stage 1 that ``--method mcga`` trains first: its summary (preempted)
    comes back and stage 2 does not start (the same command resumes stage 1)."""
    from jaxspec.train import loop
    real = loop.train_and_evaluate

    def fake(cfg, wd, **kw):
        if cfg.method == "mcga_vq":
            return {"preempted": True, "step": 3}
        return real(cfg, wd, **kw)

    monkeypatch.setattr(loop, "train_and_evaluate", fake)
    out = real(registry.get("mcga").config("smoke"), tmp_path / "m", progress=False)
    assert out == {"preempted": True, "step": 3}
    assert not (tmp_path / "m" / "config.json").exists()


# ---------------------------------------------------------------- ablations, one step each
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import random_state  # noqa: E402

TINY = dict(width=4, ganet_width=4, top_k=8)


def _subtree_names(tree) -> set[str]:
    return {str(getattr(k, "key", k)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
            for k in p}


def _ablation_step(name):
    """``(state, batch, step)`` of the stage-2 model of ``ablation(name)``: 31 bands, 16x16,
    tiny widths (top-K scaled with them), 512 codes per run of a mixture, the engine's ``mcga``
    step kind with ``moc``/``decoder`` frozen."""
    from jaxspec.train import steps
    method = registry.get("mcga")
    over = dict(TINY)
    if "top_k" in mcga_cfg.ABLATIONS[name]:
        over["top_k"] = mcga_cfg.ABLATIONS[name]["top_k"] // 32     # 64 -> 2, 512 -> 16
    if name in mcga_cfg.MIXTURES:
        over["num_codes"] = 512 * (1 + len(mcga_cfg.MIXTURES[name]))
    cfg = mcga_cfg.ablation(name, method.config("smoke"), **over)
    model = method.model(cfg).clone(out_channels=31)
    state = random_state(model, cfg, tx=steps.make_optimizer_for(cfg, method))
    rng = np.random.default_rng(0)
    hsi = jnp.asarray(rng.random((2, 16, 16, 31)) * 0.8 + 0.1, jnp.float32)
    batch = {"rgb": hsi[..., ::10][..., :3], "hsi": hsi}
    return cfg, state, batch, steps.build_train_step(model, cfg, method)


@pytest.mark.parametrize("name", sorted(mcga_cfg.ABLATIONS))
def test_each_ablation_builds_and_traces_a_step(name):
    """Every row of Tables 3-5: the whole train step of ``ablation(name)`` traces
    (``jax.eval_shape``: shapes, gradients, optimiser, nothing compiled), the modules the row is
    about are there or gone, and the stage-1 run it needs (``stage1_config``) has the shapes of
    the parts stage 2 freezes."""
    cfg, state, batch, step = _ablation_step(name)
    new, m = jax.eval_shape(step, state, batch)
    assert m["loss"].shape == () and jax.tree.map(np.shape, new.params) == \
        jax.tree.map(np.shape, state.params)
    o = {**mcga_cfg.MODEL, **mcga_cfg.ABLATIONS[name]}
    ganet = _subtree_names(state.params["ganet"])
    s = o["scales"]
    assert f"down{s - 1}" in ganet and f"down{s}" not in ganet
    assert ("query0" in ganet) == o["use_moc"]
    assert ("gqa" in ganet) == o["attention"]
    assert ("code_proj" in ganet) == (o["attention"] and not o["full_attention"])
    assert ("ga_gamma" in ganet) == o["ga"] and ("ga_linear" in ganet) == o["ga"]
    assert state.params["moc"]["quantizers_0"]["codebook"].shape[0] == cfg.model["num_codes"]

    vq = registry.get("mcga_vq").model(mcga_cfg.stage1_config(cfg)).clone(
        in_channels=31, out_channels=31)
    shapes1 = jax.eval_shape(vq.init, {"params": jax.random.PRNGKey(0),
                                       "mask": jax.random.PRNGKey(1)}, jnp.zeros((1, 16, 16, 31)))
    for sub in ("moc", "decoder"):
        if sub == "moc" and name in mcga_cfg.MIXTURES:     # one run's share of the mixture
            continue
        assert jax.tree.map(np.shape, shapes1["params"][sub]) == \
            jax.tree.map(np.shape, state.params[sub]), sub


@pytest.mark.parametrize("name", ["plain"])
def test_ablation_trains_a_step(name):
    """One real (jitted) step: finite loss, only GANet moves (the codebooks and decoder are
    frozen). "plain" (no codebook query, no GA, no attention) in the default leg; the full
    model's step is run by the stage-2 test and every other row here, both in the slow leg."""
    _, state, batch, step = _ablation_step(name)
    new, m = jax.jit(step)(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    before, after = _leaves(state.params), _leaves(new.params)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith("ganet/") for k in moved), sorted(moved)[:4]


@pytest.mark.slow   # ~10-25 s of compilation per variant
@pytest.mark.parametrize("name", sorted(set(mcga_cfg.ABLATIONS) - {"plain"}))
def test_ablation_trains_a_step_slow(name):
    test_ablation_trains_a_step(name)


def test_ablation_names_and_code_dim_floor():
    with pytest.raises(ValueError, match="unknown MCGA ablation"):
        mcga_cfg.ablation("nope")
    assert mcga.code_dims(31, 4, min_dim=1) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="min_code_dim=1"):
        mcga.code_dims(31, 4)
    # the GA-free FFN is the same convolutions, activations and flow with GA_gamma / GA_l
    # replaced by the identity: gelu(conv_out(concat(x1, x2, xs))) = gelu(conv_out([xs, xs]))
    from jaxspec.layers import Conv2d
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 4, 6))
    ffn = mcga.GAFFN(ga=False)
    p = ffn.init(jax.random.PRNGKey(1), x)["params"]
    assert set(p) == {"conv1", "conv3", "conv_out"}
    conv = lambda n, k, name, z: Conv2d(n, (k, k)).apply({"params": p[name]}, z)  # noqa: E731
    xs = mcga.gelu(conv(12, 3, "conv3", conv(6, 1, "conv1", x)))
    ref = mcga.gelu(conv(6, 1, "conv_out", jnp.concatenate([xs, xs], -1)))
    np.testing.assert_allclose(ffn.apply({"params": p}, x), ref, rtol=1e-5, atol=1e-6)
    with_ga = mcga.GAFFN(ga=True)
    pg = with_ga.init(jax.random.PRNGKey(1), x)["params"]
    assert {"ga_gamma", "ga_log"} <= set(pg)
    assert not np.allclose(with_ga.apply({"params": pg}, x), ref, atol=1e-3)


def test_ablation_bench_direction_table_and_bad_options(tmp_path, capsys):
    """bench/mcga_ablations.py: the direction column, the table (every row against its
    reference, the ladder rung by rung) and one-line errors (exit 2) before any training."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import _ablations
    import mcga_ablations as bench
    ref = {"mrae": 1.0, "psnr": 20.0}
    worse, better = {"mrae": 1.2, "psnr": 19.0}, {"mrae": 0.8, "psnr": 21.0}
    assert _ablations.direction(worse, ref, 15.0, 13.1, 0.01) == "yes"
    assert _ablations.direction(better, ref, 15.0, 13.1, 0.01) == "no"
    assert _ablations.direction({"mrae": 1.2, "psnr": 21.0}, ref, 15.0, 13.1, 0.01) == \
        "partly (MRAE yes, PSNR no)"
    assert _ablations.direction({"mrae": 1.005, "psnr": 19.0}, ref, 15.0, 13.1, 0.01) == "tie"
    assert _ablations.direction(better, ref, 13.1, 13.1, 0.01) == "paper: no change; ours better"
    assert _ablations.direction(worse, ref, None, 13.1, 0.01).startswith("n/a")
    assert {n for _, n, *_ in bench.ROWS} == set(mcga_cfg.ABLATIONS)
    ev = lambda m, p: {"eval": {"mrae": m, "rmse": 0.1, "psnr": p, "sam": 9.0},  # noqa: E731
                       "params": 10}
    args = bench.argparse.Namespace(stage1_steps=1, steps=1, crop=16, batch=2, eval_images=1,
                                    tolerance=0.01)
    rows = bench.table(args, {"full": ev(1.0, 20.0), "moc_ga": ev(1.5, 18.0),
                              "moc": ev(1.4, 18.5)}).splitlines()
    qattn = next(r for r in rows if r.startswith("| + QAttn"))
    assert "| moc_ga | 13.1 | 18.4 | yes |" in qattn           # full vs moc_ga: better, as paper
    ga = next(r for r in rows if r.startswith("| + GA"))
    assert ga.endswith("| moc | 18.4 | 29.8 | no |")             # moc_ga worse than moc
    assert not any(r.startswith("| plain") for r in rows)       # not trained: left out
    for argv, msg in ((["--only", "nope"], "unknown 'nope'"), (["--steps", "0"], ">= 1"),
                      (["--stability"], "needs --workdir"),
                      (["--stage1", str(tmp_path)], "no config.json")):
        assert bench.cli(argv + ["--out", str(tmp_path / "o")]) == 2
        assert msg in capsys.readouterr().err


def test_stage1_config_carries_shared_keys_the_stage1_preset_leaves_at_default(tmp_path):
    """``--set model.interface_width=32`` on ``train.py --method mcga`` reaches stage 1 (whose
    preset does not list the key), so the frozen parts fit; a stage-1 run that never recorded a
    shared key gives stage 2 the module default, not the stage-2 override."""
    cfg = registry.get("mcga").config("smoke")
    cfg = cfg.replace(model={**cfg.model, "interface_width": 32})
    assert mcga_cfg.stage1_config(cfg).model["interface_width"] == 32
    vq = registry.get("mcga_vq").model(mcga_cfg.stage1_config(cfg)).clone(
        in_channels=31, out_channels=31)
    p1 = jax.eval_shape(vq.init, {"params": jax.random.PRNGKey(0),
                                  "mask": jax.random.PRNGKey(1)}, jnp.zeros((1, 16, 16, 31)))
    p2 = jax.eval_shape(registry.get("mcga").model(cfg).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 16, 16, 3)))
    assert jax.tree.map(np.shape, p1["params"]["moc"]) == jax.tree.map(np.shape,
                                                                       p2["params"]["moc"])
    old = registry.get("mcga_vq").config("smoke")      # a stage-1 run without the key
    (tmp_path / "config.json").write_text(json.dumps(old.to_dict()))
    assert "interface_width" not in mcga_cfg.stage2(cfg, str(tmp_path)).model
