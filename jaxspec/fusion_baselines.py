"""Classical HSI-MSI fusion (HSI super-resolution) baselines as pure JAX functions.

Inputs are batched NHWC float arrays: ``lr_hsi`` (B, h, w, C), ``hr_msi`` (B, H, W, K) with
``H = s h``, ``W = s w`` (``s`` = ``scale``, a static int); outputs are (B, H, W, C) float32.
Every function is jit-able (``scale``, iteration counts and modes static) and vectorised over
the batch with ``jax.vmap``.

* :func:`bicubic`: cubic interpolation of the LR-HSI (the MSI is not used).
* :func:`gsa`: Gram-Schmidt adaptive component substitution (Aiazzi, Baronti & Selva, IEEE
  TGRS 2007) extended to HS-MS fusion as in the Yokoya, Grohnfeldt & Chanussot (IEEE GRSM 2017)
  comparison: every HS band is sharpened by the MSI band it correlates with best at low
  resolution.
* :func:`lr_regression`: a per-pixel spectral map fitted on the image's own low-resolution
  pairs: the affine least-squares map from the spatially degraded MSI to the LR-HSI, applied
  to the HR-MSI. It uses the LR-HSI only through that fit (no spatial detail injection): the
  classical counterpart of per-pixel learned fusion such as DAEM, whose per-image fine-tuning
  fits its decoder on the same pairs.
* :func:`back_project`: iterative back-projection (Irani & Peleg, CVGIP 1991) of any HR
  estimate onto the LR-HSI: ``Z <- Z + U(X - S(Z))`` with ``U`` the cubic interpolation of
  :func:`bicubic`, so the estimate agrees with the measured LR-HSI (a refinement step, used
  after per-pixel maps such as :func:`lr_regression` or DAEM's decoder).
* :func:`cnmf`: coupled non-negative matrix factorisation (Yokoya, Yairi & Iwasaki, IEEE TGRS
  2012): alternate Lee-Seung multiplicative NMF unmixing of the LR-HSI and the HR-MSI, the
  endmembers coupled through the SRF and the abundances through the PSF.
* :func:`estimate_psf`, :func:`estimate_srf`: blind least-squares estimates of the degradation
  from the observed pair alone (the first stage of HySure, Simoes et al., IEEE TGRS 2015, with
  the PSF restricted to a Gaussian): the PSF that makes the degraded MSI best explained as a
  linear function of the LR-HSI's bands, then the SRF as that linear map. They make every
  method above blind.

The spatial degradation ``S`` that GSA and CNMF need (to compare the MSI with the LR-HSI and
to degrade HR abundances) is given by ``psf`` -- a (k, k) kernel, one (B, k, k) kernel per
image, or ``None`` for the s x s box (block mean) -- and ``degradation``:

* ``"daem"`` (default): :func:`jaxspec.physics.daem_degrade`, DAEM's zero-padded valid
  correlation with stride s (any k >= s);
* ``"same"``: :func:`jaxspec.physics.spatial_degrade`, a same-size convolution with a
  reflected border then phase-0 decimation (odd k), i.e. ``physics.make_sr_pair``'s default.

Alignment: LR pixel ``i`` is the PSF-weighted average around HR coordinate ``c + s i``
(``lr_center`` = ``c``, per axis). The box and any symmetric k = s kernel under ``"daem"`` give
the cell centre ``c = (s - 1) / 2`` (:func:`jax.image.resize`'s half-pixel convention); a DAEM
kernel centred at ``k // 2`` gives ``c = k // 2 - (k - s) // 2`` (``s / 2`` for k = s, half a
pixel off the cell centre); a centred kernel under ``"same"`` gives ``c = 0``. By default the
methods compute ``c`` from the kernel's centroid (:func:`psf_lr_center`, traceable), so
interpolated LR pixels land where they were measured.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspec import physics

__all__ = ["bicubic", "gsa", "lr_regression", "back_project", "cnmf", "estimate_psf",
           "estimate_srf", "gaussian_kernel", "psf_lr_center", "GSA_MODES", "DEGRADATIONS"]

GSA_MODES = ("grouped", "joint")
DEGRADATIONS = ("daem", "same")
_HI = jax.lax.Precision.HIGHEST
_EPS = 1e-12


# ----------------------------------------------------------------------------- validation
def _check_scale(scale, fn: str) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"{fn}: scale must be a positive integer, got {scale!r}")
    return int(scale)


def _check_image(x, name: str, fn: str) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{fn}: {name} must have shape (B, H, W, C), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}")
    physics.render.check_finite(x, name, fn)
    return jnp.asarray(x, jnp.float32)


def _check_pair(lr_hsi, hr_msi, scale, fn: str):
    s = _check_scale(scale, fn)
    lr = _check_image(lr_hsi, "lr_hsi", fn)
    msi = _check_image(hr_msi, "hr_msi", fn)
    b, h, w, _ = lr.shape
    if msi.shape[0] != b:
        raise ValueError(f"{fn}: batch mismatch, lr_hsi {lr.shape} vs hr_msi {msi.shape}")
    if msi.shape[1] % s or msi.shape[2] % s:
        raise ValueError(f"{fn}: hr_msi size {msi.shape[1:3]} is not divisible by scale {s}")
    if msi.shape[1:3] != (h * s, w * s):
        raise ValueError(f"{fn}: hr_msi is {msi.shape[1:3]} but lr_hsi {lr.shape[1:3]} x scale "
                         f"{s} = {(h * s, w * s)}")
    return lr, msi, s


def _check_psf(psf, batch: int, scale: int, degradation: str, fn: str):
    """None -> the s x s box; (k, k) or (B, k, k) -> normalised (B, k, k) float32."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"{fn}: degradation must be one of {DEGRADATIONS}, got {degradation!r}")
    if psf is None:
        if degradation == "same":
            raise ValueError(f"{fn}: degradation='same' needs an odd psf (no default box)")
        p = jnp.full((scale, scale), 1.0 / scale ** 2, jnp.float32)
    else:
        p = jnp.asarray(psf, jnp.float32)
        if p.ndim not in (2, 3) or p.shape[-1] != p.shape[-2]:
            raise ValueError(f"{fn}: psf must be (k, k) or (B, k, k), got {p.shape}")
        if degradation == "daem" and p.shape[-1] < scale:
            raise ValueError(f"{fn}: psf size {p.shape[-1]} must be >= scale {scale}")
        if degradation == "same" and p.shape[-1] % 2 == 0:
            raise ValueError(f"{fn}: degradation='same' needs an odd psf size, got {p.shape}")
        if p.ndim == 3 and p.shape[0] != batch:
            raise ValueError(f"{fn}: {p.shape[0]} PSFs for a batch of {batch}")
        physics.render.check_finite(p, "psf", fn)
        physics.render.check_nonnegative(p, "psf", fn)
        p = p / jnp.sum(p, axis=(-2, -1), keepdims=True)
    return jnp.broadcast_to(p, (batch,) + p.shape[-2:])


