"""Channel-block Jacobians ``J_ij = dY_i / dX_j`` of image-to-image maps and their 2-norms.

For a map ``Y = fn(X)`` between feature maps ``X`` (H, W, C_in) and ``Y`` (H', W', C_out), the
block ``J_ij`` is the (H'W' x HW) Jacobian of output channel ``i`` with respect to input
channel ``j``; its spectral norm ``||J_ij||_2`` is the local 2-Lipschitz constant from channel
``j`` to channel ``i`` used in Sinha (2023), Tables 2-3.

* :func:`channel_jacobian` -- exact blocks by forward mode (the columns ``jax.jacfwd`` builds,
  chunked; small inputs only: the full Jacobian has ``(H W C)^2`` entries).
* :func:`exact_block_norms` -- ``||J_ij||_2`` from the exact blocks (SVD).
* :func:`power_iteration_block_norms` -- matrix-free ``||J_ij||_2`` by power iteration on
  ``J_ij^T J_ij`` with one ``jax.linearize`` (JVP) and its transpose (VJP), ``jax.vmap``-ed
  over (i, j) pairs: ``v <- J_ij^T J_ij v / ||J_ij^T J_ij v||``, ``sigma = ||J_ij v||``.
* :func:`perturbation_estimate` -- the paper's empirical estimate: perturb channel ``j`` by
  ``delta``, report ``||Y_i(X + delta) - Y_i(X)|| / ||delta||`` (forward) or the central
  difference; along a random direction it is a lower estimate of ``||J_ij||_2``, along the top
  right-singular vector it converges to it.

``fn`` maps a batch (1, H, W, C) -> (1, H', W', C') (any Flax ``apply`` closure) or a single
image (H, W, C) -> (H', W', C'); ``x`` may be given in either form (one image).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["image_fn", "channel_jacobian", "exact_block_norms", "power_iteration_block_norms",
           "perturbation_estimate", "block_norm_matrix", "all_pairs"]


def _as_image(x) -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"Jacobian analysis works on one image at a time; got a batch of "
                             f"{x.shape[0]} (x shape {tuple(x.shape)})")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"x must be (H, W, C) or (1, H, W, C); got shape {tuple(x.shape)}")
    return x


def image_fn(fn: Callable, batched: bool | None = None) -> Callable[[Array], Array]:
    """Wrap ``fn`` as a single-image map (H, W, C) -> (H', W', C').

    ``batched=None`` decides at call time: the function is called on ``x[None]`` and the
    leading axis is dropped if the result is 4-D.
    """
    def f(x):
        if batched is False:
            return fn(x)
        y = fn(x[None])
        if y.ndim != 4 or y.shape[0] != 1:
            if batched:
                raise ValueError(f"batched fn returned shape {tuple(y.shape)}; expected "
                                 "(1, H, W, C)")
            return fn(x)
        return y[0]
    return f


def all_pairs(c_out: int, c_in: int | None = None) -> np.ndarray:
    """All (i, j) pairs, row-major, as an (c_out * c_in, 2) int array."""
    c_in = c_out if c_in is None else c_in
    i, j = np.meshgrid(np.arange(c_out), np.arange(c_in), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=1)


def _pairs(pairs, c_out: int, c_in: int) -> np.ndarray:
    p = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"pairs must be a sequence of (i, j); got array of shape {p.shape}")
    if p.size and (p[:, 0].min() < 0 or p[:, 0].max() >= c_out or p[:, 1].min() < 0
                   or p[:, 1].max() >= c_in):
        raise ValueError(f"pairs out of range: output channels 0..{c_out - 1}, input channels "
                         f"0..{c_in - 1}; got {p.tolist()}")
    return p


def channel_jacobian(fn: Callable, x, *, chunk: int = 512) -> Array:
    """Exact channel blocks ``J[i, j] = dY_i / dX_j`` of shape (C_out, C_in, H'W', HW).

    ``J[i, j][p, q] = d Y[p, i] / d X[q, j]`` with pixels flattened row-major.  Forward mode
    (the columns of ``jax.jacfwd``): one ``jax.linearize`` and ``HW C_in`` JVPs against the
    standard basis, ``chunk`` at a time (``jax.lax.map``), memory ``(H W C)^2`` floats for the
    result -- small inputs only.
    """
    x = _as_image(x)
    f = image_fn(fn)
    y, jvp_fn = jax.linearize(f, x)
    n = x.size

    def column(k):
        return jvp_fn(jax.nn.one_hot(k, n, dtype=x.dtype).reshape(x.shape))

    cols = jax.jit(lambda idx: jax.lax.map(column, idx, batch_size=min(chunk, n)))(
        jnp.arange(n))                                        # (HW Ci, H', W', Co)
    h, w, ci = x.shape
    ho, wo, co = y.shape
    jac = cols.reshape(h * w, ci, ho * wo, co)
    return jnp.transpose(jac, (3, 1, 2, 0))


def exact_block_norms(fn: Callable, x, pairs=None, jac: Array | None = None) -> np.ndarray:
    """``||J_ij||_2`` (largest singular value) of the exact blocks.

    Returns a (C_out, C_in) matrix when ``pairs`` is None, else a (P,) vector.
    """
    if jac is None:
        jac = channel_jacobian(fn, x)
    jac = np.asarray(jac, np.float64)
    co, ci = jac.shape[:2]
    if pairs is None:
        return np.linalg.norm(jac, ord=2, axis=(2, 3))
    p = _pairs(pairs, co, ci)
    return np.array([np.linalg.norm(jac[i, j], ord=2) for i, j in p])


def power_iteration_block_norms(fn: Callable, x, pairs, *, iters: int = 300, tol: float = 1e-7,
                                seed: int = 0, chunk: int = 64, return_vectors: bool = False):
    """Matrix-free ``||J_ij||_2`` for each (i, j) in ``pairs`` (power iteration on J^T J).

    One ``jax.linearize`` of ``fn`` at ``x`` gives ``t -> J t``; ``jax.linear_transpose`` gives
    ``u -> J^T u``.  For a pair, ``J_ij v = e_i^T J (v e_j^T)`` and
    ``J_ij^T u = e_j^T J^T (u e_i^T)``; iterate ``v_{k+1} = J_ij^T J_ij v_k / ||.||`` from a
    seeded Gaussian start until ``|sigma_k - sigma_{k-1}| <= tol sigma_k`` or ``iters`` steps,
    with ``sigma_k = ||J_ij v_k||``.  Pairs are ``jax.vmap``-ed in chunks of ``chunk``.

    Returns (P,) norms, and with ``return_vectors`` also the right singular vectors
    (P, H, W) and the iteration counts (P,).
    """
    x = _as_image(x)
    f = image_fn(fn)
    y, jvp_fn = jax.linearize(f, x)
    vjp_fn = jax.linear_transpose(jvp_fn, x)
    co, ci = y.shape[-1], x.shape[-1]
    p = _pairs(pairs, co, ci)
    h, w = x.shape[:2]

    def one(ij, v0):
        ei = jax.nn.one_hot(ij[0], co, dtype=x.dtype)
        ej = jax.nn.one_hot(ij[1], ci, dtype=x.dtype)

        def normal_op(v):
            u = jnp.sum(jvp_fn(v[..., None] * ej) * ei, axis=-1)
            (g,) = vjp_fn(u[..., None] * ei)
            return u, jnp.sum(g * ej, axis=-1)

        def cond(state):
            k, _, sig, sig_prev = state
            return (k < iters) & ((k < 2) | (jnp.abs(sig - sig_prev) > tol * sig))

        def body(state):
            k, v, sig, _ = state
            u, g = normal_op(v)
            sig_new = jnp.linalg.norm(u)
            gn = jnp.linalg.norm(g)
            v_new = jnp.where(gn > 0, g / jnp.where(gn > 0, gn, 1.0), v)
            return k + 1, v_new, sig_new, sig

        v0 = v0 / jnp.linalg.norm(v0)
        k, v, sig, _ = jax.lax.while_loop(cond, body, (0, v0, jnp.zeros((), x.dtype),
                                                       jnp.full((), -1.0, x.dtype)))
        # sigma of the final vector
        u, _ = normal_op(v)
        return jnp.linalg.norm(u), v, k

    run = jax.jit(jax.vmap(one))
    key = jax.random.PRNGKey(seed)
    out_s, out_v, out_k = [], [], []
    for start in range(0, len(p), chunk):
        idx = p[start:start + chunk]
        n = len(idx)
        pad = np.concatenate([idx, np.repeat(idx[-1:], chunk - n, 0)]) if n < chunk else idx
        v0 = jax.random.normal(jax.random.fold_in(key, start), (len(pad), h, w), x.dtype)
        s, v, k = run(jnp.asarray(pad), v0)
        out_s.append(np.asarray(s[:n]))
        out_v.append(np.asarray(v[:n]))
        out_k.append(np.asarray(k[:n]))
    sig = np.concatenate(out_s) if out_s else np.zeros((0,), np.float32)
    if return_vectors:
        return sig, np.concatenate(out_v), np.concatenate(out_k)
    return sig


def perturbation_estimate(fn: Callable, x, pairs, *, eps: float = 1e-2,
                          direction: str | Array = "random", scheme: str = "forward",
                          seed: int = 0) -> np.ndarray:
    """Finite-difference gain ``||Y_i(X + eps d e_j) - Y_i(X)|| / eps`` for unit ``d``.

    Args:
      direction: ``"random"`` (seeded Gaussian perturbation of channel ``j``, the paper's
        experiment; a lower estimate of ``||J_ij||_2``), ``"top"`` (the top right-singular
        vector from :func:`power_iteration_block_norms`; converges to ``||J_ij||_2``), or an
        array (P, H, W) of directions.
      eps: absolute perturbation size ``||delta||_2`` (in the units of ``x``).
      scheme: ``"forward"`` or ``"central"`` (``(Y(X + delta) - Y(X - delta)) / 2``).
    """
    if scheme not in ("forward", "central"):
        raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    x = _as_image(x)
    f = jax.jit(image_fn(fn))
    y0 = f(x)
    p = _pairs(pairs, y0.shape[-1], x.shape[-1])
    h, w = x.shape[:2]
    if isinstance(direction, str):
        if direction == "random":
            d = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (len(p), h, w)))
        elif direction == "top":
            _, d, _ = power_iteration_block_norms(fn, x, p, seed=seed, return_vectors=True)
        else:
            raise ValueError(f"direction must be 'random', 'top' or an array; got {direction!r}")
    else:
        d = np.asarray(direction)
        if d.shape != (len(p), h, w):
            raise ValueError(f"direction array must have shape {(len(p), h, w)}; got {d.shape}")
    out = []
    for (i, j), dk in zip(p, d):
        delta = jnp.zeros_like(x).at[..., j].set(eps * dk / np.linalg.norm(dk))
        yp = f(x + delta)[..., i]
        ym = f(x - delta)[..., i] if scheme == "central" else y0[..., i]
        scale = 2.0 * eps if scheme == "central" else eps
        out.append(float(jnp.linalg.norm(yp - ym)) / scale)
    return np.asarray(out)


def block_norm_matrix(fn: Callable, x, *, method: str = "exact",
                      channels: Sequence[int] | None = None, **kw) -> np.ndarray:
    """(n, n) matrix ``M[i, j] = ||J_{c_i, c_j}||_2`` over ``channels`` (default: all).

    ``method``: ``"exact"`` (jacfwd + SVD, small inputs), ``"power"`` (matrix-free) or
    ``"perturbation"`` (random-direction finite differences, the paper's estimate).
    """
    x = _as_image(x)
    c = x.shape[-1]
    ch = np.arange(c) if channels is None else np.asarray(channels)
    pairs = np.stack(np.meshgrid(ch, ch, indexing="ij"), -1).reshape(-1, 2)
    if method == "exact":
        vals = exact_block_norms(fn, x, pairs)
    elif method == "power":
        vals = power_iteration_block_norms(fn, x, pairs, **kw)
    elif method == "perturbation":
        vals = perturbation_estimate(fn, x, pairs, **kw)
    else:
        raise ValueError(f"method must be 'exact', 'power' or 'perturbation'; got {method!r}")
    return np.asarray(vals).reshape(len(ch), len(ch))
