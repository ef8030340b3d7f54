"""CCNet: params, golden output, NeSCM scan vs unrolled 3-D convolutions, PAF, L_diff, every
ablation config trains a step, 1 vs 8 simulated devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import layers as L
from jaxspec import registry
from jaxspec.configs import ccnet as presets
from jaxspec.flops import count_params
from jaxspec.models import ccnet
from jaxspec.train import losses, steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import random_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# one CSRM block per unit at the bottleneck (4 heads): the smallest network that has every part
TINY = dict(n_feat=8, stage=1, num_blocks=(0, 0, 1), groups=2, patch=8)


def smooth_rgb(h=16, w=20):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = np.stack([np.sin(0.3 * xx + 0.2 * yy), np.cos(0.25 * yy), (xx * yy) / 240.0], -1)[None]
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def test_flat_initialisers_equal_the_reference_draws():
    """layers' initialisers draw flat and reshape (faster to compile); same bits as before."""
    import flax.linen as nn
    k = jax.random.PRNGKey(11)
    for shape, ia, oa in [((3, 3, 5, 7), -2, -1), ((2, 2, 64, 32), -1, -2), ((4, 8, 8), -2, -1)]:
        ref = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=ia,
                                               out_axis=oa)(k, shape)
        assert bool(jnp.array_equal(L.torch_kernel_init(ia, oa)(k, shape), ref))
        b = 1 / np.sqrt(27)
        assert bool(jnp.array_equal(L.torch_bias_init(27)(k, shape),
                                    jax.random.uniform(k, shape, jnp.float32, -b, b)))
        assert bool(jnp.array_equal(L.trunc_normal_init(0.02)(k, shape),
                                    jax.random.truncated_normal(k, -100., 100., shape) * 0.02))


def test_param_count_paper_architecture():
    m = registry.get("ccnet")
    model = m.model(m.config("paper"))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    p = shapes["params"]
    assert count_params(p) == 1_621_590                    # paper: 1.61 M (+0.7 %)
    assert sorted(p) == ["body_0", "body_1", "body_2", "conv_in", "conv_out"]
    assert count_params(p["conv_in"]) == 864 and count_params(p["conv_out"]) == 8_928
    blk = p["body_0"]["encoder_0_block_0"]
    assert {k: count_params(v) for k, v in blk.items()} == {
        "grscm": 2_084, "nescm": 65, "paf": 1_152, "norm": 64, "ffn": 9_344}
    assert blk["grscm"]["rse"].shape == (4, 8, 8)            # k groups x n=1 head, C_in/k = 8
    assert p["body_0"]["bottleneck_block_0"]["grscm"]["rse"].shape == (16, 8, 8)   # n = 4
    assert blk["nescm"]["out_kernel"].shape == (2, 3, 3, 3, 1, 1)   # 3x3xs Conv3D, 2 chains
    assert set(shapes) == {"params"}
    for preset in ("paper", "cpu", "smoke"):                  # one architecture everywhere
        assert m.config(preset).model == m.config("paper").model


@pytest.fixture(scope="module")
def tiny():
    model = ccnet.CCNet(**TINY)
    x = jnp.asarray(smooth_rgb())                              # 16x20: a multiple of 4
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    return model, variables, x


def test_golden_output(tiny):
    # First run of this code (jax 0.10.2, flax 0.12.x, XLA:CPU, float32); pins architecture,
    # initialisers and op order. CCNet(**TINY), PRNGKey(0), smooth_rgb().
    model, variables, x = tiny
    assert count_params(variables["params"]) == GOLDEN_PARAMS
    y = np.asarray(jax.jit(model.apply)(variables, x), np.float64)
    assert y.shape == (1, 16, 20, 31)
    np.testing.assert_allclose(y.sum(), GOLDEN_SUM, rtol=1e-4)
    np.testing.assert_allclose(np.abs(y).sum(), GOLDEN_ABS, rtol=1e-5)
    np.testing.assert_allclose(y[0, 0, 0, :4], GOLDEN_CORNER, atol=2e-5)
    np.testing.assert_allclose(y[0, 15, 19, -3:], GOLDEN_LAST, atol=2e-5)
    # the other conv implementation gives the same output with the same parameters
    other = "lax" if L.resolve_depthwise_impl("auto") == "shift" else "shift"
    y2 = jax.jit(ccnet.CCNet(**{**TINY, "dw_impl": other}).apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y2), y, atol=1e-5)
    # the training forward (stacked NeSCM windows) is the same function as inference's (band
    # planes where a level has one NeSCM feature channel: level 0, the block TINY lacks)
    lvl0 = ccnet.CCNet(**{**TINY, "num_blocks": (1, 0, 0)})
    v0 = lvl0.init(jax.random.PRNGKey(0), x)
    y_train = jax.jit(lvl0.apply, static_argnums=2)(v0, x, True)
    y_infer = jax.jit(lvl0.apply, static_argnums=2)(v0, x, False)
    np.testing.assert_allclose(np.asarray(y_infer), np.asarray(y_train), atol=1e-5)