def _kernel_center(p, s: int, degradation: str) -> jax.Array:
    """(c_y, c_x) of LR pixel 0 for a normalised (k, k) kernel (traceable)."""
    k = p.shape[-1]
    idx = jnp.arange(k, dtype=jnp.float32)
    cen = jnp.stack([jnp.sum(jnp.sum(p, 1) * idx), jnp.sum(jnp.sum(p, 0) * idx)])
    if degradation == "daem":       # correlation: LR i sees HR s i + u - pad
        return cen - (k - s) // 2
    return (k - 1) / 2.0 - cen      # convolution (flipped kernel), phase-0 decimation


def psf_lr_center(psf, scale: int, degradation: str = "daem") -> tuple[float, float]:
    """HR coordinate ``(c_y, c_x)`` of LR pixel 0 when the LR-HSI was made with ``psf``
    (k, k) under ``degradation``: for ``"daem"`` the kernel centroid minus the zero padding
    ``(k - s) // 2``; for ``"same"`` ``(k - 1) / 2`` minus the centroid (the convolution flips
    the kernel). ``None`` (box) -> ``((s - 1) / 2, (s - 1) / 2)``."""
    s = _check_scale(scale, "psf_lr_center")
    p = _check_psf(psf, 1, s, degradation, "psf_lr_center")
    return tuple(float(v) for v in _kernel_center(p[0], s, degradation))


def _centers(lr_center, p, s: int, degradation: str) -> jax.Array:
    """(B, 2) LR-pixel-0 coordinates: ``lr_center`` broadcast, else from each kernel."""
    if lr_center is not None:
        c = jnp.broadcast_to(jnp.asarray(lr_center, jnp.float32), (2,))
        return jnp.broadcast_to(c, (p.shape[0], 2))
    return jax.vmap(lambda k: _kernel_center(k, s, degradation))(p)


def _degrade(x, p, s: int, degradation: str):
    if degradation == "daem":
        return physics.daem_degrade(x, p, s)
    return physics.spatial_degrade(x, p, s)


