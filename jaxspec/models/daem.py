"""DAEM: coordinated degradation estimation + a tiny VAE fusion net, trained by generalised EM.

Guo, Xie, Jiang, Li, Lei, Fang, "Toward Stable, Interpretable, and Lightweight Hyperspectral
Super-Resolution", CVPR 2023. Design notes, every code-vs-paper difference and what we chose:
``shared/specs/daem.md`` and docs/methods/daem.md.

Observation model (LR-HSI ``X`` (B, h, w, C), HR-MSI ``Y`` (B, H, W, b), latent HR-HSI ``Z``
(B, H, W, C), ``H = s h``)::

    X = PSF_theta(Z) = (Z * K)_valid [::s, ::s]     K: k x k Gaussian from a Cholesky factor
    Y = SRF_theta(Z) = Z R                          R: (C, b), columns: K-Gaussian mixtures

Parameters live in two subtrees, ``fusion`` (phi: encoder + the mean / std decoders) and
``degradation`` (theta: ``psf/q`` (2, 2), ``srf/p`` (b, K, 2)). Everything is per pixel except
the PSF, so the fusion net runs unchanged at LR (training, fine-tuning) and HR (inference).

The EM losses (:func:`theta_loss`, :func:`phi_loss`) take the *whole* parameter tree and stop the
gradient of the other group themselves, so ``jax.grad`` of either is non-zero only on its own
subtree; the released code gets the same effect by toggling ``requires_grad`` before each
``backward`` and then making one Adam step on the sum (:func:`em_gradients`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspec import fusion_baselines, layers

Array = jax.Array

__all__ = [
    "cholesky_gaussian_kernel", "gmm_srf", "psf_degrade", "srf_project", "reparameterize",
    "consistency_loss", "GaussianPSF", "GaussianSRF", "Degradation", "Encoder", "DecoderHead",
    "FusionVAE", "DAEM", "theta_loss", "phi_loss", "em_gradients", "draw_noise",
    "finetune_lr", "finetune_update_count", "finetune", "analytic_macs", "kernel_error",
    "srf_error", "param_count_by_group", "theta_phase_loss", "phi_phase_loss", "adapt_loss",
]

LRELU_SLOPE = 0.2
CODE_MU_HIDDEN = (18, 22, 26, 30, 32)     # setting.json ConvLayerSpectralParamMean (6 layers)
CODE_SIGMA_HIDDEN = (24,)                 # setting.json ConvLayerSpectralParamVar (2 layers)
PAPER_HIDDEN = (24,)                      # [SUPP] Table 1 (CAVE/Harvard), both heads
ENCODER_FEATURES = (4, 8, 16, 24)         # setting.json ConvLayerAbundanceParam E0..E3
DECODERS = ("code", "paper")
CONSISTENCY = ("paper", "code", "none")
SRF_INITS = ("code", "spread")


# --------------------------------------------------------------------------------------------
# degradation operators (pure functions, differentiable in every argument)
# --------------------------------------------------------------------------------------------
def cholesky_gaussian_kernel(q: Array, size: int) -> Array:
    """Gaussian PSF from a Cholesky-like factor (``Modules/KernelAdaption.kernel_generator``)::

        M = q * [[1, 0], [1, 1]],   Lambda = M^T M   (precision, positive semi-definite)
        K[u, v] = exp(-1/2 d^T Lambda d) / Z,   d = (u - size // 2, v - size // 2),  sum K = 1

    ``u`` indexes rows (H), ``v`` columns (W); the centre is the grid point ``size // 2`` (16 for
    the 32 x 32 CAVE kernels, not 15.5). ``q[0, 1]`` is stored but masked (zero gradient).
    ``Lambda`` is written out elementwise (no matmul precision issues on any backend)."""
    q = jnp.asarray(q, jnp.float32)
    if q.shape != (2, 2):
        raise ValueError(f"cholesky_gaussian_kernel: q must have shape (2, 2), got {q.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"cholesky_gaussian_kernel: size must be a positive int, got {size!r}")
    l00 = q[0, 0] ** 2 + q[1, 0] ** 2
    l01 = q[1, 0] * q[1, 1]
    l11 = q[1, 1] ** 2
    d = jnp.arange(size, dtype=jnp.float32) - size // 2
    du, dv = d[:, None], d[None, :]
    logits = -0.5 * (l00 * du * du + 2.0 * l01 * du * dv + l11 * dv * dv)
    k = jnp.exp(logits)   # max logit is 0 at the centre grid point: no overflow, no underflow there
    return k / jnp.sum(k)


def gmm_srf(p: Array, n_bands: int, eps: float = 1e-8) -> Array:
    """SRF as a Gaussian mixture over the HSI band index
    (``Modules/SpectralResponseAdaption.srf_generator``)::

        R[i, j] = sum_k exp(-(i - mu_jk)^2 / (2 sigma_jk^2 + eps)),   i = 0 .. n_bands - 1
        R[:, j] <- R[:, j] / (sum_i R[i, j] + eps)

    ``p``: (b, K, 2) with ``mu = p[..., 0]``, ``sigma = p[..., 1]`` (band units, no
    ``1/(sqrt(2 pi) sigma)`` prefactor, as the code). Returns (n_bands, b), non-negative, columns
    summing to 1 (up to ``eps``). The two ``eps`` keep a zero-width or far-away component from
    producing 0/0 = NaN (the released code has none)."""
    p = jnp.asarray(p, jnp.float32)
    if p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"gmm_srf: p must have shape (msi_bands, K, 2), got {p.shape}")
    mu, sigma = p[..., 0], p[..., 1]                              # (b, K)
    i = jnp.arange(n_bands, dtype=jnp.float32)[:, None, None]     # (C, 1, 1)
    g = jnp.exp(-(i - mu) ** 2 / (2.0 * sigma ** 2 + eps))        # (C, b, K)
    r = jnp.sum(g, axis=-1)
    return r / (jnp.sum(r, axis=0, keepdims=True) + eps)


def psf_degrade(z: Array, kernel: Array, scale: int) -> Array:
    """The model's spatial degradation (``GaussianKernel.forward``): per-band *valid*
    cross-correlation with ``kernel`` (k, k), no padding, keeping every ``scale``-th sample::

        out[b, i, j, c] = sum_{u, v} K[u, v] z[b, s i + u, s j + v, c],   (H - k) // s + 1 rows

    For ``k == s`` (DAEM ties the kernel size to the scale) each LR pixel is the K-weighted sum
    over its own s x s block -- one reshape + einsum -- and this equals the synthesis of the data
    (``physics.daem_degrade``, whose zero padding ``(k - s) // 2`` is then 0). ``z``:
    (..., H, W, C); ``kernel`` (k, k), or (N, k, k) with one kernel per image of ``z`` (N, H, W,
    C). Differentiable in ``z`` and ``kernel``."""
    z = jnp.asarray(z)
    kernel = jnp.asarray(kernel, z.dtype)
    if z.ndim < 3:
        raise ValueError(f"psf_degrade: z must have shape (..., H, W, C), got {z.shape}")
    if kernel.ndim == 3:                     # one kernel per image (image-wise protocol)
        if z.ndim != 4 or kernel.shape[0] != z.shape[0]:
            raise ValueError(f"psf_degrade: {kernel.shape[0]} kernels need z of shape "
                             f"(N, H, W, C) with N = {kernel.shape[0]}, got {z.shape}")
        return jax.vmap(lambda zi, ki: psf_degrade(zi, ki, scale))(z, kernel)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"psf_degrade: kernel must have shape (k, k), got {kernel.shape}")
    k, s = kernel.shape[0], int(scale)
    lead, (h, w, c) = z.shape[:-3], z.shape[-3:]
    if k == s:
        if h % s or w % s:
            raise ValueError(f"psf_degrade: H, W = ({h}, {w}) must be multiples of the scale {s}")
        blocks = z.reshape(lead + (h // s, s, w // s, s, c))
        return jnp.einsum("...huwvc,uv->...hwc", blocks, kernel,
                          precision=jax.lax.Precision.HIGHEST)
    if h < k or w < k:
        raise ValueError(f"psf_degrade: image {h}x{w} is smaller than the {k}x{k} kernel")
    planes = jnp.moveaxis(z.reshape((-1, h, w, c)), -1, 1).reshape((-1, h, w, 1))
    out = jax.lax.conv_general_dilated(
        planes, kernel[:, :, None, None], (s, s), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    ho, wo = out.shape[1], out.shape[2]
    out = jnp.moveaxis(out.reshape((-1, c, ho, wo)), 1, -1)
    return out.reshape(lead + (ho, wo, c))


def srf_project(z: Array, srf: Array) -> Array:
    """``z @ R``: (..., C) x (C, b) -> (..., b)."""
    if z.shape[-1] != srf.shape[0]:
        raise ValueError(f"srf_project: the image has {z.shape[-1]} bands, the SRF {srf.shape[0]}")
    return jnp.einsum("...c,cm->...m", z, srf.astype(z.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def reparameterize(mean: Array, std: Array, noise: Array) -> Array:
    """``Z = mean + noise * std`` (``Network.reparameterize``): the std head output is used as is
    (no exp/softplus; it may be negative, which only flips the sign of the noise)."""
    return mean + noise * std


def _l1(a: Array, b: Array) -> Array:
    return jnp.mean(jnp.abs(a - b))


def consistency_loss(lr_hsi: Array, hr_msi: Array, kernel: Array, srf: Array, scale: int) -> Array:
    """The paper's spatial-spectral consistency on the *observed* images,
    ``mean |SRF(X) - PSF(Y)|`` = ``mean |X R - (Y * K)[::s, ::s]|`` (both LR-MSIs, (B, h, w, b)).
    Differentiable in ``kernel`` and ``srf`` (the theta group)."""
    return _l1(srf_project(lr_hsi, srf), psf_degrade(hr_msi, kernel, scale))


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class GaussianPSF(nn.Module):
    """Learnable PSF: ``q`` (2, 2) initialised ``init_scale * I`` (code: 5 I, i.e.
    ``Lambda = 25 I``, a near-delta kernel); ``__call__()`` returns the (size, size) kernel.
    ``param_scale`` stores ``q / param_scale`` as the parameter: with Adam (scale-invariant
    steps) that multiplies theta's effective learning rate by ``param_scale`` (1 = the code)."""
    size: int
    init_scale: float = 5.0
    param_scale: float = 1.0

    @nn.compact
    def __call__(self) -> Array:
        q = self.param("q", lambda key: self.init_scale / self.param_scale
                       * jnp.eye(2, dtype=jnp.float32))
        return cholesky_gaussian_kernel(q * self.param_scale, self.size)


def _srf_init(init: str, n_bands: int):
    if init not in SRF_INITS:
        raise ValueError(f"srf_init must be one of {SRF_INITS}, got {init!r}")

    def code_init(key, shape):            # torch.rand(b, K, 2): mu, sigma ~ U[0, 1)
        return jax.random.uniform(key, shape, jnp.float32)

    def spread_init(key, shape):          # mixture means spread over the bands, sigma ~ C / (2 b K)
        b, kk, _ = shape
        centres = (jnp.arange(b * kk, dtype=jnp.float32) + 0.5) * n_bands / (b * kk)
        mu = centres.reshape(b, kk) + jax.random.uniform(key, (b, kk), jnp.float32, -0.5, 0.5)
        sigma = jnp.full((b, kk), n_bands / (2.0 * b * kk), jnp.float32)
        return jnp.stack([mu, sigma], -1)

    return code_init if init == "code" else spread_init


class GaussianSRF(nn.Module):
    """Learnable SRF: parameter ``p`` (msi_bands, components, 2); ``__call__()`` -> (C, b)."""
    n_bands: int
    msi_bands: int
    components: int = 4
    initialization: str = "code"
    eps: float = 1e-8
    param_scale: float = 1.0          # as GaussianPSF.param_scale

    @nn.compact
    def __call__(self) -> Array:
        init = _srf_init(self.initialization, self.n_bands)
        p = self.param("p", lambda key, shape: init(key, shape) / self.param_scale,
                       (self.msi_bands, self.components, 2))
        return gmm_srf(p * self.param_scale, self.n_bands, self.eps)


class Degradation(nn.Module):
    """theta: the estimated PSF (``psf``) and SRF (``srf``)."""
    n_bands: int
    msi_bands: int
    kernel_size: int
    components: int = 4
    psf_init: float = 5.0
    srf_init: str = "code"
    srf_eps: float = 1e-8
    param_scale: float = 1.0

    def setup(self):
        self.psf = GaussianPSF(self.kernel_size, self.psf_init, self.param_scale)
        self.srf = GaussianSRF(self.n_bands, self.msi_bands, self.components, self.srf_init,
                               self.srf_eps, self.param_scale)

    def __call__(self) -> tuple[Array, Array]:
        return self.psf(), self.srf()


def _pointwise(features: int, name: str) -> layers.Conv2d:
    """A 1x1 conv with bias = a per-pixel Dense with PyTorch's default init (the custom init of
    the released code is dead code, specs/daem.md §4)."""
    return layers.Conv2d(features, (1, 1), use_bias=True, name=name)


class Encoder(nn.Module):
    """Per-pixel abundance encoder: E0 on Y, then E1..E4 on ``[previous, Y]`` (MSI concatenated
    before every layer), LReLU(0.2) after E0..E3; ``last_activation`` after E4 (code: ReLU,
    [SUPP] Table 1: LReLU). (..., b) -> (..., n_endmembers)."""
    features: Sequence[int] = ENCODER_FEATURES
    n_endmembers: int = 16
    last_activation: str = "relu"

    @nn.compact
    def __call__(self, y: Array) -> Array:
        h = y
        for i, f in enumerate(self.features):
            inp = y if i == 0 else jnp.concatenate([h, y], -1)
            h = nn.leaky_relu(_pointwise(f, f"conv_{i}")(inp), LRELU_SLOPE)
        a = _pointwise(self.n_endmembers, f"conv_{len(self.features)}")(
            jnp.concatenate([h, y], -1))
        return _activation(self.last_activation)(a)


def _activation(name: str):
    if name == "relu":
        return nn.relu
    if name == "leaky_relu":
        return functools.partial(nn.leaky_relu, negative_slope=LRELU_SLOPE)
    raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {name!r}")


class DecoderHead(nn.Module):
    """Per-pixel MLP ``hidden... -> out_features``: LReLU(0.2) after every hidden layer and
    ``last_activation`` after the last (code: LReLU everywhere; paper: ReLU last)."""
    hidden: Sequence[int]
    out_features: int
    last_activation: str = "leaky_relu"

    @nn.compact
    def __call__(self, a: Array) -> Array:
        h = a
        for i, f in enumerate(self.hidden):
            h = nn.leaky_relu(_pointwise(f, f"fc_{i}")(h), LRELU_SLOPE)
        out = _pointwise(self.out_features, f"fc_{len(self.hidden)}")(h)
        return _activation(self.last_activation)(out)


class FusionVAE(nn.Module):
    """phi: encoder + mean / std decoders. ``__call__(msi) -> (mean, std)``."""
    n_bands: int
    n_endmembers: int = 16
    decoder: str = "code"
    encoder_last_activation: str = "relu"
    mu_hidden: Sequence[int] | None = None
    sigma_hidden: Sequence[int] | None = None

    def setup(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        code = self.decoder == "code"
        mu_h = self.mu_hidden if self.mu_hidden is not None else (
            CODE_MU_HIDDEN if code else PAPER_HIDDEN)
        sg_h = self.sigma_hidden if self.sigma_hidden is not None else (
            CODE_SIGMA_HIDDEN if code else PAPER_HIDDEN)
        last = "leaky_relu" if code else "relu"
        self.encoder = Encoder(ENCODER_FEATURES, self.n_endmembers, self.encoder_last_activation)
        self.decoder_mu = DecoderHead(tuple(mu_h), self.n_bands, last)
        self.decoder_sigma = DecoderHead(tuple(sg_h), self.n_bands, last)

    def encode(self, msi: Array) -> Array:
        return self.encoder(msi)

    def decode(self, abundances: Array) -> tuple[Array, Array]:
        return self.decoder_mu(abundances), self.decoder_sigma(abundances)

    def __call__(self, msi: Array) -> tuple[Array, Array]:
        return self.decode(self.encode(msi))


class DAEM(nn.Module):
    """The whole DAEM model (fusion net phi + degradation estimate theta).

    ``__call__(lr_hsi, hr_msi)`` -> the HR-HSI estimate ``mean(Dec(Enc(hr_msi)))`` (B, H, W, C)
    (deterministic; the released code evaluates one sample, see :meth:`sample_hr`). The encoder
    never sees ``lr_hsi`` (as the code); it is checked for shape consistency. The PSF kernel is
    ``scale x scale`` (the code ties the kernel size to the scale factor).
    ``back_projection`` > 0 (ours, not the paper's; default 0 = the paper) then runs that many
    iterations of :func:`jaxspec.fusion_baselines.back_project` with the estimated PSF, so the
    output agrees with the LR-HSI it was given."""
    n_bands: int = 31
    msi_bands: int = 3
    scale: int = 32
    n_endmembers: int = 16
    decoder: str = "code"
    encoder_last_activation: str = "relu"
    mu_hidden: Sequence[int] | None = None
    sigma_hidden: Sequence[int] | None = None
    srf_components: int = 4
    psf_init: float = 5.0
    srf_init: str = "code"
    srf_eps: float = 1e-8
    theta_lr_scale: float = 1.0       # theta stored / this: Adam lr of theta x this (1 = code)
    # EM loss settings (read by the registered phase losses): [a1, a2, a3], beta, consistency
    theta_weights: Sequence[float] = (0.5, 0.2, 0.2)
    beta: float = 0.5
    consistency: str = "paper"
    # ours, not the paper's: iterations of back-projection onto the LR-HSI after the mean head
    back_projection: int = 0

    def setup(self):
        self.fusion = FusionVAE(self.n_bands, self.n_endmembers, self.decoder,
                                self.encoder_last_activation, self.mu_hidden, self.sigma_hidden)
        self.degradation = Degradation(self.n_bands, self.msi_bands, self.scale,
                                       self.srf_components, self.psf_init, self.srf_init,
                                       self.srf_eps, self.theta_lr_scale)

    # -- checks -----------------------------------------------------------------------------
    def _check(self, lr_hsi: Array | None, hr_msi: Array) -> None:
        if hr_msi.ndim != 4 or hr_msi.shape[-1] != self.msi_bands:
            raise ValueError(f"DAEM(msi_bands={self.msi_bands}) expects hr_msi of shape "
                             f"(B, H, W, {self.msi_bands}); got {tuple(hr_msi.shape)}")
        if lr_hsi is None:
            return
        if lr_hsi.ndim != 4 or lr_hsi.shape[-1] != self.n_bands:
            raise ValueError(f"DAEM(n_bands={self.n_bands}) expects lr_hsi of shape "
                             f"(B, h, w, {self.n_bands}); got {tuple(lr_hsi.shape)}")
        hh, ww = hr_msi.shape[1:3]
        if (lr_hsi.shape[0] != hr_msi.shape[0]
                or (lr_hsi.shape[1] * self.scale, lr_hsi.shape[2] * self.scale) != (hh, ww)):
            raise ValueError(f"DAEM(scale={self.scale}): lr_hsi {tuple(lr_hsi.shape)} and hr_msi "
                             f"{tuple(hr_msi.shape)} do not pair (need H = {self.scale} h, W = "
                             f"{self.scale} w, same batch)")

    # -- pieces (``model.apply(variables, ..., method=DAEM.xxx)``) --------------------------------
    def psf(self) -> Array:
        return self.degradation.psf()

    def srf(self) -> Array:
        return self.degradation.srf()

    def encode(self, msi: Array) -> Array:
        return self.fusion.encode(msi)

    def decode(self, abundances: Array) -> tuple[Array, Array]:
        return self.fusion.decode(abundances)

    def spatial_degrade(self, z: Array) -> Array:
        return psf_degrade(z, self.psf(), self.scale)

    def spectral_degrade(self, z: Array) -> Array:
        return srf_project(z, self.srf())

    def sample_hr(self, hr_msi: Array, noise: Array) -> Array:
        """One reparameterised sample ``mean + noise * std`` of Z at HR (the code's E-step)."""
        mean, std = self.fusion(hr_msi)
        return reparameterize(mean, std, noise)

    def sample_lr(self, hr_msi: Array, noise: Array, kernel: Array | None = None) -> Array:
        """The degradation-aware LR pass: ``sample(Dec(Enc(PSF(Y))))`` (the phi-step input);
        ``kernel`` replaces the estimated PSF (e.g. the true one) when given."""
        y_lr = (self.spatial_degrade(hr_msi) if kernel is None
                else psf_degrade(hr_msi, kernel, self.scale))
        mean, std = self.fusion(y_lr)
        return reparameterize(mean, std, noise)

    def __call__(self, lr_hsi: Array | None, hr_msi: Array, train: bool = False) -> Array:
        hr_msi = layers.as_floating(hr_msi)
        self._check(lr_hsi, hr_msi)
        if self.is_initializing():
            self.degradation()
        mean, _ = self.fusion(hr_msi)
        if self.back_projection and lr_hsi is not None:
            mean = fusion_baselines.back_project(mean, layers.as_floating(lr_hsi), self.scale,
                                                 self.psf(), iters=self.back_projection)
        return mean


# --------------------------------------------------------------------------------------------
# EM losses
# --------------------------------------------------------------------------------------------
def draw_noise(key: Array, lr_hsi: Array, scale: int) -> tuple[Array, Array]:
    """Two independent standard-normal fields: ``(noise_hr (B, sH, sw, C), noise_lr (B, h, w, C))``
    for the HR sample of the theta-step and the LR sample of the phi-step."""
    b, h, w, c = lr_hsi.shape
    k_hr, k_lr = jax.random.split(key)
    return (jax.random.normal(k_hr, (b, h * scale, w * scale, c), jnp.float32),
            jax.random.normal(k_lr, (b, h, w, c), jnp.float32))


def _freeze(params: Mapping[str, Any], group: str) -> dict:
    out = dict(params)
    out[group] = jax.lax.stop_gradient(params[group])
    return out


def _apply_of(model):
    """``(apply, scale)`` from a :class:`DAEM` or its bound ``model.apply``."""
    module = model if isinstance(model, DAEM) else getattr(model, "__self__", None)
    if not isinstance(module, DAEM):
        raise ValueError(f"expected a DAEM module or its bound .apply, got {model!r}")
    return module.apply, module.scale


def theta_loss(model, params: Mapping[str, Any], lr_hsi: Array, hr_msi: Array,
               noise_hr: Array, weights: Sequence[float] = (0.5, 0.2, 0.2),
               consistency: str = "paper") -> tuple[Array, dict]:
    """M-step for theta (``loss.cal_loss_theta``), gradients to ``degradation`` only::

        Zs = stop_grad(mean + noise_hr * std)(Enc(Y))          (E-step sample, fusion frozen)
        L  = a1 |X - PSF(Zs)| + a2 |Y - Zs R| + a3 C

    ``consistency``: ``"paper"`` C = |X R - PSF(Y)| on the observed images (default);
    ``"code"`` C = |SRF(PSF(Zs)) - PSF(SRF(Zs))|, the released code's term, identically zero up to
    rounding (both operators are linear and act on different axes, so they commute);
    ``"none"`` C = 0. ``model``: the DAEM module or its bound ``apply``. Returns
    ``(L, {"x_fit", "y_fit", "consistency"})`` (unweighted terms)."""
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
    apply, scale = _apply_of(model)
    variables = {"params": _freeze(params, "fusion")}
    z = jax.lax.stop_gradient(apply(variables, hr_msi, noise_hr, method=DAEM.sample_hr))
    kernel, srf = apply(variables, method=DAEM.psf), apply(variables, method=DAEM.srf)
    x_fit = _l1(lr_hsi, psf_degrade(z, kernel, scale))
    y_fit = _l1(hr_msi, srf_project(z, srf))
    if consistency == "paper":
        cons = consistency_loss(lr_hsi, hr_msi, kernel, srf, scale)
    elif consistency == "code":
        cons = _l1(srf_project(psf_degrade(z, kernel, scale), srf),
                   psf_degrade(srf_project(z, srf), kernel, scale))
    else:
        cons = jnp.zeros((), jnp.float32)
    a1, a2, a3 = weights
    return a1 * x_fit + a2 * y_fit + a3 * cons, {"x_fit": x_fit, "y_fit": y_fit,
                                                  "consistency": cons}


def phi_loss(model, params: Mapping[str, Any], lr_hsi: Array, hr_msi: Array,
             noise_lr: Array, beta: float = 0.5, kernel: Array | None = None
             ) -> tuple[Array, dict]:
    """M-step for phi, degradation-aware (``loss.cal_loss_phi``), gradients to ``fusion`` only::

        X^ = mean + noise_lr * std  of  Dec(Enc(stop_grad(PSF)(Y)))      L = beta |X^ - X|

    ``kernel``: a fixed PSF instead of the estimate (the true one, or the supplement's "w/o COP"
    ablation's fixed near-delta kernel)."""
    apply, _ = _apply_of(model)
    variables = {"params": _freeze(params, "degradation")}
    x_hat = apply(variables, hr_msi, noise_lr, kernel, method=DAEM.sample_lr)
    fit = _l1(x_hat, lr_hsi)
    return beta * fit, {"lr_fit": fit}


def em_gradients(model: DAEM, params: Mapping[str, Any], lr_hsi: Array, hr_msi: Array,
                 key: Array, weights: Sequence[float] = (0.5, 0.2, 0.2), beta: float = 0.5,
                 consistency: str = "paper", kernel: Array | None = None
                 ) -> tuple[dict, dict]:
    """One generalised-EM iteration's gradient as the released code takes it: theta-gradient of
    :func:`theta_loss` plus phi-gradient of :func:`phi_loss`, both at the *same* parameters, with
    two independent noise draws (one Adam step on the sum then equals the code's single
    ``optimizer.step()``). Returns ``(grads, metrics)``."""
    noise_hr, noise_lr = draw_noise(key, lr_hsi, model.scale)
    (lt, mt), gt = jax.value_and_grad(
        lambda p: theta_loss(model, p, lr_hsi, hr_msi, noise_hr, weights, consistency),
        has_aux=True)(params)
    (lp, mp), gp = jax.value_and_grad(
        lambda p: phi_loss(model, p, lr_hsi, hr_msi, noise_lr, beta, kernel),
        has_aux=True)(params)
    grads = {**gt, "fusion": gp["fusion"]}
    return grads, {"loss_theta": lt, "loss_phi": lp, **mt, **mp}


# --------------------------------------------------------------------------------------------
# per-image partial fine-tuning (decoders only)
# --------------------------------------------------------------------------------------------
def finetune_lr(t, lr: float = 1e-3, milestones: Sequence[int] = (250, 450, 650, 850, 1050),
                gamma: float = 0.5, eval_every: int = 20):
    """The fine-tuning learning rate *as the released code executes it*: ``MultiStepLR.step(e)``
    is only called at the evaluation iterations ``e = 0, 20, 40, ...``, so the update at
    iteration ``t`` uses ``lr * gamma^#{m <= 20 floor(t / 20)}`` (1e-3, 5e-4 from t = 260,
    2.5e-4 from t = 460)."""
    e = (jnp.asarray(t) // eval_every) * eval_every
    n = jnp.sum(e[..., None] >= jnp.asarray(milestones, jnp.int32), axis=-1)
    return lr * jnp.float32(gamma) ** n


def finetune_update_count(t: int, eval_every: int = 20) -> int:
    """Number of decoder updates made before iteration ``t`` (iterations ``t' < t`` with
    ``t' % eval_every != 0``; the code only evaluates at those)."""
    return t - (t + eval_every - 1) // eval_every


def _split_fusion(params):
    fus = params["fusion"]
    dec = {"decoder_mu": fus["decoder_mu"], "decoder_sigma": fus["decoder_sigma"]}
    return dec, fus["encoder"]


def _join_fusion(params, dec):
    fus = dict(params["fusion"])
    fus.update(dec)
    out = dict(params)
    out["fusion"] = fus
    return out


@functools.partial(jax.jit, static_argnames=("model", "eval_every", "milestones", "lr", "gamma",
                                             "beta"))
def _finetune_segment(model, params, dec, opt_state, a_lr, lr_hsi, key, t0, t1, *, eval_every,
                      milestones, lr, gamma, beta):
    adam = optax.scale_by_adam()

    def loss_fn(d, noise):
        mean, std = model.apply({"params": _join_fusion(params, d)}, a_lr, method=DAEM.decode)
        return beta * _l1(reparameterize(mean, std, noise), lr_hsi)

    def body(t, carry):
        d, st = carry

        def update(c):
            d, st = c
            noise = jax.random.normal(jax.random.fold_in(key, t), lr_hsi.shape, jnp.float32)
            g = jax.grad(loss_fn)(d, noise)
            u, st = adam.update(g, st, d)
            step = finetune_lr(t, lr, milestones, gamma, eval_every)
            return jax.tree_util.tree_map(lambda p, x: p - step * x, d, u), st

        return jax.lax.cond(t % eval_every == 0, lambda c: c, update, (d, st))

    return jax.lax.fori_loop(t0, t1, body, (dec, opt_state))


@functools.partial(jax.jit, static_argnames=("model", "steps", "lr"))
def _reestimate_theta(model, params, lr_hsi, hr_msi, *, steps, lr):
    opt = optax.adam(lr / model.theta_lr_scale)       # theta is stored / theta_lr_scale

    def loss(theta):
        v = {"params": {**params, "degradation": theta}}
        return consistency_loss(lr_hsi, hr_msi, model.apply(v, method=DAEM.psf),
                                model.apply(v, method=DAEM.srf), model.scale)

    def body(_, carry):
        theta, st = carry
        upd, st = opt.update(jax.grad(loss)(theta), st, theta)
        return optax.apply_updates(theta, upd), st

    theta = params["degradation"]
    theta, _ = jax.lax.fori_loop(0, steps, body, (theta, opt.init(theta)))
    return {**params, "degradation": theta}


def reestimate_theta(model: DAEM, params: Mapping[str, Any], lr_hsi: Array, hr_msi: Array, *,
                     steps: int = 300, lr: float = 0.1) -> dict:
    """Test-time re-estimation of the degradation (theta) on one observed pair, for PSFs that
    change from image to image ([SUPP] E; the released code never updates theta at test time,
    specs/daem.md §5): ``steps`` Adam steps (fresh state, step size ``lr`` on theta's actual
    values, whatever ``theta_lr_scale``) on the paper's consistency term
    ``mean |X R_theta - PSF_theta(Y)|`` alone, starting from the trained theta. It needs no HR
    decode (both sides are LR-MSIs), so it is cheap; the fusion parameters are untouched.
    Returns the parameters with the new theta."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"reestimate_theta: steps must be an integer >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"reestimate_theta: lr must be > 0, got {lr!r}")
    lr_hsi = jnp.asarray(lr_hsi, jnp.float32)
    hr_msi = jnp.asarray(hr_msi, jnp.float32)
    model.apply({"params": params}, lr_hsi, hr_msi)           # shape checks
    return _reestimate_theta(model, params, lr_hsi, hr_msi, steps=int(steps), lr=float(lr))


def finetune(model: DAEM, params: Mapping[str, Any], lr_hsi: Array, hr_msi: Array, key: Array,
             *, record_at: Sequence[int] = (0, 200, 500), eval_every: int = 20, lr: float = 1e-3,
             milestones: Sequence[int] = (250, 450, 650, 850, 1050), gamma: float = 0.5,
             beta: float = 0.5, kernel: Array | None = None, theta_steps: int = 0,
             theta_lr: float = 0.1) -> tuple[dict[int, Array], dict]:
    """Per-image partial fine-tuning of the released code (``demo_cave.test`` /
    ``model.test_incremental``), one image pair (1, h, w, C) / (1, H, W, b):

    1. start from ``params`` (the trained weights) and a fresh Adam state;
    2. encoder, PSF and SRF frozen: the LR abundances ``A_lr = Enc(PSF(Y))`` are computed once;
    3. iterations ``t = 0 .. max(record_at) - 1``: at ``t % eval_every == 0`` no update (the code
       only evaluates there); otherwise one Adam step on the decoders (mean and std heads) on
       ``beta |sample(Dec(A_lr)) - X|`` with the lr of :func:`finetune_lr`.

    ``record_at``: iteration counts at which the HR prediction ``mean(Dec(Enc(Y)))`` is taken
    (200 is the authors' reported row; 500 = after the full loop). ``kernel`` replaces the
    estimated PSF in ``A_lr`` (e.g. the true PSF). ``theta_steps`` > 0 (ours; 0 = the code)
    first re-estimates theta on this pair (:func:`reestimate_theta`, step size ``theta_lr``), so
    ``A_lr`` -- and the model's back-projection, when on -- use this image's PSF. Returns
    ``({t: prediction}, fine-tuned params)`` (with the re-estimated theta); ``params`` itself is
    never modified, so every image starts from the same weights."""
    lr_hsi = jnp.asarray(lr_hsi, jnp.float32)
    hr_msi = jnp.asarray(hr_msi, jnp.float32)
    model.apply({"params": params}, lr_hsi, hr_msi)           # shape checks
    if theta_steps:
        params = reestimate_theta(model, params, lr_hsi, hr_msi, steps=theta_steps, lr=theta_lr)
    variables = {"params": params}
    y_lr = (model.apply(variables, hr_msi, method=DAEM.spatial_degrade) if kernel is None
            else psf_degrade(hr_msi, kernel, model.scale))
    a_lr = model.apply(variables, y_lr, method=DAEM.encode)
    dec, _ = _split_fusion(params)
    opt_state = optax.scale_by_adam().init(dec)
    preds, t = {}, 0
    for target in sorted(set(int(r) for r in record_at)):
        if target < 0:
            raise ValueError(f"record_at must be >= 0, got {target}")
        if target > t:
            dec, opt_state = _finetune_segment(
                model, params, dec, opt_state, a_lr, lr_hsi, key, t, target,
                eval_every=eval_every, milestones=tuple(milestones), lr=lr, gamma=gamma,
                beta=beta)
            t = target
        preds[target] = model.apply({"params": _join_fusion(params, dec)}, lr_hsi, hr_msi)
    return preds, _join_fusion(params, dec)


# --------------------------------------------------------------------------------------------
# size, cost and degradation-estimate errors
# --------------------------------------------------------------------------------------------
def analytic_macs(height: int, width: int, n_bands: int = 31, msi_bands: int = 3,
                  n_endmembers: int = 16, decoder: str = "code", with_sigma: bool = True) -> int:
    """Multiply-accumulates of the HR inference pass (encoder + decoder heads, weights only;
    activations and biases count 0, the fvcore/thop convention). Per pixel, CAVE, code
    decoders: encoder 1,132 + mean head 3,988 + std head 1,128 = 6,248 (paper decoders: 3,388).
    ``with_sigma=False``: the mean head only (what :class:`DAEM` evaluates)."""
    enc, cin = 0, msi_bands
    for f in ENCODER_FEATURES:
        enc += cin * f
        cin = f + msi_bands
    enc += cin * n_endmembers

    def head(hidden):
        dims = (n_endmembers,) + tuple(hidden) + (n_bands,)
        return sum(a * b for a, b in zip(dims[:-1], dims[1:]))

    mu = head(CODE_MU_HIDDEN if decoder == "code" else PAPER_HIDDEN)
    sg = head(CODE_SIGMA_HIDDEN if decoder == "code" else PAPER_HIDDEN)
    return height * width * (enc + mu + (sg if with_sigma else 0))


def kernel_error(estimated, true) -> dict[str, float]:
    """PSF estimate vs truth (same k x k grid): ``l1 = sum |K^ - K|`` (0..2, both sum to 1),
    ``rel_l2 = ||K^ - K|| / ||K||`` and the second-moment (covariance) eigenvalues of both."""
    e, t = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    if e.shape != t.shape:
        raise ValueError(f"kernel_error: shapes differ, {e.shape} vs {t.shape}")

    def cov_eigs(k):
        k = k / k.sum()
        u, v = np.mgrid[0:k.shape[0], 0:k.shape[1]].astype(np.float64)
        mu_u, mu_v = (k * u).sum(), (k * v).sum()
        cuu = (k * (u - mu_u) ** 2).sum()
        cvv = (k * (v - mu_v) ** 2).sum()
        cuv = (k * (u - mu_u) * (v - mu_v)).sum()
        return sorted(np.linalg.eigvalsh([[cuu, cuv], [cuv, cvv]]).tolist(), reverse=True)

    return {"l1": float(np.abs(e - t).sum()),
            "rel_l2": float(np.linalg.norm(e - t) / np.linalg.norm(t)),
            "cov_eigs_est": cov_eigs(e), "cov_eigs_true": cov_eigs(t)}


def srf_error(estimated, true) -> dict[str, float]:
    """SRF estimate vs truth, both (C, b) with columns summing to 1: mean column L1
    ``mean_j sum_i |R^ - R|`` (0..2) and the mean spectral angle between columns (degrees)."""
    e, t = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    if e.shape != t.shape:
        raise ValueError(f"srf_error: shapes differ, {e.shape} vs {t.shape}")
    cos = (e * t).sum(0) / (np.linalg.norm(e, axis=0) * np.linalg.norm(t, axis=0) + 1e-12)
    return {"l1": float(np.abs(e - t).sum(0).mean()),
            "angle_deg": float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())}


def param_count_by_group(params: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts of the encoder, the two heads and the degradation estimate."""
    def n(t):
        return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(t)))
    fus = params["fusion"]
    return {"encoder": n(fus["encoder"]), "decoder_mu": n(fus["decoder_mu"]),
            "decoder_sigma": n(fus["decoder_sigma"]), "psf": n(params["degradation"]["psf"]),
            "srf": n(params["degradation"]["srf"]), "total": n(params)}


# --------------------------------------------------------------------------------------------
# engine integration: task "fusion", step kind "phases" (theta-step, then phi-step), adapt
# --------------------------------------------------------------------------------------------
def _module_of(apply_fn) -> DAEM:
    module = getattr(apply_fn, "__self__", None)
    if not isinstance(module, DAEM):
        raise ValueError("the DAEM phase losses need the model's bound .apply as apply_fn")
    return module


def theta_phase_loss(apply_fn, variables, batch, rngs):
    """Phase ``theta`` (M-step of the degradation, after the E-step sample): :func:`theta_loss`
    with the model's ``theta_weights`` / ``consistency``; the phase updates ``degradation/``."""
    m = _module_of(apply_fn)
    x, y = batch["lr_hsi"], batch["hr_msi"]
    noise_hr, _ = draw_noise(rngs["noise"], x, m.scale)
    return theta_loss(m, variables["params"], x, y, noise_hr, tuple(m.theta_weights),
                      m.consistency)


def phi_phase_loss(apply_fn, variables, batch, rngs):
    """Phase ``phi`` (degradation-aware M-step of the fusion net): :func:`phi_loss` with the
    model's ``beta``, the PSF as updated by phase ``theta``; the phase updates ``fusion/``."""
    m = _module_of(apply_fn)
    x, y = batch["lr_hsi"], batch["hr_msi"]
    _, noise_lr = draw_noise(rngs["noise"], x, m.scale)
    return phi_loss(m, variables["params"], x, y, noise_lr, m.beta)


def adapt_loss(apply_fn, variables, inputs):
    """Self-supervised loss of the per-image fine-tuning through ``jaxspec.inference.
    make_adapter`` (``config.adapt_params`` = the two decoder heads): ``beta * mean |mean(Dec(
    Enc(PSF(Y)))) - X|`` at LR. The engine's adapter passes no PRNG key, so this uses the mean
    head (no sample; the std head gets no gradient) -- :func:`finetune` is the sampled version
    with the code's lr schedule."""
    m = _module_of(apply_fn)
    x, y = inputs["lr_hsi"], inputs["hr_msi"]
    a_lr = apply_fn(variables, apply_fn(variables, y, method=DAEM.spatial_degrade),
                    method=DAEM.encode)
    mean, _ = apply_fn(variables, a_lr, method=DAEM.decode)
    return m.beta * _l1(mean, x)


def _register():
    from jaxspec import registry
    from jaxspec.configs import daem as _configs
    from jaxspec.train.steps import Phase

    registry.register(registry.Method(
        name="daem",
        make_model=registry.module_factory(
            DAEM, "DAEM", tuple_keys=("theta_weights", "mu_hidden", "sigma_hidden")),
        presets={**registry.standard_presets("jaxspec.configs.daem"),
                 "harvard": _configs.harvard, "chikusei": _configs.chikusei},
        task="fusion",
        step_kind="phases",
        data_fields={"n_bands": "bands", "msi_bands": "msi_bands", "scale": "scale"},
        adapt_loss=adapt_loss,
        rng_streams=("noise",),
        step_options={"phases": [
            Phase("theta", theta_phase_loss, params=(r"^degradation/",)),
            Phase("phi", phi_phase_loss, params=(r"^fusion/",)),
        ]},
        description="DAEM: Gaussian PSF + GMM SRF estimation and a per-pixel VAE fusion net "
                    "(6.6 K params), generalised EM, per-image decoder fine-tuning",
        reference=("W. Guo, W. Xie, K. Jiang, Y. Li, J. Lei, L. Fang. Toward Stable, "
                   "Interpretable, and Lightweight Hyperspectral Super-Resolution. CVPR 2023."),
    ))


_register()