GOLDEN_PARAMS = 31_280
GOLDEN_SUM = 292.943548876734
GOLDEN_ABS = 1362.7346548331552
GOLDEN_CORNER = [-0.18558146059513092, 0.2905706763267517, -0.14849074184894562,
                 -0.12231841683387756]
GOLDEN_LAST = [0.08838878571987152, 0.016970358788967133, 0.07394453883171082]


# ---------------------------------------------------------------- NeSCM
def nescm_reference(x, p, heads, window):
    """Per-band Python loop of Eq. 5-7 with ``lax.conv_general_dilated`` 3-D convolutions
    (shares no code with the scan)."""
    b, h, w, c = x.shape
    n, t_len, s = heads, c // heads, window
    pad = (s - 1) // 2
    bands = jnp.pad(x.reshape(b, h, w, n, t_len), ((0, 0),) * 4 + ((pad, pad),))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    outs = []
    for d, order in ((0, range(t_len)), (1, range(t_len - 1, -1, -1))):
        gate_k = jnp.concatenate([p["gate_m"][d], p["gate_x"][d]], 0)[None, None, None]
        out_k = jnp.transpose(p["out_kernel"][d], (2, 0, 1, 3, 4))     # (s, 3, 3, n, n)
        m = jnp.zeros((b, s, h, w, n))
        ys = [None] * t_len
        for t in order:
            xt = jnp.transpose(bands[..., t:t + s], (0, 4, 1, 2, 3))      # (b, s, h, w, n)
            st = jax.nn.sigmoid(jax.lax.conv_general_dilated(
                jnp.concatenate([m, xt], -1), gate_k, (1, 1, 1), "VALID",
                dimension_numbers=dn) + p["gate_b"][d])
            m = st * m + (1 - st) * xt
            yt = jax.lax.conv_general_dilated(jnp.tanh(m) + xt, out_k, (1, 1, 1),
                                              ((0, 0), (1, 1), (1, 1)), dimension_numbers=dn)
            ys[t] = yt[:, 0] + p["out_bias"][d]                            # (b, h, w, n)
        outs.append(jnp.stack(ys, -1))                                     # (b, h, w, n, T)
    cat = jnp.concatenate(outs, axis=3)
    y = jnp.einsum("bhwct,co->bhwot", cat, p["fuse_kernel"]) + p["fuse_bias"][:, None]
    return y.reshape(b, h, w, c)