# ----------------------------------------------------------------------------- upsampling
def _upsample(x, s: int, center) -> jax.Array:
    """Keys cubic (a = -0.5, MATLAB ``imresize``'s bicubic) interpolation of (..., h, w, C)
    by ``s``, with LR pixel i placed at HR coordinate ``center + s i``. jax.image's sample
    position of output pixel x is ``(x + 0.5 - t) / s`` in input pixel units; LR pixel i (at
    i + 0.5) must sit at x = c + s i, so ``t = 0.5 + c - s / 2`` (c = (s-1)/2 -> t = 0, i.e.
    plain ``jax.image.resize``)."""
    nd = x.ndim
    h, w = x.shape[-3], x.shape[-2]
    shape = x.shape[:-3] + (h * s, w * s, x.shape[-1])
    t = 0.5 + jnp.asarray(center, jnp.float32) - s / 2.0
    return jax.image.scale_and_translate(
        x, shape, (nd - 3, nd - 2), jnp.asarray([s, s], jnp.float32), t, "cubic",
        antialias=False)


def bicubic(lr_hsi, scale: int, lr_center=None) -> jax.Array:
    """Cubic-interpolation upsampling of the LR-HSI by ``scale``: (B, h, w, C) ->
    (B, s h, s w, C), Keys kernel (a = -0.5, as MATLAB ``imresize``), edge weights
    renormalised (jax.image). ``lr_center``: HR coordinate of LR pixel 0 (scalar or
    (c_y, c_x)); default the cell centre (s - 1) / 2 (``jax.image.resize``); see the module
    docstring and :func:`psf_lr_center`."""
    s = _check_scale(scale, "bicubic")
    lr = _check_image(lr_hsi, "lr_hsi", "bicubic")
    c = jnp.full((2,), (s - 1) / 2.0) if lr_center is None else lr_center
    return _bicubic(lr, s, jnp.broadcast_to(jnp.asarray(c, jnp.float32), (2,)))


@functools.partial(jax.jit, static_argnums=(1,))
def _bicubic(lr, s, center):
    return _upsample(lr, s, center)


# ----------------------------------------------------------------------------- GSA
def gsa(lr_hsi, hr_msi, scale: int, psf=None, *, mode: str = "grouped",
        degradation: str = "daem", lr_center=None) -> jax.Array:
    r"""Gram-Schmidt adaptive (GSA) fusion. Per image, with :math:`\tilde Z` the cubic
    upsampled LR-HSI, :math:`\bar{\cdot}` the per-band image mean, :math:`S` the spatial
    degradation (``psf``) and :math:`Y_k` the MSI bands:

    1. low-resolution MSI :math:`Y^{lr} = S(Y)`;
    2. ``mode="grouped"`` (Yokoya et al. 2017): HS band c joins the group of the MSI band
       :math:`k(c) = \arg\max_k \mathrm{corr}(Y^{lr}_k, X_c)` at low resolution. For each
       group, the intensity weights are the least-squares regression
       :math:`Y^{lr}_k - \bar Y^{lr}_k \approx \sum_{c \in k} \alpha_c (X_c - \bar X_c) +
       \alpha_0` (Aiazzi 2007), :math:`I_k = \sum_{c\in k} \alpha_c (\tilde Z_c -
       \bar{\tilde Z}_c)`, centred; the gain is :math:`g_c = \mathrm{cov}(I_k, \tilde Z_c) /
       \mathrm{var}(I_k)` and :math:`\hat Z_c = \tilde Z_c + g_c\,(Y_k - \bar Y_k - I_k)`
       (detail injection, which keeps the band mean of :math:`\tilde Z_c`).
       ``mode="joint"``: one regression per MSI band on *all* HS bands, and multivariate
       gains :math:`G = \mathrm{Cov}(I)^{-1}\mathrm{Cov}(I, \tilde Z)` (K x C), so
       :math:`\hat Z = \tilde Z + (Y - \bar Y - I)\,G`.

    Exact cases (tests): ``grouped`` for a rank-one scene :math:`Z = a(x)\,e`; ``joint`` for
    any scene of at most K linearly mixed endmembers whose SRF projections are independent,
    when ``psf`` is the true PSF (then :math:`\alpha` is the SRF and :math:`\hat Z = Z`).
    """
    lr, msi, s = _check_pair(lr_hsi, hr_msi, scale, "gsa")
    if mode not in GSA_MODES:
        raise ValueError(f"gsa: mode must be one of {GSA_MODES}, got {mode!r}")
    p = _check_psf(psf, lr.shape[0], s, degradation, "gsa")
    return _gsa(lr, msi, p, _centers(lr_center, p, s, degradation), s, mode, degradation)


