"""Tests for jaxspec.layers: each block against a literal NumPy transcription of the PyTorch
reference (MST-plus-plus ``MST_Plus_Plus.py``), both depthwise paths, init statistics, errors."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxspec import layers as L
from jaxspec.flops import count_flops, count_params


# ----------------------------------------------------------------------------------------------
# NumPy references (NCHW-free, but written like the PyTorch code: loops and explicit layouts)
# ----------------------------------------------------------------------------------------------
def np_gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_conv2d(x, k, stride=1, pad=((0, 0), (0, 0)), groups=1):
    """Cross-correlation, x (B,H,W,Cin), k (kh,kw,Cin/groups,Cout), zero padding."""
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    b, h, w, cin = x.shape
    kh, kw, cg, cout = k.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, ho, wo, cout), np.float64)
    opg = cout // groups
    for o in range(cout):
        g = o // opg
        xs = x[..., g * cg:(g + 1) * cg]
        for u in range(kh):
            for v in range(kw):
                patch = xs[:, u:u + stride * ho:stride, v:v + stride * wo:stride, :]
                out[..., o] += patch @ k[u, v, :, o]
    return out


def np_dwconv(x, k3):  # k3 (kh, kw, C), SAME for odd kernels
    kh, kw, c = k3.shape
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return np_conv2d(x, k3[:, :, None, :], pad=pad, groups=c)


def np_conv_transpose(x, k, s):
    """PyTorch ConvTranspose2d(stride=s, padding=0) by its scatter definition.
    Torch weight W[c, o, u, v] == k[u, v, c, o]."""
    b, h, w, cin = x.shape
    kh, kw, _, cout = k.shape
    out = np.zeros((b, (h - 1) * s + kh, (w - 1) * s + kw, cout))
    for i in range(h):
        for j in range(w):
            out[:, i * s:i * s + kh, j * s:j * s + kw, :] += np.einsum(
                "bc,uvco->buvo", x[:, i, j, :], k)
    return out


def np_layernorm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_msa(x, p, heads):
    """MS_MSA.forward of the reference, step by step (b,heads,d,N layouts)."""
    b, h, w, c = x.shape
    n = h * w
    d = c // heads
    X = x.reshape(b, n, c)
    q_inp, k_inp, v_inp = (X @ p["to_q"]["kernel"], X @ p["to_k"]["kernel"],
                           X @ p["to_v"]["kernel"])

    def heads_dn(t):  # 'b n (h d) -> b h n d' then transpose(-2, -1)
        return t.reshape(b, n, heads, d).transpose(0, 2, 3, 1)

    q, k, v = heads_dn(q_inp), heads_dn(k_inp), heads_dn(v_inp)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    attn = k @ q.transpose(0, 1, 3, 2)                 # A = K Q^T
    attn = attn * p["rescale"]                         # (heads, 1, 1)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    xo = attn @ v                                      # b, heads, d, N
    xo = xo.transpose(0, 3, 1, 2).reshape(b, n, heads * d)
    out_c = (xo @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(b, h, w, c)
    vimg = v_inp.reshape(b, h, w, c)
    pe = np_dwconv(np_gelu(np_dwconv(vimg, p["pos_emb_0"]["kernel"][:, :, 0])),
                   p["pos_emb_1"]["kernel"][:, :, 0])
    return out_c + pe


def np_ffn(x, p):
    y = np_gelu(x @ p["conv_0"]["kernel"][0, 0])
    y = np_gelu(np_dwconv(y, p["dwconv"]["kernel"][:, :, 0]))
    return y @ p["conv_1"]["kernel"][0, 0]


def np_msab(x, p, heads):
    x = np_msa(x, p["msa"], heads) + x
    y = np_layernorm(x, p["norm"]["scale"], p["norm"]["bias"])
    return np_ffn(y, p["ffn"]) + x


def randomize(params, seed, scale=0.3):
    """Replace every leaf by random values (so e.g. rescale != 1 and biases != 0)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(params)
    new = [(1.0 if (l.ndim == 3 and l.shape[1:] == (1, 1)) else 0.0)
           + scale * rng.normal(size=l.shape).astype(np.float32) for l in leaves]
    return jax.tree_util.tree_unflatten(tree, new)


def init(module, *args, seed=0):
    """Jitted init (eager Flax init dispatches op by op and is slow on CPU)."""
    return jax.jit(module.init)(jax.random.PRNGKey(seed), *args)


