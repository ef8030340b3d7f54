"""ACC: spectral transformer with Adjacent Channel Coupling (Sinha, SynS&ML @ ICML 2023).

"Improving the Lipschitz Stability in Spectral Transformer through Nearest Neighbour Coupling".
No public code exists; the resolutions below are those of ``shared/specs/methods.md`` §1.

Adjacent channel coupling (paper Eq. 4-7), for each channel ``c`` of a feature map
``X`` (B, H, W, C) and each direction ``u in {F, B}`` with its own 3x3 single-channel kernels
``f^u_c`` (value), ``W^{Q,u}_c`` (query) and ``W^{K,u}_c`` (key)::

    g^u_c(X_c) = W^{Q,u}_c * X_c,   h^u_c(S) = W^{Q,u}_c * (W^{K,u}_c * S)        (Eq. 5)
    alpha^u_c  = g^u_c(X_c) + h^u_c(S^u_{c-+1})
    T^u_c      = f^u_c(X_c) * sigmoid(alpha^u_c)
    S^u_c      = X_c + T^u_c                  (the "Y" that is fed to the next channel)
    Y_c        = X_c + 1/2 (T^F_c + T^B_c)                                          (Eq. 6)

with ``S^F_{-1} = S^B_{C} = 0`` (forward scan runs c = 0..C-1, backward c = C-1..0).  Eq. 6 as
printed feeds ``Y_{c-1}`` and ``Y_{c+1}`` at once, which is circular; the two directions
therefore carry separate states.  ``recurrent=False`` gives the literal Eq. 4 instead, where the
key comes from the *input* neighbour, ``alpha^u_c = W^Q * (X_c + W^K * X_{c-+1})`` (fully
parallel, so the Jacobian is tridiagonal in channel blocks).

Implementation: ``f`` and ``g`` of every channel and both directions are one depthwise 3x3
convolution (``jaxspec.layers.depthwise_conv``); only ``h(S)`` is sequential, a
``jax.lax.scan`` over the channel axis whose ``xs`` carry the per-channel kernels and whose step
is a single-channel 3x3 convolution written as nine shifted multiply-adds (20x faster than
``lax.conv`` on CPU).  Both directions run in the same scan (stacked on a leading axis).

The rest of the network follows Fig. 1: SSTA = ACC + windowed non-local second-order attention
(App. A.1), transformer block ``x + SSTA(BN(x))``, ``x + FFN(BN(x))``; MS-SSF U-Net blocks with
separable convolutions; pointwise output convolution and a global residual.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import layers
from jaxspec import registry

Array = jax.Array

__all__ = [
    "acc_coupling", "acc_coupling_planes", "acc_coupling_reference", "conv3x3_planes", "ACC",
    "WindowedNonLocal",
    "SSTA", "ACCTransformerBlock", "MSSSF", "ACCNet", "make_model",
]


# --------------------------------------------------------------------------------------------
# functional core of the coupling (used by the module, the tests and jaxspec.analysis.bounds)
# --------------------------------------------------------------------------------------------
def conv3x3_planes(x: Array, k: Array) -> Array:
    """Zero-padded 'SAME' 3x3 cross-correlation of stacks of single-channel planes.

    ``out[..., y, x] = sum_{a,b in {0,1,2}} k[..., a, b] * x_pad[..., y + a, x + b]`` with
    ``x`` of shape (D, B, H, W) and one kernel per leading index, ``k`` of shape (D, 3, 3)
    (the convention of ``lax.conv_general_dilated``).  Nine shifted multiply-adds.
    """
    h, w = x.shape[-2:]
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    kk = k.reshape(k.shape[:1] + (1,) * (x.ndim - 3) + (3, 3))
    out = None
    for a in range(3):
        for b in range(3):
            term = kk[..., a:a + 1, b:b + 1] * xp[..., a:a + h, b:b + w]
            out = term if out is None else out + term
    return out


def _check_kernels(x: Array, value: Array, query: Array, key: Array) -> int:
    if x.ndim != 4:
        raise ValueError(f"ACC expects x of shape (B, H, W, C), got shape {x.shape}")
    c = x.shape[-1]
    for name, k in (("value", value), ("query", query), ("key", key)):
        if k.shape != (2, c, 3, 3):
            raise ValueError(f"ACC kernel {name!r} must have shape (2, {c}, 3, 3) "
                             f"(direction, channel, 3, 3); got {k.shape}")
    return c


def _dir_kernels_hwc(k: Array) -> Array:
    """(2, C, 3, 3) -> depthwise (3, 3, 2C) kernel, forward channels first."""
    return jnp.transpose(k, (2, 3, 0, 1)).reshape(3, 3, -1)


def acc_coupling(x: Array, value: Array, query: Array, key: Array, *, recurrent: bool = True,
                 unroll: int | bool = 1, return_aux: bool = False, impl: str = "auto"):
    """Bidirectional adjacent channel coupling, ``Y_c = X_c + 1/2 (T^F_c + T^B_c)``.

    Args:
      x: (B, H, W, C) feature map.
      value, query, key: (2, C, 3, 3) kernels ``f``, ``W^Q``, ``W^K``; index 0 of the first axis
        is the forward (c-1 -> c) direction, index 1 the backward (c+1 -> c) direction.
      recurrent: True -> the key sees the coupled state ``S_{c-+1}`` (scan); False -> Eq. 4, the
        key sees the input ``X_{c-+1}`` (parallel).
      unroll: passed to ``jax.lax.scan`` (``True`` fully unrolls, used for FLOP counting).
      impl: depthwise-conv implementation of the parallel part (``layers.depthwise_conv``).
      return_aux: also return a dict with ``V`` (f(X)), ``alpha`` (gate pre-activation),
        ``T``, ``S`` (the state fed to the neighbour) and ``S_prev`` (the neighbour state the
        key saw), each of shape (2, B, H, W, C) in channel order.

    Returns:
      ``Y`` (B, H, W, C), or ``(Y, aux)``.
    """
    c = _check_kernels(x, value, query, key)
    # channel-parallel part: V = f(X) and G = g(X) = W^Q * X for both directions at once.
    x4 = jnp.concatenate([x, x, x, x], axis=-1)
    k4 = jnp.concatenate([_dir_kernels_hwc(value), _dir_kernels_hwc(query)], axis=-1)
    vg = layers.depthwise_conv(x4, k4, impl=impl)
    v = jnp.stack([vg[..., :c], vg[..., c:2 * c]])             # (2, B, H, W, C)
    g = jnp.stack([vg[..., 2 * c:3 * c], vg[..., 3 * c:]])

    if recurrent:
        # channel-major sequences; the backward direction is stored reversed so that a single
        # forward scan advances both directions.
        def seq(a):  # (2, B, H, W, C) -> (C, 2, B, H, W) with direction 1 reversed in c
            a = jnp.moveaxis(a, -1, 0)
            return jnp.stack([a[:, 0], a[::-1, 1]], axis=1)

        def kseq(k):  # (2, C, 3, 3) -> (C, 2, 3, 3)
            return jnp.stack([k[0], k[1, ::-1]], axis=1)

        xs_x = jnp.moveaxis(x, -1, 0)
        xs_x = jnp.stack([xs_x, xs_x[::-1]], axis=1)

        def step(s_prev, inp):
            xc, vc, gc, kq, kk = inp
            alpha = gc + conv3x3_planes(conv3x3_planes(s_prev, kk), kq)
            t = vc * jax.nn.sigmoid(alpha)
            s = xc + t
            return s, (t, alpha, s, s_prev)

        s0 = jnp.zeros(xs_x.shape[1:], x.dtype)
        _, (t_seq, a_seq, s_seq, sp_seq) = jax.lax.scan(
            step, s0, (xs_x, seq(v), seq(g), kseq(query), kseq(key)), unroll=unroll)

        def unseq(a):  # (C, 2, B, H, W) -> (2, B, H, W, C)
            a = jnp.stack([a[:, 0], a[::-1, 1]], axis=1)
            return jnp.moveaxis(a, 0, -1)

        t, alpha, s, s_prev = (unseq(a) for a in (t_seq, a_seq, s_seq, sp_seq))
    else:
        zero = jnp.zeros_like(x[..., :1])
        x_prev = jnp.concatenate([zero, x[..., :-1]], axis=-1)   # X_{c-1}
        x_next = jnp.concatenate([x[..., 1:], zero], axis=-1)    # X_{c+1}
        kx = layers.depthwise_conv(jnp.concatenate([x_prev, x_next], -1),
                                   _dir_kernels_hwc(key), impl=impl)
        alpha = layers.depthwise_conv(jnp.concatenate([x, x], -1) + kx,
                                      _dir_kernels_hwc(query), impl=impl)
        alpha = jnp.stack([alpha[..., :c], alpha[..., c:]])
        t = v * jax.nn.sigmoid(alpha)
        s_prev = jnp.stack([x_prev, x_next])
        s = x[None] + t
    y = x + 0.5 * (t[0] + t[1])
    if return_aux:
        return y, dict(V=v, alpha=alpha, T=t, S=s, S_prev=s_prev)
    return y


def acc_coupling_planes(x: Array, value: Array, query: Array, key: Array, *,
                        unroll: int | bool = 1) -> Array:
    """:func:`acc_coupling` (``recurrent=True``) rearranged for XLA:CPU inference: the same
    function, 3-4x faster at 484x512x31 (its reverse mode is not faster than the scan's,
    so training keeps the scan; :class:`ACC` picks this form when ``train`` is False on the
    CPU).

    Channel planes ``(C, B, H, W)`` with the width minor and a one-pixel zero border; one
    ``fori_loop`` over the step ``t`` advances both directions (channel ``t`` forward,
    ``C - 1 - t`` backward) and adds each direction's half of ``Y_c`` to its output plane as
    it goes. By linearity ``alpha = W^Q * (X_c + W^K * S_{c-+1})`` (one padded plane, two
    3x3 sums instead of ``g`` and a nested conv), and ``f``, ``g`` are computed per step from
    the carried input plane instead of one depthwise conv over 4C stacked channels plus the
    transposes to and from channel-major order. The carried planes (the neighbour state
    ``S`` and the next input plane) make every 3x3 tap a static slice of a loop value (see
    ``ccnet.nescm_planes`` for the XLA:CPU traps this avoids).
    """
    _check_kernels(x, value, query, key)
    b, h, w, c = x.shape
    planes = jnp.moveaxis(x, -1, 0)                                   # (C, B, H, W)
    border = ((0, 0), (1, 1), (1, 1))

    def load(ch):             # channel ch as a (B, H+2, W+2) plane with a zero border
        return layers.bordered_plane(planes, ch)

    conv = layers.plane_taps  # src (B, H+2, W+2) a loop value, k (3, 3) -> (B, H, W)

    def kern(k, d, ch):
        return jax.lax.dynamic_slice(k, (d, ch, 0, 0), (1, 1, 3, 3))[0, 0]

    def step(t, carry):
        s_prev, x_cur, out = carry          # per direction: S_{c-+1} and X_c, padded planes
        new_s, new_x = [], []
        for d in (0, 1):
            ch = t if d == 0 else c - 1 - t
            xc = x_cur[d]
            inner = xc[:, 1:-1, 1:-1]
            z = jnp.pad(inner + conv(s_prev[d], kern(key, d, ch)), border)
            alpha = conv(z, kern(query, d, ch))                      # Eq. 5
            tt = conv(xc, kern(value, d, ch)) * jax.nn.sigmoid(alpha)
            new_s.append(jnp.pad(inner + tt, border))                # S_c
            half = 0.5 * tt + inner if d == 0 else 0.5 * tt          # Eq. 6, X_c once
            old = jax.lax.dynamic_slice(out, (ch, 0, 0, 0), (1, b, h, w))
            out = jax.lax.dynamic_update_slice(out, old + half[None], (ch, 0, 0, 0))
            new_x.append(load(t + 1 if d == 0 else c - 2 - t))
        return tuple(new_s), tuple(new_x), out

    zero = jnp.zeros((b, h + 2, w + 2), x.dtype)
    init = ((zero, zero), (load(0), load(c - 1)), jnp.zeros((c, b, h, w), x.dtype))
    out = jax.lax.fori_loop(0, c, step, init, unroll=unroll)[-1]
    return jnp.moveaxis(out, 0, -1)


def _conv_single(x: Array, k: Array) -> Array:
    """Reference single-channel SAME conv with ``lax.conv_general_dilated``; x (B, H, W)."""
    out = jax.lax.conv_general_dilated(
        x[..., None], k[:, :, None, None], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out[..., 0]


def acc_coupling_reference(x: Array, value: Array, query: Array, key: Array, *,
                           recurrent: bool = True) -> Array:
    """Unrolled, loop-over-channels definition of :func:`acc_coupling` (tests only).

    Written directly from the equations with ``lax.conv_general_dilated`` so that it shares no
    code with the scan implementation.
    """
    c = _check_kernels(x, value, query, key)
    xs = [x[..., i] for i in range(c)]
    zero = jnp.zeros_like(xs[0])
    t = [[None] * c, [None] * c]
    for u, order in ((0, range(c)), (1, range(c - 1, -1, -1))):
        s_prev = zero
        for i in order:
            nb = i - 1 if u == 0 else i + 1
            if recurrent:
                k_in = s_prev
            else:
                k_in = xs[nb] if 0 <= nb < c else zero
            alpha = _conv_single(xs[i] + _conv_single(k_in, key[u, i]), query[u, i])
            t[u][i] = _conv_single(xs[i], value[u, i]) * jax.nn.sigmoid(alpha)
            s_prev = xs[i] + t[u][i]
    return jnp.stack([xs[i] + 0.5 * (t[0][i] + t[1][i]) for i in range(c)], axis=-1)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class ACC(nn.Module):
    """Adjacent Channel Coupler (Fig. 1D), see :func:`acc_coupling` for the equations.

    Parameters: ``value``, ``query``, ``key`` of shape (2, C, 3, 3) -- one 3x3 kernel per
    channel and direction (27 * 2 * C weights, no biases: Eq. 4-5 have none).
    """
    recurrent: bool = True
    unroll: int | bool = 1
    impl: str = "auto"
    kernel_init: Callable = nn.initializers.normal(stddev=1.0 / 3.0)   # fan-in 9
    planes: bool = True        # CPU inference: acc_coupling_planes (same function)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        shape = (2, c, 3, 3)
        value = self.param("value", self.kernel_init, shape, jnp.float32)
        query = self.param("query", self.kernel_init, shape, jnp.float32)
        key = self.param("key", self.kernel_init, shape, jnp.float32)
        if (self.planes and self.recurrent and not train
                and layers.resolve_depthwise_impl(self.impl) == "shift"):
            return acc_coupling_planes(x, value, query, key, unroll=self.unroll)
        return acc_coupling(x, value, query, key, recurrent=self.recurrent, unroll=self.unroll,
                            impl=self.impl)


class WindowedNonLocal(nn.Module):
    """Non-local second-order self-attention (App. A.1, Eq. 8-9) inside fixed windows.

    In each ``window x window`` patch with ``n`` positions::

        theta = X W_theta            (n, d),  d = C // reduction   (1x1 conv, no bias)
        theta~ = theta - mean_n(theta)       (the centring I^ = (1/n)(I - 11^T/n) of Eq. 9)
        A = softmax(theta~ theta~^T / n)     (n, n), row-wise
        out = (A (X W_v)) W_o                (W_v: C -> d, W_o: d -> C, W_o zero-initialised)

    Feature maps larger than the window are reflect-padded to a multiple of it and cut into
    non-overlapping windows (the paper trains and infers the quadratic attention "in patches");
    maps smaller than the window use one window of their own size.

    Evaluation order (the function is the same in all; outputs agree to float rounding):

    * ``window_batch=None``: every window at once (``vmap``), the whole ``n x n`` matrix of each
      -- what XLA's cost analysis counts in full, and what accelerators want;
    * ``row_block`` rows at a time (``"auto"``: 512 on the CPU backend, off elsewhere): windows
      one after the other, each in ``row_block x row_block`` blocks of the matrix
      ``S_ij = exp(l_ij - a_i - a_j)``, ``a_i = |theta_i|^2 / 2n``, which is symmetric and
      <= 1 (Cauchy-Schwarz): softmax row ``i`` is ``sum_j S_ij w_j v_j / sum_j S_ij w_j`` with
      ``w_j = exp(a_j - max a)`` (the shift of each row cancels), so each block above the
      diagonal is computed once and serves both triangles (half the exps and logits), the
      shifts are folded into the logits matmul and the row sums come out of the value matmul
      (``[w v, w]``). The row-max form (blocks of rows) runs instead where the row sums could
      underflow (``lax.cond``) and for windows of one block. A block stays in cache instead
      of streaming 16 windows' 64 MiB matrices through memory five times: 10x faster on
      XLA:CPU than whole matrices for the 64 full-resolution windows, and the symmetric
      blocks 1.2x faster again than blocks of rows;
    * otherwise ``window_batch`` windows of every image at a time (``jax.lax.map``), whole
      matrices.

    Both loops run over the windows of an image, never over the batch axis (which a
    data-parallel mesh shards).
    """
    window: int = 64
    reduction: int = 2
    window_batch: int | None = 16
    row_block: int | str | None = "auto"

    def _row_block(self, n: int) -> int | None:
        rb = self.row_block
        if rb == "auto":
            rb = 512 if layers.target_backend() == "cpu" else None
        if rb is None or self.window_batch is None:
            return None
        if not isinstance(rb, int) or rb < 1:
            raise ValueError(f"row_block must be a positive int, 'auto' or None; got {rb!r}")
        return next(k for k in range(min(rb, n), 0, -1) if n % k == 0)   # divides n

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        d = max(c // self.reduction, 1)
        theta = nn.Dense(d, use_bias=False, name="theta")(x)
        val = nn.Dense(d, use_bias=False, name="value")(x)
        wh, ww = min(self.window, h), min(self.window, w)
        ph, pw = (-h) % wh, (-w) % ww
        tv = jnp.concatenate([theta, val], axis=-1)
        if ph or pw:
            tv = jnp.pad(tv, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
        nh, nw = (h + ph) // wh, (w + pw) // ww
        # (windows, batch, n, 2d): the loops below run over the windows of an image and keep
        # the batch axis whole inside each iteration -- a loop over an axis that mixes in the
        # batch would make XLA's SPMD partitioner all-gather the global batch of every layer
        # on a data-parallel mesh (75 GiB per chip for a 256-chip v5e ACC step at batch 1).
        win = tv.reshape(b, nh, wh, nw, ww, 2 * d).transpose(1, 3, 0, 2, 4, 5)
        win = win.reshape(nh * nw, b, wh * ww, 2 * d)

        def per_image(f):   # f on one image's arrays -> on the batch (no batch axis if b == 1)
            def g(*a):
                if a[0].shape[0] == 1:
                    return f(*(x[0] for x in a))[None]
                return jax.vmap(f)(*a)
            return g

        def attend(t):  # t: (n, 2d)
            th, v = t[:, :d], t[:, d:]
            th = th - th.mean(axis=0, keepdims=True)
            logits = th @ th.T / th.shape[0]
            return jax.nn.softmax(logits, axis=-1) @ v

        def attend_rows_rowmax(th, v):  # same as attend, rb rows of the softmax at a time
            th_t = th.T / th.shape[0]

            def rows(r):
                logits = r @ th_t
                e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
                return (e @ v) / e.sum(axis=-1, keepdims=True)

            return jax.lax.map(rows, th.reshape(-1, rb, d)).reshape(th.shape[0], d)

        def attend_pairs(q, k_t, v1):  # one image: (nb, rb, d+2), (nb, d+2, rb), (nb, rb, d+1)
            # S = exp(logits - a_i - a_j) is symmetric: the blocks S_IJ with I < J serve
            # rows I (S_IJ V_J) and rows J (V_I^T S_IJ, accumulated transposed: XLA:CPU's
            # fast layout), so half the exps and logits of the full matrix are computed
            nb = q.shape[0]
            out = jax.vmap(lambda a, b_, c_: jnp.exp(a @ b_) @ c_)(q, k_t, v1)   # S_II V_I
            if nb == 1:
                return out
            v1_t = v1.swapaxes(1, 2)                                              # (nb, d+1, rb)
            pi, pj = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(nb, 1))

            def pair(p_, carry):
                o, o_t = carry
                i, j = pi[p_], pj[p_]
                e = jnp.exp(q[i] @ k_t[j])                                        # S_IJ
                o = o.at[i].add(e @ v1[j])
                o_t = o_t.at[j].add(v1_t[i] @ e)
                return o, o_t

            out, out_t = jax.lax.fori_loop(0, pi.shape[0], pair,
                                           (out, jnp.zeros_like(v1_t)))
            return out + out_t.swapaxes(1, 2)

        def attend_rows(t):  # t: (b, n, 2d), one window of every image
            # Softmax rows are invariant to a shift per row, and row i of softmax(L) V is
            # sum_j S_ij w_j v_j / sum_j S_ij w_j with S_ij = exp(l_ij - a_i - a_j) and
            # w_j = exp(a_j - max a), a_i = |th_i|^2 / 2n: the factor exp(a_i) cancels.
            # S is symmetric and <= 1 (l_ij <= |th_i||th_j|/n <= a_i + a_j): its blocks are
            # computed once for both triangles (:func:`attend_pairs`), the shifts are folded
            # into the logits matmul as two extra columns and the row sums come out of the
            # value matmul as an extra column (w). The row sums are >= S_ii w_i =
            # w_i >= exp(-max|th|^2 / 2n); the backward pass divides by their squares, so
            # beyond max|th|^2 = 40 n (row sums < e^-20) in any image of the batch the rowmax
            # form runs instead (one branch for the batch: a per-image ``cond`` under ``vmap``
            # would run both).
            n = t.shape[1]
            th, v = t[..., :d], t[..., d:]
            th = th - th.mean(axis=1, keepdims=True)
            if n == rb:     # one block (e.g. 16x16 training crops): the plain form is faster
                return per_image(attend_rows_rowmax)(th, v)
            nb = n // rb
            a = jax.lax.stop_gradient(jnp.sum(th * th, axis=-1, keepdims=True)) / (2 * n)
            big = jnp.max(a, axis=1, keepdims=True)                            # (b, 1, 1)
            w = jnp.exp(a - big)
            ones = jnp.ones(th.shape[:2] + (1,), t.dtype)
            q = jnp.concatenate([th / n, -a, ones], axis=-1).reshape(b, nb, rb, d + 2)
            k_t = jnp.concatenate([th, ones, -a], axis=-1).reshape(b, nb, rb, d + 2)
            v1 = jnp.concatenate([v * w, w], axis=-1).reshape(b, nb, rb, d + 1)
            pairs = per_image(attend_pairs)

            def sym():
                o = pairs(q, k_t.swapaxes(2, 3), v1).reshape(b, n, d + 1)
                return o[..., :d] / o[..., d:]

            return jax.lax.cond(jnp.all(big < 20.0),
                                sym, lambda: per_image(attend_rows_rowmax)(th, v))

        rb = self._row_block(wh * ww)
        if rb is not None:
            out = jax.lax.map(attend_rows, win)
        elif self.window_batch is None or self.window_batch >= win.shape[0]:
            out = jax.vmap(jax.vmap(attend))(win)
        else:
            out = jax.lax.map(jax.vmap(attend), win, batch_size=self.window_batch)
        out = out.reshape(nh, nw, b, wh, ww, d).transpose(2, 0, 3, 1, 4, 5)
        out = out.reshape(b, nh * wh, nw * ww, d)[:, :h, :w]
        return nn.Dense(c, use_bias=False, kernel_init=nn.initializers.zeros, name="out")(out)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Options shared by every ACC transformer block of a network (one value, passed down).

    ``recurrent``/``unroll``/``impl`` configure :class:`ACC`; ``window``, ``nl_reduction``,
    ``use_nonlocal`` and ``window_batch`` the non-local branch (:class:`WindowedNonLocal`);
    ``ffn_mult`` the feed-forward width; ``impl`` also picks the depthwise-conv implementation;
    ``coupling_planes`` lets CPU inference use :func:`acc_coupling_planes`.
    """
    recurrent: bool = True
    window: int = 64
    nl_reduction: int = 2
    use_nonlocal: bool = True
    ffn_mult: int = 4
    window_batch: int | None = 16
    unroll: int | bool = 1
    impl: str = "auto"
    coupling_planes: bool = True

    def at_level(self, level: int) -> "BlockOptions":
        """The options at U-Net level ``level``: the window shrinks as ``window / 2^level``."""
        return dataclasses.replace(self, window=max(self.window >> level, 1))