def _centred(x):
    return x - jnp.mean(x, axis=(0, 1), keepdims=True)


def _lstsq(a, b, ridge: float = 1e-6):
    """Least squares ``argmin |a x - b|^2 + lam |x|^2`` with ``lam = ridge tr(a^T a) / n`` (a
    tiny ridge relative to the design's scale: all-zero columns get weight 0, rank-deficient
    designs the near-minimum-norm solution). Solved by QR of the ridge-augmented design
    ``[a; sqrt(lam) I]``, so the float32 error follows the design's condition number, not its
    square as with the normal equations (GSA's design -- 31 correlated bands -- has a condition
    number of ~1e4, whose square is beyond float32)."""
    n = a.shape[1]
    lam = ridge * jnp.sum(a * a) / n + _EPS
    aug = jnp.concatenate([a, jnp.sqrt(lam) * jnp.eye(n, dtype=a.dtype)], 0)
    rhs = jnp.concatenate([b, jnp.zeros((n,) + b.shape[1:], b.dtype)], 0)
    q, r = jnp.linalg.qr(aug)
    return jax.scipy.linalg.solve_triangular(r, jnp.dot(q.T, rhs, precision=_HI), lower=False)


def _with_ones(a):
    return jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], 1)


def _affine_lstsq(a, b, ridge: float = 1e-6):
    """``[W; w0] = argmin |[a, 1] [W; w0] - b|^2`` (+ the ridge of :func:`_lstsq`): (F + 1, O)
    for ``a`` (n, F) and ``b`` (n, O)."""
    return _lstsq(_with_ones(a), b, ridge)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _gsa(lr, msi, psf, centers, s, mode, degradation):
    def one(x, y, p, center):
        h, w, c = x.shape
        k = y.shape[-1]
        up = _upsample(x, s, center)
        up0 = _centred(up).reshape(-1, c)
        x0 = _centred(x).reshape(-1, c)
        y_lr0 = _centred(_degrade(y, p, s, degradation)).reshape(-1, k)
        y0 = _centred(y).reshape(-1, k)
        ones = jnp.ones((x0.shape[0], 1), x0.dtype)
        if mode == "joint":
            alpha = _lstsq(jnp.concatenate([x0, ones], 1), y_lr0)[:c]          # (C, K)
            i0 = _centred(jnp.dot(up0, alpha, precision=_HI))
            cov = jnp.dot(i0.T, i0, precision=_HI)
            g = jnp.linalg.solve(cov + _EPS * jnp.trace(cov) * jnp.eye(k),
                                 jnp.dot(i0.T, up0, precision=_HI))           # (K, C)
            out = up.reshape(-1, c) + jnp.dot(y0 - i0, g, precision=_HI)
            return out.reshape(up.shape)
        # grouped: each HS band sharpened by its best-correlated MSI band
        xn = x0 / (jnp.linalg.norm(x0, axis=0, keepdims=True) + _EPS)
        yn = y_lr0 / (jnp.linalg.norm(y_lr0, axis=0, keepdims=True) + _EPS)
        group = jnp.argmax(jnp.dot(yn.T, xn, precision=_HI), axis=0)          # (C,)
        out = up.reshape(-1, c)
        for j in range(k):
            m = (group == j).astype(x0.dtype)                                  # (C,)
            alpha = _lstsq(jnp.concatenate([x0 * m, ones], 1), y_lr0[:, j])[:c] * m
            i0 = _centred(jnp.dot(up0, alpha, precision=_HI)[:, None])[:, 0]
            var = jnp.mean(i0 * i0)
            gain = jnp.mean(i0[:, None] * up0, axis=0) / jnp.maximum(var, _EPS)
            out = out + m * gain * (y0[:, j] - i0)[:, None]
        return out.reshape(up.shape)

    return jax.vmap(one)(lr, msi, psf, centers)


