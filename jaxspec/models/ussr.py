"""USSR: semantic-embedded unsupervised spectral reconstruction (Zhu et al., ICCV 2021).

"Semantic-embedded Unsupervised Spectral Reconstruction from Single RGB Images in the Wild".
Authors' code: ``zbzhzhy/Unsupervised-Spectral-Reconstruction`` (``Training_model/lib/models``:
``rgb2hsi.py`` reconnet, ``SPFNet.py``, ``Discriminator.py``, ``seg_hrnet.py`` Network/GradNorm).
``shared/specs/methods.md`` §4 describes that code; this module follows it layer for layer, and
``docs/methods/ussr.md`` maps every parameter to the authors' name and shape.

The method trains **without paired RGB/HSI**: an RGB photo ``X`` (B, H, W, 3) and an unrelated
real cube ``Y_r`` (B, H, W, 31) per iteration.

* ``hsiG`` (:class:`Generator`, reconnet, 170,996 params): T = 4 stages of identical layout,
  each ``Upconv`` 3x3 3->31 then five densely connected layers (1x1 conv [+ReLU], depthwise
  3x3 [+ReLU]); stage 0 sees ``X``, stage t >= 1 sees the back-projection error
  ``X - C_o Y^(t)``; ``Y^(t+1) = Y^(t) + G_t(.)``; output ``LeakyReLU_0.001(Y^(T))`` and the
  final residual ``r = X - C_o Y^(T)``. Stages 1-3 subtract the per-pixel channel mean before
  every conv of layers 1-4 (the code's ``BN=True``). All convs are bias-free.
* ``respG`` (:class:`SRFEstimator`, SPFNet, 130,620 params with the 28-camera dictionary):
  dense CNN -> ``W`` (B, N, 3) -> ``C_o(i) = amp_i * sum_j softmax_j(W)_ji C_j(i)`` with
  ``amp = mean_j sigmoid(W) / mean_{i,j} sigmoid(W)`` (paper Eq. 5-6, :func:`combine_srf`).
* ``dishsi`` (:class:`Discriminator`, 630,531 params): dense net with real BatchNorm and
  Swish on ``Y / mean|Y|``; one logit per image.
* ``extractor`` (:class:`SemanticHead`, E2 + SE, 220,196 params) and ``E1``
  (:class:`RGBSegmenter`): the semantic branch. The authors' E1 is HRNet-W48 pretrained on
  PASCAL-Context (not available offline); E1 here is a small RGB segmenter trained on the
  material labels of ``spectral_scenes`` (:func:`fit_segmenter`) or loaded from a user ``.npz``
  (:func:`load_param_tree`). See docs/methods/ussr.md "Deviations".
* :func:`l1_gradient_clip`: identity forward, per-sample Frobenius rescale of the incoming
  gradient to at most ``1/sqrt(C H W)`` (times ``scale``) backward, as a ``jax.custom_vjp``.
* Losses (:class:`LossWeights`; code version by default, paper version by
  :meth:`LossWeights.paper`), unpaired baselines (:func:`min_norm_inverse`,
  :func:`smooth_inverse`), the paper's metrics (:func:`paper_metrics`) and SRF-estimation
  accuracy (:func:`srf_accuracy`).

Arrays are NHWC, bands last, float32. An SRF is ``(C, 3)`` (``rgb = hsi @ srf``) and a
per-image SRF batch ``(B, C, 3)``: the authors' ``resp`` (B, 3, C) transposed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspec import layers
from jaxspec import metrics as _metrics
from jaxspec import physics
from jaxspec.train import state as train_state

Array = jax.Array

__all__ = [
    "CAMSPEC_ENV", "SRFDictionary", "load_srf_dictionary", "combine_srf", "project_batch",
    "adaptive_pool", "resize_nearest", "resize_bilinear", "l1_gradient_clip",
    "l1_gradient_clip_reference", "BCR", "DenseLayer", "GeneratorStage", "Generator",
    "SRFEstimator", "Discriminator", "SemanticHead", "RGBSegmenter", "USSR",
    "random_dictionary_srf",
    "LossWeights", "discriminator_input", "shuffle_pixels", "bce_with_logits",
    "back_projection_loss", "smoothness_loss", "positivity_loss", "semantic_cross_entropy",
    "gradient_penalty", "generator_loss", "discriminator_loss", "min_norm_inverse",
    "smooth_inverse", "select_smooth_lambda", "psnr_per_band", "paper_metrics", "srf_accuracy",
    "authors_name", "param_table", "from_torch_state_dict", "to_torch_state_dict",
    "save_param_tree", "load_param_tree", "fit_segmenter",
    "PHASE_PARAMS", "make_phase_losses", "make_optimizers", "init_train_state", "make_train_step",
]

#: Environment variable naming the user's copy of Jiang et al. 2013 ``camspec_database.txt``.
CAMSPEC_ENV = "JAXSPEC_CAMSPEC_DATABASE"


# ============================================================================================
# SRF dictionary (paper §3.3; authors' ``resp.mat``, 28 x 3 x 33 truncated to 31 samples)
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class SRFDictionary:
    """``curves`` float32 (N, C, 3): camera j's SRF, each column normalised to sum 1 over
    wavelength (the authors' ``resp / resp.sum(dim=2)``); ``names`` the N camera names;
    ``source`` where it came from (a file path or ``"builtin"``)."""
    names: tuple[str, ...]
    curves: np.ndarray
    source: str

    @property
    def n_cameras(self) -> int:
        return len(self.names)


def _column_sum_normalise(srf: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(srf, np.float64)
    sums = s.sum(axis=0, keepdims=True)
    if not np.all(sums > 0):
        raise ValueError(f"SRF {name!r} has a channel that sums to {sums.min()} on this grid")
    return (s / sums).astype(np.float32)


@functools.lru_cache(maxsize=16)
def load_srf_dictionary(source: str = "auto",
                        wavelengths: tuple[float, ...] | None = None) -> SRFDictionary:
    """The SRF dictionary ``D_c`` of paper Eq. 5.

    ``source``:
      * a path to Jiang et al. (WACV 2013) ``camspec_database.txt`` -> its 28 cameras, read by
        :func:`jaxspec.physics.parse_camspec_database` (file order, which is fixed);
      * ``"builtin"`` -> the SRFs jaxspec ships (:func:`jaxspec.physics.list_srfs`, the 3-channel ones);
      * ``"auto"`` -> the file named by ``$JAXSPEC_CAMSPEC_DATABASE`` when set, else
        ``"builtin"`` with a ``UserWarning`` (the 28-camera database is CC BY-NC-SA and not
        shipped; the number of cameras sets the shape of SPFNet's last layer).

    Every camera-channel curve is resampled to ``wavelengths`` (default 400-700 / 10 nm, so the
    authors' truncation of 400-720 to the first 31 samples) and normalised to sum 1.
    """
    wl = physics.WAVELENGTHS_31 if wavelengths is None else np.asarray(wavelengths, np.float32)
    if source == "auto":
        env = os.environ.get(CAMSPEC_ENV)
        if env:
            source = env
        else:
            warnings.warn(
                f"USSR: no camera SRF database given (set ${CAMSPEC_ENV} or model.srf_dictionary "
                f"to Jiang et al. 2013 camspec_database.txt); falling back to the "
                f"RGB SRFs shipped with jaxspec (a subset of {physics.list_srfs()})",
                UserWarning, stacklevel=2)
            source = "builtin"
    if source == "builtin":   # the shipped RGB curves defined on this grid
        pairs = [(n, physics.get_srf(n, wavelengths=wl, normalize=None))
                 for n in physics.list_srfs()]
        pairs = [(n, c) for n, c in pairs if c.shape == (wl.size, 3)]
        names, curves = tuple(n for n, _ in pairs), [c for _, c in pairs]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"USSR SRF dictionary: no such file {str(path)!r} (expected "
                                    "Jiang et al. 2013 camspec_database.txt)")
        db = physics.parse_camspec_database(path, wavelengths=wl, normalize=None)
        names, curves = tuple(db), list(db.values())
    arr = np.stack([_column_sum_normalise(c, n) for n, c in zip(names, curves)])
    return SRFDictionary(names=names, curves=arr, source=str(source))


def combine_srf(w: Array, curves: Array) -> Array:
    r"""Estimated SRF from SPFNet's weights (paper Eq. 5-6; authors' ``SPFNet.forward``).

    ``w`` (B, N, 3) raw weights, ``curves`` (N, C, 3) dictionary. Per RGB channel i:

    .. math:: \hat C(i) = \sum_j \mathrm{softmax}_j(W_{\cdot i})_j\, C_j(i), \qquad
              C_o(i) = \frac{\frac1N\sum_j \sigma(W_{ji})}{\frac1{3N}\sum_{k,j}\sigma(W_{jk})}
              \hat C(i)

    (Eq. 6's sums over j cancel against the 1/3 mean: the code's mean/mean is identical).
    Returns (B, C, 3): a convex combination of the dictionary per channel, times the gray-world
    amplitude (mean 1 over the three channels).
    """
    amp = jnp.mean(jax.nn.sigmoid(w), axis=1)                      # (B, 3)
    amp = amp / jnp.mean(amp, axis=-1, keepdims=True)
    weights = jax.nn.softmax(w, axis=1)                            # over cameras
    srf = jnp.einsum("bjk,jck->bck", weights, curves.astype(w.dtype),
                     precision=jax.lax.Precision.HIGHEST)
    return srf * amp[:, None, :]


def random_dictionary_srf(key: Array, curves: Array, b: int) -> Array:
    """(b, C, 3) SRFs, each ``t C_j + (1 - t) C_k`` for two random dictionary cameras j, k and
    t ~ U(0, 1) (a camera of the dictionary's convex hull; columns still sum to 1)."""
    curves = jnp.asarray(curves, jnp.float32)
    kj, kk, kt = jax.random.split(key, 3)
    j = jax.random.randint(kj, (b,), 0, curves.shape[0])
    k = jax.random.randint(kk, (b,), 0, curves.shape[0])
    t = jax.random.uniform(kt, (b, 1, 1))
    return t * curves[j] + (1.0 - t) * curves[k]


def project_batch(hsi: Array, srf: Array) -> Array:
    """``rgb[b] = hsi[b] @ srf[b]``: (B, H, W, C) x (B, C, 3) -> (B, H, W, 3); ``srf`` may also
    be one (C, 3) SRF for the whole batch."""
    if srf.ndim == 2:
        return physics.project(hsi, srf)
    if srf.ndim != 3 or srf.shape[0] != hsi.shape[0] or srf.shape[1] != hsi.shape[-1]:
        raise ValueError(f"project_batch: srf must be (C, 3) or (B, C, 3) matching hsi "
                         f"{tuple(hsi.shape)}; got {tuple(srf.shape)}")
    return jnp.einsum("bhwc,bck->bhwk", hsi, srf.astype(hsi.dtype),
                      precision=jax.lax.Precision.HIGHEST)


# ============================================================================================
# Resampling helpers with PyTorch semantics
# ============================================================================================
def _adaptive_windows(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch adaptive pooling windows along one axis: ``[floor(i n/m), ceil((i+1) n/m))``.
    Returns (index (m, L) clipped into the window, mask (m, L))."""
    start = (np.arange(m) * n) // m
    end = -((-(np.arange(m) + 1) * n) // m)
    length = int((end - start).max())
    idx = start[:, None] + np.arange(length)[None, :]
    mask = idx < end[:, None]
    return np.minimum(idx, end[:, None] - 1), mask


def adaptive_pool(x: Array, size: tuple[int, int], op: str = "max") -> Array:
    """``nn.AdaptiveMaxPool2d`` / ``nn.AdaptiveAvgPool2d`` on (B, H, W, C) to ``size``."""
    if op not in ("max", "avg"):
        raise ValueError(f"adaptive_pool: op must be 'max' or 'avg', got {op!r}")
    b, h, w, c = x.shape
    oh, ow = size
    if oh < 1 or ow < 1:
        raise ValueError(f"adaptive_pool: output size {size} of a {h}x{w} map must be >= 1")
    if h % oh == 0 and w % ow == 0:          # regular windows: a reshape
        r = x.reshape(b, oh, h // oh, ow, w // ow, c)
        return r.max(axis=(2, 4)) if op == "max" else r.mean(axis=(2, 4))
    ih, mh = _adaptive_windows(h, oh)
    iw, mw = _adaptive_windows(w, ow)
    g = x[:, ih][:, :, :, iw]                                      # (B, oh, Lh, ow, Lw, C)
    mask = (mh[:, :, None, None] & mw[None, None, :, :])[None, ..., None]
    if op == "max":
        return jnp.where(mask, g, -jnp.inf).max(axis=(2, 4))
    return (g * mask).sum(axis=(2, 4)) / mask.sum(axis=(2, 4))


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """PyTorch ``F.interpolate(mode='nearest')``: source index ``floor(i * in / out)``
    (jax.image.resize uses half-pixel centres, which picks different pixels)."""
    h, w = x.shape[1], x.shape[2]
    oh, ow = size
    if (oh, ow) == (h, w):
        return x
    ih = np.minimum((np.arange(oh) * h) // oh, h - 1)
    iw = np.minimum((np.arange(ow) * w) // ow, w - 1)
    return x[:, ih][:, :, iw]


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` for up-sampling (the
    HRNet criterion's logit up-sampling); no anti-aliasing."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), "bilinear", antialias=False)


# ============================================================================================
# L1 gradient clipping (paper §3.4; authors' seg_hrnet.GradNorm)
# ============================================================================================
def _l1gc_rule(g: Array, scale: float) -> Array:
    axes = tuple(range(1, g.ndim))
    tau = 1.0 / math.sqrt(float(np.prod(g.shape[1:])))
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
    factor = jnp.where(norm > 0, jnp.minimum(1.0, tau / jnp.where(norm > 0, norm, 1.0)), 1.0)
    return (factor * scale).astype(g.dtype) * g


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def l1_gradient_clip(x: Array, scale: float = 1.0) -> Array:
    r"""Identity in the forward pass; backward rescales the cotangent per sample:

    .. math:: \bar g_b = s\cdot\min\Big(1, \frac{1/\sqrt{CHW}}{\|g_b\|_F}\Big)\, g_b

    with the Frobenius norm over all non-batch axes (C, H, W), ``s = scale`` (1 before the
    discriminator, 2 before the semantic branch). 1/sqrt(CHW) is the Frobenius norm of the
    gradient of a mean-L1 loss over the same sample (the paper's "L1" reference). A zero
    gradient stays zero.
    """
    return x


def _l1gc_fwd(x, scale):
    return x, None


def _l1gc_bwd(scale, _, g):
    return (_l1gc_rule(g, scale),)


l1_gradient_clip.defvjp(_l1gc_fwd, _l1gc_bwd)


def l1_gradient_clip_reference(g: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """numpy (float64) statement of the backward rule, for tests."""
    g = np.asarray(g, np.float64)
    tau = 1.0 / math.sqrt(float(np.prod(g.shape[1:])))
    out = np.empty_like(g)
    for b in range(g.shape[0]):
        n = math.sqrt(float((g[b] ** 2).sum()))
        f = 1.0 if n == 0 else min(1.0, tau / n)
        out[b] = scale * f * g[b]
    return out


# ============================================================================================
# Building blocks (authors' BCR and denselayer, one class for every network)
# ============================================================================================
def _swish(x):
    return x * jax.nn.sigmoid(x)


_ACTS = {None: None, "relu": jax.nn.relu, "swish": _swish}


class BCR(nn.Module):
    """One conv "unit" of the authors' code: ``[x - mean_c(x)] -> conv -> [BatchNorm] -> [act]``.

    ``depthwise`` selects a ``features``-group conv (``jaxspec.layers.depthwise_conv``: shift-add
    on CPU) instead of a dense one; ``stride`` 2 is the stride-1 'SAME' result sampled at even
    positions, identical to PyTorch ``stride=2, padding=(k-1)//2`` for odd k. Children are named
    ``conv`` and ``Bn`` as in the authors' modules.
    """
    features: int
    kernel: int = 1
    depthwise: bool = False
    stride: int = 1
    use_bias: bool = False
    mean_sub: bool = False
    batch_norm: bool = False
    act: str | None = None
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.mean_sub:
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        k = (self.kernel, self.kernel)
        if self.depthwise:
            x = layers.DepthwiseConv(self.features, k, use_bias=self.use_bias, impl=self.dw_impl,
                                     name="conv")(x)
        else:
            x = layers.Conv2d(self.features, k, use_bias=self.use_bias, name="conv")(x)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name="Bn")(x)
        act = _ACTS[self.act]
        return act(x) if act is not None else x


class DenseLayer(nn.Module):
    """Authors' ``denselayer``: ``compressLayer`` (1x1 dense conv) then ``actlayer`` (k x k
    depthwise conv, optional stride), both with the same unit options. ``act_layer=False``
    drops the depthwise conv (Discriminator ``act=False``); ``dropout`` > 0 applies per-pixel
    band dropout to the input first (the code's ``Dropout2d`` on a (BHW, C, 1, 1) view, which is
    element-wise dropout with 1/(1-p) scaling)."""
    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = False
    mean_sub: bool = False
    batch_norm: bool = False
    act: str | None = "relu"
    act_layer: bool = True
    dropout: float = 0.0
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        unit = functools.partial(BCR, self.features, use_bias=self.use_bias,
                                 mean_sub=self.mean_sub, batch_norm=self.batch_norm,
                                 act=self.act, dw_impl=self.dw_impl)
        x = unit(kernel=1, name="compressLayer")(x, train)
        if self.act_layer:
            x = unit(kernel=self.kernel, depthwise=True, stride=self.stride,
                     name="actlayer")(x, train)
        return x


def _dense_block(x: Array, make_layers: Sequence[Callable[[], nn.Module]], train: bool) -> Array:
    """Dense connectivity: layer k sees ``concat(x, out_1, ..., out_{k-1})``; returns the last
    layer's output (the authors' ``feature[-1]``)."""
    feats = [x]
    for layer in make_layers:
        feats.append(layer(jnp.concatenate(feats, axis=-1) if len(feats) > 1 else feats[0],
                           train))
    return feats[-1]


# ============================================================================================
# Generator (authors' rgb2hsi.reconnet)
# ============================================================================================
class GeneratorStage(nn.Module):
    """Authors' ``rgb2hsi.stage(cin=3, cout=31, linear=False, bias=False)``.

    ``Upconv`` 3x3 3 -> C (no bias, no activation), then ``denselayers_0..4`` on the dense
    concatenations (C, 3C, 5C, 7C, 9C channels in): layers 0-3 are 1x1 -> 2C + ReLU, depthwise
    3x3 + ReLU; layer 4 is 1x1 9C -> C and depthwise 3x3, no activation. ``mean_sub`` (the
    code's ``BN=True``, stages 1-3) subtracts the per-pixel channel mean before every conv of
    layers 0-3. Returns layer 4's output (no residual). 42,749 parameters for C = 31.
    """
    bands: int = 31
    mean_sub: bool = False
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = self.bands
        x = BCR(c, kernel=3, name="Upconv")(x)
        mk = [DenseLayer(2 * c, 3, mean_sub=self.mean_sub, act="relu", dw_impl=self.dw_impl,
                         name=f"denselayers_{i}") for i in range(4)]
        mk.append(DenseLayer(c, 3, act=None, dw_impl=self.dw_impl, name="denselayers_4"))
        return _dense_block(x, mk, train)


class Generator(nn.Module):
    """Authors' ``reconnet``: ``__call__(rgb, srf) -> (hsi, residual)``.

    ``rgb`` (B, H, W, 3), ``srf`` (B, C, 3) or (C, 3) -- the estimated ``C_o``. With
    ``Y^(0) = 0``: ``Y^(t+1) = Y^(t) + G_t(E_t)``, ``E_0 = X``, ``E_t = X - C_o Y^(t)`` (the
    code's sign; Eq. 3 has the opposite sign, which a learned stage absorbs).
    ``hsi = LeakyReLU(Y^(T), 0.001)``, ``residual = X - C_o Y^(T)`` (before the LeakyReLU,
    used by the back-projection loss).

    ``prior_lambda > 0`` (ours, not the authors'; default 0 = their reconnet): the recursion
    starts from the closed-form smooth inverse of the *estimated* SRF,
    ``Y^(0) = smooth_inverse(X, C_o, prior_lambda)``, and each
    stage's output is scaled by a learned scalar ``gate_t`` initialised at 0, so training starts
    at that classical solution and the stages learn a correction of it (stage 0 still sees X;
    no gradient flows to ``C_o`` through ``Y^(0)``).
    """
    bands: int = 31
    stages: int = 4
    dw_impl: str = "auto"
    prior_lambda: float = 0.0

    @nn.compact
    def __call__(self, rgb: Array, srf: Array, train: bool = False) -> tuple[Array, Array]:
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"Generator expects rgb of shape (B, H, W, 3); got {tuple(rgb.shape)}")
        if srf.shape[-2:] != (self.bands, 3):
            raise ValueError(f"Generator(bands={self.bands}) needs an SRF (..., {self.bands}, 3); "
                             f"got {tuple(srf.shape)}")
        if self.prior_lambda < 0:
            raise ValueError(f"Generator: prior_lambda must be >= 0, got {self.prior_lambda}")
        x0 = rgb
        inp, res = x0, None
        # no gradient to C_o through the start: its float32 solve is ill-conditioned at small
        # lambda, and C_o keeps the authors' signal (back-projection, adversarial)
        acc = (smooth_inverse(x0, jax.lax.stop_gradient(srf), self.prior_lambda)
               if self.prior_lambda > 0 else None)
        for t in range(self.stages):
            out = GeneratorStage(self.bands, mean_sub=t > 0, dw_impl=self.dw_impl,
                                 name=f"stages_{t}")(inp, train)
            if self.prior_lambda > 0:
                out = out * self.param(f"gate_{t}", nn.initializers.zeros, (), jnp.float32)
            acc = out if acc is None else acc + out
            res = x0 - project_batch(acc, srf)
            inp = res
        return jax.nn.leaky_relu(acc, 0.001), res


# ============================================================================================
# SRF estimator (authors' SPFNet)
# ============================================================================================
class _SPFStage(nn.Module):
    """Two dense layers (1x1 + ReLU, depthwise k x k + ReLU, biases) then adaptive max-pool to
    half size (the code pools to ``(H//2, H//2)``; we pool to ``(H//2, W//2)``, the same for
    the square inputs it is trained on)."""
    widths: tuple[int, int]
    kernel: int
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train=False):
        mk = [DenseLayer(wd, self.kernel, use_bias=True, act="relu", dw_impl=self.dw_impl,
                         name=f"conv_{i}") for i, wd in enumerate(self.widths)]
        y = _dense_block(x, mk, train)
        return adaptive_pool(y, (y.shape[1] // 2, y.shape[2] // 2), "max")


class _SPFHead(nn.Module):
    """Authors' ``Fstage``: dense layers 64 -> 128 (inputs 64, 192, 320; 3x3 depthwise, ReLU),
    ``final_conv`` (1x1 128 -> 3N, depthwise 3x3, no activation) on the last one, global mean."""
    out: int
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train=False):
        mk = [DenseLayer(128, 3, use_bias=True, act="relu", dw_impl=self.dw_impl,
                         name=f"conv_{i}") for i in range(3)]
        y = _dense_block(x, mk, train)
        y = DenseLayer(self.out, 3, use_bias=True, act=None, dw_impl=self.dw_impl,
                       name="final_conv")(y, train)
        return jnp.mean(y, axis=(1, 2))


class SRFEstimator(nn.Module):
    """Authors' ``SPFNet``: ``__call__(rgb) -> W`` of shape (B, n_cameras, 3).

    Stages (in -> [w1, w2], depthwise k, then /2 max-pool): (3 -> [16, 32], 5),
    (32 -> [64, 64], 5), (64 -> [64, 64], 3), (64 -> [64, 64], 3); head as :class:`_SPFHead`.
    The 3N outputs are read camera-major (``k = 3 j + i``) as the code's reshape (B, 28, 3).
    Needs H, W >= 16 (four halvings). 130,620 parameters for N = 28.
    """
    n_cameras: int = 28
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False) -> Array:
        if rgb.shape[1] < 16 or rgb.shape[2] < 16:
            raise ValueError(f"SRFEstimator halves the image four times and needs H, W >= 16; "
                             f"got {tuple(rgb.shape[1:3])}")
        x = rgb
        for i, (wd, k) in enumerate((((16, 32), 5), ((64, 64), 5), ((64, 64), 3),
                                     ((64, 64), 3))):
            x = _SPFStage(wd, k, dw_impl=self.dw_impl, name=f"stages_{i}")(x, train)
        w = _SPFHead(3 * self.n_cameras, dw_impl=self.dw_impl, name="fstage")(x, train)
        return w.reshape(w.shape[0], self.n_cameras, 3)


# ============================================================================================
# Discriminator (authors' Discriminator_HSI) and semantic head (Feature_extractor)
# ============================================================================================
def _d_layer(features, stride=1, name=None, dw_impl="auto"):
    """Discriminator ``denselayer``: 1x1 conv + BN + Swish, depthwise 3x3 (stride) + BN + Swish,
    biases on (PyTorch default)."""
    return DenseLayer(features, 3, stride=stride, use_bias=True, batch_norm=True, act="swish",
                      dw_impl=dw_impl, name=name)


class _DisStage(nn.Module):
    """Authors' ``Dis_stage``: ``downsample`` = two stride-2 layers (-> /4), ``denseconv`` = 7
    dense-connected layers of growth ``features``; returns last + down-sampled feature."""
    features: int
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train=False):
        d = _d_layer(self.features, 2, "downsample_0", self.dw_impl)(x, train)
        d = _d_layer(self.features, 2, "downsample_1", self.dw_impl)(d, train)
        mk = [_d_layer(self.features, 1, f"denseconv_{i}", self.dw_impl) for i in range(7)]
        return _dense_block(d, mk, train) + d


class Discriminator(nn.Module):
    """Authors' ``Discriminator_HSI``: ``stage1`` (C -> 64, /4), ``stage2`` (64 -> 128, /4),
    adaptive average pool to 2x2, channel-major flatten to 512 (the code's ``view(B, -1, 1, 1)``
    of an NCHW map), ``classifier_2`` = 1x1 conv 512 -> 1 and 1x1 "depthwise" conv 1 -> 1.
    Returns one **logit** per image (B,); the code's sigmoid is folded into
    :func:`bce_with_logits`. 630,531 parameters (+ BatchNorm statistics) for C = 31.
    """
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, hsi: Array, train: bool = False) -> Array:
        x = _DisStage(64, self.dw_impl, name="stage1")(hsi, train)
        x = _DisStage(128, self.dw_impl, name="stage2")(x, train)
        x = adaptive_pool(x, (2, 2), "avg")                            # (B, 2, 2, 128)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], 1, 1, -1)  # torch (c, i, j) order
        x = DenseLayer(1, 1, use_bias=True, act=None, dw_impl=self.dw_impl,
                       name="classifier_2")(x, train)
        return x.reshape(x.shape[0])


class SemanticHead(nn.Module):
    """Authors' ``Feature_extractor`` (E2 + SE) at the resolution of the E1 logits.

    ``__call__(e1_logits (B, h, w, M), hsi (B, h, w, C)) -> logits (B, h, w, M)``:
    E2 = per-pixel band dropout (p = ``band_dropout``, 0.2) then ``edenseconv_0..3`` (growth 64,
    BN + Swish, inputs C, C+64, C+128, C+192); SE = ``concat(e1, E2)`` then
    ``fianl_denseconv_0..3`` (growth 2M, inputs 64+M, 64+3M, 64+5M, 64+7M) and
    ``fianl_denseconv_4``: dropout 0.1 then a single 1x1 conv 64+9M -> M (names, including the
    code's spelling, kept for a one-to-one weight mapping). 220,196 parameters for C = 31,
    M = 59; the code's unused ``adenseconv`` and layer-4 ``actlayer`` are not created.
    """
    n_classes: int
    band_dropout: float = 0.2
    final_dropout: float = 0.1
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, e1_logits: Array, hsi: Array, train: bool = False) -> Array:
        m = self.n_classes
        if e1_logits.shape[-1] != m:
            raise ValueError(f"SemanticHead(n_classes={m}) got E1 logits with "
                             f"{e1_logits.shape[-1]} channels")
        if e1_logits.shape[:3] != hsi.shape[:3]:
            raise ValueError(f"SemanticHead: E1 logits {tuple(e1_logits.shape)} and HSI "
                             f"{tuple(hsi.shape)} must share (B, h, w)")
        y = nn.Dropout(self.band_dropout, deterministic=not train)(hsi)
        e2 = _dense_block(y, [_d_layer(64, 1, f"edenseconv_{i}", self.dw_impl)
                              for i in range(4)], train)
        x = jnp.concatenate([e1_logits, e2], axis=-1)
        mk = [_d_layer(2 * m, 1, f"fianl_denseconv_{i}", self.dw_impl) for i in range(4)]
        mk.append(DenseLayer(m, 3, use_bias=True, act=None, act_layer=False,
                             dropout=self.final_dropout, name="fianl_denseconv_4"))
        return _dense_block(x, mk, train)


class RGBSegmenter(nn.Module):
    """Our E1 (the authors' HRNet-W48 is not available offline): a small RGB segmenter with
    an HRNet-like stem (two 3x3 stride-2 convs + BN + ReLU -> 1/4 resolution, the resolution of
    HRNet's logits), ``blocks`` residual blocks of two 3x3 convs + BN at width ``width`` (the
    second pair dilated by 2 for context), and a 1x1 classifier -> ``n_classes`` logits.
    ``__call__(rgb) -> (B, ceil(H/4), ceil(W/4), n_classes)``.
    """
    n_classes: int
    width: int = 32
    blocks: int = 3

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False) -> Array:
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=layers.torch_kernel_init())
        x = rgb
        for i in range(2):
            x = jax.nn.relu(bn(name=f"bn{i + 1}")(
                conv(self.width, (3, 3), strides=2, padding=1, name=f"conv{i + 1}")(x)))
        for b in range(self.blocks):
            d = 1 + (b % 2)
            y = jax.nn.relu(bn(name=f"block{b}_bn1")(conv(
                self.width, (3, 3), padding=d, kernel_dilation=d, name=f"block{b}_conv1")(x)))
            y = bn(name=f"block{b}_bn2")(conv(self.width, (3, 3), padding=d, kernel_dilation=d,
                                              name=f"block{b}_conv2")(y))
            x = jax.nn.relu(x + y)
        return layers.Conv2d(self.n_classes, (1, 1), use_bias=True, name="last_layer")(x)


# ============================================================================================
# The whole method
# ============================================================================================
class USSR(nn.Module):
    """Generator ``hsiG`` + SRF estimator ``respG`` (used at test time) and the training-only
    ``dishsi`` (discriminator), ``extractor`` (E2 + SE) and ``E1`` (RGB segmenter).

    * ``__call__(rgb, train=False) -> hsi`` (B, H, W, bands): the registry contract.
    * ``reconstruct(rgb) -> dict(hsi, residual, srf, weights)``; ``srf`` (B, bands, 3) is the
      estimated camera SRF, ``weights`` (B, N, 3) SPFNet's raw output.
    * ``discriminate(hsi_normalised, train) -> logits (B,)``.
    * ``semantic(rgb, hsi, train) -> logits (B, h, w, n_classes)`` at E1's resolution; ``hsi``
      goes through :func:`l1_gradient_clip` with scale ``sem_clip_scale`` (2) *before* the
      nearest resize, as in the code.
    * ``init_all(rgb, hsi)``: creates every sub-network (use as ``init(..., method=...)``).

    ``srf_dictionary``: see :func:`load_srf_dictionary` (``"auto"`` | ``"builtin"`` | a path).
    ``loss`` / ``loss_overrides``: the training objective (:meth:`loss_weights`); not used by
    the forward pass.
    ``n_classes = 0`` removes the semantic branch (``E1``/``extractor`` are not created).
    """
    bands: int = 31
    stages: int = 4
    srf_dictionary: str = "auto"
    n_classes: int = 13
    segmenter_width: int = 32
    segmenter_blocks: int = 3
    sem_clip_scale: float = 2.0
    dw_impl: str = "auto"
    loss: str = "code"
    loss_overrides: tuple = ()
    prior_lambda: float = 0.0

    def setup(self):
        d = load_srf_dictionary(self.srf_dictionary)
        if d.curves.shape[1] != self.bands:
            raise ValueError(f"USSR(bands={self.bands}) but the SRF dictionary has "
                             f"{d.curves.shape[1]} samples")
        self._curves = d.curves
        self.hsiG = Generator(self.bands, self.stages, self.dw_impl, self.prior_lambda)
        self.respG = SRFEstimator(d.n_cameras, self.dw_impl)
        self.dishsi = Discriminator(self.dw_impl)
        if self.n_classes > 0:
            self.E1 = RGBSegmenter(self.n_classes, self.segmenter_width, self.segmenter_blocks)
            self.extractor = SemanticHead(self.n_classes, dw_impl=self.dw_impl)

    def reconstruct(self, rgb: Array, train: bool = False) -> dict[str, Array]:
        rgb = layers.as_floating(rgb)
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"USSR expects rgb of shape (B, H, W, 3); got {tuple(rgb.shape)}")
        w = self.respG(rgb, train)
        srf = combine_srf(w, jnp.asarray(self._curves))
        hsi, res = self.hsiG(rgb, srf, train)
        return {"hsi": hsi, "residual": res, "srf": srf, "weights": w}

    def render_random_cameras(self, hsi: Array, key: Array) -> tuple[Array, Array]:
        """``(rgb, srf)``: each cube of ``hsi`` (B, H, W, bands) rendered through its own
        :func:`random_dictionary_srf` camera (the ``syn`` terms of :class:`LossWeights`)."""
        srf = random_dictionary_srf(key, self._curves, hsi.shape[0])
        return project_batch(hsi, srf), srf

    def estimate_srf_weights(self, rgb: Array) -> Array:
        """SPFNet's raw weights W (B, N, 3) on ``rgb`` (inference mode)."""
        return self.respG(layers.as_floating(rgb), False)

    def __call__(self, rgb: Array, train: bool = False) -> Array:
        hsi = self.reconstruct(rgb, train)["hsi"]
        if self.is_initializing():           # the engine initialises through __call__
            self.discriminate(discriminator_input(hsi))
            if self.n_classes > 0:
                self.semantic(rgb, hsi)
        return hsi

    def loss_weights(self) -> "LossWeights":
        """The objective this model is trained with (``loss`` "code" | "paper", then the
        ``loss_overrides`` pairs): read by the phase losses, so a config selects it."""
        base = LossWeights.code if self.loss == "code" else LossWeights.paper
        if self.loss not in ("code", "paper"):
            raise ValueError(f"USSR: loss must be 'code' or 'paper', got {self.loss!r}")
        return base(**dict(self.loss_overrides))

    def discriminate(self, hsi_normalised: Array, train: bool = False) -> Array:
        return self.dishsi(hsi_normalised, train)

    def segment_rgb(self, rgb: Array, train: bool = False) -> Array:
        return self.E1(layers.as_floating(rgb), train)

    def semantic(self, rgb: Array, hsi: Array, train: bool = False,
                 e1_train: bool = False, clip: bool = True) -> Array:
        if self.n_classes <= 0:
            raise ValueError("USSR(n_classes=0) has no semantic branch")
        e1 = self.E1(layers.as_floating(rgb), e1_train)
        if clip:
            hsi = l1_gradient_clip(hsi, self.sem_clip_scale)
        y = resize_nearest(hsi, e1.shape[1:3])
        return self.extractor(e1, y, train)

    def init_all(self, rgb: Array, hsi: Array) -> Array:
        out = self.reconstruct(rgb)
        d = self.discriminate(discriminator_input(hsi))
        if self.n_classes > 0:
            self.semantic(rgb, out["hsi"])
        return d


# ============================================================================================
# Losses (methods.md §4 "Losses as actually coded"; paper Eq. 8-13)
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights and forms of the generator/discriminator objective.

    Default = the authors' code (``Network.Cal_generatorloss``): ``bp`` 100 on mean(r^2),
    ``smooth`` 10 on mean of **squared** first spectral differences, ``pos`` 0 (computed but
    commented out), ``sem`` 1, L1 gradient clipping on, no gradient penalty.
    :meth:`paper` = Eq. 8-11: ``smooth`` on the mean **absolute** difference (Eq. 10), ``pos``
    1e-2 on ``||Y - |Y|||_F^2`` (Eq. 11). ``gp`` ("none" | "one" | "zero") and ``gp_weight``
    select the Table 5 alternatives (1-GP: penalty (||grad||-1)^2, 0-GP: ||grad||^2, on
    real/fake interpolates); ``l1gc=False`` removes the clipping (Table 3 ablations).
    ``d_pixels=True`` (ours, not the authors'): every discriminator input -- fake, real and the
    penalty's interpolates -- has its pixels shuffled across the batch (one fresh permutation
    per step, after the per-image mean normalisation), so D judges spectra only and cannot
    separate the two streams by their spatial structure (see :func:`shuffle_pixels`).

    ``syn`` / ``syn_srf`` (ours, 0 = the authors' objective): synthetic pairs made from the
    *unpaired* HSI stream. Each real cube ``Y_r`` of the batch is rendered through a random
    camera of the SRF dictionary (:func:`random_dictionary_srf`: a random mix of two of its
    cameras), ``X_s = C_s Y_r``, and G + M are asked to recover it: ``syn`` weighs
    ``mean|G(X_s) - Y_r|`` (``syn_kind="squared"``: the mean squared error; G sees M's
    estimate of ``C_s``, as on photos), ``syn_srf`` the relative squared error of M's
    estimate, ``||C_o(X_s) - C_s||^2 / ||C_s||^2``. No RGB/HSI pair of the target camera or
    scene is used: only the HSI stream and the dictionary.
    """
    adv: float = 1.0
    bp: float = 100.0
    smooth: float = 10.0
    pos: float = 0.0
    sem: float = 1.0
    smooth_kind: str = "squared"       # "squared" (code) | "l1" (paper Eq. 10)
    pos_kind: str = "code"             # "code": sum(|Y| - Y) | "paper": ||Y - |Y|||_F^2
    l1gc: bool = True
    gp: str = "none"                   # "none" | "one" (1-GP) | "zero" (0-GP)
    gp_weight: float = 10.0
    d_pixels: bool = False
    syn: float = 0.0
    syn_srf: float = 0.0
    syn_kind: str = "l1"               # "l1": mean |G(X_s) - Y_r| | "squared": mean (.)^2

    def __post_init__(self):
        if self.smooth_kind not in ("squared", "l1"):
            raise ValueError(f"smooth_kind must be 'squared' or 'l1', got {self.smooth_kind!r}")
        if self.pos_kind not in ("code", "paper"):
            raise ValueError(f"pos_kind must be 'code' or 'paper', got {self.pos_kind!r}")
        if self.syn_kind not in ("l1", "squared"):
            raise ValueError(f"syn_kind must be 'l1' or 'squared', got {self.syn_kind!r}")
        if self.gp not in ("none", "one", "zero"):
            raise ValueError(f"gp must be 'none', 'one' or 'zero', got {self.gp!r}")

    @classmethod
    def code(cls, **kw) -> "LossWeights":
        return cls(**kw)

    @classmethod
    def paper(cls, **kw) -> "LossWeights":
        base = dict(adv=1.0, bp=100.0, smooth=10.0, pos=1e-2, sem=1.0, smooth_kind="l1",
                    pos_kind="paper")
        base.update(kw)
        return cls(**base)


def discriminator_input(hsi: Array, eps: float = 1e-6) -> Array:
    """``Y / (mean|Y| + eps)`` per image with the mean detached (paper's Y/y-bar; the code
    uses mean|Y| for fakes and mean(Y) for the non-negative real cubes: the same there)."""
    m = jnp.mean(jnp.abs(hsi), axis=tuple(range(1, hsi.ndim)), keepdims=True)
    return hsi / (jax.lax.stop_gradient(m) + eps)


def shuffle_pixels(x: Array, key: Array) -> Array:
    """(B, H, W, C) with its B*H*W pixel spectra permuted (one permutation of ``key``, the same
    for every call with that key): spatial structure destroyed, the set of spectra kept."""
    b, h, w, c = x.shape
    flat = x.reshape(b * h * w, c)
    return jnp.take(flat, jax.random.permutation(key, b * h * w), axis=0).reshape(x.shape)


def bce_with_logits(logits: Array, target: float) -> Array:
    """``BCELoss(sigmoid(logits), target)`` averaged over the batch, in the stable form
    ``-t log s(z) - (1 - t) log s(-z)``."""
    return -jnp.mean(target * jax.nn.log_sigmoid(logits)
                     + (1.0 - target) * jax.nn.log_sigmoid(-logits))


def back_projection_loss(residual: Array) -> Array:
    """``S_bp = mean(r^2)``, r = X - C_o Y (Eq. 9: ||C_o Y - X||_F^2 / (3 h w))."""
    return jnp.mean(jnp.square(residual))


def smoothness_loss(hsi: Array, kind: str = "squared") -> Array:
    """``S_1``: mean over (B, H, W, C-1) of ``(Y_{c+1} - Y_c)^2`` (code) or ``|.|`` (Eq. 10)."""
    d = hsi[..., 1:] - hsi[..., :-1]
    if kind == "squared":
        return jnp.mean(jnp.square(d))
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    raise ValueError(f"smoothness_loss: kind must be 'squared' or 'l1', got {kind!r}")


def positivity_loss(hsi: Array, kind: str = "code") -> Array:
    """``S_pos`` per image, averaged over the batch: ``sum(|Y| - Y)`` (the code's unused term)
    or ``||Y - |Y|||_F^2`` (Eq. 11)."""
    axes = tuple(range(1, hsi.ndim))
    if kind == "code":
        return jnp.mean(jnp.sum(jnp.abs(hsi) - hsi, axis=axes))
    if kind == "paper":
        return jnp.mean(jnp.sum(jnp.square(hsi - jnp.abs(hsi)), axis=axes))
    raise ValueError(f"positivity_loss: kind must be 'code' or 'paper', got {kind!r}")


def semantic_cross_entropy(logits: Array, labels: Array, ignore_index: int = -1) -> Array:
    """``S_sem`` (Eq. 12): pixel cross-entropy with ``ignore_index``. ``logits`` (B, h, w, M)
    are bilinearly up-sampled to the label size (B, H, W) first (HRNet criterion); the mean is
    over labelled pixels (0 when none are)."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W) ints; got shape {tuple(labels.shape)}")
    if logits.shape[1:3] != labels.shape[1:3]:
        logits = resize_bilinear(logits, labels.shape[1:3])
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid, dtype=jnp.float32)          # no int32 wrap on a pod's global batch
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n, 1.0)


def gradient_penalty(d_prob: Callable[[Array], Array], real: Array, fake: Array, key: Array,
                     center: float) -> Array:
    """Authors' ``calc_gradient_penalty``: ``mean_b (||grad_x D(x_b)||_2 - center)^2`` at
    ``x = a real + (1 - a) fake``, a ~ U(0, 1) per sample; ``d_prob`` maps a batch to the
    discriminator's probabilities (B,). center 1 = 1-GP (Gulrajani), 0 = 0-GP (Thanh-Tung)."""
    a = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), real.dtype)
    x = a * real + (1.0 - a) * fake
    g = jax.grad(lambda z: jnp.sum(d_prob(z)))(x)
    norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1))
    return jnp.mean(jnp.square(norm - center))


def generator_loss(d_logits_fake: Array, residual: Array, hsi: Array,
                   weights: LossWeights = LossWeights(),
                   sem_logits: Array | None = None, labels: Array | None = None,
                   ignore_index: int = -1) -> tuple[Array, dict[str, Array]]:
    """L_G = adv BCE(D(fake), 1) + bp S_bp + smooth S_1 + pos S_pos + sem S_sem (Eq. 8).

    ``d_logits_fake`` must come from ``D(discriminator_input(l1_gradient_clip(hsi)))`` when
    ``weights.l1gc`` (the clip only shapes the gradient reaching the generator). Returns the
    total and its terms."""
    terms = {"adv": bce_with_logits(d_logits_fake, 1.0),
             "bp": back_projection_loss(residual),
             "smooth": smoothness_loss(hsi, weights.smooth_kind),
             "pos": positivity_loss(hsi, weights.pos_kind)}
    total = (weights.adv * terms["adv"] + weights.bp * terms["bp"]
             + weights.smooth * terms["smooth"] + weights.pos * terms["pos"])
    if sem_logits is not None and weights.sem:
        if labels is None:
            raise ValueError("generator_loss: sem_logits given without labels")
        terms["sem"] = semantic_cross_entropy(sem_logits, labels, ignore_index)
        total = total + weights.sem * terms["sem"]
    return total, terms


def discriminator_loss(d_logits_fake: Array, d_logits_real: Array,
                       gp: Array | None = None, gp_weight: float = 0.0
                       ) -> tuple[Array, dict[str, Array]]:
    """L_D = BCE(D(fake), 0) + BCE(D(real), 1) (Eq. 13) [+ gp_weight * GP]."""
    terms = {"fake": bce_with_logits(d_logits_fake, 0.0),
             "real": bce_with_logits(d_logits_real, 1.0)}
    total = terms["fake"] + terms["real"]
    if gp is not None:
        terms["gp"] = gp
        total = total + gp_weight * gp
    return total, terms


# ============================================================================================
# Unpaired baselines (no RGB/HSI pairs needed: only an SRF, known or estimated)
# ============================================================================================
def _srf_batch(srf: Array, b: int) -> Array:
    srf = jnp.asarray(srf, jnp.float32)
    if srf.ndim == 2:
        srf = jnp.broadcast_to(srf, (b,) + srf.shape)
    if srf.ndim != 3 or srf.shape[-1] != 3:
        raise ValueError(f"srf must be (C, 3) or (B, C, 3); got {tuple(srf.shape)}")
    return srf


def min_norm_inverse(rgb: Array, srf: Array) -> Array:
    r"""Minimum-norm solution of ``x = S^T y`` per pixel: ``y = S (S^T S)^{-1} x``
    (``S`` (C, 3) or per image (B, C, 3)). Exact back-projection, no prior."""
    rgb = jnp.asarray(rgb, jnp.float32)
    s = _srf_batch(srf, rgb.shape[0])
    pinv_t = jnp.einsum("bck,bkl->bcl", s, jnp.linalg.inv(jnp.einsum("bck,bcl->bkl", s, s)))
    return jnp.einsum("bhwk,bck->bhwc", rgb, pinv_t, precision=jax.lax.Precision.HIGHEST)


def smooth_inverse(rgb: Array, srf: Array, lam: float = 1e-2) -> Array:
    r"""Smooth-spectrum regularised inverse (Tikhonov on first differences) per pixel:

    .. math:: \hat y = \arg\min_y \|S^T y - x\|^2 + \lambda \|D y\|^2
              = (S S^T + \lambda D^T D)^{-1} S x

    with ``D`` the (C-1, C) first-difference matrix. ``lam`` is relative to the scale of
    ``S S^T`` (multiplied by ``trace(S S^T) / C``), so it does not depend on the SRF's
    normalisation. The system is non-singular for ``lam > 0`` when some channel has a non-zero
    sum (constants are the null space of D). With a concrete ``srf`` (the usual case) the 31 x 31
    system is solved in float64 with numpy, so the result does not depend on the LAPACK build;
    a traced ``srf`` takes a float32 solve with one step of iterative refinement."""
    rgb = jnp.asarray(rgb, jnp.float32)
    s = _srf_batch(srf, rgb.shape[0])
    hi = jax.lax.Precision.HIGHEST
    if physics.render.is_concrete(s):
        s64 = np.asarray(s, np.float64)
        m = jnp.asarray(np.linalg.solve(_smooth_system(s64, lam, np), s64), jnp.float32)
    else:
        a = _smooth_system(s, lam, jnp)
        m = jnp.linalg.solve(a, s)                                 # (B, C, 3) = A^{-1} S
        # One step of iterative refinement: A is ill-conditioned for small lam and a float32
        # LU leaves ~1e-4 relative error whose size depends on the LAPACK build.
        m = m + jnp.linalg.solve(a, s - jnp.einsum("bcd,bdk->bck", a, m, precision=hi))
    return jnp.einsum("bhwk,bck->bhwc", rgb, m, precision=hi)


def _smooth_system(s, lam: float, xp):
    """``A = S S^T + lam (trace(S S^T) / C) D^T D`` for (B, C, 3) ``s``; ``xp`` = numpy (float64)
    or jax.numpy (float32, HIGHEST precision)."""
    c = s.shape[1]
    d = np.diff(np.eye(c), axis=0)
    kw = {"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}
    sst = xp.einsum("bck,bdk->bcd", s, s, **kw)
    scale = xp.trace(sst, axis1=1, axis2=2)[:, None, None] / c
    return sst + lam * scale * xp.asarray(d.T @ d, s.dtype)


def select_smooth_lambda(hsi_pixels: np.ndarray, srf: np.ndarray,
                         grid: Sequence[float] = tuple(10.0 ** np.arange(-5, 1.5, 0.5))) -> float:
    """Pick ``lam`` of :func:`smooth_inverse` from real spectra alone: render them with the
    (assumed or estimated) SRF, invert, and keep the ``lam`` with the lowest RMSE. Uses no
    RGB/HSI pairs of the target camera, only unpaired spectra and an SRF."""
    y = np.asarray(hsi_pixels, np.float32).reshape(1, 1, -1, np.shape(srf)[0])
    x = np.asarray(physics.project(y, np.asarray(srf)))
    errs = [float(np.sqrt(np.mean((np.asarray(smooth_inverse(x, srf, lam)) - y) ** 2)))
            for lam in grid]
    return float(grid[int(np.argmin(errs))])


# ============================================================================================
# Evaluation as in the paper
# ============================================================================================
def psnr_per_band(pred: Array, gt: Array, data_range: float = 1.0) -> Array:
    """PSNR of each band on [0, data_range] (the authors scale [0, 1] by 255 and use peak 255,
    the same number), averaged over bands. Inputs clamped. Returns (B,)."""
    p = jnp.clip(pred, 0.0, data_range)
    g = jnp.clip(gt, 0.0, data_range)
    mse = jnp.mean(jnp.square(p - g), axis=(1, 2))                  # (B, C)
    return jnp.mean(10.0 * jnp.log10(data_range ** 2 / mse), axis=-1)


def paper_metrics(pred: Array, gt: Array) -> dict[str, np.ndarray]:
    """The paper's table metrics per image: ``psnr`` (per band, averaged), ``ssim`` (per band
    Gaussian SSIM averaged, K1 0.01, K2 0.03), ``sam`` (degrees); plus MST++'s ``mrae``."""
    return {"psnr": np.asarray(psnr_per_band(pred, gt)),
            "ssim": np.asarray(_metrics.ssim(pred, gt)),
            "sam": np.asarray(_metrics.sam(pred, gt)),
            "mrae": np.asarray(_metrics.mrae(pred, jnp.maximum(gt, 1e-6)))}


def srf_accuracy(est: Array, true: Array, thresholds: Sequence[float] | None = None,
                 curve: bool = False) -> dict[str, np.ndarray]:
    """Accuracy of estimated SRFs against the true ones, per image.

    Both (B, C, 3) (or (C, 3)) are compared after normalising every channel to sum 1, so
    the comparison is of curve shapes (the absolute scale of an SRF is not identifiable from
    an RGB image). ``rmse``: RMS difference / mean curve value; ``angle``: mean over channels of
    the angle (degrees) between curves; ``auc``: area under the fraction-of-samples-within-
    relative-error-t curve for t in [0, 1] (our reading of the paper's Fig. 5 "AUC"; 1 = exact).
    ``curve=True`` adds that curve: ``within`` (B, T), the fraction at each of ``thresholds``
    (T; default 101 points on [0, 1]), and ``thresholds`` itself.
    """
    e = np.asarray(est, np.float64)
    t = np.asarray(true, np.float64)
    if e.ndim == 2:
        e = e[None]
    if t.ndim == 2:
        t = np.broadcast_to(t, e.shape)
    e = e / e.sum(axis=1, keepdims=True)
    t = t / t.sum(axis=1, keepdims=True)
    scale = t.mean(axis=(1, 2), keepdims=True)
    rmse = np.sqrt(((e - t) ** 2).mean(axis=(1, 2))) / scale[:, 0, 0]
    cos = (e * t).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(t, axis=1))
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(axis=1)
    ths = np.linspace(0, 1, 101) if thresholds is None else np.asarray(thresholds)
    rel = np.abs(e - t) / t.max(axis=1, keepdims=True)               # error relative to peak
    frac = (rel[..., None] <= ths).mean(axis=(1, 2))                 # (B, T)
    auc = np.trapezoid(frac, ths, axis=-1) / (ths[-1] - ths[0])
    out = {"rmse": rmse, "angle": angle, "auc": auc}
    if curve:
        out.update(within=frac, thresholds=ths)
    return out


# ============================================================================================
# Weight mapping to/from the authors' PyTorch state_dict
# ============================================================================================
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def authors_name(path: Sequence[str], collection: str = "params") -> str | None:
    """The authors' ``state_dict`` key of one of our leaves, e.g.
    ``("hsiG", "stages_1", "denselayers_0", "compressLayer", "conv", "kernel")`` ->
    ``"hsiG.stages.1.denselayers.0.compressLayer.conv.weight"``; ``None`` for parts with no
    counterpart (E1, which replaces HRNet; the generator's ``gate_t`` of ``prior_lambda > 0``)."""
    if path[0] == "E1" or (path[0] == "hsiG" and path[-1].startswith("gate_")):
        return None
    parts = []
    for p in path[:-1]:
        m = _INDEXED.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    leaf = path[-1]
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(parts + [leaf])


def _torch_layout(x: np.ndarray) -> np.ndarray:
    """Flax conv kernel (kh, kw, I, O) -> PyTorch weight (O, I, kh, kw); other leaves as is."""
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x


def _flat(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def param_table(variables: Mapping) -> list[dict[str, Any]]:
    """One row per leaf: ``path`` (ours), ``shape`` (ours), ``authors`` (state_dict key or
    None), ``authors_shape``. Used for the mapping tables in docs/methods/ussr.md."""
    rows = []
    for coll in ("params", "batch_stats"):
        for path, v in _flat(variables.get(coll, {})).items():
            shape = tuple(np.shape(v))
            rows.append({"collection": coll, "path": "/".join(path), "shape": shape,
                         "authors": authors_name(path, coll),
                         "authors_shape": (shape[3], shape[2], shape[0], shape[1])
                         if len(shape) == 4 else shape})
    return rows


def to_torch_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """Our variables as a dict keyed by the authors' ``state_dict`` names (PyTorch layouts)."""
    out = {}
    for coll in ("params", "batch_stats"):
        for path, v in _flat(variables.get(coll, {})).items():
            name = authors_name(path, coll)
            if name is not None:
                out[name] = _torch_layout(np.asarray(v))
    return out


def from_torch_state_dict(state_dict: Mapping[str, Any], template: Mapping
                          ) -> tuple[dict, list[str]]:
    """Load the authors' weights (``{k: tensor.numpy()}`` of ``Network.state_dict()``; a
    ``module.`` DDP prefix is stripped) into a copy of ``template`` (our variables).

    Returns ``(variables, unused_keys)``. Every leaf of ``template`` that has an authors'
    counterpart must be present with the right shape, else ``ValueError`` names the key;
    ``unused_keys`` lists what was not needed (HRNet, the code's unused ``adenseconv``,
    ``Module.N`` aliases of the same tensors, ``num_batches_tracked``).
    """
    sd = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        sd[k] = np.asarray(v)
    used = set()
    out = {}
    for coll in ("params", "batch_stats"):
        flat = _flat(template.get(coll, {}))
        new = {}
        for path, v in flat.items():
            name = authors_name(path, coll)
            if name is None:
                new[path] = v
                continue
            if name not in sd:
                raise ValueError(f"authors' state_dict lacks {name!r} (for {'/'.join(path)})")
            w = sd[name]
            want = np.shape(v)
            if w.ndim == 4:
                w = np.transpose(w, (2, 3, 1, 0))
            if tuple(w.shape) != tuple(want):
                raise ValueError(f"{name!r}: shape {tuple(sd[name].shape)} does not fit our "
                                 f"{'/'.join(path)} of shape {tuple(want)}")
            new[path] = jnp.asarray(w, jnp.float32)
            used.add(name)
        if flat:
            out[coll] = _unflat(new)
    for coll in template:
        if coll not in out:
            out[coll] = template[coll]
    return out, sorted(set(sd) - used)


# the .npz variable-tree format lives in the engine (``init_from`` entries with a "file" read
# it); these names are kept for the USSR API
save_param_tree = train_state.save_variable_tree
load_param_tree = train_state.load_variable_tree


# ============================================================================================
# E1 pre-training on RGB + material labels (our substitute for HRNet on PASCAL-Context)
# ============================================================================================
def fit_segmenter(rgb: np.ndarray, labels: np.ndarray, *, n_classes: int, width: int = 32,
                  blocks: int = 3, steps: int = 300, batch_size: int = 8, crop: int = 32,
                  lr: float = 3e-3, seed: int = 0, ignore_index: int = -1,
                  log: Callable[[str], None] | None = None) -> dict:
    """Train :class:`RGBSegmenter` on (N, H, W, 3) images and (N, H, W) int labels with Adam
    and the same cross-entropy as the semantic branch; random crops and flips. Returns its
    variables ``{"params", "batch_stats"}`` (to freeze as E1, or save with
    :func:`save_param_tree`)."""

    rgb = np.asarray(rgb, np.float32)
    labels = np.asarray(labels, np.int32)
    if rgb.ndim != 4 or labels.shape != rgb.shape[:3]:
        raise ValueError(f"fit_segmenter: rgb (N, H, W, 3) and labels (N, H, W) must match; got "
                         f"{rgb.shape} and {labels.shape}")
    n, h, w, _ = rgb.shape
    crop = min(crop, h, w)
    model = RGBSegmenter(n_classes, width, blocks)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, crop, crop, 3)))
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, True,
                                      mutable=["batch_stats"])
            return semantic_cross_entropy(logits, y, ignore_index), upd["batch_stats"]
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), stats, opt, loss

    rng = np.random.default_rng(seed)
    for t in range(steps):
        idx = rng.integers(0, n, batch_size)
        ys = rng.integers(0, h - crop + 1, batch_size)
        xs = rng.integers(0, w - crop + 1, batch_size)
        xb = np.stack([rgb[i, a:a + crop, b:b + crop] for i, a, b in zip(idx, ys, xs)])
        yb = np.stack([labels[i, a:a + crop, b:b + crop] for i, a, b in zip(idx, ys, xs)])
        if rng.random() < 0.5:
            xb, yb = xb[:, :, ::-1], yb[:, :, ::-1]
        params, stats, opt, loss = step(params, stats, opt, jnp.asarray(xb), jnp.asarray(yb))
        if log is not None and (t % 50 == 0 or t == steps - 1):
            log(f"segmenter step {t}: ce {float(loss):.4f}")
    return {"params": params, "batch_stats": stats}