class SSTA(nn.Module):
    """Spatio-Spectral Transformer Attention: ``SSTA(x) = ACC(x) + NL(x)``.

    The non-local branch is zero-initialised, so at initialisation the attention is governed by
    the spectral coupling alone ("governed by the spectral features in the majority").
    """
    opts: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        o = self.opts
        y = ACC(recurrent=o.recurrent, unroll=o.unroll, impl=o.impl,
                planes=o.coupling_planes, name="acc")(x, train)
        if o.use_nonlocal:
            y = y + WindowedNonLocal(o.window, o.nl_reduction, o.window_batch,
                                     name="nonlocal")(x)
        return y


class ACCTransformerBlock(nn.Module):
    """Fig. 1C: ``x = x + SSTA(BN(x)); x = x + FFN(BN(x))`` (BatchNorm pre-norm).

    BatchNorm: ``nn.BatchNorm(use_running_average=not train, momentum=0.9)`` (PyTorch's
    momentum 0.1), statistics in the ``batch_stats`` collection.  FFN: the MST feed-forward
    ``1x1 (C -> 4C) -> GELU -> dw3x3 -> GELU -> 1x1 (4C -> C)`` (``layers.FeedForward``).
    """
    opts: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        x = x + SSTA(self.opts, name="ssta")(bn(name="bn_1")(x), train)
        x = x + layers.FeedForward(x.shape[-1], self.opts.ffn_mult, impl=self.opts.impl,
                                   name="ffn")(bn(name="bn_2")(x))
        return x