# ----------------------------------------------------------------------------- LR regression
def lr_regression(lr_hsi, hr_msi, scale: int, psf=None, *, degradation: str = "daem",
                  ridge: float = 1e-6) -> jax.Array:
    r"""Per-image spectral regression on the low-resolution pairs. With :math:`S` the spatial
    degradation (``psf``, ``None`` = the s x s box) and :math:`X` the LR-HSI:

    .. math:: W = \arg\min_W \|[S(Y), 1]\,W - X\|^2, \qquad \hat Z = [Y, 1]\,W

    (``ridge`` as :func:`_lstsq`, relative to the design's scale). Exact (tests) when the scene's
    spectra are an affine function of its MSI values and ``psf`` is the true PSF. The output is
    not clamped."""
    lr, msi, s = _check_pair(lr_hsi, hr_msi, scale, "lr_regression")
    p = _check_psf(psf, lr.shape[0], s, degradation, "lr_regression")
    return _lr_regression(lr, msi, p, s, degradation, float(ridge))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _lr_regression(lr, msi, psf, s, degradation, ridge):
    def one(x, y, p):
        c, k = x.shape[-1], y.shape[-1]
        w = _affine_lstsq(_degrade(y, p, s, degradation).reshape(-1, k), x.reshape(-1, c),
                          ridge)                                              # (K + 1, C)
        return (jnp.dot(y, w[:k], precision=_HI) + w[k]).astype(jnp.float32)

    return jax.vmap(one)(lr, msi, psf)