# ============================================================================================
# Unpaired training: the D phase and the joint G/M/E2/SE phase
# ============================================================================================
#: Parameter subtrees (regexes on '/'-joined paths) of each optimiser group.
PHASE_PARAMS = {"dis": (r"^dishsi/",), "gen": (r"^hsiG/", r"^respG/"), "sem": (r"^extractor/",),
                "frozen": (r"^E1/",)}


def _merge_state(variables, new):
    return {**variables, **new} if new else variables


def _get(batch, key):
    """``batch[key]`` or, for a tuple key, the nested ``batch[k0][k1]`` (engine streams)."""
    if isinstance(key, tuple):
        for k in key:
            batch = batch[k]
        return batch
    return batch[key]


def make_phase_losses(weights: LossWeights | None = None, *, rgb_key: Any = "rgb",
                      hsi_key: Any = "hsi_real", label_key: Any = "label",
                      semantic: bool = True) -> dict[str, Callable]:
    """Losses of one USSR iteration as ``loss(apply_fn, variables, batch, rngs) -> (loss, aux)``
    (the engine's phase-loss signature; ``aux["model_state"]`` holds updated BatchNorm stats).
    Keys may be tuples for nested batches (``("rgb", "rgb")`` = stream "rgb", key "rgb").
    ``weights=None`` takes the model's own :meth:`USSR.loss_weights` (its ``loss`` options).

    * ``"dis"``: L_D on ``D(Y_fake / mean|Y_fake|)`` (the generator output on the RGB batch,
      gradient stopped: the code discards D's gradient to G in the D step) and
      ``D(Y_r / mean Y_r)`` for the unpaired real cubes; BatchNorm in training mode on each of
      the two batches separately, as the code's two calls; plus the gradient penalty of
      ``weights.gp``.
    * ``"gen"``: L_G (Eq. 8) through the L1-clipped fake; the discriminator runs in training
      mode (batch statistics) as in the code; the semantic term uses the material labels
      (B, H, W), E1 in inference mode. Its gradient trains G + M (and E2 + SE, whose parameters
      the ``"sem"`` optimiser group of :func:`make_optimizers` updates in the same step).
      With ``weights.syn`` / ``syn_srf`` > 0 it adds the synthetic-pair terms on the batch's
      real cubes (``hsi_key``; :class:`LossWeights`).
    * ``"sem"``: the semantic cross-entropy alone on the (stopped) generator output, E1 and
      E2 + SE in training mode: for step drivers that give each phase one optimiser (the
      engine's ``phases``), where E1 + E2 + SE are then trained after the G update.
    """
    def wts(apply_fn, variables):
        return weights if weights is not None else apply_fn(variables, method=USSR.loss_weights)

    def reconstruct(apply_fn, variables, rgb):
        return apply_fn(variables, rgb, True, method=USSR.reconstruct)

    def disc(apply_fn, variables, x):
        logits, upd = apply_fn(variables, x, True, method=USSR.discriminate,
                               mutable=["batch_stats"])
        return logits, upd

    def dis_loss(apply_fn, variables, batch, rngs):
        w = wts(apply_fn, variables)
        fake = jax.lax.stop_gradient(reconstruct(apply_fn, variables, _get(batch, rgb_key))["hsi"])
        real = _get(batch, hsi_key)
        fake_n, real_n = discriminator_input(fake), discriminator_input(real)
        if w.d_pixels:
            fake_n = shuffle_pixels(fake_n, jax.random.fold_in(rngs["gp"], 1))
            real_n = shuffle_pixels(real_n, jax.random.fold_in(rngs["gp"], 2))
        lf, upd = disc(apply_fn, variables, fake_n)
        lr_, upd = disc(apply_fn, _merge_state(variables, upd), real_n)
        gp = None
        if w.gp != "none":
            def prob(x):
                return jax.nn.sigmoid(disc(apply_fn, variables, x)[0])
            gp = gradient_penalty(prob, real_n, fake_n, rngs["gp"],
                                  1.0 if w.gp == "one" else 0.0)
        loss, terms = discriminator_loss(lf, lr_, gp, w.gp_weight)
        return loss, {**terms, "d_fake": jnp.mean(jax.nn.sigmoid(lf)),
                      "d_real": jnp.mean(jax.nn.sigmoid(lr_)), "model_state": upd}

    def gen_loss(apply_fn, variables, batch, rngs):
        w = wts(apply_fn, variables)
        rgb = _get(batch, rgb_key)
        out = reconstruct(apply_fn, variables, rgb)
        hsi = out["hsi"]
        x = discriminator_input(l1_gradient_clip(hsi) if w.l1gc else hsi)
        if w.d_pixels:
            x = shuffle_pixels(x, jax.random.fold_in(rngs["gp"], 3))
        logits, upd = disc(apply_fn, variables, x)
        sem_logits = labels = None
        if semantic and w.sem:
            sem_logits, upd2 = apply_fn(_merge_state(variables, upd), rgb, hsi, True,
                                        method=USSR.semantic, rngs={"dropout": rngs["dropout"]},
                                        mutable=["batch_stats"], clip=w.l1gc)
            upd = {"batch_stats": {**upd["batch_stats"], **upd2["batch_stats"]}}
            labels = _get(batch, label_key)
        loss, terms = generator_loss(logits, out["residual"], hsi, w, sem_logits, labels)
        if w.syn or w.syn_srf:
            real = _get(batch, hsi_key)
            x_s, srf_s = apply_fn(variables, real, jax.random.fold_in(rngs["gp"], 4),
                                  method=USSR.render_random_cameras)
            syn = reconstruct(apply_fn, variables, x_s)
            err = syn["hsi"] - real
            terms["syn"] = jnp.mean(jnp.abs(err) if w.syn_kind == "l1" else jnp.square(err))
            terms["syn_srf"] = (jnp.sum(jnp.square(syn["srf"] - srf_s))
                                / jnp.sum(jnp.square(srf_s)))
            loss = loss + w.syn * terms["syn"] + w.syn_srf * terms["syn_srf"]
        return loss, {**terms, "model_state": upd}

    def sem_loss(apply_fn, variables, batch, rngs):
        rgb = _get(batch, rgb_key)
        hsi = jax.lax.stop_gradient(reconstruct(apply_fn, variables, rgb)["hsi"])
        logits, upd = apply_fn(variables, rgb, hsi, True, True, method=USSR.semantic,
                               rngs={"dropout": rngs["dropout"]}, mutable=["batch_stats"])
        ce = semantic_cross_entropy(logits, _get(batch, label_key))
        return ce, {"ce": ce, "model_state": upd}

    out = {"dis": dis_loss, "gen": gen_loss}
    if semantic:
        out["sem"] = sem_loss
    return out