def depthwise_conv_strided(x: Array, kernel: Array, stride: int, padding: int,
                           impl: str = "auto") -> Array:
    """Strided depthwise conv ``y[b,i,j,c] = sum_{u,v} x_pad[b, s i + u, s j + v, c] k[u, v, c]``.

    ``kernel`` (kh, kw, C), symmetric zero padding ``padding``.  Shift-add with strided slices
    on CPU, grouped ``lax.conv_general_dilated`` elsewhere (``layers.resolve_depthwise_impl``).
    """
    kh, kw, c = kernel.shape
    if x.shape[-1] != c:
        raise ValueError(f"kernel has {c} channels, x has {x.shape[-1]}")
    if layers.resolve_depthwise_impl(impl) == "lax":
        return jax.lax.conv_general_dilated(
            x, kernel[:, :, None, :], (stride, stride), ((padding, padding),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    y = None
    for u in range(kh):
        for v in range(kw):
            term = xp[:, u:u + stride * (ho - 1) + 1:stride,
                      v:v + stride * (wo - 1) + 1:stride, :] * kernel[u, v]
            y = term if y is None else y + term
    return y


class SeparableConv(nn.Module):
    """Depthwise ``k x k`` (stride ``s``, no bias) followed by a pointwise ``1x1`` conv (no bias).

    ``k=4, s=2, padding=1`` halves the resolution (the MST down-sampling geometry);
    ``k=3, s=1, padding=1`` keeps it.  Parameters: ``dw`` (k, k, C_in) and ``pw`` (C_in, C_out).
    """
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        k = self.kernel_size
        dw = self.param("dw", layers.torch_kernel_init(in_axis=-2, out_axis=-1), (k, k, 1, c))
        y = depthwise_conv_strided(x, dw[:, :, 0, :], self.stride, self.padding, self.impl)
        pw = self.param("pw", layers.torch_kernel_init(), (1, 1, c, self.features))
        return layers.pointwise(y, pw[0, 0])


class MSSSF(nn.Module):
    """Multi-Scale Spatio-Spectral Feature block (Fig. 1B), a U-Net of ACC transformer blocks.

    Encoder level ``l`` (``dim_l = dim 2^l``): ``num_blocks[l]`` :class:`ACCTransformerBlock`,
    keep the skip, down-sample with a separable conv (dw 4x4 stride 2 + pw ``dim_l -> 2 dim_l``);
    bottleneck: ``num_blocks[levels]`` blocks; decoder level ``l``: 2x2 stride-2 transposed conv
    to ``dim_l``, concat the skip, pointwise fuse ``2 dim_l -> dim_l``, ``num_blocks[l]``
    blocks; output separable 3x3 conv; residual.  The non-local window at level ``l`` is
    ``window / 2^l`` so a window covers the same image area at every level (and at train and
    test time).  ``H, W`` must be multiples of ``2^levels``.
    """
    dim: int = 31
    levels: int = 2
    num_blocks: Sequence[int] = (1, 1, 1)
    opts: BlockOptions = BlockOptions()

    def _blocks(self, x, level, n, prefix, train):
        for k in range(n):
            x = ACCTransformerBlock(self.opts.at_level(level),
                                    name=f"{prefix}_block_{k}")(x, train)
        return x

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.num_blocks) != self.levels + 1:
            raise ValueError(f"num_blocks needs levels+1 = {self.levels + 1} entries; got "
                             f"{tuple(self.num_blocks)}")
        m = 2 ** self.levels
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"MSSSF with {self.levels} levels needs H, W multiples of {m}; "
                             f"got {x.shape[1]}x{x.shape[2]}")
        fea = SeparableConv(self.dim, 3, 1, 1, self.opts.impl, name="embedding")(x)
        skips, d = [], self.dim
        for lvl in range(self.levels):
            fea = self._blocks(fea, lvl, self.num_blocks[lvl], f"encoder_{lvl}", train)
            skips.append(fea)
            fea = SeparableConv(2 * d, 4, 2, 1, self.opts.impl, name=f"down_{lvl}")(fea)
            d *= 2
        fea = self._blocks(fea, self.levels, self.num_blocks[self.levels], "bottleneck", train)
        for lvl in reversed(range(self.levels)):
            d //= 2
            fea = layers.ConvTranspose2d(d, stride=2, use_bias=True, name=f"up_{lvl}")(fea)
            fea = jnp.concatenate([fea, skips[lvl]], axis=-1)
            fea = layers.Conv2d(d, (1, 1), name=f"fuse_{lvl}")(fea)
            fea = self._blocks(fea, lvl, self.num_blocks[lvl], f"decoder_{lvl}", train)
        return SeparableConv(self.dim, 3, 1, 1, self.opts.impl, name="mapping")(fea) + x