# ----------------------------------------------------------------------------- back-projection
def back_project(hr, lr_hsi, scale: int, psf=None, *, iters: int = 5,
                 degradation: str = "daem", lr_center=None) -> jax.Array:
    r"""Iterative back-projection of an HR estimate ``hr`` (B, s h, s w, C) onto the LR-HSI
    (B, h, w, C), ``iters`` times:

    .. math:: \hat Z \leftarrow \hat Z + U(X - S(\hat Z))

    with :math:`S` the spatial degradation (``psf`` and ``degradation`` as :func:`gsa`; ``None``
    = the s x s box) and :math:`U` the cubic interpolation of :func:`bicubic` with LR pixel i at
    the kernel's centre (``lr_center``, default from the kernel). The LR residual's low-pass
    part is restored, so a per-pixel spectral map's local errors (metamers the MSI cannot tell
    apart) are corrected by what the LR-HSI measured there. Traceable (works under ``jit`` with
    a traced ``psf``, e.g. an estimated kernel); ``iters`` 0 returns ``hr``. Not clamped."""
    s = _check_scale(scale, "back_project")
    lr = _check_image(lr_hsi, "lr_hsi", "back_project")
    z = _check_image(hr, "hr", "back_project")
    b, h, w, c = lr.shape
    if z.shape != (b, h * s, w * s, c):
        raise ValueError(f"back_project: hr must have shape {(b, h * s, w * s, c)} for lr_hsi "
                         f"{tuple(lr.shape)} at scale {s}, got {tuple(z.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"back_project: iters must be an integer >= 0, got {iters!r}")
    p = _check_psf(psf, b, s, degradation, "back_project")
    return _back_project(z, lr, p, _centers(lr_center, p, s, degradation), s, int(iters),
                         degradation)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _back_project(z, lr, psf, centers, s, iters, degradation):
    def one(zi, x, p, center):
        def body(_, zz):
            return zz + _upsample(x - _degrade(zz, p, s, degradation), s, center)
        return jax.lax.fori_loop(0, iters, body, zi)

    return jax.vmap(one)(z, lr, psf, centers)


# ----------------------------------------------------------------------------- CNMF
def _spa(y, m: int):
    """Successive projection algorithm (Araujo et al. 2001; Gillis & Vavasis 2014): pick the
    pixel of largest residual norm, project it out, ``m`` times. ``y`` (n, C) -> (m, C)."""
    def body(j, carry):
        r, idx = carry
        i = jnp.argmax(jnp.sum(r * r, axis=1))
        u = r[i] / (jnp.linalg.norm(r[i]) + _EPS)
        r = r - jnp.outer(jnp.dot(r, u, precision=_HI), u)
        return r, idx.at[j].set(i)

    _, idx = jax.lax.fori_loop(0, m, body, (y, jnp.zeros((m,), jnp.int32)))
    return y[idx]


def _update_h(h, w, y, n_iter):
    """``n_iter`` Lee-Seung steps for ``H`` in ``Y ~ H W`` (H (n, M), W (M, C'))."""
    wwt = jnp.dot(w, w.T, precision=_HI)
    ywt = jnp.dot(y, w.T, precision=_HI)

    def body(_, h):
        return h * ywt / (jnp.dot(h, wwt, precision=_HI) + _EPS)
    return jax.lax.fori_loop(0, n_iter, body, h)


def _update_w(h, w, y, n_iter, ncol):
    """Lee-Seung steps for the first ``ncol`` columns of ``W`` (the rest, the sum-to-one row
    of the augmented system, stays)."""
    hth = jnp.dot(h.T, h, precision=_HI)
    hty = jnp.dot(h.T, y[:, :ncol], precision=_HI)

    def body(_, w):
        wc = w[:, :ncol]
        wc = wc * hty / (jnp.dot(hth, wc, precision=_HI) + _EPS)
        return w.at[:, :ncol].set(wc)
    return jax.lax.fori_loop(0, n_iter, body, w)


def _alternate(h, w, y, n_iter, ncol, update_w=True, update_h=True):
    def body(_, hw):
        h, w = hw
        if update_w:
            w = _update_w(h, w, y, 1, ncol)
        if update_h:
            h = _update_h(h, w, y, 1)
        return h, w
    return jax.lax.fori_loop(0, n_iter, body, (h, w))


def cnmf(lr_hsi, hr_msi, scale: int, srf, psf=None, *, n_endmembers: int = 30,
         iters: int = 200, outer_iters: int = 1, delta: float | None = None,
         degradation: str = "daem", lr_center=None) -> jax.Array:
    r"""Coupled NMF (Yokoya et al. 2012). Per image, matrices pixel-major: :math:`X` (n, C)
    the LR-HSI, :math:`Y` (N, K) the MSI, :math:`R` (C, K) the SRF (known), :math:`S` the
    spatial degradation (``psf``), M = ``min(n_endmembers, C)`` endmembers (the authors'
    code uses ``max(min(30, C), VD)``, i.e. 30 for 31 bands). ``srf``: (C, K), or (B, C, K)
    one per image:

    * HSI unmixing :math:`X \approx H_h W_h`, MSI unmixing :math:`Y \approx H_m W_m`, with
      :math:`W_m = W_h R` and, in the outer loop, :math:`H_h = S(H_m)`. Each NMF uses the
      Lee-Seung multiplicative rules :math:`H \leftarrow H \odot Y W^\top / (H W W^\top)`,
      :math:`W \leftarrow W \odot H^\top Y / (H^\top H W)` on the data augmented with a
      constant column :math:`\delta` (soft sum-to-one of the abundances; default
      :math:`\delta = 2\sqrt{\bar Y / 0.7455} / K^3`, the authors' heuristic).
    * Initialisation: :math:`W_h` from SPA endmember extraction on :math:`X` (instead of
      VCA: deterministic, no noise model), :math:`H_h = 1/M`; ``3 * iters`` H-only steps,
      then ``iters`` alternating steps. :math:`W_m = W_h R`, :math:`H_m` = cubic upsampling
      of :math:`H_h` (clipped at 0); ``iters`` H-only steps then ``iters`` alternating steps,
      :math:`W_m` updated only when K > 3 (as the authors' code).
    * ``outer_iters`` times: :math:`H_h = S(H_m)`, ``iters`` W-only steps on the HSI, then
      ``iters`` alternating steps (:math:`H_h` updated only when K > 3); unless it is the
      last, the MSI step again from :math:`W_m = W_h R`.
    * Output :math:`\hat Z = H_m W_h` reshaped to (H, W, C).

    Fixed iteration counts (no convergence test) keep it one compiled program.
    """
    lr, msi, s = _check_pair(lr_hsi, hr_msi, scale, "cnmf")
    r = jnp.asarray(srf, jnp.float32)
    want = (lr.shape[-1], msi.shape[-1])
    if r.shape[-2:] != want or r.ndim not in (2, 3) or (r.ndim == 3 and r.shape[0] != lr.shape[0]):
        raise ValueError(f"cnmf: srf must have shape (C, K) = {want} or (B, C, K) for lr_hsi "
                         f"{lr.shape} and hr_msi {msi.shape}, got {r.shape}")
    physics.render.check_finite(r, "srf", "cnmf")
    r = jnp.broadcast_to(r, (lr.shape[0],) + want)
    for name, v in (("n_endmembers", n_endmembers), ("iters", iters)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"cnmf: {name} must be a positive integer, got {v!r}")
    if isinstance(outer_iters, bool) or not isinstance(outer_iters, (int, np.integer)) \
            or outer_iters < 0:
        raise ValueError(f"cnmf: outer_iters must be a non-negative integer, got {outer_iters!r}")
    p = _check_psf(psf, lr.shape[0], s, degradation, "cnmf")
    m = min(int(n_endmembers), lr.shape[-1])
    d = jnp.full((lr.shape[0],), -1.0 if delta is None else float(delta), jnp.float32)
    return _cnmf(lr, msi, r, p, d, _centers(lr_center, p, s, degradation), s, m, int(iters),
                 int(outer_iters), degradation)


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10))
def _cnmf(lr, msi, srf, psf, delta, centers, s, m, iters, outer, degradation):
    def one(x, y, srf, p, dlt, center):
        h, w, c = x.shape
        hh, ww, k = y.shape
        x = jnp.maximum(x, 0.0).reshape(-1, c)
        y = jnp.maximum(y, 0.0).reshape(-1, k)
        dlt = jnp.where(dlt < 0, 2.0 * jnp.sqrt(jnp.mean(y) / 0.7455) / k ** 3, dlt)
        xa = jnp.concatenate([x, jnp.full((x.shape[0], 1), dlt)], 1)
        ya = jnp.concatenate([y, jnp.full((y.shape[0], 1), dlt)], 1)

        def aug(wc):
            return jnp.concatenate([wc, jnp.full((m, 1), dlt)], 1)

        # HSI unmixing
        w_h = aug(jnp.maximum(_spa(x, m), _EPS))
        h_h = jnp.full((x.shape[0], m), 1.0 / m)
        h_h = _update_h(h_h, w_h, xa, 3 * iters)
        h_h, w_h = _alternate(h_h, w_h, xa, iters, c)

        def msi_step(h_m, w_h):
            w_m = aug(jnp.dot(w_h[:, :c], srf, precision=_HI))
            h_m = _update_h(h_m, w_m, ya, iters)
            h_m, w_m = _alternate(h_m, w_m, ya, iters, k, update_w=k > 3)
            return h_m

        h_m0 = _upsample(h_h.reshape(h, w, m), s, center).reshape(-1, m)
        h_m = msi_step(jnp.maximum(h_m0, _EPS), w_h)
        for it in range(outer):
            h_h = _degrade(h_m.reshape(hh, ww, m), p, s, degradation).reshape(-1, m)
            w_h = _update_w(h_h, w_h, xa, iters, c)
            h_h, w_h = _alternate(h_h, w_h, xa, iters, c, update_h=k > 3)
            if it < outer - 1:
                h_m = msi_step(h_m, w_h)
        return jnp.dot(h_m, w_h[:, :c], precision=_HI).reshape(hh, ww, c)

    return jax.vmap(one)(lr, msi, srf, psf, delta, centers)