def apply(module, variables, *args, **kw):
    return jax.jit(functools.partial(module.apply, **kw))(variables, *args)


def to_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# depthwise_conv
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ksize,padding", [
    ((3, 3), "SAME"), ((5, 5), "SAME"), ((1, 1), "SAME"), ((3, 5), "SAME"), ((7, 3), "VALID"),
    ((2, 2), "SAME"), ((4, 4), ((1, 2), (2, 1))), ((3, 3), 2)])
def test_depthwise_impls_agree_values_and_grads(ksize, padding):
    x = jnp.asarray(RNG.normal(size=(2, 9, 11, 5)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=ksize + (5,)), jnp.float32)
    ys = L.depthwise_conv(x, k, padding, impl="shift")
    yl = L.depthwise_conv(x, k, padding, impl="lax")
    assert ys.shape == yl.shape
    np.testing.assert_allclose(ys, yl, atol=1e-5, rtol=1e-5)
    w = jnp.asarray(RNG.normal(size=ys.shape), jnp.float32)

    def loss(impl):
        return lambda x_, k_: jnp.sum(w * jnp.tanh(L.depthwise_conv(x_, k_, padding, impl=impl)))

    gs = jax.grad(loss("shift"), argnums=(0, 1))(x, k)
    gl = jax.grad(loss("lax"), argnums=(0, 1))(x, k)
    for a, b in zip(gs, gl):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ksize,padding", [
    ((3, 3), "SAME"), ((4, 4), "SAME"), ((3, 5), ((2, 0), (1, 3))), ((3, 3), ((3, 2), (0, 4)))])
def test_depthwise_shift_custom_jvp_forward_mode_and_second_order(ksize, padding):
    # the shift path has a hand-written JVP (layers._dw_shift): forward mode (what
    # jaxspec.analysis uses), second derivatives and negative transposed padding (p > k - 1)
    # must equal the grouped convolution's autodiff
    x = jnp.asarray(RNG.normal(size=(2, 6, 7, 3)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=ksize + (3,)), jnp.float32)
    tx = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
    tk = jnp.asarray(RNG.normal(size=k.shape), jnp.float32)

    def f(impl):
        return lambda x_, k_: L.depthwise_conv(x_, k_, padding, impl=impl)

    _, js = jax.jvp(f("shift"), (x, k), (tx, tk))
    _, jl = jax.jvp(f("lax"), (x, k), (tx, tk))
    np.testing.assert_allclose(js, jl, atol=1e-5, rtol=1e-5)
    w = jnp.asarray(RNG.normal(size=js.shape), jnp.float32)

    def hess(impl):
        return jax.hessian(lambda k_: jnp.sum(w * f(impl)(x, k_)) ** 2)(k)

    np.testing.assert_allclose(hess("shift"), hess("lax"), rtol=1e-4, atol=1e-3)


