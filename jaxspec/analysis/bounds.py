"""Analytic Lipschitz bounds of Sinha (2023) and their rigorous counterparts.

Every bound is returned in two or three *forms*:

* ``"paper"`` -- the statement exactly as printed (Corollary 2.1, Lemma 2.2, Lemma 2.3);
* ``"lemma"``/``"corrected"`` -- the same derivation with the steps that need an unstated
  assumption replaced by valid inequalities (exact convolution operator norms, the missing
  dimension factors);
* ``"data"`` -- the tightest data-dependent form of the derivation (activations measured).

The corrected and data forms are proven upper bounds; the paper forms are not, and
``docs/lipschitz.md`` gives counterexamples together with the assumption each one breaks.

Convolution operator norms (Sedghi, Gupta & Long, ICLR 2019, "The singular values of
convolutional layers"): a 2-D *circular* convolution with a (k, k, C_in, C_out) kernel on an
n x m grid is block-diagonalised by the 2-D DFT; its singular values are the union over the nm
frequencies (p, q) of the singular values of ``K^(p,q) = sum_{a,b} K[a, b] w_n^{pa} w_m^{qb}``
(C_out x C_in).  For one channel they are ``|FFT2(K, (n, m))|``.  A zero-padded ("SAME") conv
on H x W is a compression ``R C E`` of the circular conv on the (H+k-1) x (W+k-1) grid, so the
FFT norm on that grid is an upper bound for it (tight as H, W grow).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
import scipy.special

Array = jax.Array

__all__ = [
    "conv_singular_values", "conv_operator_norm", "spectral_dot_product_attention",
    "corollary21_bound", "acc_kernel_norms", "acc_diagonal_bounds", "acc_offdiagonal_bounds",
    "lemma22_epsilon",
]


# --------------------------------------------------------------------------------------------
# convolution operator norms
# --------------------------------------------------------------------------------------------
def conv_singular_values(kernel, shape: tuple[int, int], padding: str = "circular") -> np.ndarray:
    """All singular values of a 2-D convolution operator (Sedghi et al. 2019).

    Args:
      kernel: (kh, kw) single-channel or (kh, kw, C_in, C_out) kernel.
      shape: (H, W) of the input.
      padding: ``"circular"`` -> exact singular values on the H x W torus;
        ``"zeros"`` -> those of the circular conv on (H+kh-1) x (W+kw-1), whose maximum bounds
        the zero-padded operator's norm from above.
    """
    k = np.asarray(kernel, np.float64)
    if k.ndim == 2:
        k = k[:, :, None, None]
    if k.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw) or (kh, kw, C_in, C_out); got {k.shape}")
    h, w = shape
    kh, kw = k.shape[:2]
    if padding == "zeros":
        h, w = h + kh - 1, w + kw - 1
    elif padding != "circular":
        raise ValueError(f"padding must be 'circular' or 'zeros', got {padding!r}")
    if kh > h or kw > w:
        raise ValueError(f"kernel {kh}x{kw} larger than the grid {h}x{w}")
    t = np.fft.fft2(k, s=(h, w), axes=(0, 1))                 # (h, w, C_in, C_out)
    if t.shape[2] == 1 and t.shape[3] == 1:
        return np.abs(t[:, :, 0, 0]).ravel()
    return np.linalg.svd(np.swapaxes(t, 2, 3), compute_uv=False).ravel()


def conv_operator_norm(kernel, shape: tuple[int, int], padding: str = "zeros") -> float:
    """``||op(W)||_2``: exact for circular padding, an upper bound for zero padding."""
    return float(conv_singular_values(kernel, shape, padding).max())


# --------------------------------------------------------------------------------------------
# Corollary 2.1 -- dot-product spectral self-attention (Kim et al., 2021 setting)
# --------------------------------------------------------------------------------------------
def spectral_dot_product_attention(x, wq, wk, scale: float | None = None) -> Array:
    """``Y = softmax(s X W^Q (X W^K)^T) X`` with channels as tokens.

    ``x`` (C, D): C tokens (spectral channels), each the flattened D = HW spatial map;
    ``wq, wk`` (D, D); ``s = 1/sqrt(D)`` by default (the ``1/sqrt(HW)`` of App. A.2).  This is
    the map whose Jacobian App. A.2 differentiates (value = identity, Kim et al. 2021).
    """
    x = jnp.asarray(x)
    s = 1.0 / math.sqrt(x.shape[-1]) if scale is None else scale
    logits = s * (x @ wq) @ (x @ wk).T
    return jax.nn.softmax(logits, axis=-1) @ x


def corollary21_bound(x, wq, wk, scale: float | None = None, form: str = "paper") -> float:
    """Bound on ``||J_ii||_2`` of :func:`spectral_dot_product_attention`.

    With ``A = ||W^Q W^K^T||_2`` (the matrix in the logits; the paper writes ``W^K W^Q``),
    ``M, m`` the max / min of ``X`` and ``D`` the token dimension:

    * ``"paper"`` (Eq. 1): ``A/4 + A (M - m)^2 / 4 + 1`` (A without the ``1/sqrt(D)`` softmax
      scale, the reading most favourable to the paper).
    * ``"corrected"``: from ``J_ii = X^T P^(i) (e_i x_i^T Ã + X Ã^T) + P_ii I`` with
      ``Ã = s W^Q W^K^T``, ``||X^T P^(i) e_i|| = p_i ||x_i - x̄_p|| <= sqrt(D)(M - m)``,
      ``||x_i|| <= sqrt(D) max(|M|, |m|)`` and ``||X^T P^(i) X|| <= tr Cov_p <= D (M - m)^2/4``
      (Popoviciu):  ``||Ã|| D [(M - m) max(|M|, |m|) + (M - m)^2 / 4] + 1``.
    """
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    a = float(np.linalg.norm(np.asarray(wq, np.float64) @ np.asarray(wk, np.float64).T, 2))
    big_m, small_m = float(x.max()), float(x.min())
    rng = big_m - small_m
    if form == "paper":
        return a / 4 + a * rng ** 2 / 4 + 1
    if form == "corrected":
        s = 1.0 / math.sqrt(d) if scale is None else scale
        return s * a * d * (rng * max(abs(big_m), abs(small_m)) + rng ** 2 / 4) + 1
    raise ValueError(f"form must be 'paper' or 'corrected', got {form!r}")


# --------------------------------------------------------------------------------------------
# ACC: Lemma 2.2 (diagonal) and Lemma 2.3 (off-diagonal)
# --------------------------------------------------------------------------------------------
def _acc_params(params: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = params.get("params", params)
    if "value" not in p:          # allow {"acc": {...}}
        if len(p) == 1:
            p = next(iter(p.values()))
    try:
        return tuple(np.asarray(p[k], np.float64) for k in ("value", "query", "key"))
    except KeyError as e:
        raise ValueError(f"ACC parameters need 'value', 'query', 'key'; got keys {list(p)}") from e


def acc_kernel_norms(params: Mapping, shape: tuple[int, int], padding: str = "zeros") -> dict:
    """Operator norms (2, C) of the ACC kernels ``f`` (value), ``g`` (= W^Q) and ``h``.

    ``h = op(W^Q) op(W^K)``: for circular padding the norm is exact,
    ``max_freq |FFT(W^Q) FFT(W^K)|``; for zero padding the product ``||W^Q|| ||W^K||`` of the
    padded-grid bounds is used (the intermediate map is truncated to H x W, which a single
    composite kernel would not do).
    """
    v, q, k = _acc_params(params)
    f = np.array([[conv_operator_norm(v[u, c], shape, padding) for c in range(v.shape[1])]
                  for u in range(2)])
    g = np.array([[conv_operator_norm(q[u, c], shape, padding) for c in range(q.shape[1])]
                  for u in range(2)])
    if padding == "circular":
        h = np.array([[float(np.abs(np.fft.fft2(q[u, c], s=shape)
                                    * np.fft.fft2(k[u, c], s=shape)).max())
                       for c in range(q.shape[1])] for u in range(2)])
    else:
        kn = np.array([[conv_operator_norm(k[u, c], shape, padding) for c in range(k.shape[1])]
                       for u in range(2)])
        h = g * kn
    return dict(f=f, g=g, h=h)


def lemma22_epsilon(kernel, init_kernel) -> float:
    """``eps = (1/9) (F^T J F)_{0,0}`` with ``J = W - W_0`` (Lemma 2.2).

    ``F_{ij} = w^{ij}`` has a first row and column of ones, so ``(F^T J F)_{0,0} = sum(J)``:
    ``1 + 9 eps = 1 + sum(W) - sum(W_0)``, i.e. a change of the DC gain of the kernel.
    """
    j = np.asarray(kernel, np.float64) - np.asarray(init_kernel, np.float64)
    return float(j.sum()) / 9.0


def _aux(x, params, recurrent):
    from jaxspec.models.acc import acc_coupling
    v, q, k = _acc_params(params)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one image (H, W, C) or (1, H, W, C); got {x.shape}")
    _, aux = acc_coupling(x, jnp.asarray(v, jnp.float32), jnp.asarray(q, jnp.float32),
                          jnp.asarray(k, jnp.float32), recurrent=recurrent, return_aux=True)
    return x, {n: np.asarray(a[:, 0], np.float64) for n, a in aux.items()}   # (2, H, W, C)


def _sig(a):
    return scipy.special.expit(a)


def acc_diagonal_bounds(x, params: Mapping, *, recurrent: bool = True,
                        init_params: Mapping | None = None, padding: str = "zeros") -> dict:
    """Upper bounds on ``||J_ii||_2 = ||dY_i/dX_i||_2`` of the ACC (Lemma 2.2), shape (C,).

    From Eq. 12, ``J_ii = I + 1/2 sum_u [diag(V^u_i ⊙ σ'(α^u_i)) op(g^u_i)
    + diag(σ(α^u_i)) op(f^u_i)]`` (both for the recurrent and the parallel form):

    * ``"data"``: ``1 + 1/2 sum_u [max|V σ'(α)| ||g|| + max σ(α) ||f||]``;
    * ``"lemma"``: Eq. 13 with exact operator norms, using ``σ' <= 1/4``, ``σ <= 1`` and
      ``max|f X| <= ||f|| sqrt(HW) max(|M|, |m|)``:
      ``1 + 1/8 sum_u ||f^u|| ||g^u|| sqrt(HW) max(|M|,|m|) + 1/2 sum_u ||f^u||``;
    * ``"paper"`` (only with ``init_params``): Eq. 13 as printed, ``||op(W)||`` replaced by
      ``1 + 9 eps = 1 + sum(W - W_0)`` (:func:`lemma22_epsilon`).
    ``M, m``: max / min of the whole input ``X``.
    """
    x, aux = _aux(x, params, recurrent)
    v, q, _ = _acc_params(params)
    h, w = x.shape[1:3]
    norms = acc_kernel_norms(params, (h, w), padding)
    xa = np.asarray(x, np.float64)
    big = max(abs(xa.max()), abs(xa.min()))
    s = _sig(aux["alpha"])
    ds = s * (1 - s)
    vds = np.abs(aux["V"] * ds).max(axis=(1, 2))          # (2, C)
    smax = s.max(axis=(1, 2))
    out = {
        "data": 1 + 0.5 * (vds * norms["g"] + smax * norms["f"]).sum(0),
        "lemma": 1 + 0.125 * (norms["f"] * norms["g"]).sum(0) * math.sqrt(h * w) * big
                 + 0.5 * norms["f"].sum(0),
    }
    if init_params is not None:
        v0, q0, _ = _acc_params(init_params)
        ef = 1 + (v - v0).sum(axis=(2, 3))                 # 1 + 9 eps^f, (2, C)
        eg = 1 + (q - q0).sum(axis=(2, 3))
        out["paper"] = (1 + 0.125 * (ef * eg).sum(0) * math.sqrt(h * w) * big
                        + 0.5 * ef.sum(0))
    return out


def acc_offdiagonal_bounds(x, params: Mapping, pairs: Sequence[tuple[int, int]], *,
                           recurrent: bool = True, padding: str = "zeros",
                           diag_norms: Mapping[int, float] | None = None,
                           kernel_bound: float | None = None) -> dict:
    """Upper bounds on ``||J_ij||_2``, ``i != j`` (Lemma 2.3), one value per pair.

    Recurrent coupling, ``i > j`` (only the forward chain reaches ``Y_i``):
    ``J_ij = 1/2 [prod_{k=i..j+1} D_k op(h_k)] dS_j/dX_j`` with
    ``D_k = diag(V^F_k ⊙ σ'(α^F_k))`` and
    ``dS_j/dX_j = I + D_j op(g^F_j) + diag(σ(α^F_j)) op(f^F_j)``; ``i < j`` uses the backward
    chain.  Parallel coupling (Eq. 4): ``J_ij = 1/2 D_i op(h_i)`` for ``|i - j| = 1`` and 0
    beyond.

    * ``"data"``: ``1/2 prod_k max|V_k σ'(α_k)| ||h_k|| * (1 + max|V_j σ'(α_j)| ||g_j||
      + max σ(α_j) ||f_j||)`` (exact norms, a proven bound);
    * ``"paper"`` (when ``diag_norms`` is given): Lemma 2.3 as printed,
      ``prod_{k} C ||V_k ⊙ σ(F_k)||_2 * ||J_jj||_2`` with ``C = kernel_bound`` (default: the
      largest Frobenius norm among the f, g and composite h kernels, the "maximum L2 norm of a
      kernel" of App. A.4, i.e. the tightest value that satisfies Eq. 15) and
      ``||J_jj||_2`` from ``diag_norms[j]`` (measured).
    """
    x, aux = _aux(x, params, recurrent)
    v, q, k = _acc_params(params)
    h, w = x.shape[1:3]
    c = x.shape[-1]
    norms = acc_kernel_norms(params, (h, w), padding)
    s = _sig(aux["alpha"])
    ds = s * (1 - s)
    vds = np.abs(aux["V"] * ds).max(axis=(1, 2))          # (2, C)
    smax = s.max(axis=(1, 2))
    vs_l2 = np.sqrt(((aux["V"] * s) ** 2).sum(axis=(1, 2)))  # ||V ⊙ σ(F)||_2, (2, C)
    if kernel_bound is None:
        # composite kernel of h = W^Q * (W^K * .): the full convolution of the two kernels
        comp = [scipy.signal.convolve2d(q[u, ch], k[u, ch]) for u in range(2) for ch in range(c)]
        kernel_bound = max(np.linalg.norm(v, axis=(2, 3)).max(),
                           np.linalg.norm(q, axis=(2, 3)).max(),
                           max(np.linalg.norm(cm) for cm in comp))
    data, paper = [], []
    for i, j in pairs:
        if not (0 <= i < c and 0 <= j < c) or i == j:
            raise ValueError(f"pairs must be off-diagonal channel pairs in 0..{c - 1}; got "
                             f"({i}, {j})")
        u = 0 if i > j else 1
        chain = range(j + 1, i + 1) if i > j else range(i, j)
        if recurrent:
            prod = np.prod([vds[u, kk] * norms["h"][u, kk] for kk in chain])
            ds_j = 1 + vds[u, j] * norms["g"][u, j] + smax[u, j] * norms["f"][u, j]
            data.append(0.5 * prod * ds_j)
        else:
            data.append(0.5 * vds[u, i] * norms["h"][u, i] if abs(i - j) == 1 else 0.0)
        if diag_norms is not None:
            paper.append(np.prod([kernel_bound * vs_l2[u, kk] for kk in chain])
                         * float(diag_norms[j]))
    out = {"data": np.asarray(data)}
    if diag_norms is not None:
        out["paper"] = np.asarray(paper)
        out["kernel_bound"] = float(kernel_bound)
    return out