@pytest.mark.parametrize("heads,window", [(1, 3), (1, 5), (2, 5), (4, 3)])
def test_nescm_scan_matches_unrolled(heads, window):
    """Every path against the per-band loop: the stacked-window scan (training; both conv
    implementations) and the band-plane CPU inference form
    (``nescm_planes``, any feature count), forward and forward-mode derivative (what
    jaxspec.analysis uses)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 7 * heads))
    mod = ccnet.NeSCM(dim=7 * heads, heads=heads, window=window)
    params = mod.init(jax.random.PRNGKey(2), x)["params"]
    ref = jax.jit(nescm_reference, static_argnums=(2, 3))(x, params, heads, window)
    for impl in ("shift", "lax"):
        for train in (True, False):
            m = ccnet.NeSCM(dim=7 * heads, heads=heads, window=window, impl=impl)
            y = jax.jit(m.apply, static_argnums=2)({"params": params}, x, train)
            np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    planes = jax.jit(ccnet.nescm_planes, static_argnums=(2, 3, 4))(x, params, window, 1, heads)
    np.testing.assert_allclose(np.asarray(planes), np.asarray(ref), atol=1e-5, rtol=1e-5)
    t = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    _, j_planes = jax.jvp(lambda z: ccnet.nescm_planes(z, params, window, 1, heads), (x,), (t,))
    _, j_ref = jax.jvp(lambda z: ccnet.nescm_apply(z, params, heads, window), (x,), (t,))
    np.testing.assert_allclose(np.asarray(j_planes), np.asarray(j_ref), atol=1e-5, rtol=1e-5)
    # both chains matter: a perturbation of the last band reaches the first band's output
    dx = jnp.zeros_like(x).at[..., -1].set(1.0)
    f = jax.jit(mod.apply)
    dy = jnp.abs(f({"params": params}, x + dx) - f({"params": params}, x))
    assert float(dy[..., 0].max()) > 1e-4


def test_recurrent_cells_run_and_are_bidirectional():
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 4, 6))
    for cell in ("convlstm", "convgru"):
        mod = ccnet.NeSCM(dim=6, heads=1, cell=cell)
        v = mod.init(jax.random.PRNGKey(4), x)
        y = mod.apply(v, x)
        assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
        dy = jnp.abs(mod.apply(v, x.at[..., 0].add(1.0)) - y)
        assert float(dy[..., -1].max()) > 1e-5 and float(dy[..., 0].max()) > 1e-5
        y_lax = ccnet.NeSCM(dim=6, heads=1, cell=cell, impl="lax").apply(v, x)
        np.testing.assert_allclose(np.asarray(y_lax), np.asarray(y), atol=1e-5)


def test_band_windows():
    x = jnp.arange(5.0)[None]
    w = ccnet.band_windows(x, 3)
    assert w.shape == (5, 1, 3)
    np.testing.assert_array_equal(np.asarray(w[:, 0]), [[0, 0, 1], [0, 1, 2], [1, 2, 3],
                                                        [2, 3, 4], [3, 4, 0]])
    with pytest.raises(ValueError, match="odd"):
        ccnet.band_windows(x, 4)


# ---------------------------------------------------------------- GrSCM / PAF
def test_grscm_groups_are_independent():
    """A channel of group 0 never influences the output of group 1 before the projection."""
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 4, 16))
    mod = ccnet.GrSCM(dim=16, heads=2, groups=2)
    v = mod.init(jax.random.PRNGKey(6), x)
    p = jax.tree.map(lambda a: a, v["params"])
    p["proj"]["kernel"] = jnp.eye(16)
    f = lambda z: mod.apply({"params": p}, z)   # noqa: E731
    dy = f(x.at[..., 0].add(1.0)) - f(x)
    assert float(jnp.abs(dy[..., 8:]).max()) == 0.0
    assert float(jnp.abs(dy[..., :8]).max()) > 0.0           # same group: coupled


@pytest.mark.parametrize("heads,groups", [(1, 4), (2, 2)])
def test_grscm_cpu_gram_form_equals_the_literal_form(heads, groups):
    """GrSCM's CPU form (Gram matrix, folded output matmul) against the literal form that
    accelerators trace (group maps, normalised Q/K, ``layers.spectral_attention``, proj):
    the same parameters, values and gradients (parameters and input), logit bias non-zero."""
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 5, 6, 16))
    x = x.at[1, ..., 3].set(0.0)                     # a zero channel: the norms' eps clamp
    mod = ccnet.GrSCM(dim=16, heads=heads, groups=groups)
    params = jax.tree.map(lambda a: a, mod.init(jax.random.PRNGKey(8), x)["params"])
    params["rse"] = jax.random.normal(jax.random.PRNGKey(9), params["rse"].shape)
    params["rescale"] = params["rescale"] * 1.7
    tgt = jax.random.normal(jax.random.PRNGKey(10), x.shape)

    def run(platform):
        def f(p, z):
            with L.compiling_for(platform):
                return mod.apply({"params": p}, z)
        g = jax.grad(lambda p, z: jnp.sum(jnp.sin(f(p, z)) * tgt), (0, 1))(params, x)
        return f(params, x), g

    (y_cpu, g_cpu), (y_ref, g_ref) = run("cpu"), run("gpu")
    np.testing.assert_allclose(y_cpu, y_ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(jax.tree_util.tree_leaves(g_cpu), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4)


def test_paf_matches_per_patch_definition():
    b, h, w, c, k, r = 1, 8, 8, 8, 2, 4
    fa = jax.random.normal(jax.random.PRNGKey(7), (b, h, w, c))
    fp = jax.random.normal(jax.random.PRNGKey(8), (b, h, w, c))
    mod = ccnet.PAF(dim=c, groups=k, patch=r)
    p = mod.init(jax.random.PRNGKey(9), fa, fp)["params"]
    y = np.asarray(mod.apply({"params": p}, fa, fp))
    # reference: SIA by lax.conv (grouped), projections, per-patch softmax of cosines
    g = np.asarray(fp).reshape(b, h, w, k, c // k)
    pooled = np.stack([g.mean(-1), g.max(-1)], -1).reshape(b, h, w, 2 * k)
    sia = jax.lax.conv_general_dilated(
        pooled, jnp.asarray(p["sia_kernel"]).reshape(3, 3, k, 2).transpose(0, 1, 3, 2),
        (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=k)
    fcp = np.asarray(sia) + np.asarray(p["sia_bias"])
    a = np.asarray(fa) @ np.asarray(p["proj_att"]["kernel"][0, 0]) + np.asarray(
        p["proj_att"]["bias"])
    cp = fcp @ np.asarray(p["proj_cp"]["kernel"][0, 0]) + np.asarray(p["proj_cp"]["bias"])
    ref = np.array(fa)
    for i0 in range(0, h, r):
        for j0 in range(0, w, r):
            ap = a[0, i0:i0 + r, j0:j0 + r].reshape(-1, c)
            cpp = cp[0, i0:i0 + r, j0:j0 + r].reshape(-1, k)
            sim = (ap / np.linalg.norm(ap, axis=0)).T @ (cpp / np.linalg.norm(cpp, axis=0))
            wts = np.exp(sim) / np.exp(sim).sum(-1, keepdims=True)          # (c, k)
            ref[0, i0:i0 + r, j0:j0 + r] += (cpp @ wts.T).reshape(r, r, c)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # a map smaller than the patch is one patch; a non-multiple is edge-padded and cropped
    y_small = ccnet.PAF(dim=c, groups=k, patch=64).apply({"params": p}, fa, fp)
    y_odd = ccnet.PAF(dim=c, groups=k, patch=3).apply({"params": p}, fa, fp)
    assert y_small.shape == y_odd.shape == fa.shape


# ---------------------------------------------------------------- loss
def test_spectral_difference_loss_matches_numpy():
    rng = np.random.default_rng(0)
    gt = rng.random((2, 3, 4, 6)).astype(np.float32)
    pred = rng.random((2, 3, 4, 6)).astype(np.float32)
    ref = 0.0
    c = gt.shape[-1]
    for bb in range(2):
        for y in range(3):
            for x in range(4):
                s = sum(abs(abs(gt[bb, y, x, i] - gt[bb, y, x, j])
                            - abs(pred[bb, y, x, i] - pred[bb, y, x, j]))
                        for i in range(c) for j in range(c) if j != i)
                ref += s / c
    ref /= 2 * 3 * 4
    val = float(ccnet.spectral_difference_loss(jnp.asarray(pred), jnp.asarray(gt)))
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    assert float(ccnet.spectral_difference_loss(jnp.asarray(gt) + 0.3, jnp.asarray(gt))) < 1e-6
    combined = losses.get_loss(presets.PAPER_LOSS)
    np.testing.assert_allclose(
        float(combined(jnp.asarray(pred), jnp.asarray(gt))),
        float(losses.mrae_loss(jnp.asarray(pred), jnp.asarray(gt))) + 0.1 * ref, rtol=1e-5)


# ---------------------------------------------------------------- ablations, one step each
@pytest.mark.parametrize("name", sorted(presets.ABLATIONS))
def test_each_ablation_builds_and_trains_a_step(name):
    """The engine's supervised step (eager: the primitives compiled for one variant are reused
    by the next, which is several times faster than compiling 13 jitted steps)."""
    method = registry.get("ccnet")
    patch = presets.ABLATIONS[name].get("patch", 16) // 2      # TINY's r = 8 stands for 16
    cfg = presets.ablation(name, method.config("smoke"), **{**TINY, "patch": patch})
    model = method.model(cfg)
    state = random_state(model, cfg)
    rng = np.random.default_rng(0)
    hsi = jnp.asarray(rng.random((2, 16, 16, 31)) * 0.8 + 0.1, jnp.float32)
    batch = {"rgb": hsi[..., ::10][..., :3], "hsi": hsi}
    new, m = steps.build_train_step(model, cfg, method)(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, new.params)
    assert max(jax.tree.leaves(changed)) > 0
    block = new.params["body_0"]["bottleneck_block_0"]        # the module the row is about
    o = {**presets.MODEL, **presets.ABLATIONS[name]}
    if o["attention"] == "mha":
        assert "msa" in block and "grscm" not in block
    elif o["global_model"] == "none":
        assert "grscm" in block and "nescm" not in block and "paf" not in block
    else:
        fused = {"paf": "paf", "concat": "fuse", "cattn": "cattn", "add": "nescm"}[o["fusion"]]
        assert fused in block, sorted(block)
        assert ("w_h" in block["nescm"]) == (o["global_model"] != "nescm")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="fusion"):
        jax.eval_shape(ccnet.CCNet(fusion="mul").init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="window"):
        jax.eval_shape(ccnet.CCNet(window=4).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="rgb"):
        jax.eval_shape(ccnet.CCNet().init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="unknown CCNet model options"):
        ccnet.make_model({"depth": 3})
    with pytest.raises(ValueError, match="unknown CCNet ablation"):
        presets.ablation("nope")


# ---------------------------------------------------------------- 1 vs 8 devices
_DEVICES_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from jaxspec import registry
    from jaxspec.configs import ccnet as presets
    from jaxspec.train import sharding, steps
    from jaxspec.train.state import create_train_state
    method = registry.get("ccnet")
    cfg = presets.ablation("full", method.config("smoke"), **TINY).replace(batch_size=8)
    model = method.model(cfg)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    state = create_train_state(model, steps.make_optimizer_for(cfg, method),
                               jax.random.PRNGKey(0), (1, 16, 16, 3), out_sharding=rep)
    step = jax.jit(steps.build_train_step(model, cfg, method), donate_argnums=0,
                   out_shardings=(rep, rep))
    rng = np.random.default_rng(0)
    # the data-parallel step moves only the gradient all-reduce: no activation is gathered
    # (NeSCM once merged (T, B) batch-minor, and the partitioner gathered the global batch)
    from jaxspec.scale import collective_bytes
    probe = sharding.shard_batch({"rgb": np.zeros((8, 16, 16, 3), np.float32),
                                  "hsi": np.ones((8, 16, 16, 31), np.float32)}, mesh)
    coll = collective_bytes(step.lower(state, probe).compile().as_text())
    out = []
    for t in range(3):
        hsi = (rng.random((8, 16, 16, 31)) * 0.8 + 0.1).astype(np.float32)
        rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
        state, m = step(state, sharding.shard_batch({"rgb": rgb, "hsi": hsi}, mesh))
        out.append(float(m["loss"]))
    print(json.dumps({"devices": jax.device_count(), "losses": out,
                      "gathered": coll["all-gather"]["bytes"] + coll["all-to-all"]["bytes"]}))
""")


def _run(n, tmp_path):
    script = tmp_path / f"dev{n}.py"
    script.write_text(f"TINY = {TINY!r}\n" + _DEVICES_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n} "
                         "--xla_backend_optimization_level=0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_vs_eight_devices_same_loss(tmp_path):
    one, eight = _run(1, tmp_path), _run(8, tmp_path)
    assert one["devices"] == 1 and eight["devices"] == 8
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=0, atol=1e-5)
    assert eight["gathered"] == 0, eight
    assert one["losses"][-1] < one["losses"][0]
