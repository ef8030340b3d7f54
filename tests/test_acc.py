"""ACC model: scan vs unrolled definition, coupling structure, BatchNorm, params, registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import registry
from jaxspec.analysis import channel_jacobian, exact_block_norms
from jaxspec.flops import count_params
from jaxspec.models import acc


def _kernels(c, seed=0, scale=1 / 3):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [scale * jax.random.normal(kk, (2, c, 3, 3)) for kk in k]


@pytest.mark.parametrize("recurrent", [True, False])
def test_scan_matches_unrolled_reference(recurrent):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 6, 9)) * 2
    v, q, k = _kernels(9)
    y = acc.acc_coupling(x, v, q, k, recurrent=recurrent)
    ref = acc.acc_coupling_reference(x, v, q, k, recurrent=recurrent)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # both depthwise implementations agree
    y_lax = acc.acc_coupling(x, v, q, k, recurrent=recurrent, impl="lax")
    np.testing.assert_allclose(np.asarray(y_lax), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_planes_form_matches_reference_values_and_forward_mode():
    """The CPU inference form (channel planes, one fori_loop) is the recurrent coupling:
    values against the unrolled definition, forward-mode derivative (what the Jacobian
    tools use) and gradients against the scan form; ACCNet's inference with and without it."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 6, 9)) * 2
    v, q, k = _kernels(9)
    ref = acc.acc_coupling_reference(x, v, q, k)
    y = jax.jit(acc.acc_coupling_planes)(x, v, q, k)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    t = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    _, jp = jax.jvp(lambda z: acc.acc_coupling_planes(z, v, q, k), (x,), (t,))
    _, js = jax.jvp(lambda z: acc.acc_coupling(z, v, q, k), (x,), (t,))
    np.testing.assert_allclose(np.asarray(jp), np.asarray(js), atol=1e-4, rtol=1e-4)
    gp = jax.grad(lambda *a: jnp.sum(jnp.sin(acc.acc_coupling_planes(*a))), (0, 1, 2, 3))(
        x, v, q, k)
    gs = jax.grad(lambda *a: jnp.sum(jnp.sin(acc.acc_coupling(*a))), (0, 1, 2, 3))(x, v, q, k)
    for a, b in zip(gp, gs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    rgb = jax.random.uniform(jax.random.PRNGKey(3), (1, 12, 16, 3))
    net = acc.ACCNet(dim=8, out_channels=8, window=4, num_blocks=(1, 1, 1))
    variables = net.init(jax.random.PRNGKey(4), rgb)
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                             variables)           # non-zero output conv and non-local branch
    y_planes = jax.jit(net.apply)(variables, rgb)
    y_scan = jax.jit(acc.ACCNet(dim=8, out_channels=8, window=4, num_blocks=(1, 1, 1),
                                coupling_planes=False).apply)(variables, rgb)
    np.testing.assert_allclose(np.asarray(y_planes), np.asarray(y_scan), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(y_scan).max()) > 1e-2


def test_recurrence_is_not_the_parallel_form():
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 5, 6))
    v, q, k = _kernels(6)
    a = acc.acc_coupling(x, v, q, k, recurrent=True)
    b = acc.acc_coupling(x, v, q, k, recurrent=False)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_aux_reconstructs_output():
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 4, 5))
    v, q, k = _kernels(5)
    y, aux = acc.acc_coupling(x, v, q, k, return_aux=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + 0.5 * (aux["T"][0] + aux["T"][1])),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["T"]),
                               np.asarray(aux["V"] * jax.nn.sigmoid(aux["alpha"])), atol=1e-6)
    # forward state of channel c is what channel c+1 saw
    np.testing.assert_allclose(np.asarray(aux["S"][0][..., :-1]),
                               np.asarray(aux["S_prev"][0][..., 1:]), atol=1e-6)


def test_zeroed_coupling_blocks_propagation():
    """With h^F_3 = 0 (W^K = 0) a perturbation of channel 1 cannot reach channels >= 3 through
    the forward chain, and channels below 1 only see it through the backward chain."""
    c = 7
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 6, c))
    v, q, k = _kernels(c)
    k = k.at[0, 3].set(0.0)                       # forward key of channel 3
    k = k.at[1, 0].set(0.0)                       # backward key of channel 0
    delta = jnp.zeros_like(x).at[..., 1].set(0.5 * jax.random.normal(jax.random.PRNGKey(5),
                                                                     (1, 6, 6)))
    y0 = acc.acc_coupling(x, v, q, k)
    y1 = acc.acc_coupling(x + delta, v, q, k)
    diff = np.abs(np.asarray(y1 - y0)).max(axis=(0, 1, 2))
    assert np.all(diff[3:] == 0.0), diff          # far side of the zeroed forward coupling
    assert diff[0] == 0.0 and diff[1] > 0 and diff[2] > 0, diff   # channel 0's backward key = 0
    # without the zeroed kernels the perturbation reaches every channel
    v2, q2, k2 = _kernels(c)
    d2 = np.abs(np.asarray(acc.acc_coupling(x + delta, v2, q2, k2)
                           - acc.acc_coupling(x, v2, q2, k2))).max(axis=(0, 1, 2))
    assert np.all(d2 > 0)