# ----------------------------------------------------------------------------- blind degradation
def gaussian_kernel(params, size: int) -> jax.Array:
    """A (size, size) Gaussian kernel, sum 1, centred at pixel ``size // 2`` (the DAEM kernels'
    centre) with covariance ``L L^T``, ``L = [[exp(a), 0], [b, exp(c)]]`` for ``params = (a, b,
    c)`` (any real values give a valid kernel). Traceable and differentiable."""
    a, b, c = params[0], params[1], params[2]
    l = jnp.array([[jnp.exp(a), 0.0], [b, jnp.exp(c)]])
    prec = jnp.linalg.inv(l @ l.T)
    d = jnp.arange(size, dtype=jnp.float32) - size // 2
    dd = jnp.stack(jnp.meshgrid(d, d, indexing="ij"), -1)                     # (k, k, 2)
    k = jnp.exp(-0.5 * jnp.einsum("uvi,ij,uvj->uv", dd, prec, dd))
    return k / jnp.sum(k)


def estimate_psf(lr_hsi, hr_msi, scale: int, *, size: int | None = None,
                 degradation: str = "daem", steps: int = 300, step_size: float = 0.05,
                 init_sigma: float | None = None) -> jax.Array:
    r"""Blind least-squares PSF estimate from the observed pair alone, one kernel per image.

    With :math:`X` the LR-HSI (n LR pixels x C bands) and :math:`S_K(Y)` the HR-MSI degraded by a
    kernel :math:`K`, both LR-MSIs of the same scene agree when the SRF is (close to) a linear
    map of the bands: :math:`X R \approx S_K(Y)` -- the consistency that HySure (Simoes et al.
    2015) and DAEM's paper use to estimate the degradation. Eliminating :math:`R` by least
    squares (variable projection) leaves

    .. math:: K = \arg\min_K \frac{\|(I - P)\, S_K(Y)\|^2}{\|S_K(Y) - \overline{S_K(Y)}\|^2}

    with :math:`P` the orthogonal projector on the span of :math:`[X, 1]` (from a QR); the
    denominator keeps wide, flat kernels from winning by smoothing the MSI away. :math:`K` is
    the Gaussian of :func:`gaussian_kernel` (3 parameters, centre ``size // 2``), fitted by
    ``steps`` Adam steps of size ``step_size`` from an isotropic start of standard deviation
    ``init_sigma`` (default ``scale / 4``). ``size`` defaults to ``scale`` under ``"daem"``
    (DAEM's k = s) and ``2 scale + 1`` under ``"same"`` (odd). Returns (B, size, size) kernels
    (sum 1). An estimate for data made with a Gaussian PSF; other kernels get their best
    Gaussian fit. Needs more LR pixels than bands + 1 (checked)."""
    lr, msi, s = _check_pair(lr_hsi, hr_msi, scale, "estimate_psf")
    if degradation not in DEGRADATIONS:
        raise ValueError(f"estimate_psf: degradation must be one of {DEGRADATIONS}, "
                         f"got {degradation!r}")
    k = (s if degradation == "daem" else 2 * s + 1) if size is None else int(size)
    if degradation == "daem" and k < s:
        raise ValueError(f"estimate_psf: size {k} must be >= scale {s}")
    if degradation == "same" and k % 2 == 0:
        raise ValueError(f"estimate_psf: degradation='same' needs an odd size, got {k}")
    n, c = lr.shape[1] * lr.shape[2], lr.shape[3]
    if n <= c + 1:
        raise ValueError(f"estimate_psf: {n} LR pixels cannot separate the PSF from a linear "
                         f"map of {c} bands (need more than {c + 1})")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"estimate_psf: steps must be an integer >= 1, got {steps!r}")
    sigma = float(s / 4.0 if init_sigma is None else init_sigma)
    if not sigma > 0:
        raise ValueError(f"estimate_psf: init_sigma must be > 0, got {init_sigma!r}")
    if not step_size > 0:
        raise ValueError(f"estimate_psf: step_size must be > 0, got {step_size!r}")
    return _estimate_psf(lr, msi, s, k, degradation, int(steps), float(step_size), sigma)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _estimate_psf(lr, msi, s, k, degradation, steps, step_size, sigma):
    opt = optax.adam(step_size)

    def one(x, y):
        xf = x.reshape(-1, x.shape[-1])
        q, _ = jnp.linalg.qr(_with_ones(xf))

        def loss(p):
            yk = _degrade(y, gaussian_kernel(p, k), s, degradation).reshape(-1, y.shape[-1])
            res = yk - jnp.dot(q, jnp.dot(q.T, yk, precision=_HI), precision=_HI)
            dev = yk - jnp.mean(yk, axis=0)
            return jnp.sum(res * res) / (jnp.sum(dev * dev) + _EPS)

        def body(_, carry):
            p, st = carry
            upd, st = opt.update(jax.grad(loss)(p), st, p)
            return optax.apply_updates(p, upd), st

        p0 = jnp.array([jnp.log(sigma), 0.0, jnp.log(sigma)], jnp.float32)
        p, _ = jax.lax.fori_loop(0, steps, body, (p0, opt.init(p0)))
        return gaussian_kernel(p, k)

    return jax.vmap(one)(lr, msi)


