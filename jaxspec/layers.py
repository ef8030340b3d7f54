"""Shared building blocks for the MST-style spectral transformers (MST++, ACC, CCNet).

Everything is NHWC, bands/channels last, float32. The blocks follow the PyTorch reference of
MST++ (Cai et al., CVPRW 2022, ``caiyuanhao1998/MST-plus-plus``) operation for operation, so
weights can be ported by transposing layouts only (see the per-module notes).

Contents
--------
* :func:`gelu` -- exact (erf) GELU, ``x * Phi(x)``; PyTorch's ``F.gelu`` default.
* :func:`pointwise` -- a 1x1 conv / linear map over channels as one 2-D matmul.
* :func:`depthwise_conv` / :class:`DepthwiseConv` -- per-channel 2-D cross-correlation with two
  interchangeable implementations (9 shifted multiply-adds on CPU, ``lax.conv_general_dilated``
  with ``feature_group_count=C`` elsewhere).
* :class:`Conv2d`, :class:`ConvTranspose2d`, :class:`Linear`, :class:`LayerNorm` -- thin layers
  with PyTorch's default initialisation / epsilon.
* :class:`SpectralMSA` -- spectral-wise multi-head self-attention (S-MSA).
* :class:`FeedForward` -- 1x1 -> GELU -> depthwise 3x3 -> GELU -> 1x1.
* :class:`MSAB` -- one MST block ``x = MSA(x) + x; x = FFN(LN(x)) + x``.
* :class:`SpectralUNet` -- the MST U-Net scaffold with a pluggable transformer block.
* :func:`pad_to_multiple`, :func:`crop_to` -- reflect padding to a stride multiple and back.

Initialisation (matches the PyTorch reference)
----------------------------------------------
* Convolutions (dense, depthwise, transposed) use PyTorch's default
  ``kaiming_uniform_(a=sqrt(5))``: ``U(-b, b)`` with ``b = gain * sqrt(3 / fan_in)``,
  ``gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)``, i.e. ``b = 1 / sqrt(fan_in)``
  (``fan_in = C_in / groups * kh * kw``; for ``ConvTranspose2d`` PyTorch's weight is
  ``(C_in, C_out, kh, kw)`` so its "fan_in" is ``C_out * kh * kw``). Conv biases are
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. See :func:`torch_kernel_init`, :func:`torch_bias_init`.
* ``nn.Linear`` layers use timm's ``trunc_normal_(std=0.02)`` (truncated at the *absolute*
  bounds +-2, i.e. +-100 sigma) and zero bias, as in ``MST._init_weights``.
  See :func:`trunc_normal_init`.
* LayerNorm: scale 1, bias 0, ``eps = 1e-5`` (PyTorch default; Flax's is 1e-6) and the two-pass
  variance (``use_fast_variance=False``), as PyTorch computes it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
Padding = Union[str, int, Sequence[tuple[int, int]]]
DEPTHWISE_IMPLS = ("auto", "shift", "lax")

__all__ = [
    "DEPTHWISE_IMPLS", "gelu", "pointwise", "l2_normalize", "resolve_depthwise_impl",
    "depthwise_conv", "conv2d",
    "torch_kernel_init", "torch_bias_init", "trunc_normal_init",
    "DepthwiseConv", "Conv2d", "ConvTranspose2d", "Linear", "LayerNorm",
    "spectral_attention", "SpectralMSA", "FeedForward", "MSAB", "mst_block", "SpectralUNet",
    "as_floating", "pad_to_multiple", "crop_to",
]


# ----------------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------------
def gelu(x: Array) -> Array:
    """Exact GELU: ``gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))``.

    PyTorch's ``nn.GELU()``/``F.gelu`` default; ``flax.linen.gelu`` defaults to the tanh
    approximation, which would silently change a ported model.

    Written with ``erf`` as PyTorch computes it, not ``jax.nn.gelu(approximate=False)``: that
    uses ``erfc``, which XLA:CPU expands into exp/divide branches over three materialised
    full-size temporaries; ``lax.erf`` is one rational polynomial that fuses with its
    neighbours (2.3x faster on the MST++ FFN's GELU -> depthwise conv -> GELU, same values
    to 1e-6).

    Custom JVP ``t -> gelu'(x) t`` with ``gelu'(x) = Phi(x) + x phi(x)``: reverse mode keeps
    one full-size residual per GELU (``gelu'(x)``) where autodiff of the formula keeps two
    (``Phi(x)`` and ``x phi(x)``) from the forward to the backward pass, on the widest maps of
    a train step (the 4C-wide FFN).
    """
    return _gelu(jnp.asarray(x))


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + lax.erf(x * np.asarray(_INV_SQRT2, x.dtype)))


@jax.custom_jvp
def _gelu(x: Array) -> Array:
    return x * _normal_cdf(x)


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = _normal_cdf(x)
    slope = cdf + x * (np.asarray(_INV_SQRT_2PI, x.dtype) * jnp.exp(-0.5 * x * x))
    return x * cdf, slope * t


def pointwise(x: Array, w: Array) -> Array:
    """``y[..., o] = sum_c x[..., c] w[c, o]``: a 1x1 convolution / linear layer over channels.

    Run as one 2-D matmul ``(N, C) @ (C, O)`` on the flattened pixels. Written as
    ``einsum("...c,co->...o")`` the same product differentiates into a weight-gradient dot
    whose operands XLA:CPU lays out transposed and runs off its fast matmul path: the
    31 -> 124 FFN projection's forward + backward at 4 x 128 x 128 took 64 ms that way and
    18 ms as a 2-D matmul (same values).
    """
    y = jnp.reshape(x, (-1, x.shape[-1])) @ w
    return y.reshape(x.shape[:-1] + (w.shape[-1],))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||_2, eps)`` along ``axis`` -- PyTorch ``F.normalize(x, p=2, dim=axis)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------------------------
# Initialisers (PyTorch defaults)
# ----------------------------------------------------------------------------------------------
def torch_kernel_init(in_axis: int = -2, out_axis: int = -1):
    """PyTorch's default conv/linear weight init ``kaiming_uniform_(a=sqrt(5))``.

    ``W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` = product of the receptive
    field and the ``in_axis`` size: ``variance_scaling(1/3, "fan_in", "uniform")``.
    For a Flax ``(kh, kw, in, out)`` conv kernel use the defaults; for a transposed conv whose
    PyTorch fan_in is ``C_out * kh * kw`` pass ``in_axis=-1, out_axis=-2``.

    The numbers are bitwise those of ``nn.initializers.variance_scaling(1/3, "fan_in",
    "uniform", in_axis, out_axis)``, but the uniform bits are drawn for the flattened shape and
    reshaped: XLA:CPU compiles the random-bit kernel of a 4-D shape ~5x slower than of a 1-D
    one, and a network's ``jit(init)`` compiles one per parameter (tests/test_ccnet.py checks
    the equality).
    """
    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        ndim = len(shape)
        in_ax, out_ax = in_axis % ndim, out_axis % ndim
        receptive = math.prod(d for i, d in enumerate(shape) if i not in (in_ax, out_ax))
        variance = jnp.array((1.0 / 3.0) / (shape[in_ax] * receptive), dtype=dtype)
        flat = jax.random.uniform(key, (math.prod(shape),), dtype, -1)
        return flat.reshape(shape) * jnp.sqrt(3 * variance)

    return init


def torch_bias_init(fan_in: int):
    """PyTorch's default conv bias init ``b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):   # flat draw, reshaped: see torch_kernel_init
        shape = tuple(int(d) for d in shape)
        return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

    return init


def trunc_normal_init(std: float = 0.02, a: float = -2.0, b: float = 2.0):
    """timm ``trunc_normal_(std, a, b)``: ``N(0, std^2)`` truncated to the absolute range [a, b].

    With the reference's ``std=0.02, a=-2, b=2`` the truncation sits at +-100 sigma, so the
    samples are (to float precision) plain ``N(0, 0.02^2)``; no variance correction is applied,
    unlike ``flax.linen.initializers.truncated_normal`` whose bounds are in units of sigma.
    """
    def init(key, shape, dtype=jnp.float32):   # flat draw, reshaped: see torch_kernel_init
        shape = tuple(int(d) for d in shape)
        flat = jax.random.truncated_normal(key, a / std, b / std, (math.prod(shape),),
                                           jnp.float32)
        return (flat.reshape(shape) * std).astype(dtype)

    return init


# ----------------------------------------------------------------------------------------------
# Depthwise convolution
# ----------------------------------------------------------------------------------------------
_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxspec_target_backend", default=None)


def target_backend() -> str:
    """The platform the program being traced will run on: ``jax.default_backend()``, unless
    :func:`compiling_for` says otherwise (ahead-of-time compilation for a TPU topology from a
    CPU process, where the default backend is the CPU). Layers with a CPU-specific form
    (the shifted depthwise conv, ACC's row-blocked attention) ask this, not the default."""
    return _TARGET_BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``) inside this block."""
    token = _TARGET_BACKEND.set(platform)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def resolve_depthwise_impl(impl: str = "auto") -> str:
    """``"auto"`` -> ``"shift"`` on the CPU backend, ``"lax"`` elsewhere (GPU/TPU).

    On XLA:CPU a grouped convolution is ~20x slower than the equivalent shifted
    multiply-adds (STYLE.md "Performance facts"); accelerators have native depthwise kernels.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shift" if target_backend() == "cpu" else "lax"
    return impl


def _dw_kernel_3d(kernel: Array, channels: int) -> Array:
    """Accept (kh, kw, C) or Flax grouped layout (kh, kw, 1, C); return (kh, kw, C)."""
    if kernel.ndim == 4:
        if kernel.shape[2] != 1:
            raise ValueError("a 4-D depthwise kernel must have the Flax grouped layout "
                             f"(kh, kw, 1, C); got shape {tuple(kernel.shape)}")
        kernel = kernel[:, :, 0, :]
    if kernel.ndim != 3:
        raise ValueError(f"depthwise kernel must be (kh, kw, C) or (kh, kw, 1, C); got shape "
                         f"{tuple(kernel.shape)}")
    if kernel.shape[-1] != channels:
        raise ValueError(f"depthwise kernel has {kernel.shape[-1]} channels but x has "
                         f"{channels}")
    return kernel


def _resolve_padding(padding: Padding, kh: int, kw: int, stride: int = 1,
                     in_hw: tuple[int, int] = (1, 1)) -> tuple[tuple[int, int], ...]:
    """Explicit ``((top, bottom), (left, right))``; ``"SAME"`` follows XLA's convention for
    ``stride``, which needs the input's ``in_hw`` when ``stride > 1``."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), "
                             f"(left, right)); got {padding!r}")
        return tuple(tuple(v) for v in lax.padtype_to_pads(in_hw, (kh, kw), (stride, stride), p))
    if isinstance(padding, (int, np.integer)):
        return ((int(padding),) * 2,) * 2
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 for p in pads) or min(min(p) for p in pads) < 0:
        raise ValueError(f"explicit padding must be ((top, bottom), (left, right)) of "
                         f"non-negative ints; got {padding!r}")
    return pads


def depthwise_conv(x: Array, kernel: Array, padding: Padding = "SAME",
                   impl: str = "auto") -> Array:
    """Depthwise (per-channel) 2-D cross-correlation, stride 1, zero padding.

    ``y[b, i, j, c] = sum_{u < kh, v < kw} x_pad[b, i + u, j + v, c] * k[u, v, c]``

    (no kernel flip: the same operation as PyTorch ``Conv2d(groups=C)`` and
    ``lax.conv_general_dilated``; a PyTorch weight ``(C, 1, kh, kw)`` maps to
    ``w.transpose(2, 3, 1, 0)``).

    Args:
      x: ``(..., H, W, C)`` with at least 3 dims (leading dims are batch dims).
      kernel: ``(kh, kw, C)`` or the Flax grouped layout ``(kh, kw, 1, C)``; any odd or even size.
      padding: ``"SAME"`` (XLA convention: extra pad at the bottom/right for even kernels),
        ``"VALID"``, an int, or explicit ``((top, bottom), (left, right))``.
      impl: ``"shift"`` -- ``kh*kw`` shifted multiply-adds on the padded array (fast on CPU);
        ``"lax"`` -- ``lax.conv_general_dilated(feature_group_count=C)`` (native on GPU/TPU);
        ``"auto"`` -- chosen by :func:`resolve_depthwise_impl`. Both give the same result to
        float32 rounding, with identical gradients.
    Returns:
      ``(..., H', W', C)`` with ``H' = H + top + bottom - kh + 1`` (``H`` for ``"SAME"``).
    """
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"x must be (..., H, W, C); got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    k = _dw_kernel_3d(jnp.asarray(kernel), channels)
    kh, kw = int(k.shape[0]), int(k.shape[1])
    (pt, pb), (pl, pr) = _resolve_padding(padding, kh, kw)
    h_out = x.shape[-3] + pt + pb - kh + 1
    w_out = x.shape[-2] + pl + pr - kw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"depthwise_conv: a {kh}x{kw} kernel with padding {padding!r} leaves "
                         f"no output for spatial size {tuple(x.shape[-3:-1])}")
    impl = resolve_depthwise_impl(impl)
    k = k.astype(x.dtype)
    lead = x.shape[:-3]
    if impl == "lax":
        x4 = x.reshape((-1,) + x.shape[-3:])
        y = lax.conv_general_dilated(
            x4, k[:, :, None, :], window_strides=(1, 1), padding=((pt, pb), (pl, pr)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
        return y.reshape(lead + y.shape[1:])
    return _dw_shift(x, k, ((pt, pb), (pl, pr)))


def _pad_hw(x: Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """Zero-pad (negative: crop) the H and W axes of ``(..., H, W, C)``."""
    if not any(v for p in pads for v in p):
        return x
    cfg = [(0, 0, 0)] * (x.ndim - 3) + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    return lax.pad(x, np.asarray(0, x.dtype), cfg)


def _shift_correlate(xp: Array, k: Array, h_out: int, w_out: int) -> Array:
    """``sum_{u,v} xp[..., u:u+h_out, v:v+w_out, :] * k[u, v]`` (the shift-add kernel)."""
    y = None
    for u in range(k.shape[0]):
        for v in range(k.shape[1]):
            term = xp[..., u:u + h_out, v:v + w_out, :] * k[u, v]
            y = term if y is None else y + term
    return y


def bordered_plane(planes: Array, index) -> Array:
    """``planes[index]`` of a stack ``(N, ..., H, W)`` with a one-pixel zero border on ``H``
    and ``W``, all zeros when the (traced) ``index`` is outside ``[0, N)``: one dynamic slice.

    With :func:`plane_taps`, the pieces of the plane forms of CPU recurrences over bands or
    channels (``acc.acc_coupling_planes``, ``ccnet.nescm_planes``): load the next plane with
    this once per loop step and carry it, so that every 3x3 tap is a static slice of a loop
    value (a tap sliced from a dynamically sliced plane is indexed element by element by
    XLA:CPU, 5-15x slower; padding inside the tap sum is as slow)."""
    index = jnp.asarray(index, jnp.int32)
    n = planes.shape[0]
    inside = ((index >= 0) & (index < n)).astype(planes.dtype)
    plane = lax.dynamic_index_in_dim(planes, jnp.clip(index, 0, n - 1), 0, keepdims=False)
    return jnp.pad(plane * inside, [(0, 0)] * (plane.ndim - 2) + [(1, 1), (1, 1)])


def plane_taps(src: Array, k: Array, acc: Array | None = None) -> Array:
    """``acc + sum_{u,v} src[..., u:u+H, v:v+W] * k[u, v]``: the zero-padded 'SAME' 3x3
    cross-correlation of a plane stored with its one-pixel zero border (``src`` of shape
    ``(..., H+2, W+2)``, ``k`` a (3, 3) kernel of scalars; ``acc`` None starts the sum). See
    :func:`bordered_plane`."""
    h, w = src.shape[-2] - 2, src.shape[-1] - 2
    for u in range(3):
        for v in range(3):
            term = src[..., u:u + h, v:v + w] * k[u, v]
            acc = term if acc is None else acc + term
    return acc


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dw_shift(x: Array, k: Array, pads) -> Array:
    """Shift-add depthwise correlation with a custom JVP shaped for reverse mode.

    The op is bilinear, ``y = x (*) k``, so its JVP is ``tx (*) k + x (*) tk``. Autodiff of
    the shift-adds keeps every shifted slice of the padded ``x`` (``kh*kw`` full-size
    residuals, 9x the input for a 3x3 kernel) from the forward to the backward pass, where
    the kernel gradient reads them (and XLA merges them with the forward's own slices). Here
    the second term slices the products ``(xp * tk[u, v])[slice_uv]`` rather than ``xp``,
    so reverse mode keeps the padded ``x`` alone, and the kernel gradient (its transpose)
    multiplies ``xp`` by the padded output gradient. MST++'s train step at 4 x 128 x 128,
    with GELU's custom JVP: 6.8 -> 3.5 GiB of XLA temporaries. Symbolic-zero tangents are skipped (``jacfwd`` over
    the input alone never runs the kernel term). Same values as autodiff to float rounding.
    """
    (pt, pb), (pl, pr) = pads
    kh, kw = k.shape[0], k.shape[1]
    h_out = x.shape[-3] + pt + pb - kh + 1
    w_out = x.shape[-2] + pl + pr - kw + 1
    return _shift_correlate(_pad_hw(x, pads), k, h_out, w_out)


def _dw_shift_jvp(pads, primals, tangents):
    (x, k), (tx, tk) = primals, tangents
    y = _dw_shift(x, k, pads)
    h_out, w_out = y.shape[-3], y.shape[-2]
    t = None
    if not isinstance(tx, SymbolicZero):
        t = _shift_correlate(_pad_hw(tx, pads), k, h_out, w_out)
    if not isinstance(tk, SymbolicZero):
        # slice the products, not xp: slices of xp would be kept as residuals
        xp = _pad_hw(x, pads)
        for u in range(k.shape[0]):
            for v in range(k.shape[1]):
                term = (xp * tk[u, v])[..., u:u + h_out, v:v + w_out, :]
                t = term if t is None else t + term
    if t is None:
        t = jnp.zeros_like(y)
    return y, t


_dw_shift.defjvp(_dw_shift_jvp, symbolic_zeros=True)


def conv2d(x: Array, kernel: Array, strides: int = 1, padding: Padding = "SAME",
           impl: str = "auto") -> Array:
    """Dense 2-D cross-correlation, NHWC input, HWIO ``kernel``, zero padding: exactly
    ``lax.conv_general_dilated(x, kernel, (s, s), padding, ("NHWC", "HWIO", "NHWC"))``.

    ``padding``: ``"SAME"`` / ``"VALID"`` (XLA's conventions for the stride), an int, or
    ``((top, bottom), (left, right))``. ``impl`` as :func:`resolve_depthwise_impl`: ``"lax"``
    runs the convolution as it is (accelerators); ``"shift"`` (the CPU choice) computes the
    same forward with it but differentiates through :func:`_conv_taps`' custom JVP, whose
    kernel term XLA:CPU turns into one 2-D matmul per tap in reverse mode instead of a
    convolution with an image-sized window (3x3, 31 -> 31 at 20 x 128 x 128: kernel gradient
    ~360 -> ~160 ms). Same values; gradients equal to float32 rounding (tests).
    """
    x = jnp.asarray(x)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv2d: x must be (B, H, W, C) and kernel (kh, kw, C, O) with the "
                         f"same C; got {tuple(x.shape)} and {tuple(kernel.shape)}")
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    s = int(strides)
    pads = _resolve_padding(padding, kh, kw, s, x.shape[1:3])
    dtype = jnp.result_type(x.dtype, kernel.dtype)        # e.g. an int image: float32
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if resolve_depthwise_impl(impl) == "lax":
        return _lax_conv(x, kernel, s, pads)
    return _conv_taps(x, kernel, s, pads)


def _lax_conv(x: Array, k: Array, s: int, pads) -> Array:
    return lax.conv_general_dilated(x, k, (s, s), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_taps(x: Array, k: Array, s: int, pads) -> Array:
    """:func:`conv2d` on the CPU: the forward is the convolution; the JVP is
    ``conv(tx, k) + x (*) tk`` (with a stride, ``conv(tx, k)`` is taken after a space-to-depth,
    :func:`_space_to_depth_conv`) and the kernel term written per tap on the padded input,
    ``sum_{u,v} (xp @ tk[u, v])[slice_uv]``, after a space-to-depth by the stride (so a
    ``4x4`` stride-2 kernel becomes a ``2x2`` stride-1 kernel over ``4C`` channels, no
    wasted products). Reverse mode transposes it into one ``(C, O)`` matmul per tap,
    ``xp^T @ shift(dy)``, and keeps the padded input (not its shifted copies) as residual.
    XLA:CPU's own transpose of the kernel term is a convolution whose window is the whole
    image, run ~2x slower. ``jacfwd`` runs the same JVP (tangent kernels per tap)."""
    return _lax_conv(x, k, s, pads)


def _space_to_depth_taps(x: Array, k: Array, s: int, pads):
    """Pad ``x`` and fold the stride into channels: returns ``(xs, ks, h_out, w_out)`` with
    ``conv(x, k, s, pads) == conv(xs, ks, 1, VALID)[:, :h_out, :w_out]``."""
    kh, kw, c, o = k.shape
    (pt, pb), (pl, pr) = pads
    hp, wp = x.shape[1] + pt + pb, x.shape[2] + pl + pr
    h_out, w_out = (hp - kh) // s + 1, (wp - kw) // s + 1
    th, tw = -(-kh // s), -(-kw // s)                      # taps after space-to-depth
    hq, wq = (h_out + th - 1) * s, (w_out + tw - 1) * s    # rows / cols the taps read
    xp = _pad_hw(x, ((pt, hq - x.shape[1] - pt), (pl, wq - x.shape[2] - pl)))
    if s == 1:
        return xp, k, h_out, w_out
    b = x.shape[0]
    xs = xp.reshape(b, hq // s, s, wq // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    xs = xs.reshape(b, hq // s, wq // s, s * s * c)
    kp = jnp.pad(k, ((0, th * s - kh), (0, tw * s - kw), (0, 0), (0, 0)))
    ks = kp.reshape(th, s, tw, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(th, tw, s * s * c, o)
    return xs, ks, h_out, w_out


def _space_to_depth_conv(x: Array, k: Array, s: int, pads) -> Array:
    """``conv(x, k, s, pads)`` as a stride-1 VALID convolution of the space-to-depth input.
    Its transpose (the input gradient) is a stride-1 convolution and a depth-to-space, where
    that of the strided convolution is one over an input dilated by ``s``, which XLA:CPU runs
    slowly (MST++'s 4x4 stride-2 down-sampling: the largest thunks of its train step profile
    before, bench/RESULTS.md)."""
    xs, ks, h_out, w_out = _space_to_depth_taps(x, k, s, pads)
    y = _lax_conv_oi(xs, ks, ((0, 0), (0, 0)))
    return y[:, :h_out, :w_out, :]


def _lax_conv_oi(x: Array, k: Array, pads) -> Array:
    """Stride-1 ``_lax_conv(x, k, 1, pads)`` with the kernel handed over as HWOI. The same
    value; JAX transposes it (the input gradient) into a convolution whose kernel is HWIO,
    the layout XLA:CPU's YNNPACK convolution takes also inside a loop body; the transpose of
    the HWIO form is an HWOI (``01oi``) convolution that XLA:CPU runs with its slow generic
    convolution there (scan / while bodies; at the top level it copies the kernel first)."""
    return lax.conv_general_dilated(x, jnp.swapaxes(k, 2, 3), (1, 1), pads,
                                    dimension_numbers=("NHWC", "HWOI", "NHWC"))


def _conv_taps_jvp(s, pads, primals, tangents):
    (x, k), (tx, tk) = primals, tangents
    y = _conv_taps(x, k, s, pads)
    t = None
    if not isinstance(tx, SymbolicZero):
        t = _lax_conv_oi(tx, k, pads) if s == 1 else _space_to_depth_conv(tx, k, s, pads)
    if not isinstance(tk, SymbolicZero):
        xs, ks, h_out, w_out = _space_to_depth_taps(x, tk, s, pads)
        flat = xs.reshape(-1, xs.shape[-1])          # one residual, shared by the taps
        for u in range(ks.shape[0]):
            for v in range(ks.shape[1]):
                # slice the products, not xs: slices of xs would be kept as residuals
                prod = (flat @ ks[u, v]).reshape(xs.shape[:-1] + (ks.shape[-1],))
                term = prod[:, u:u + h_out, v:v + w_out, :]
                t = term if t is None else t + term
    if t is None:
        t = jnp.zeros_like(y)
    return y, t


_conv_taps.defjvp(_conv_taps_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Layers with PyTorch semantics
# ----------------------------------------------------------------------------------------------
class DepthwiseConv(nn.Module):
    """Depthwise conv layer (channel multiplier 1), stride 1.

    Parameters: ``kernel`` of shape ``(kh, kw, 1, features)`` -- the layout of
    ``nn.Conv(feature_group_count=features)`` -- and optional ``bias`` ``(features,)``; the
    layout does not depend on ``impl``, so checkpoints move freely between CPU and GPU.
    PyTorch ``Conv2d(C, C, k, groups=C)`` weight ``(C, 1, kh, kw)`` -> ``transpose(2, 3, 1, 0)``.
    """
    features: int
    kernel_size: tuple[int, int] = (3, 3)
    use_bias: bool = False
    padding: Padding = "SAME"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.features:
            raise ValueError(f"DepthwiseConv({self.features}) got input with {x.shape[-1]} "
                             "channels")
        kh, kw = self.kernel_size
        kernel = self.param("kernel", torch_kernel_init(), (kh, kw, 1, self.features))
        y = depthwise_conv(x, kernel, self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(kh * kw), (self.features,))
        return y


class Conv2d(nn.Module):
    """Dense 2-D convolution with PyTorch default init (parameter names as ``nn.Conv``).

    ``kernel`` is ``(kh, kw, C_in, C_out)`` (PyTorch ``(C_out, C_in, kh, kw)`` ->
    ``transpose(2, 3, 1, 0)``). A 1x1 stride-1 conv runs as a matmul over channels, any
    other through :func:`conv2d` (``impl`` picks its form; the parameters do not depend on it).
    """
    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init(), (kh, kw, cin, self.features))
        if (kh, kw) == (1, 1) and self.strides == 1 and self.padding in ("SAME", "VALID", 0):
            y = pointwise(x, kernel[0, 0])
        else:
            y = conv2d(x, kernel, self.strides, self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(cin * kh * kw), (self.features,))
        return y


class ConvTranspose2d(nn.Module):
    """Transposed conv with ``kernel_size == stride`` and no padding (non-overlapping up-sampling).

    ``y[b, s*i + u, s*j + v, o] = sum_c x[b, i, j, c] * K[u, v, c, o] + bias[o]`` -- exactly
    PyTorch ``ConvTranspose2d(C_in, C_out, kernel_size=s, stride=s, padding=0)`` with
    ``K = W_torch.transpose(2, 3, 0, 1)`` (no spatial flip needed in this form). Init follows
    PyTorch, whose fan_in for this weight is ``C_out * s * s``.
    """
    features: int
    stride: int = 2
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = self.stride
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init(in_axis=-1, out_axis=-2),
                            (s, s, cin, self.features))
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwc,uvco->bhuwvo", x, kernel).reshape(b, h * s, w * s, self.features)
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(self.features * s * s), (self.features,))
        return y


class Linear(nn.Module):
    """``nn.Linear`` over the last axis with MST init (trunc-normal 0.02 weight, zero bias).

    ``kernel`` is ``(in, out)`` = PyTorch ``weight.T``.
    """
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", trunc_normal_init(0.02), (x.shape[-1], self.features))
        y = pointwise(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class LinearParams(nn.Module):
    """The parameters of a :class:`Linear` (same names, shapes, init and PRNG path), returned
    as ``(kernel, bias-or-None)`` for layers that use the weights in a folded product."""
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", trunc_normal_init(0.02), (in_features, self.features))
        bias = (self.param("bias", nn.initializers.zeros, (self.features,))
                if self.use_bias else None)
        return kernel, bias


class LayerNorm(nn.LayerNorm):
    """Channel LayerNorm with PyTorch semantics: ``eps = 1e-5`` and two-pass variance.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis.
    """
    epsilon: float = 1e-5
    use_fast_variance: bool = False


# ----------------------------------------------------------------------------------------------
# MST blocks
# ----------------------------------------------------------------------------------------------
def spectral_attention(q: Array, k: Array, v: Array, rescale: Array,
                       bias: Array | None = None) -> Array:
    """Spectral-wise (channels-as-tokens) attention core of MST/MST++ and CCNet's GrSCM.

    ``q, k, v``: ``(B, N, G, d)`` -- ``G`` independent attention units (heads, or groups x
    heads) of ``d`` channel tokens, each an ``N = H*W`` vector. Per unit ``g``::

        Q^, K^ = L2-normalise Q_g, K_g along N          (cosine similarity, eps 1e-12)
        A_g    = softmax_row(bias_g + rescale_g * K^ Q^^T)   (d x d; MST++'s K Q^T order)
        out_g  = A_g V_g

    ``rescale`` ``(G, 1, 1)`` (learnable sigma); ``bias`` ``(G, d, d)`` or ``None`` (CCNet's
    relative spectrum encoding, added to the logits). Returns ``(B, N, G, d)``.
    """
    q = l2_normalize(q, axis=1)
    k = l2_normalize(k, axis=1)
    attn = jnp.einsum("bnhi,bnhj->bhij", k, q) * rescale[None]      # K Q^T, (b, h, d, d)
    if bias is not None:
        attn = attn + bias[None]
    attn = jax.nn.softmax(attn, axis=-1)
    return jnp.einsum("bhij,bnhj->bnhi", attn, v)


class SpectralMSA(nn.Module):
    """Spectral-wise multi-head self-attention (S-MSA, MST / MST++ ``MS_MSA``).

    Channels are the tokens, the spatial map is the feature, so the cost is linear in
    ``N = H*W``. For input ``X`` (N x C), head ``h`` with channel slice ``d`` (einops
    ``(h d)`` order):

    * ``Q = X W_q``, ``K = X W_k``, ``V = X W_v`` (Linear, no bias), split into heads;
      each head's ``Q_h, K_h, V_h`` seen as ``d x N``;
    * ``Q_h, K_h`` L2-normalised along ``N`` (eps 1e-12);
    * ``A_h = softmax_row(sigma_h * K_h Q_h^T)`` (``d x d``; learnable ``sigma_h`` = ``rescale``,
      init 1, no ``1/sqrt(d)``) -- note the **K Q^T** order of the reference (MST issue #63);
    * ``O = concat_h(A_h V_h)^T W_p + b_p`` (``proj``, with bias);
    * output ``O + pos_emb(V)`` with ``pos_emb = dw3x3 -> GELU -> dw3x3`` (no biases) applied to
      the pre-split ``V`` as an image.

    Parameters: ``to_q/to_k/to_v/proj`` (:class:`Linear`), ``rescale`` ``(heads, 1, 1)``,
    ``pos_emb_0``/``pos_emb_1`` (:class:`DepthwiseConv`). ``heads * dim_head`` must equal ``dim``.
    """
    dim: int
    heads: int = 1
    dim_head: int | None = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        if c != self.dim:
            raise ValueError(f"SpectralMSA(dim={self.dim}) got input with {c} channels")
        dh = self.dim_head if self.dim_head is not None else self.dim // self.heads
        if dh * self.heads != self.dim:
            raise ValueError(f"SpectralMSA: heads*dim_head = {self.heads}*{dh} must equal dim="
                             f"{self.dim} (the positional branch reuses V as a dim-channel "
                             "image)")
        # Same function as the reference, evaluated by associativity (MST++ spends 2/3 of its
        # attention time on N-sized tensors otherwise): with X (N x C) and the Gram matrix
        # G = X^T X (C x C, one pass over the pixels),
        #   K_h Q_h^T = W_k,h^T G W_q,h   and   ||q_j||^2 = (W_q^T G W_q)_jj  (same for k),
        # so Q and K are never formed and the L2 normalisation divides the d x d logits; and
        #   proj(concat_h A_h V_h) = V M + b_p  with  M[h*d + j, o] = sum_i A_h[i, j] W_p[h*d + i, o],
        # so A V and the projection are one N x C x C matmul. Outputs equal the literal
        # formulation to float rounding (tests/test_layers.py checks a NumPy transcription of
        # the PyTorch forward).
        wq = LinearParams(dh * self.heads, use_bias=False, name="to_q")(c)[0]
        wk = LinearParams(dh * self.heads, use_bias=False, name="to_k")(c)[0]
        v_inp = Linear(dh * self.heads, use_bias=False, name="to_v")(x)
        rescale = self.param("rescale", nn.initializers.ones, (self.heads, 1, 1))
        wp, bp = LinearParams(self.dim, use_bias=True, name="proj")(dh * self.heads)

        xf = x.reshape(b, h * w, c)
        gram_x = jnp.einsum("bnc,bne->bce", xf, xf)                       # X^T X
        wq_h = wq.reshape(c, self.heads, dh)
        wk_h = wk.reshape(c, self.heads, dh)
        gq = jnp.einsum("bce,ehj->bchj", gram_x, wq_h)                    # G W_q
        gk = jnp.einsum("bce,ehi->bchi", gram_x, wk_h)                    # G W_k
        logits = jnp.einsum("chi,bchj->bhij", wk_h, gq)                   # K_h Q_h^T
        q_norm = jnp.sqrt(jnp.maximum(jnp.einsum("chj,bchj->bhj", wq_h, gq), 0.0))
        k_norm = jnp.sqrt(jnp.maximum(jnp.einsum("chi,bchi->bhi", wk_h, gk), 0.0))
        logits = logits / (jnp.maximum(k_norm, 1e-12)[..., :, None]
                           * jnp.maximum(q_norm, 1e-12)[..., None, :])
        attn = jax.nn.softmax(logits * rescale[None], axis=-1)            # (b, h, d, d)
        mix = jnp.einsum("bhij,hio->bhjo", attn, wp.reshape(self.heads, dh, self.dim))
        out_c = jnp.einsum("bnc,bco->bno", v_inp.reshape(b, h * w, c),
                           mix.reshape(b, self.heads * dh, self.dim)) + bp
        out_c = out_c.reshape(b, h, w, self.dim)
        p = DepthwiseConv(self.dim, (3, 3), use_bias=False, impl=self.impl,
                          name="pos_emb_0")(v_inp)
        p = DepthwiseConv(self.dim, (3, 3), use_bias=False, impl=self.impl,
                          name="pos_emb_1")(gelu(p))
        return out_c + p


class FeedForward(nn.Module):
    """MST feed-forward: ``1x1 (C->mC) -> GELU -> dw3x3 (mC) -> GELU -> 1x1 (mC->C)``, no biases."""
    dim: int
    mult: int = 4
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = self.dim * self.mult
        y = gelu(Conv2d(hidden, (1, 1), name="conv_0")(x))
        y = gelu(DepthwiseConv(hidden, (3, 3), use_bias=False, impl=self.impl,
                               name="dwconv")(y))
        return Conv2d(self.dim, (1, 1), name="conv_1")(y)


class MSAB(nn.Module):
    """One MST transformer block: ``x = S-MSA(x) + x; x = FFN(LN(x)) + x``.

    There is deliberately no LayerNorm before the attention (the L2 normalisation of Q and K
    plays that role; MST issue #28). ``12 C^2 + 57 C + heads`` parameters.
    ``train`` is accepted for the block protocol of :class:`SpectralUNet` and unused.
    """
    dim: int
    heads: int = 1
    dim_head: int | None = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        x = SpectralMSA(self.dim, self.heads, self.dim_head, impl=self.impl, name="msa")(x) + x
        y = LayerNorm(name="norm")(x)
        return FeedForward(self.dim, impl=self.impl, name="ffn")(y) + x


def mst_block(dim: int, heads: int, name: str | None = None, *, impl: str = "auto") -> MSAB:
    """Default :class:`SpectralUNet` block factory: an :class:`MSAB` with head dim ``dim // heads``."""
    return MSAB(dim=dim, heads=heads, impl=impl, name=name)


BlockFactory = Callable[..., nn.Module]   # block(dim, heads, name=...) -> module(x, train)


class SpectralUNet(nn.Module):
    """MST U-Net scaffold (the ``MST`` class of MST++; one "SST" stage).

    ``x -> embedding (3x3, no bias)``; encoder level ``l`` (``dim_l = dim * 2^l``,
    ``heads_l = dim_l // head_dim``): ``num_blocks[l]`` blocks, keep the skip, down-sample with a
    4x4 stride-2 pad-1 conv (no bias) to ``2 dim_l``; bottleneck: ``num_blocks[levels]`` blocks
    at ``dim * 2^levels``; decoder level ``l = levels-1 .. 0``: ConvTranspose k2 s2 (bias) to
    ``dim_l``, concat the skip, 1x1 fuse (no bias) ``2 dim_l -> dim_l``, ``num_blocks[l]`` blocks;
    ``mapping`` (3x3, no bias) to ``out_features``; plus the input if ``residual``.

    ``block`` is a factory ``block(dim, heads, name=...)`` returning a module applied as
    ``x = module(x, train)``; ``None`` uses :class:`MSAB` (MST++). ``train`` is passed through so
    blocks with BatchNorm/dropout work. ``H`` and ``W`` must be multiples of ``2**levels``
    (see :func:`pad_to_multiple`).

    Parameter names: ``embedding``, ``encoder_{l}_block_{k}``, ``down_{l}``,
    ``bottleneck_block_{k}``, ``up_{l}``, ``fuse_{l}``, ``decoder_{l}_block_{k}``, ``mapping``.
    """
    dim: int
    levels: int = 2
    num_blocks: Sequence[int] = (1, 1, 1)
    block: BlockFactory | None = None
    head_dim: int | None = None          # default: dim (MST: heads = dim_l // dim)
    out_features: int | None = None      # default: dim
    residual: bool = True
    impl: str = "auto"                   # depthwise impl of the default block

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.num_blocks) != self.levels + 1:
            raise ValueError(f"num_blocks needs levels+1 = {self.levels + 1} entries (encoder "
                             f"levels + bottleneck); got {tuple(self.num_blocks)}")
        if x.ndim != 4:
            raise ValueError(f"SpectralUNet expects (B, H, W, C); got shape {tuple(x.shape)}")
        m = 2 ** self.levels
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"SpectralUNet with {self.levels} levels needs H, W multiples of "
                             f"{m}; got {x.shape[1]}x{x.shape[2]} (use pad_to_multiple)")
        block = self.block or functools.partial(mst_block, impl=self.impl)
        head_dim = self.head_dim or self.dim
        out_features = self.out_features or self.dim
        if self.residual and out_features != x.shape[-1]:
            raise ValueError(f"residual SpectralUNet needs out_features ({out_features}) == "
                             f"input channels ({x.shape[-1]})")

        def blocks(fea, d, n, prefix):
            heads = max(d // head_dim, 1)
            for k in range(n):
                fea = block(d, heads, name=f"{prefix}_block_{k}")(fea, train)
            return fea

        fea = Conv2d(self.dim, (3, 3), name="embedding")(x)
        skips = []
        d = self.dim
        for lvl in range(self.levels):
            fea = blocks(fea, d, self.num_blocks[lvl], f"encoder_{lvl}")
            skips.append(fea)
            fea = Conv2d(2 * d, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                         name=f"down_{lvl}")(fea)
            d *= 2
        fea = blocks(fea, d, self.num_blocks[self.levels], "bottleneck")
        for lvl in reversed(range(self.levels)):
            d //= 2
            fea = ConvTranspose2d(d, stride=2, use_bias=True, name=f"up_{lvl}")(fea)
            fea = jnp.concatenate([fea, skips[lvl]], axis=-1)
            fea = Conv2d(d, (1, 1), name=f"fuse_{lvl}")(fea)
            fea = blocks(fea, d, self.num_blocks[lvl], f"decoder_{lvl}")
        out = Conv2d(out_features, (3, 3), name="mapping")(fea)
        return out + x if self.residual else out


# ----------------------------------------------------------------------------------------------
# Model inputs: dtype, padding to a stride multiple
# ----------------------------------------------------------------------------------------------
def as_floating(x) -> Array:
    """A model input as float32 (uint8 images, float16/64 arrays, ...), except that bfloat16
    stays bfloat16: the mixed-precision train step (``compute_dtype="bfloat16"``) casts the
    parameters and the RGB batch to bf16, and the model must then compute in bf16 too."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


def pad_to_multiple(x: Array, multiple: int, mode: str = "reflect") -> Array:
    """Pad the bottom and right of ``(B, H, W, C)`` so ``H`` and ``W`` are multiples of ``multiple``.

    ``pad = (multiple - size % multiple) % multiple`` per axis; ``mode="reflect"`` matches
    PyTorch ``F.pad(mode='reflect')`` (edge not repeated). Undo with :func:`crop_to`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if x.ndim != 4:
        raise ValueError(f"pad_to_multiple expects (B, H, W, C); got shape {tuple(x.shape)}")
    h, w = x.shape[1], x.shape[2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        raise ValueError(f"reflect padding of {h}x{w} to a multiple of {multiple} needs pads "
                         f"({ph}, {pw}) smaller than the image; use a larger input")
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def crop_to(x: Array, size: tuple[int, int]) -> Array:
    """Crop ``(B, H, W, C)`` back to its top-left ``size = (h, w)``."""
    h, w = size
    if h > x.shape[1] or w > x.shape[2]:
        raise ValueError(f"cannot crop {x.shape[1]}x{x.shape[2]} to larger {h}x{w}")
    return x[:, :h, :w, :]