def _labels(params, rules: Mapping[str, Sequence[str]], default: str = "frozen"):
    flat = _flat(params)
    out = {}
    for path in flat:
        name = "/".join(path)
        out[path] = next((g for g, pats in rules.items() if any(re.search(p, name)
                                                                 for p in pats)), default)
    return _unflat(out)


def make_optimizers(steps: int, *, lr_gen: float = 1e-4, lr_dis: float = 5e-4,
                    lr_sem: float = 1e-3, sem_momentum: float = 0.9, sem_wd: float = 1e-4,
                    sem_poly: float = 0.9, b1: float = 0.9, b2: float = 0.999,
                    train_e1: bool = False) -> dict[str, Any]:
    """The authors' optimisers: Adam(b1, b2), constant lr, 1e-4 for G + M and 5e-4 for D; SGD
    (momentum 0.9, weight decay 1e-4 added to the gradient as torch does) with the poly
    schedule ``lr (1 - t/steps)^0.9`` for E2 + SE (and E1 when ``train_e1``, else frozen).
    Returns ``{"dis": tx, "gen": tx}``, each an ``optax.multi_transform`` over the whole tree
    that updates only its phase's groups."""

    poly = optax.polynomial_schedule(lr_sem, 0.0, sem_poly, max(int(steps), 1))
    sgd = optax.chain(optax.add_decayed_weights(sem_wd), optax.sgd(poly, momentum=sem_momentum))
    zero = optax.set_to_zero()
    groups = dict(PHASE_PARAMS)
    if train_e1:
        groups = {**groups, "sem": groups["sem"] + groups.pop("frozen")}

    def tx_for(active: Mapping[str, Any]):
        txs = {g: active.get(g, zero) for g in ("dis", "gen", "sem", "frozen")}
        return optax.multi_transform(txs, lambda p: _labels(p, groups))

    return {"dis": tx_for({"dis": optax.adam(lr_dis, b1, b2)}),
            "gen": tx_for({"gen": optax.adam(lr_gen, b1, b2), "sem": sgd})}