def estimate_srf(lr_hsi, hr_msi, scale: int, psf=None, *, degradation: str = "daem",
                 ridge: float = 1e-6) -> jax.Array:
    r"""Blind least-squares SRF estimate, one (C, K) matrix per image: the linear map ``R``
    with :math:`[X, 1] [R; r_0] \approx S(Y)` (ridge as :func:`_lstsq`), negative weights set
    to 0 and each column normalised to sum 1 (the SRF convention of ``physics``).
    ``psf`` as :func:`gsa` (e.g. from :func:`estimate_psf`; ``None`` = the box). Returns
    (B, C, K)."""
    lr, msi, s = _check_pair(lr_hsi, hr_msi, scale, "estimate_srf")
    p = _check_psf(psf, lr.shape[0], s, degradation, "estimate_srf")
    return _estimate_srf(lr, msi, p, s, degradation, float(ridge))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _estimate_srf(lr, msi, psf, s, degradation, ridge):
    def one(x, y, p):
        c, k = x.shape[-1], y.shape[-1]
        r = _affine_lstsq(x.reshape(-1, c), _degrade(y, p, s, degradation).reshape(-1, k),
                          ridge)[:c]
        r = jnp.maximum(r, 0.0)
        return r / jnp.maximum(jnp.sum(r, axis=0, keepdims=True), _EPS)

    return jax.vmap(one)(lr, msi, psf)