def test_shift_depthwise_and_gelu_keep_one_residual_in_reverse_mode():
    # reverse mode must keep x (GELU: gelu'(x)), not the kh*kw shifted slices of the padded
    # input: the residuals are the leaves of the function jax.vjp returns
    x = jnp.asarray(RNG.normal(size=(2, 32, 32, 16)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(3, 3, 16)), jnp.float32)

    def residual_bytes(f, *args):
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(jax.vjp(f, *args)[1]))

    def plain_dw(x_, k_):                         # the literal shift-adds, plain autodiff
        xp = jnp.pad(x_, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(xp[:, u:u + 32, v:v + 32] * k_[u, v] for u in range(3) for v in range(3))

    def plain_gelu(x_):
        return x_ * (0.5 * (1.0 + jax.lax.erf(x_ / np.sqrt(2.0))))

    dw = functools.partial(L.depthwise_conv, impl="shift")
    assert residual_bytes(plain_dw, x, k) >= 8 * x.nbytes
    assert residual_bytes(dw, x, k) <= 1.2 * x.nbytes + k.nbytes      # padded x (34^2/32^2)
    assert residual_bytes(plain_gelu, x) >= 2 * x.nbytes
    assert residual_bytes(L.gelu, x) <= x.nbytes
    w = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
    g_new = jax.grad(lambda x_, k_: jnp.sum(w * L.gelu(dw(L.gelu(x_), k_))), (0, 1))(x, k)
    g_old = jax.grad(lambda x_, k_: jnp.sum(w * plain_gelu(plain_dw(plain_gelu(x_), k_))),
                     (0, 1))(x, k)
    for a, b in zip(g_new, g_old):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_matches_numpy_and_accepts_layouts():
    x = RNG.normal(size=(1, 6, 7, 4)).astype(np.float32)
    k3 = RNG.normal(size=(3, 3, 4)).astype(np.float32)
    ref = np_dwconv(x.astype(np.float64), k3.astype(np.float64))
    for impl in ("shift", "lax", "auto"):
        np.testing.assert_allclose(L.depthwise_conv(x, k3, impl=impl), ref, atol=1e-5)
        np.testing.assert_allclose(L.depthwise_conv(x, k3[:, :, None, :], impl=impl), ref,
                                   atol=1e-5)
    # unbatched (H, W, C) and extra leading dims
    np.testing.assert_allclose(L.depthwise_conv(x[0], k3), ref[0], atol=1e-5)
    xx = np.stack([x, 2 * x])                             # (2, 1, H, W, C)
    for impl in ("shift", "lax"):
        np.testing.assert_allclose(L.depthwise_conv(xx, k3, impl=impl)[1], 2 * ref, atol=1e-4)


def test_depthwise_auto_picks_backend():
    expect = "shift" if jax.default_backend() == "cpu" else "lax"
    assert L.resolve_depthwise_impl("auto") == expect
    assert L.resolve_depthwise_impl("lax") == "lax"


def test_depthwise_bad_input():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        L.depthwise_conv(x, jnp.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="impl"):
        L.depthwise_conv(x, jnp.zeros((3, 3, 3)), impl="fft")
    with pytest.raises(ValueError, match="padding"):
        L.depthwise_conv(x, jnp.zeros((3, 3, 3)), padding="FULL")
    with pytest.raises(ValueError, match="grouped layout"):
        L.depthwise_conv(x, jnp.zeros((3, 3, 3, 3)))
    with pytest.raises(ValueError, match="no output"):
        L.depthwise_conv(x, jnp.zeros((5, 5, 3)), padding="VALID")
    with pytest.raises(ValueError, match="DepthwiseConv"):
        init(L.DepthwiseConv(4), x)


def test_depthwise_module_layout_independent_of_impl_and_equals_grouped_conv():
    x = jnp.asarray(RNG.normal(size=(2, 8, 8, 6)), jnp.float32)
    vs = init(L.DepthwiseConv(6, (3, 3), use_bias=True, impl="shift"), x, seed=1)
    vl = init(L.DepthwiseConv(6, (3, 3), use_bias=True, impl="lax"), x, seed=1)
    assert jax.tree_util.tree_map(jnp.shape, vs) == {
        "params": {"kernel": (3, 3, 1, 6), "bias": (6,)}}
    jax.tree_util.tree_map(np.testing.assert_array_equal, vs, vl)
    ys = apply(L.DepthwiseConv(6, use_bias=True, impl="shift"), vs, x)
    yl = apply(L.DepthwiseConv(6, use_bias=True, impl="lax"), vs, x)
    yf = nn.Conv(6, (3, 3), feature_group_count=6, padding="SAME").apply(vs, x)
    np.testing.assert_allclose(ys, yl, atol=1e-5)
    np.testing.assert_allclose(ys, yf, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Elementwise, norms, convs
# ----------------------------------------------------------------------------------------------
def test_gelu_is_exact_and_layernorm_is_torch_like():
    x = np.linspace(-4, 4, 101)
    np.testing.assert_allclose(L.gelu(jnp.asarray(x, jnp.float32)), np_gelu(x), atol=2e-6)
    # custom JVP (one residual): first and second derivatives equal jax.nn.gelu's exact form
    xj = jnp.asarray(x, jnp.float32)
    exact = functools.partial(jax.nn.gelu, approximate=False)
    for d in (jax.grad, lambda f: jax.grad(jax.grad(f))):
        np.testing.assert_allclose(jax.vmap(d(L.gelu))(xj), jax.vmap(d(exact))(xj), atol=2e-6)
    # the tanh approximation differs by ~1e-3 -- the test would catch nn.gelu
    assert np.max(np.abs(np.asarray(nn.gelu(jnp.asarray(x, jnp.float32))) - np_gelu(x))) > 1e-4
    xs = (RNG.normal(size=(2, 3, 3, 7)) * 0.01 + 5.0).astype(np.float32)  # large mean, small var
    ln = L.LayerNorm()
    v = init(ln, xs)
    np.testing.assert_allclose(apply(ln, v, xs), np_layernorm(xs.astype(np.float64), 1.0, 0.0),
                               atol=2e-4)
    assert ln.epsilon == 1e-5


def test_conv2d_down_and_pointwise_match_numpy():
    x = RNG.normal(size=(2, 8, 6, 3)).astype(np.float32)
    down = L.Conv2d(5, (4, 4), strides=2, padding=((1, 1), (1, 1)))
    v = init(down, x)
    ref = np_conv2d(x.astype(np.float64), np.asarray(v["params"]["kernel"], np.float64),
                    stride=2, pad=((1, 1), (1, 1)))
    y = apply(down, v, x)
    assert y.shape == (2, 4, 3, 5)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    pw = L.Conv2d(4, (1, 1), use_bias=True)
    v = init(pw, x)
    ref = x @ np.asarray(v["params"]["kernel"][0, 0]) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(apply(pw, v, x), ref, atol=1e-5)


@pytest.mark.parametrize("ksize,stride,padding", [
    ((3, 3), 1, "SAME"), ((4, 4), 2, ((1, 1), (1, 1))), ((3, 3), 2, "SAME"), ((5, 3), 3, "VALID"),
    ((1, 3), 1, 2), ((4, 4), 2, "SAME"), ((2, 2), 1, ((0, 1), (1, 0)))])
def test_conv2d_cpu_form_equals_the_convolution_values_grads_forward_mode(ksize, stride, padding):
    # conv2d's CPU form (custom JVP, per-tap kernel term after a space-to-depth by the stride)
    # against lax.conv_general_dilated: values, reverse-mode gradients of x and the kernel,
    # forward mode in the kernel (jacfwd, what the Jacobian studies use) and second order
    x = jnp.asarray(RNG.normal(size=(2, 9, 11, 3)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=ksize + (3, 4)), jnp.float32)

    def f(impl):
        return lambda x_, k_: L.conv2d(x_, k_, stride, padding, impl=impl)

    ys, yl = f("shift")(x, k), f("lax")(x, k)
    assert ys.shape == yl.shape
    np.testing.assert_allclose(ys, yl, atol=1e-5, rtol=1e-5)
    w = jnp.asarray(RNG.normal(size=ys.shape), jnp.float32)

    def loss(impl):
        return lambda x_, k_: jnp.sum(w * jnp.tanh(f(impl)(x_, k_)))

    for a, b in zip(jax.grad(loss("shift"), (0, 1))(x, k), jax.grad(loss("lax"), (0, 1))(x, k)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(f("shift"), 1)(x, k), jax.jacfwd(f("lax"), 1)(x, k),
                               atol=1e-5, rtol=1e-5)
    hess = {impl: jax.hessian(lambda k_, i=impl: jnp.sum(w * f(i)(x, k_)) ** 2)(k)
            for impl in ("shift", "lax")}
    np.testing.assert_allclose(hess["shift"], hess["lax"], rtol=1e-4, atol=1e-2)


def test_conv2d_cpu_form_keeps_the_padded_input_and_runs_dots():
    # reverse mode keeps x (padded) and the kernel, not one shifted copy per tap, and the
    # compiled kernel gradient has one dot per tap and no image-window convolution
    x = jnp.asarray(RNG.normal(size=(2, 32, 32, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(3, 3, 8, 8)), jnp.float32)
    conv = functools.partial(L.conv2d, impl="shift")
    res = jax.tree_util.tree_leaves(jax.vjp(conv, x, k)[1])
    assert sum(leaf.nbytes for leaf in res) <= 1.2 * x.nbytes + k.nbytes
    dy = jnp.ones((2, 32, 32, 8), jnp.float32)
    hlo = jax.jit(lambda x_, k_: jax.vjp(lambda kk: conv(x_, kk), k_)[1](dy)).lower(
        x, k).compile().as_text()
    # whole module: jax >= 0.12.1's XLA:CPU places the dots inside fusions, older ones in ENTRY
    assert hlo.count(" dot(") == 9 and "convolution(" not in hlo
    assert "window={size=32x32" not in hlo
    xi = jnp.asarray(RNG.integers(0, 255, size=(1, 6, 6, 8)), jnp.int32)   # promoted, not cast
    yi = conv(xi, k)
    assert yi.dtype == jnp.float32
    np.testing.assert_allclose(yi, L.conv2d(xi.astype(jnp.float32), k, impl="lax"), rtol=1e-6)
    with pytest.raises(ValueError, match="same C"):
        L.conv2d(x, k[:, :, :4], 1)
    with pytest.raises(ValueError, match="padding must be"):
        L.conv2d(x, k, 1, "FULL")


def test_conv2d_cpu_form_strided_input_gradient_is_a_stride_1_convolution():
    # the input gradient of a strided conv (MST++'s 4x4 stride-2 down-sampling) compiles to
    # a stride-1 convolution of the space-to-depth layout, not one over an lhs-dilated input
    x = jnp.asarray(RNG.normal(size=(2, 16, 16, 3)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(4, 4, 3, 5)), jnp.float32)
    dy = jnp.asarray(RNG.normal(size=(2, 8, 8, 5)), jnp.float32)

    def grad_x(impl):
        conv = functools.partial(L.conv2d, strides=2, padding=1, impl=impl)
        return jax.jit(lambda x_, k_: jax.vjp(lambda xx: conv(xx, k_), x_)[1](dy)[0])

    hlo = {impl: grad_x(impl).lower(x, k).compile().as_text() for impl in ("shift", "lax")}
    assert "lhs_dilate=2x2" in hlo["lax"]          # what XLA makes of the strided transpose
    assert "lhs_dilate" not in hlo["shift"] and "convolution(" in hlo["shift"]
    np.testing.assert_allclose(grad_x("shift")(x, k), grad_x("lax")(x, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
def test_conv2d_cpu_form_input_gradient_kernel_is_hwio_inside_a_loop(strides):
    # the input gradient's convolution takes its kernel as HWIO (dim_labels ..._01io->...)
    # also inside a scan body: XLA:CPU runs that layout through YNNPACK, while a 01oi kernel
    # (JAX's transpose of an HWIO convolution, which XLA copies into HWIO only at the top
    # level) falls back to its generic convolution, ~10x slower (micro-batched train steps)
    x = jnp.asarray(RNG.normal(size=(3, 2, 16, 16, 6)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(4 if strides == 2 else 3,) * 2 + (6, 5)), jnp.float32)

    def grads(impl):
        conv = functools.partial(L.conv2d, strides=strides, padding=1, impl=impl)

        def body(acc, xb):
            gx, gk = jax.grad(lambda a, b: jnp.sum(conv(a, b) ** 2), argnums=(0, 1))(xb, k)
            return acc + gk, gx
        return jax.jit(lambda x_: jax.lax.scan(body, jnp.zeros_like(k), x_))

    hlo = grads("shift").lower(x).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=\w+_(\w+)->", hlo)
    assert labels and set(labels) == {"01io"}, labels
    for a, b in zip(grads("shift")(x), grads("lax")(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_transpose_matches_torch_scatter_definition():
    x = RNG.normal(size=(2, 3, 4, 6)).astype(np.float32)
    up = L.ConvTranspose2d(5, stride=2)
    v = init(up, x)
    p = to_np(v["params"])
    ref = np_conv_transpose(x.astype(np.float64), p["kernel"], 2) + p["bias"]
    y = apply(up, v, x)
    assert y.shape == (2, 6, 8, 5)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_initialisers_follow_pytorch_defaults():
    x = jnp.zeros((1, 8, 8, 64))
    k = init(L.Conv2d(128, (3, 3)), x)["params"]["kernel"]
    bound = 1 / np.sqrt(64 * 9)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    np.testing.assert_allclose(np.std(k), bound / np.sqrt(3), rtol=0.03)
    v = init(L.ConvTranspose2d(32, stride=2), x)["params"]
    bound_t = 1 / np.sqrt(32 * 4)                          # torch fan_in = C_out * kh * kw
    assert np.abs(v["kernel"]).max() <= bound_t and np.abs(v["kernel"]).max() > 0.95 * bound_t
    assert np.abs(v["bias"]).max() <= bound_t
    kd = init(L.DepthwiseConv(64), x)["params"]["kernel"]
    assert np.abs(kd).max() <= 1 / 3 and np.abs(kd).max() > 0.9 / 3   # fan_in = 9
    lin = init(L.Linear(256), x)["params"]
    np.testing.assert_allclose(np.std(lin["kernel"]), 0.02, rtol=0.03)
    assert np.all(lin["bias"] == 0)


# ----------------------------------------------------------------------------------------------
# S-MSA, FFN, MSAB
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,heads", [(8, 1), (12, 3)])
def test_spectral_msa_matches_reference(dim, heads):
    x = RNG.normal(size=(2, 4, 5, dim)).astype(np.float32)
    msa = L.SpectralMSA(dim, heads)
    v = init(msa, x)
    assert v["params"]["rescale"].shape == (heads, 1, 1)
    np.testing.assert_array_equal(v["params"]["rescale"], 1.0)
    p = randomize(v["params"], 3)
    ref = np_msa(x.astype(np.float64), to_np(p), heads)
    np.testing.assert_allclose(apply(msa, {"params": p}, x), ref, atol=2e-5, rtol=1e-4)
    # the K Q^T order matters: swapping to_q and to_k changes the output
    swapped = dict(p, to_q=p["to_k"], to_k=p["to_q"])
    assert np.max(np.abs(apply(msa, {"params": swapped}, x) - ref)) > 1e-3


def _msa_literal(x, p, heads):
    """The literal S-MSA (Q, K formed and L2-normalised over N, A V then proj) in jnp: the
    formulation SpectralMSA evaluated before it was rewritten by associativity."""
    b, h, w, c = x.shape
    d = c // heads
    xf = x.reshape(b, h * w, c)
    q, k, v = (xf @ p[n]["kernel"] for n in ("to_q", "to_k", "to_v"))
    q = L.l2_normalize(q.reshape(b, -1, heads, d), axis=1)
    k = L.l2_normalize(k.reshape(b, -1, heads, d), axis=1)
    attn = jax.nn.softmax(jnp.einsum("bnhi,bnhj->bhij", k, q) * p["rescale"][None], axis=-1)
    out = jnp.einsum("bhij,bnhj->bnhi", attn, v.reshape(b, -1, heads, d)).reshape(b, h, w, c)
    out = out @ p["proj"]["kernel"] + p["proj"]["bias"]
    pe = L.depthwise_conv(L.gelu(L.depthwise_conv(v.reshape(b, h, w, c),
                                                  p["pos_emb_0"]["kernel"])),
                          p["pos_emb_1"]["kernel"])
    return out + pe


def test_spectral_msa_gradients_match_literal_formulation():
    dim, heads = 12, 3
    x = jnp.asarray(RNG.normal(size=(2, 5, 4, dim)).astype(np.float32))
    msa = L.SpectralMSA(dim, heads)
    p = randomize(init(msa, x)["params"], 4)
    tgt = jnp.asarray(RNG.normal(size=(2, 5, 4, dim)).astype(np.float32))

    def loss(fn):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(fn(p, x)) * tgt), (0, 1)))(p, x)

    g_new = loss(lambda p, x: msa.apply({"params": p}, x))
    g_ref = loss(lambda p, x: _msa_literal(x, p, heads))
    for a, r in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


def test_msab_and_ffn_match_reference_and_count():
    dim, heads = 12, 2
    x = RNG.normal(size=(1, 4, 4, dim)).astype(np.float32)
    blk = L.MSAB(dim, heads)
    v = init(blk, x)
    assert count_params(v) == 12 * dim ** 2 + 57 * dim + heads
    p = randomize(v["params"], 5)
    ref = np_msab(x.astype(np.float64), to_np(p), heads)
    np.testing.assert_allclose(apply(blk, {"params": p}, x), ref, atol=5e-5, rtol=1e-4)
    ffn = L.FeedForward(dim)
    np.testing.assert_allclose(apply(ffn, {"params": p["ffn"]}, x),
                               np_ffn(x.astype(np.float64), to_np(p["ffn"])), atol=5e-5)
    # impl paths agree on the block
    y_shift = apply(L.MSAB(dim, heads, impl="shift"), {"params": p}, x)
    y_lax = apply(L.MSAB(dim, heads, impl="lax"), {"params": p}, x)
    np.testing.assert_allclose(y_shift, y_lax, atol=1e-5)


def test_spectral_msa_bad_heads():
    with pytest.raises(ValueError, match="heads"):
        init(L.SpectralMSA(10, 3), jnp.zeros((1, 2, 2, 10)))


# ----------------------------------------------------------------------------------------------
# U-Net scaffold
# ----------------------------------------------------------------------------------------------
def test_unet_param_count_matches_mst_formula():
    x = jnp.zeros((1, 8, 8, 31))
    shapes = jax.eval_shape(L.SpectralUNet(31).init, jax.random.PRNGKey(0), x)
    assert count_params(shapes) == 536_713            # one MST++ SST (specs/mstpp.md §3)
    p = shapes["params"]
    assert count_params(p["encoder_0_block_0"]) == 13_300
    assert count_params(p["encoder_1_block_0"]) == 49_664
    assert count_params(p["bottleneck_block_0"]) == 191_584
    assert count_params(p["down_0"]) == 30_752 and count_params(p["down_1"]) == 123_008
    assert count_params(p["up_1"]) == 30_814 and count_params(p["up_0"]) == 7_719
    assert count_params(p["fuse_1"]) == 7_688 and count_params(p["fuse_0"]) == 1_922
    assert p["bottleneck_block_0"]["msa"]["rescale"].shape == (4, 1, 1)


class _BNBlock(nn.Module):
    """A block with BatchNorm, to check the factory protocol and the train pass-through."""
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return x + nn.Dense(self.dim)(y)


def test_unet_custom_block_factory_gets_dims_heads_and_train():
    calls = []

    def factory(dim, heads, name):
        calls.append((dim, heads, name))
        return _BNBlock(dim, heads, name=name)

    unet = L.SpectralUNet(4, levels=2, num_blocks=(1, 2, 1), block=factory)
    x = jnp.asarray(RNG.normal(size=(2, 8, 8, 4)), jnp.float32)
    v = jax.jit(functools.partial(unet.init, train=False))(jax.random.PRNGKey(0), x)
    dims = {name: (d, h) for d, h, name in calls}
    assert dims["encoder_0_block_0"] == (4, 1)
    assert dims["encoder_1_block_1"] == (8, 2)
    assert dims["bottleneck_block_0"] == (16, 4)
    assert dims["decoder_1_block_1"] == (8, 2)
    assert "batch_stats" in v
    y, upd = apply(unet, v, x, train=True, mutable=["batch_stats"])
    assert y.shape == x.shape
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"],
                                     upd["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))            # train=True reached every BN


def test_unet_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        init(L.SpectralUNet(4, levels=2, num_blocks=(1, 1)), jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="multiples of 4"):
        init(L.SpectralUNet(4), jnp.zeros((1, 6, 8, 4)))


# ----------------------------------------------------------------------------------------------
# Padding and FLOPs
# ----------------------------------------------------------------------------------------------
def test_pad_to_multiple_reflect_and_crop():
    x = RNG.normal(size=(1, 5, 7, 2)).astype(np.float32)
    y = L.pad_to_multiple(x, 4)
    assert y.shape == (1, 8, 8, 2)
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 3), (0, 1), (0, 0)), mode="reflect"))
    np.testing.assert_array_equal(y[0, 5, :7], x[0, 3])        # torch 'reflect': edge not repeated
    np.testing.assert_array_equal(L.crop_to(y, (5, 7)), x)
    assert L.pad_to_multiple(jnp.asarray(y), 8) is not None
    with pytest.raises(ValueError, match="smaller than the image"):
        L.pad_to_multiple(jnp.zeros((1, 2, 2, 1)), 8)
    with pytest.raises(ValueError, match="crop"):
        L.crop_to(x, (6, 7))


def test_count_flops_matmul():
    a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert count_flops(jnp.matmul, a, b) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_bordered_plane_and_plane_taps_are_a_zero_padded_3x3_correlation():
    """plane_taps(bordered_plane(x, i), k) is x[i] correlated with k ('SAME', zero padding),
    an index outside the stack gives a zero plane, and ``acc`` continues a sum."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 5, 6))         # (N, B, H, W)
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3))
    ref = jax.lax.conv_general_dilated(x[2][..., None], k[:, :, None, None], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))[..., 0]
    plane = jax.jit(L.bordered_plane)(x, jnp.int32(2))
    assert plane.shape == (2, 7, 8)
    np.testing.assert_array_equal(np.asarray(plane[:, 1:-1, 1:-1]), np.asarray(x[2]))
    np.testing.assert_array_equal(np.asarray(plane[:, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(L.plane_taps(plane, k)), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(L.plane_taps(plane, k, acc=ref)), 2 * np.asarray(ref),
                               atol=1e-5)
    for i in (-1, 4):
        np.testing.assert_array_equal(np.asarray(L.bordered_plane(x, i)), 0.0)