def test_parallel_form_is_tridiagonal():
    c = 6
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 4, 4, c)) * 3
    v, q, k = _kernels(c)
    fn = lambda z: acc.acc_coupling(z, v, q, k, recurrent=False)
    norms = exact_block_norms(fn, x)
    i, j = np.indices(norms.shape)
    assert np.all(norms[np.abs(i - j) > 1] == 0.0)
    assert np.all(norms[np.abs(i - j) == 1] > 1e-4)
    rec = exact_block_norms(lambda z: acc.acc_coupling(z, v, q, k), x)
    assert np.all(rec[np.abs(i - j) > 1] > 0.0)   # the recurrence couples every pair


def test_windowed_nonlocal_matches_per_window_definition():
    nl = acc.WindowedNonLocal(window=4, reduction=2, window_batch=2)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 6))
    variables = nl.init(jax.random.PRNGKey(0), x)
    # zero-initialised output projection -> exactly zero at init
    assert float(jnp.abs(nl.apply(variables, x)).max()) == 0.0
    p = jax.tree_util.tree_map(lambda a: a, variables["params"])
    p["out"]["kernel"] = jax.random.normal(jax.random.PRNGKey(8), p["out"]["kernel"].shape)
    y = nl.apply({"params": p}, x)
    th, vv, wo = p["theta"]["kernel"], p["value"]["kernel"], p["out"]["kernel"]
    for b in range(2):
        for r in (0, 4):
            for s in (0, 4):
                win = x[b, r:r + 4, s:s + 4].reshape(16, 6)
                t = win @ th
                t = t - t.mean(0)
                a = jax.nn.softmax(t @ t.T / 16, axis=-1)
                ref = (a @ (win @ vv) @ wo).reshape(4, 4, 6)
                np.testing.assert_allclose(np.asarray(y[b, r:r + 4, s:s + 4]), np.asarray(ref),
                                           atol=1e-5)
    # non-multiple sizes are reflect-padded and cropped back; vmap and lax.map paths agree
    x2 = jax.random.normal(jax.random.PRNGKey(9), (1, 10, 7, 6))
    a1 = nl.apply({"params": p}, x2)
    a2 = acc.WindowedNonLocal(window=4, reduction=2, window_batch=None).apply({"params": p}, x2)
    assert a1.shape == x2.shape
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-5)


@pytest.mark.parametrize("scale,shift,row_block,blocks", [
    (0.5, "sym", 6, 16), (2.0, "sym", 6, 16), (0.5, "sym", 32, 2), (40.0, "rowmax", 6, 16)])