def init_train_state(model: USSR, optimizers: Mapping[str, Any], key: Array, rgb: Array,
                     hsi: Array, e1_variables: Mapping | None = None) -> dict:
    """``{"step", "params", "batch_stats", "opt": {phase: state}, "rng"}`` for
    :func:`make_train_step`; ``e1_variables`` (from :func:`fit_segmenter` or
    :func:`load_param_tree`) replace the E1 initialisation."""
    k_init, k_rng = jax.random.split(key)
    v = model.init(k_init, rgb, hsi, method=USSR.init_all)
    params, stats = dict(v["params"]), dict(v.get("batch_stats", {}))
    if e1_variables is not None:
        params["E1"] = e1_variables["params"]
        stats["E1"] = e1_variables["batch_stats"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats,
            "opt": {k: tx.init(params) for k, tx in optimizers.items()}, "rng": k_rng}


def make_train_step(model: USSR, optimizers: Mapping[str, Any],
                    losses: Mapping[str, Callable]) -> Callable:
    """One USSR iteration as a pure ``step(state, batch) -> (state, metrics)``: the D phase,
    then the G phase on the updated D (and its BatchNorm statistics), each with its own
    optimiser state. Jit it (state donated); ``rng`` is folded with the step number."""
    def step(state, batch):
        base = jax.random.fold_in(state["rng"], state["step"])
        params, stats, opt = state["params"], state["batch_stats"], dict(state["opt"])
        metrics = {}
        for i, name in enumerate(("dis", "gen")):   # E2 + SE train in "gen" (joint, as coded)
            k = jax.random.fold_in(base, i)
            rngs = {"dropout": jax.random.fold_in(k, 0), "gp": jax.random.fold_in(k, 1)}

            def objective(p, stats=stats, rngs=rngs, name=name):
                return losses[name](model.apply, {"params": p, "batch_stats": stats}, batch, rngs)

            (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(params)
            upd, opt[name] = optimizers[name].update(g, opt[name], params)
            params = optax.apply_updates(params, upd)
            ms = aux.pop("model_state", {}) or {}
            if ms:
                stats = {**stats, **ms["batch_stats"]}
            metrics[f"loss/{name}"] = loss
            metrics.update({f"{name}/{k_}": v for k_, v in aux.items()})
        new = {"step": state["step"] + 1, "params": params, "batch_stats": stats, "opt": opt,
               "rng": state["rng"]}
        return new, metrics

    return step


# ============================================================================================
# Registration: --method ussr (step kind "phases" over the unpaired streams "rgb" and "hsi")
# ============================================================================================
def engine_phases(semantic: bool = True) -> list:
    """The engine's phases: ``dis`` (Adam 5e-4 on ``dishsi``), ``gen`` (the run's optimiser:
    Adam 1e-4 on ``hsiG`` + ``respG``), ``sem`` (SGD momentum 0.9, lr 1e-3 on ``extractor`` and
    ``E1``, cosine to 0 in place of poly 0.9; the engine's SGD has no weight decay). Batches are
    ``{"rgb": {"rgb", "label"}, "hsi": {"hsi"}}`` (``config.streams``)."""
    from jaxspec.train.steps import Phase

    losses = make_phase_losses(rgb_key=("rgb", "rgb"), hsi_key=("hsi", "hsi"),
                               label_key=("rgb", "label"), semantic=semantic)
    phases = [Phase("dis", losses["dis"], params=PHASE_PARAMS["dis"], optimizer={"lr": 5e-4}),
              Phase("gen", losses["gen"], params=PHASE_PARAMS["gen"])]
    if semantic:
        phases.append(Phase("sem", losses["sem"],
                            params=PHASE_PARAMS["sem"] + PHASE_PARAMS["frozen"],
                            optimizer={"optimizer": "sgd", "lr": 1e-3, "b1": 0.9,
                                       "schedule": "cosine", "lr_min": 0.0}))
    return phases


CAMERA_ESTIMATE_SIDE = 512     # photos are area-averaged to at most this long side for M


def _area_downscale(x: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, C) -> integer-factor block means so that the long side is <= ``max_side``
    (the factor is capped so the short side stays >= 16, what SPFNet needs)."""
    f = min(int(np.ceil(max(x.shape[:2]) / max_side)), max(min(x.shape[:2]) // 16, 1))
    if f <= 1:
        return x
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f, x.shape[2]).mean(axis=(1, 3))


def camera_estimate(module: "USSR", variables, rgb, top: int = 3) -> dict:
    """Which camera of the SRF dictionary USSR's SPFNet thinks took ``rgb`` (H, W, 3), as the
    model sees it (``jaxspec.predict``'s ``photo_info`` hook). The photo is area-averaged to a
    long side of at most :data:`CAMERA_ESTIMATE_SIDE` first (SPFNet ends in a global pooling;
    the full resolution only costs memory). Returns the softmax weights over the dictionary
    per RGB channel (Eq. 5) summarised as: ``camera`` (largest weight averaged over R, G, B)
    and its ``weight``, the ``top`` cameras, the per-channel argmax, the gray-world
    ``amplitude`` (Eq. 6), and the estimated ``srf`` (bands, 3) that the generator used."""
    x = np.asarray(rgb, np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"camera_estimate expects an (H, W, 3) image, got {x.shape}")
    small = _area_downscale(x, CAMERA_ESTIMATE_SIDE)
    w = np.asarray(module.apply(variables, jnp.asarray(small)[None],
                                method=USSR.estimate_srf_weights))[0]          # (N, 3)
    d = load_srf_dictionary(module.srf_dictionary)
    names = d.names
    probs = np.asarray(jax.nn.softmax(jnp.asarray(w), axis=0))                 # over cameras
    mean = probs.mean(axis=1)
    order = np.argsort(-mean)
    srf = np.asarray(combine_srf(jnp.asarray(w)[None], jnp.asarray(d.curves)))[0]
    amp = srf.sum(axis=0)     # dictionary columns sum to 1, so a column of srf sums to Eq. 6's
    others = ", ".join(f"{names[i]} {mean[i]:.3f}" for i in order[1:top])
    return {"camera": names[order[0]], "weight": round(float(mean[order[0]]), 4),
            "top": [{"camera": names[i], "weight": round(float(mean[i]), 4)}
                    for i in order[:top]],
            "per_channel": {ch: names[int(np.argmax(probs[:, k]))]
                            for k, ch in enumerate("RGB")},
            "amplitude": [round(float(a), 4) for a in amp],
            "srf": np.round(srf, 6).tolist(), "dictionary_size": len(names),
            "estimated_on": list(small.shape[:2]),
            "summary": (f"estimated camera {names[order[0]]} (weight {mean[order[0]]:.3f}"
                        + (f"; next: {others}" if others else "")
                        + f"; {len(names)} cameras, uniform {1 / len(names):.3f})")}


def _register():
    from jaxspec import registry

    factory = registry.module_factory(USSR, "USSR")

    def make_model(model_cfg: Mapping[str, Any]):
        cfg = dict(model_cfg)
        lo = cfg.get("loss_overrides")
        if isinstance(lo, Mapping):
            cfg["loss_overrides"] = tuple(sorted(lo.items()))
        elif lo is not None:
            cfg["loss_overrides"] = tuple(tuple(x) for x in lo)
        return factory(cfg)

    make_model.allowed_keys = factory.allowed_keys
    registry.register(registry.Method(
        name="ussr",
        make_model=make_model,
        presets=registry.standard_presets("jaxspec.configs.ussr"),
        step_kind="phases",
        rng_streams=("dropout", "gp"),
        step_options={"phases": engine_phases()},
        description="USSR: unsupervised RGB -> 31 bands (SRF estimation, L1-GC GAN, semantic "
                    "regularisation), trained on unpaired RGB and HSI",
        reference=("Z. Zhu, H. Liu, J. Hou, H. Zeng, Q. Zhang. Semantic-embedded Unsupervised "
                   "Spectral Reconstruction from Single RGB Images in the Wild. ICCV 2021"),
        paper_params_m=0.58,
        photo_info=camera_estimate,
    ))


_register()