class ACCNet(nn.Module):
    """End-to-end ACC spectral transformer (Fig. 1A).

    ``rgb (B, H, W, 3) -> stem 3x3 conv (in -> dim) -> MS-SSF U-Net(s) -> pointwise conv
    (dim -> out, zero-initialised) -> + stem features`` (global residual), then crop.  Inputs are reflect-padded
    to a multiple of ``2^levels``.  ``__call__(rgb, train=False)``; BatchNorm statistics live in
    ``batch_stats`` (``mutable=["batch_stats"]`` when ``train=True``).
    """
    in_channels: int = 3
    out_channels: int = 31
    dim: int = 31
    levels: int = 2
    num_blocks: Sequence[int] = (1, 1, 1)
    stages: int = 1
    recurrent: bool = True
    window: int = 64
    nl_reduction: int = 2
    use_nonlocal: bool = True
    ffn_mult: int = 4
    window_batch: int | None = 16
    unroll: int | bool = 1
    dw_impl: str = "auto"
    coupling_planes: bool = True     # False: inference uses the training (scan) form

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False) -> Array:
        if rgb.ndim != 4 or rgb.shape[-1] != self.in_channels:
            raise ValueError(f"ACCNet expects rgb of shape (B, H, W, {self.in_channels}); got "
                             f"{tuple(rgb.shape)}")
        if self.out_channels != self.dim:
            raise ValueError(f"the global residual adds the stem features to the output: "
                             f"out_channels ({self.out_channels}) must equal dim ({self.dim})")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        opts = BlockOptions(recurrent=self.recurrent, window=self.window,
                            nl_reduction=self.nl_reduction, use_nonlocal=self.use_nonlocal,
                            ffn_mult=self.ffn_mult, window_batch=self.window_batch,
                            unroll=self.unroll, impl=self.dw_impl,
                            coupling_planes=self.coupling_planes)
        h, w = rgb.shape[1], rgb.shape[2]
        x = layers.pad_to_multiple(layers.as_floating(rgb), 2 ** self.levels, "reflect")
        stem = layers.Conv2d(self.dim, (3, 3), name="stem")(x)
        fea = stem
        for s in range(self.stages):
            fea = MSSSF(self.dim, self.levels, tuple(self.num_blocks), opts,
                        name=f"msssf_{s}")(fea, train)
        # pointwise output conv, zero-initialised: at initialisation the prediction is the
        # stem's linear RGB -> spectrum map and the transformer body learns the residual.
        w_out = self.param("out", nn.initializers.zeros, (self.dim, self.out_channels))
        out = layers.pointwise(fea, w_out) + stem
        return layers.crop_to(out, (h, w))


make_model = registry.module_factory(ACCNet, "ACC", tuple_keys=("num_blocks",))


registry.register(registry.Method(
    name="acc",
    make_model=make_model,
    presets=registry.standard_presets("jaxspec.configs.acc"),
    step_kind="supervised",
    description=("ACC spectral transformer: MS-SSF U-Net of BN transformer blocks with "
                 "adjacent-channel-coupled spectral attention + windowed non-local attention"),
    reference=("A. K. Sinha. Improving the Lipschitz Stability in Spectral Transformer through "
               "Nearest Neighbour Coupling. ICML 2023 Workshop on Synergy of Scientific and "
               "Machine Learning Modeling (SynS & ML)."),
    paper_params_m=1.18,
    paper_gflops=36.84,
    paper_gflops_input=(482, 512),
    stride=1,
))