def test_nonlocal_row_blocks_equal_whole_windows_values_and_grads(scale, shift, row_block,
                                                                 blocks):
    # the symmetric blocks of exp(l_ij - a_i - a_j) (each above the diagonal used for both
    # triangles), or blocks of rows shifted by the row max when max |theta|^2 >= 40 n
    # (scale 40: logits in the hundreds); both equal the whole-window jax.nn.softmax form,
    # values and gradients
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 12, 10, 6))   # padded to 16 x 16
    full = acc.WindowedNonLocal(window=8, window_batch=None)
    p = full.init(jax.random.PRNGKey(0), x)["params"]
    p = jax.tree_util.tree_map(
        lambda a: scale * jax.random.normal(jax.random.PRNGKey(11), a.shape), p)
    theta = np.einsum("bhwc,cd->bhwd", np.pad(np.asarray(x), ((0, 0), (0, 4), (0, 6), (0, 0)),
                                              mode="reflect"), np.asarray(p["theta"]["kernel"]))
    theta = theta.reshape(2, 2, 8, 2, 8, -1).transpose(0, 1, 3, 2, 4, 5).reshape(8, 64, -1)
    big2 = np.sum((theta - theta.mean(1, keepdims=True)) ** 2, axis=2).max(axis=1)
    assert np.all(big2 < 40 * 64) if shift == "sym" else np.all(big2 >= 40 * 64), big2
    rows = acc.WindowedNonLocal(window=8, window_batch=4, row_block=row_block)  # 6 -> 4 | 64
    assert rows._row_block(64) == 64 // blocks and full._row_block(64) is None
    np.testing.assert_allclose(np.asarray(rows.apply({"params": p}, x)),
                               np.asarray(full.apply({"params": p}, x)), atol=1e-5 * scale,
                               rtol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(12), x.shape)
    g = [jax.grad(lambda p, m=m: jnp.sum(w * m.apply({"params": p}, x)))(p)
         for m in (rows, full)]
    for a, b in zip(jax.tree_util.tree_leaves(g[0]), jax.tree_util.tree_leaves(g[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="row_block"):
        acc.WindowedNonLocal(window=8, row_block=0).apply({"params": p}, x)


def test_golden_output_paper_architecture():
    # Recorded with the code before the row-blocked non-local attention and the rewritten
    # S-MSA/GELU (commit 05cb92e; jax 0.10.2, XLA:CPU): the paper ACCNet, PRNGKey(0) init,
    # every parameter and BatchNorm statistic perturbed by a seeded numpy draw (so the
    # zero-initialised non-local and output projections contribute), eval mode, a 72x80 input
    # (windows of 64/32/16 with reflect padding at every level).
    m = registry.get("acc")
    model = m.model(m.config("paper"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (1, 72, 80, 3)).astype(np.float32))
    var = jax.jit(model.init)(jax.random.PRNGKey(0), x)

    def perturb(path, a):
        a = np.asarray(a)
        if "var" in jax.tree_util.keystr(path):
            return (a + 0.1 * np.abs(rng.normal(size=a.shape))).astype(np.float32)
        return (a + 0.05 * rng.normal(size=a.shape)).astype(np.float32)

    var = jax.tree_util.tree_map_with_path(perturb, var)
    y = np.asarray(jax.jit(model.apply)(var, x), np.float64)
    abs_sum = 201818.32178924
    np.testing.assert_allclose(np.abs(y).sum(), abs_sum, rtol=1e-5)
    assert abs(y.sum() - 146.1443185103126) < 1e-6 * abs_sum
    np.testing.assert_allclose((y ** 2).sum(), 370457.23412897205, rtol=1e-5)
    np.testing.assert_allclose(y[0, 0, 0, :3], [0.11259940266609192, -0.675632894039154,
                                                0.4578004479408264], atol=1e-5)
    np.testing.assert_allclose(y[0, 71, 79, -3:], [0.20170415937900543, 0.38814184069633484,
                                                   -0.3514375388622284], atol=1e-5)
    np.testing.assert_allclose(y[0, 40, 33, 7], -1.0865347385406494, atol=1e-5)


def test_param_count_near_paper():
    m = registry.get("acc")
    model = m.model(m.config("paper"))
    var = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    n = count_params(var["params"])
    assert n == 1_203_265                           # golden count of the paper architecture
    assert abs(n / 1e6 - 1.18) / 1.18 < 0.025        # paper: 1.18 M
    assert "batch_stats" in var


def test_forward_train_and_eval():
    m = registry.get("acc")
    cfg = m.config("smoke")
    assert cfg.steps == 2 and cfg.method == "acc"
    for preset in ("paper", "cpu", "smoke"):
        assert m.config(preset).model == cfg.model     # one architecture, one param count
    model = acc.ACCNet(out_channels=8, dim=8, levels=1, num_blocks=(1, 1), window=4)
    rgb = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 11, 3))   # not a multiple of 2
    var = jax.jit(model.init)(jax.random.PRNGKey(1), rgb)
    y = jax.jit(model.apply)(var, rgb)
    assert y.shape == (2, 9, 11, 8) and y.dtype == jnp.float32

    # the output conv is zero-initialised (prediction = stem at init); give it weights so that
    # gradients reach the body
    assert float(jnp.abs(var["params"]["out"]).max()) == 0.0
    var = {**var, "params": {**var["params"], "out": 0.1 * jax.random.normal(
        jax.random.PRNGKey(2), var["params"]["out"].shape)}}

    def loss(p):
        out, upd = model.apply({**var, "params": p}, rgb, train=True, mutable=["batch_stats"])
        return jnp.mean(out ** 2), (out, upd)

    g, (y_tr, upd) = jax.jit(jax.grad(loss, has_aux=True))(var["params"])
    assert y_tr.shape == y.shape and np.all(np.isfinite(np.asarray(y_tr)))
    changed = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                     var["batch_stats"], upd["batch_stats"])
    assert max(jax.tree_util.tree_leaves(changed)) > 0          # running stats updated
    acc_g = g["msssf_0"]["encoder_0_block_0"]["ssta"]["acc"]     # gradients reach the kernels
    assert all(float(jnp.abs(acc_g[n]).sum()) > 0 for n in ("value", "query", "key"))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="kernel"):
        acc.acc_coupling(jnp.zeros((1, 4, 4, 3)), *_kernels(4))
    with pytest.raises(ValueError, match="rgb"):
        acc.ACCNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="unknown ACC model options"):
        acc.make_model({"nope": 1})
