"""CCNet: Correlation and Continuity Network (Feng, Cong et al., IEEE T-Cyb 2025, arXiv 2501.01481).

"Unleashing Correlation and Continuity for Hyperspectral Reconstruction from RGB Images".
No public code exists; every gap is resolved as in ``shared/specs/methods.md`` §2 (see
docs/methods/ccnet.md for the list of resolutions and deviations).

Network (Fig. 2)::

    rgb -> reflect-pad to x4 -> conv_in 3x3 (3 -> 32) -> m = 3 Spectrum Reconstruction Units
        -> conv_out 3x3 (32 -> 31) -> crop

A unit is the MST++ U-Net scaffold (:class:`jaxspec.layers.SpectralUNet`: 32 -> 64 -> 128
channels, one block per level, residual) whose block is a **CSRM block**::

    x = x + Fuse(GrSCM(x), NeSCM(x))        (inter-spectral relationship modelling)
    x = x + FFN(LN(x))                      (intra-spectral spatiality, MST++ FFN)

* **GrSCM** (Eq. 3-4): channels split into ``k`` contiguous groups, per-group ``C/k x C/k``
  linear Q/K/V, each group split into ``n = C / C_in`` heads of ``C_in / k`` channel tokens,
  ``softmax(RSE + sigma * cos(K, Q)) V`` per group and head (``layers.spectral_attention``),
  heads and groups merged, output projection.
* **NeSCM** (Eq. 5-7, Fig. 3): features seen as ``n x H x W x C_in`` (``n`` = 3-D feature
  channels, ``C_in`` = band axis), zero-padded by ``(s-1)/2`` on the band axis and cut into
  ``C_in`` windows ``x_t`` of ``s`` bands. Forward and backward chains of Continuous Memory
  Units with their own weights, shared over ``t``::

      s_t = sigmoid(Conv3D_1x1x1(concat(m_{t-1}, x_t)))     m_0 = 0
      m_t = s_t * m_{t-1} + (1 - s_t) * x_t
      y_t = Conv3D_{3x3xs}(tanh(m_t) + x_t)                  (depth s -> 1)

  the two sets of ``y_t`` concatenated on the feature axis and fused by a 1x1x1 Conv3D.
  ``m_t`` does not depend on ``y``, so the only sequential part is the memory update: one
  ``jax.lax.scan`` over ``t`` (both directions stacked in the same scan) whose step is an
  element-wise gate; the gate's ``x``-half and the 3x3xs output convolution of every ``t``
  are computed in parallel outside the scan (the same numbers; ``tests/test_ccnet.py`` checks
  the scan against an unrolled per-band loop of 3-D convolutions).
* **PAF** (Eq. 8-13, Fig. 4): SIA (per group mean and max over channels, 3x3 conv 2 -> 1) ->
  ``F_cp`` (k maps); 1x1 projections of ``F_att`` (C -> C) and ``F_cp`` (k -> k); ``r x r``
  patches; cosine similarity of every ``F_att`` channel patch with the ``k`` ``F_cp``
  patches, softmax over ``k``; ``F_out = F_att + sum_j w_ij F_cp'(j)``. ``r = 16`` at full
  resolution, halved per down-sampling.

Ablations (paper Tables II-V) are model options, not code copies: ``attention="mha"``
(MST++'s S-MSA block instead of GrSCM + NeSCM + PAF), ``global_model`` ``"nescm" | "convlstm"
| "convgru" | "none"``, ``fusion`` ``"paf" | "add" | "concat" | "cattn"``, ``patch`` and
``window``. ``jaxspec.configs.ccnet.ABLATIONS`` names them.

Loss (Eq. 14-16): ``MRAE + 0.1 * L_diff`` with the spectral-difference loss
:func:`spectral_difference_loss`, registered as ``"diff"`` in ``jaxspec.train.losses``
(``config.loss = "mrae+0.1*diff"``).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import layers
from jaxspec import registry
from jaxspec.train import losses as losses_lib

Array = jax.Array

__all__ = [
    "ATTENTIONS", "GLOBAL_MODELS", "FUSIONS", "spectral_difference_loss", "band_windows",
    "conv3x3_stacked", "nescm_apply", "GrSCM", "NeSCM", "PAF", "ChannelCrossAttention",
    "CSRMOptions", "CSRM", "CCNet", "make_model", "nescm_planes",
]

ATTENTIONS = ("grscm", "mha")
GLOBAL_MODELS = ("nescm", "convlstm", "convgru", "none")
FUSIONS = ("paf", "add", "concat", "cattn")
LEVELS = 2          # U-Net down-samplings (32 -> 64 -> 128 channels)


# --------------------------------------------------------------------------------------------
# loss (Eq. 15)
# --------------------------------------------------------------------------------------------
spectral_difference_loss = losses_lib.spectral_difference_loss   # Eq. 15, registered as "diff"


# --------------------------------------------------------------------------------------------
# functional pieces of NeSCM (shared by the module and the tests)
# --------------------------------------------------------------------------------------------
def band_windows(x: Array, window: int) -> Array:
    """``(..., T)`` -> ``(T, ..., window)``: the ``T`` windows of ``window`` consecutive bands
    centred on each band, zero-padded by ``(window - 1) / 2`` at both ends (one gather, no loop
    over bands)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"NeSCM window must be a positive odd number, got {window}")
    t = x.shape[-1]
    p = (window - 1) // 2
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)])
    idx = np.arange(t)[:, None] + np.arange(window)[None, :]          # (T, window)
    win = xp[..., idx]                                                 # (..., T, window)
    return jnp.moveaxis(win, -2, 0)


def conv3x3_stacked(x: Array, kernel: Array, impl: str = "auto") -> Array:
    """Dense 3x3 'SAME' (zero-padded) cross-correlation with one kernel per leading index.

    ``x`` ``(D, N, H, W, C_in)``, ``kernel`` ``(D, 3, 3, C_in, C_out)`` ->
    ``(D, N, H, W, C_out)``: ``y[d,n,i,j,o] = sum_{u,v,c} x_pad[d,n,i+u,j+v,c] k[d,u,v,c,o]``.
    ``impl="shift"`` (CPU default): nine shifted contractions, fast for the few channels of the
    recurrences; ``"lax"``: ``lax.conv_general_dilated`` per leading index (accelerators).
    """
    if layers.resolve_depthwise_impl(impl) == "lax":
        n, h, w = x.shape[1:4]
        ys = [jax.lax.conv_general_dilated(x[d], kernel[d], (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
              for d in range(x.shape[0])]                  # D = 2 directions: static
        return jnp.stack(ys)
    h, w = x.shape[2], x.shape[3]
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    y = None
    for u in range(3):
        for v in range(3):
            term = jnp.einsum("dnhwc,dco->dnhwo", xp[:, :, u:u + h, v:v + w, :],
                              kernel[:, u, v])
            y = term if y is None else y + term
    return y


def _cmu_chains(win: Array, p: dict, impl: str, unroll) -> Array:
    """Both CMU chains on the band windows. ``win`` ``(T, 2, B, H, W, s, n)`` (direction 1
    already in reversed order) -> ``y`` ``(T, 2, B, H, W, n)`` in the same order."""
    t_len, _, b, h, w, s, n = win.shape
    # x-half of the forget gate for every t at once (Eq. 5 is linear in concat(m, x))
    gx = jnp.einsum("tdbhwsn,dno->tdbhwso", win, p["gate_x"]) \
        + p["gate_b"][None, :, None, None, None, None, :]

    def step(m, inp):
        x_t, gx_t = inp
        gate = jax.nn.sigmoid(jnp.einsum("dbhwsn,dno->dbhwso", m, p["gate_m"]) + gx_t)
        m = gate * m + (1.0 - gate) * x_t                                  # Eq. 6
        return m, m

    m0 = jnp.zeros(win.shape[1:], win.dtype)
    _, mem = jax.lax.scan(step, m0, (win, gx), unroll=unroll)          # (T, 2, B, H, W, s, n)
    z = jnp.tanh(mem) + win                                             # Eq. 7 input
    z = _merge_batch_time(z).reshape(2, b * t_len, h, w, s * n)
    k = p["out_kernel"].reshape(2, 3, 3, s * n, n)      # Conv3D 3x3xs, depth VALID -> 1
    y = conv3x3_stacked(z, k, impl) + p["out_bias"][:, None, None, None, :]
    return _split_batch_time(y, b, t_len)


def _merge_batch_time(x: Array) -> Array:
    """``(T, 2, B, ...)`` -> ``(2, B, T, ...)``, ready to merge ``(B, T)`` into one axis. The
    batch stays the major half of the merged axis, so a batch-sharded array stays sharded:
    merging ``(T, B)`` instead (batch minor) made the SPMD partitioner all-gather the global
    batch of every NeSCM input on a data-parallel mesh (5.3 GiB of collectives per step at
    128x128 on 4 chips)."""
    return jnp.moveaxis(x, 0, 2)


def _split_batch_time(y: Array, b: int, t_len: int) -> Array:
    """``(2, B*T, H, W, n)`` (batch-major) -> ``(T, 2, B, H, W, n)``."""
    return jnp.moveaxis(y.reshape(2, b, t_len, *y.shape[2:]), 2, 0)


def _rnn_chains(seq: Array, p: dict, cell: str, impl: str, unroll) -> Array:
    """b-convLSTM / b-convGRU ablation (Table III): one band per step, 3x3 conv gates, hidden
    width ``n``. ``seq`` ``(T, 2, B, H, W, n)`` -> hidden states ``(T, 2, B, H, W, n)``."""
    t_len, _, b, h, w, n = seq.shape
    # input-to-gate convolutions of every band at once; only the hidden-state part is sequential
    xin = _merge_batch_time(seq).reshape(2, b * t_len, h, w, n)
    gx = conv3x3_stacked(xin, p["w_x"], impl) + p["bias"][:, None, None, None, :]
    gx = _split_batch_time(gx, b, t_len)
    hk = p["w_h"]

    def conv_h(state, kernel):                 # state (2, B, H, W, n)
        return conv3x3_stacked(state, kernel, impl)

    if cell == "convlstm":
        def step(carry, gx_t):
            hid, c = carry
            g = gx_t + conv_h(hid, hk)
            i, f, o, cand = jnp.split(g, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(cand)
            hid = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (hid, c), hid
        init = (jnp.zeros(seq.shape[1:], seq.dtype),) * 2
    else:  # convgru
        def step(hid, gx_t):
            xz, xr, xh = jnp.split(gx_t, 3, axis=-1)
            hz, hr = jnp.split(conv_h(hid, hk[..., :2 * n]), 2, axis=-1)
            z = jax.nn.sigmoid(xz + hz)
            r = jax.nn.sigmoid(xr + hr)
            cand = jnp.tanh(xh + conv_h(r * hid, hk[..., 2 * n:]))
            hid = (1.0 - z) * hid + z * cand
            return hid, hid
        init = jnp.zeros(seq.shape[1:], seq.dtype)
    _, hs = jax.lax.scan(step, init, gx, unroll=unroll)
    return hs


def nescm_planes(x: Array, p: dict, window: int = 3, unroll=1, heads: int = 1) -> Array:
    """:func:`nescm_apply` (CMU cell, ``heads`` = ``n`` feature channels) computed on band
    planes ``(T, n, B, H, W)`` with the image width minor: the same function, rearranged for
    XLA:CPU inference (3-6x faster than the stacked-window form at 496x512; its reverse mode
    is slow, so training keeps the stacked form). One ``fori_loop`` over the processing step
    ``t`` runs both directions and writes the output as it goes:

    * window element ``j`` of a chain is the chain over the band sequence shifted by
      ``e = j - (s-1)/2`` (backward: ``(s-1)/2 - j``), and a chain fed zeros from a zero
      memory stays zero, so an ``e < 0`` chain is the ``e = 0`` chain ``-e`` steps earlier:
      only the ``(s+1)/2`` chains with ``e >= 0`` run per direction, and the loop carries the
      last ``(s-1)/2`` values of ``tanh`` of chain 0;
    * the output Conv3D and the 1x1x1 fusion are linear: their kernels fold into one 3x3
      kernel per (direction, window element, feature in, feature out), and the ``+ x_t`` part
      of Eq. 7 of both directions into one. Step ``t`` adds the forward and ``x`` terms to
      output band ``t`` and the backward terms to band ``T - 1 - t``;
    * the 1x1x1 gate and the 3x3 convolutions are sums of (shifted) planes times scalars: the
      few channels (``n`` <= 4 in CCNet) make dot/conv kernels slow. The planes carry a
      one-pixel zero border (a chain fed zeros stays zero, so it stays a border), and every
      tap is a static slice of a loop-carried plane (the loop carries the ``s`` input bands
      around ``t``): a tap sliced from a dynamically sliced plane made XLA:CPU index it
      element by element inside the sum (5-15x slower), and summing outside the loop let the
      final band-last transpose into the sum's loop (7x slower)."""
    b, h, w, c = x.shape
    n = heads
    t_len = c // n
    pd = (window - 1) // 2
    ne = pd + 1                                        # chains per direction: e = 0 .. pd
    planes = jnp.moveaxis(x.reshape(b, h, w, n, t_len), (4, 3), (0, 1))   # (T, n, B, H, W)
    gm, gx, gb = p["gate_m"], p["gate_x"], p["gate_b"]              # (2, n, n), (2, n)
    fuse = p["fuse_kernel"].reshape(2, n, n)                          # (d, o, o')
    a = jnp.einsum("duvjio,dop->duvjip", p["out_kernel"], fuse)     # (2, 3, 3, s, n, n)
    a_x = a[0] + a[1]
    bias = jnp.einsum("do,dop->p", p["out_bias"], fuse) + p["fuse_bias"]
    elems = [[(j - pd) if d == 0 else (pd - j) for j in range(window)] for d in (0, 1)]

    def load(band):           # band planes (n, B, H+2, W+2) with a zero border; 0 outside
        return layers.bordered_plane(planes, band)

    def conv(terms, o):       # [(planes (n, B, H+2, W+2), kernel (3, 3, n_in, n_out))] -> o
        acc = None
        for src, kern in terms:
            for i in range(n):
                acc = layers.plane_taps(src[i], kern[:, :, i, o], acc)
        return acc

    def add_band(out, band, y):                        # y (n, B, H, W)
        old = jax.lax.dynamic_slice(out, (band, 0, 0, 0, 0), (1, n, b, h, w))
        return jax.lax.dynamic_update_slice(out, old + y[None], (band, 0, 0, 0, 0))

    def step(t, carry):
        # hist[d][k]: tanh(chain 0 of direction d), k + 1 steps ago; xwin: padded bands
        # t - pd .. t + pd, bwin: bands T-1-t .. T-1-t-pd (carried, so the taps below are
        # static slices of loop values and each step loads one band per direction)
        m, hist, xwin, bwin, out = carry
        new_m, new_hist, ys = [], [], []
        for d in (0, 1):
            th = []
            for e in range(ne):
                x_t = xwin[pd + e] if d == 0 else bwin[e]
                mc = m[d * ne + e]
                z = jnp.stack([gb[d, o] + sum(mc[i] * gm[d, i, o] + x_t[i] * gx[d, i, o]
                                              for i in range(n)) for o in range(n)])
                g = jax.nn.sigmoid(z)                                          # Eq. 5
                mc = g * mc + (1.0 - g) * x_t                                  # Eq. 6
                new_m.append(mc)
                th.append(jnp.tanh(mc))
            terms = [(th[e] if e >= 0 else hist[d][-e - 1], a[d, :, :, j])
                     for j, e in enumerate(elems[d])]
            ys.append(jnp.stack([conv(terms, o) for o in range(n)]))
            new_hist.append((th[0],) + hist[d][:-1] if pd else ())
        # Eq. 7's "+ x_t": bands t - pd .. t + pd around band t
        x_terms = [(xwin[j], a_x[:, :, j]) for j in range(window)]
        y_x = jnp.stack([conv(x_terms, o) + bias[o] for o in range(n)])
        out = add_band(out, t, ys[0] + y_x)
        out = add_band(out, t_len - 1 - t, ys[1])
        return (tuple(new_m), tuple(new_hist), xwin[1:] + (load(t + window - pd),),
                bwin[1:] + (load(t_len - 2 - t - pd),), out)

    zero = jnp.zeros((n, b, h + 2, w + 2), x.dtype)
    init = ((zero,) * (2 * ne), ((zero,) * pd,) * 2, tuple(load(k - pd) for k in range(window)),
            tuple(load(t_len - 1 - e) for e in range(ne)),
            jnp.zeros((t_len, n, b, h, w), x.dtype))
    out = jax.lax.fori_loop(0, t_len, step, init, unroll=unroll)[-1]
    return jnp.moveaxis(out, (0, 1), (4, 3)).reshape(b, h, w, c)   # channel h * C_in + t


def nescm_apply(x: Array, p: dict, heads: int, window: int = 3, cell: str = "cmu",
                impl: str = "auto", unroll=1) -> Array:
    """NeSCM (or a b-convLSTM / b-convGRU ablation) on ``x`` ``(B, H, W, C)`` with ``C = heads
    * C_in``: channel ``h * C_in + t`` is feature ``h`` of band ``t``. ``p`` holds the
    parameters of :class:`NeSCM`. Returns the global progressive features ``F_p`` (B, H, W, C).
    """
    b, h, w, c = x.shape
    if c % heads:
        raise ValueError(f"NeSCM: channels {c} not divisible by heads {heads}")
    n, t_len = heads, c // heads
    bands = x.reshape(b, h, w, n, t_len)
    if cell == "cmu":
        win = band_windows(bands, window)                       # (T, B, H, W, n, s)
        win = jnp.swapaxes(win, -1, -2)                          # (T, B, H, W, s, n)
        win = jnp.stack([win, win[::-1]], axis=1)               # backward chain: reversed t
        y = _cmu_chains(win, p, impl, unroll)
    elif cell in ("convlstm", "convgru"):
        seq = jnp.moveaxis(bands, -1, 0)                         # (T, B, H, W, n)
        seq = jnp.stack([seq, seq[::-1]], axis=1)
        y = _rnn_chains(seq, p, cell, impl, unroll)
    else:
        raise ValueError(f"unknown NeSCM cell {cell!r}")
    y = jnp.concatenate([y[:, 0], y[::-1, 1]], axis=-1)        # (T, B, H, W, 2n), band order
    y = jnp.einsum("tbhwc,co->tbhwo", y, p["fuse_kernel"]) + p["fuse_bias"]
    return jnp.moveaxis(y, 0, -1).reshape(b, h, w, c)          # channel h * C_in + t


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
def _conv_init(fan_in: int):
    """PyTorch's default conv weight init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    return layers.torch_bias_init(fan_in)


class GrSCM(nn.Module):
    """Group-wise Spectral Correlation Modelling (Eq. 3-4).

    Parameters: ``to_q/to_k/to_v`` ``(k, C/k, C/k)`` (per-group linear maps, no bias, MST's
    trunc-normal 0.02 init), ``rescale`` (sigma) ``(k n, 1, 1)`` init 1, ``rse``
    ``(k n, C_in/k, C_in/k)`` init 0, ``proj`` (C -> C, bias) after merging groups and heads.

    On the CPU (``layers.target_backend()``) the same function is evaluated by associativity,
    as :class:`layers.SpectralMSA` does for MST++: with ``X`` (N x C), ``G = X^T X`` and the
    block-diagonal ``C x C`` matrices ``B_q, B_k, B_v`` of the group maps, every unit's
    ``K Q^T`` is a diagonal block of ``B_k^T G B_q`` and its column norms the diagonals of
    ``B_q^T G B_q`` / ``B_k^T G B_k``; the output ``proj(A V)`` is ``X (B_v A_bd^T W_p) + b_p``
    with ``A_bd`` the block-diagonal matrix of the softmaxed units. So the N-sized work is
    two N x C x C matmuls (3.3x faster at 496 x 512 x 32 than forming Q, K and V, whose
    per-group einsums XLA:CPU ran as transposes). Accelerators keep the literal form
    (``layers.spectral_attention``; not measured there, and the TPU AOT rows of
    docs/scaling.md compile it).
    """
    dim: int
    heads: int = 1
    groups: int = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        k = self.groups
        if c != self.dim or c % (k * self.heads):
            raise ValueError(f"GrSCM(dim={self.dim}, groups={k}, heads={self.heads}) got "
                             f"{c} channels (needs dim divisible by groups * heads)")
        cg = c // k
        units = k * self.heads
        d = cg // self.heads
        init = layers.trunc_normal_init(0.02)
        wq, wk, wv = (self.param(nm, init, (k, cg, cg)) for nm in ("to_q", "to_k", "to_v"))
        rescale = self.param("rescale", nn.initializers.ones, (units, 1, 1))
        rse = self.param("rse", nn.initializers.zeros, (units, d, d))
        if layers.target_backend() != "cpu":
            xg = x.reshape(b, h * w, k, cg)

            def group_linear(wt):
                y = jnp.einsum("bngc,gco->bngo", xg, wt)
                return y.reshape(b, h * w, units, d)           # channel g*cg + h*d + i

            out = layers.spectral_attention(group_linear(wq), group_linear(wk),
                                            group_linear(wv), rescale, rse)
            return layers.Linear(c, use_bias=True, name="proj")(out.reshape(b, h, w, c))
        wp, bp = layers.LinearParams(c, use_bias=True, name="proj")(c)
        xf = x.reshape(b, h * w, c)
        gram = jnp.einsum("bnc,bne->bce", xf, xf)                          # X^T X

        def block_diag(blocks):          # (..., m, r, r) -> (..., m r, m r)
            m, r = blocks.shape[-3], blocks.shape[-1]
            full = jnp.einsum("...mij,mn->...minj", blocks, jnp.eye(m, dtype=blocks.dtype))
            return full.reshape(*blocks.shape[:-3], m * r, m * r)

        bq, bk, bv = (block_diag(wt) for wt in (wq, wk, wv))               # (C, C)
        gq = jnp.einsum("bce,eo->bco", gram, bq)                             # G B_q
        gk = jnp.einsum("bce,eo->bco", gram, bk)                             # G B_k
        unit = np.arange(units)

        def unit_blocks(full):           # (b, C, C) -> the units' diagonal (b, U, d, d)
            return jnp.moveaxis(full.reshape(b, units, d, units, d)[:, unit, :, unit], 0, 1)

        logits = unit_blocks(jnp.einsum("ci,bcj->bij", bk, gq))             # K Q^T
        q_norm = jnp.sqrt(jnp.maximum(jnp.einsum("cj,bcj->bj", bq, gq), 0.0))
        k_norm = jnp.sqrt(jnp.maximum(jnp.einsum("ci,bci->bi", bk, gk), 0.0))
        q_norm = jnp.maximum(q_norm, 1e-12).reshape(b, units, d)
        k_norm = jnp.maximum(k_norm, 1e-12).reshape(b, units, d)
        logits = logits / (k_norm[..., :, None] * q_norm[..., None, :])
        attn = jax.nn.softmax(rse[None] + rescale[None] * logits, axis=-1)   # (b, U, d, d)
        mix = jnp.einsum("ce,bfe,fo->bco", bv, block_diag(attn), wp)         # B_v A^T W_p
        out = jnp.einsum("bnc,bco->bno", xf, mix) + bp
        return out.reshape(b, h, w, c)


class NeSCM(nn.Module):
    """Neighbourhood-wise Spectral Continuity Modelling (Fig. 3); see :func:`nescm_apply`.

    ``cell="cmu"`` (the paper's CMU chains, window ``s``), ``"convlstm"`` / ``"convgru"``
    (Table III ablations). Parameters (leading axis 2 = forward, backward chain):
    CMU: ``gate_m``, ``gate_x`` ``(2, n, n)``, ``gate_b`` ``(2, n)`` (the 1x1x1 Conv3D on
    ``concat(m, x)``), ``out_kernel`` ``(2, 3, 3, s, n, n)``, ``out_bias`` ``(2, n)`` (the
    3x3xs Conv3D); RNN cells: ``w_x``, ``w_h`` ``(2, 3, 3, n, G n)``, ``bias`` ``(2, G n)``;
    fusion: ``fuse_kernel`` ``(2n, n)``, ``fuse_bias`` ``(n,)`` (1x1x1 Conv3D).
    """
    dim: int
    heads: int = 1
    window: int = 3
    cell: str = "cmu"
    impl: str = "auto"
    unroll: int | bool = 1
    planes: bool = True         # inference on CPU, <= 4 feature channels: nescm_planes

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        n, s = self.heads, self.window
        if self.cell == "cmu":
            p = {"gate_m": self.param("gate_m", _conv_init(2 * n), (2, n, n)),
                 "gate_x": self.param("gate_x", _conv_init(2 * n), (2, n, n)),
                 "gate_b": self.param("gate_b", _conv_init(2 * n), (2, n)),
                 "out_kernel": self.param("out_kernel", _conv_init(9 * s * n),
                                          (2, 3, 3, s, n, n)),
                 "out_bias": self.param("out_bias", _conv_init(9 * s * n), (2, n))}
        elif self.cell in ("convlstm", "convgru"):
            g = 4 if self.cell == "convlstm" else 3
            fan = 9 * 2 * n
            p = {"w_x": self.param("w_x", _conv_init(fan), (2, 3, 3, n, g * n)),
                 "w_h": self.param("w_h", _conv_init(fan), (2, 3, 3, n, g * n)),
                 "bias": self.param("bias", _conv_init(fan), (2, g * n))}
        else:
            raise ValueError(f"NeSCM cell must be 'cmu', 'convlstm' or 'convgru', got "
                             f"{self.cell!r}")
        p["fuse_kernel"] = self.param("fuse_kernel", _conv_init(2 * n), (2 * n, n))
        p["fuse_bias"] = self.param("fuse_bias", _conv_init(2 * n), (n,))
        if (self.planes and not train and self.cell == "cmu" and n <= 4
                and layers.resolve_depthwise_impl(self.impl) == "shift"):
            if x.shape[-1] != self.dim or self.dim % n:
                raise ValueError(f"NeSCM(dim={self.dim}, heads={n}) got {x.shape[-1]} "
                                 f"channels")
            return nescm_planes(x, p, s, self.unroll, n)
        return nescm_apply(x, p, n, s, self.cell, self.impl, self.unroll)


def _patches(x: Array, rh: int, rw: int) -> tuple[Array, tuple]:
    """(B, H, W, C) -> (B, H/rh, W/rw, rh*rw, C), edge-padding H, W up to multiples first."""
    b, h, w, c = x.shape
    ph, pw = (-h) % rh, (-w) % rw
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    nh, nw = (h + ph) // rh, (w + pw) // rw
    x = x.reshape(b, nh, rh, nw, rw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh, nw, rh * rw, c), (h, w, nh, nw)


def _unpatch(x: Array, rh: int, rw: int, geom: tuple) -> Array:
    h, w, nh, nw = geom
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, nh, nw, rh, rw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * rh, nw * rw, c)[:, :h, :w]


class PAF(nn.Module):
    """Patch-wise Adaptive Fusion (Eq. 8-13, Fig. 4) of ``F_att`` (GrSCM) and ``F_p`` (NeSCM).

    SIA: ``F_p`` split into ``k`` contiguous channel groups; per group the channel mean and max
    (Eq. 8-9) fused by a 3x3 conv 2 -> 1 with bias (Eq. 10; a grouped conv, computed as a
    ``layers.depthwise_conv`` on the 2k pooled maps plus a pair sum) -> ``F_cp`` (B, H, W, k).
    ``F_att' = 1x1 conv (C -> C)``, ``F_cp' = 1x1 conv (k -> k)`` (biases). In every
    ``r x r`` patch ``n``: ``w^n(i, j) = softmax_j cos(F_att'^n(i), F_cp'^n(j))`` (Eq. 11-12)
    and ``F_out = F_att + sum_j w^n(i, j) F_cp'^n(j)`` (Eq. 13, residual on the un-projected
    ``F_att``). ``H, W`` not multiples of ``r`` are edge-padded inside; a map smaller than
    ``r`` is one patch (image-level fusion).
    """
    dim: int
    groups: int = 4
    patch: int = 16
    impl: str = "auto"

    @nn.compact
    def __call__(self, f_att: Array, f_p: Array) -> Array:
        b, h, w, c = f_att.shape
        k = self.groups
        if c % k:
            raise ValueError(f"PAF: {c} channels not divisible by groups={k}")
        fp = f_p.reshape(b, h, w, k, c // k)
        pooled = jnp.stack([fp.mean(-1), fp.max(-1)], axis=-1).reshape(b, h, w, 2 * k)
        sia = self.param("sia_kernel", layers.torch_kernel_init(), (3, 3, 1, 2 * k))
        sia_b = self.param("sia_bias", _conv_init(18), (k,))
        f_cp = layers.depthwise_conv(pooled, sia, impl=self.impl)
        f_cp = f_cp.reshape(b, h, w, k, 2).sum(-1) + sia_b
        a = layers.Conv2d(c, (1, 1), use_bias=True, name="proj_att")(f_att)
        cp = layers.Conv2d(k, (1, 1), use_bias=True, name="proj_cp")(f_cp)
        rh, rw = min(self.patch, h), min(self.patch, w)
        ap, geom = _patches(a, rh, rw)                           # (B, Ph, Pw, r^2, C)
        cpp, _ = _patches(cp, rh, rw)                            # (B, Ph, Pw, r^2, k)
        sim = jnp.einsum("bpqnc,bpqnj->bpqcj", layers.l2_normalize(ap, axis=3),
                         layers.l2_normalize(cpp, axis=3))
        wts = jax.nn.softmax(sim, axis=-1)
        fused = jnp.einsum("bpqcj,bpqnj->bpqnc", wts, cpp)
        return f_att + _unpatch(fused, rh, rw, geom)


class ChannelCrossAttention(nn.Module):
    """Table IV "CAttention": image-level channel cross-attention, queries from ``F_att``,
    keys/values from ``F_p`` (``n`` heads of ``C_in`` channel tokens, cosine logits x sigma),
    output projection, residual on ``F_att``."""
    dim: int
    heads: int = 1

    @nn.compact
    def __call__(self, f_att: Array, f_p: Array) -> Array:
        b, h, w, c = f_att.shape
        d = c // self.heads

        def lin(name, t):
            return layers.Linear(c, use_bias=False, name=name)(t).reshape(
                b, h * w, self.heads, d)

        rescale = self.param("rescale", nn.initializers.ones, (self.heads, 1, 1))
        out = layers.spectral_attention(lin("to_q", f_att), lin("to_k", f_p), lin("to_v", f_p),
                                        rescale).reshape(b, h, w, c)
        return f_att + layers.Linear(c, use_bias=True, name="proj")(out)


@dataclasses.dataclass(frozen=True)
class CSRMOptions:
    """Options shared by every CSRM block of a network (one value, passed down).

    ``patch`` is the PAF patch size at full resolution (``patch / 2^level`` below).
    """
    attention: str = "grscm"
    global_model: str = "nescm"
    fusion: str = "paf"
    groups: int = 4
    window: int = 3
    patch: int = 16
    ffn_mult: int = 4
    impl: str = "auto"
    unroll: int | bool = 1
    nescm_planes: bool = True

    def validate(self) -> "CSRMOptions":
        for name, val, allowed in (("attention", self.attention, ATTENTIONS),
                                   ("global_model", self.global_model, GLOBAL_MODELS),
                                   ("fusion", self.fusion, FUSIONS)):
            if val not in allowed:
                raise ValueError(f"CCNet {name} must be one of {allowed}, got {val!r}")
        if self.patch < 1:
            raise ValueError(f"CCNet patch must be >= 1, got {self.patch}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"CCNet window must be a positive odd number, got {self.window}")
        return self


class CSRM(nn.Module):
    """Customised Spectral Relationship Modelling block::

        x = x + Fuse(GrSCM(x), NeSCM(x));   x = x + FFN(LN(x))

    (no norm before the inter-spectral part, pre-LN on the FFN: MST++'s placement).
    ``level`` is the U-Net level (PAF patch ``patch >> level``). ``train`` is unused.
    """
    dim: int
    heads: int = 1
    level: int = 0
    opts: CSRMOptions = CSRMOptions()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        o = self.opts
        f_att = GrSCM(self.dim, self.heads, o.groups, name="grscm")(x)
        if o.global_model == "none":
            f = f_att
        else:
            cell = "cmu" if o.global_model == "nescm" else o.global_model
            f_p = NeSCM(self.dim, self.heads, o.window, cell, o.impl, o.unroll,
                        planes=o.nescm_planes, name="nescm")(x, train)
            if o.fusion == "paf":
                f = PAF(self.dim, o.groups, max(o.patch >> self.level, 1), o.impl,
                        name="paf")(f_att, f_p)
            elif o.fusion == "add":
                f = f_att + f_p
            elif o.fusion == "concat":
                f = layers.Conv2d(self.dim, (1, 1), name="fuse")(
                    jnp.concatenate([f_att, f_p], axis=-1))
            else:
                f = ChannelCrossAttention(self.dim, self.heads, name="cattn")(f_att, f_p)
        x = x + f
        y = layers.LayerNorm(name="norm")(x)
        return layers.FeedForward(self.dim, o.ffn_mult, impl=o.impl, name="ffn")(y) + x


def csrm_block(dim: int, heads: int, name: str | None = None, *, base_dim: int,
               opts: CSRMOptions) -> nn.Module:
    """:class:`layers.SpectralUNet` block factory: a CSRM block (or MST++'s MSAB for
    ``attention="mha"``, Table II) at the level given by ``dim / base_dim``."""
    if opts.attention == "mha":
        return layers.MSAB(dim=dim, heads=heads, impl=opts.impl, name=name)
    level = int(np.log2(dim // base_dim))
    return CSRM(dim=dim, heads=heads, level=level, opts=opts, name=name)


class CCNet(nn.Module):
    """CCNet (Fig. 2): ``conv_in 3x3 (3 -> n_feat)``, ``stage`` Spectrum Reconstruction Units
    (:class:`layers.SpectralUNet` with CSRM blocks, ``num_blocks`` per level), ``conv_out 3x3
    (n_feat -> out_channels)``. Inputs are reflect-padded to a multiple of 4 and cropped back.

    The units are residual, so ``conv_out(conv_in(x))`` is the network's linear global path;
    MST++'s output-level ``+ conv_in(x)`` residual cannot be added because ``n_feat = 32``
    differs from the 31 output bands (docs/methods/ccnet.md).
    ``__call__(rgb, train=False)``: ``(B, H, W, in_channels) -> (B, H, W, out_channels)``.
    """
    in_channels: int = 3
    out_channels: int = 31
    n_feat: int = 32
    stage: int = 3
    num_blocks: tuple = (1, 1, 1)
    groups: int = 4
    window: int = 3
    patch: int = 16
    attention: str = "grscm"
    global_model: str = "nescm"
    fusion: str = "paf"
    ffn_mult: int = 4
    dw_impl: str = "auto"
    unroll: int | bool = 1
    nescm_planes: bool = True     # False: inference uses the training (stacked-window) form

    def options(self) -> CSRMOptions:
        return CSRMOptions(attention=self.attention, global_model=self.global_model,
                           fusion=self.fusion, groups=self.groups, window=self.window,
                           patch=self.patch, ffn_mult=self.ffn_mult, impl=self.dw_impl,
                           unroll=self.unroll, nescm_planes=self.nescm_planes).validate()

    @nn.compact
    def __call__(self, rgb: Array, train: bool = False) -> Array:
        if rgb.ndim != 4 or rgb.shape[-1] != self.in_channels:
            raise ValueError(f"CCNet expects rgb of shape (B, H, W, {self.in_channels}); got "
                             f"{tuple(rgb.shape)}")
        if self.stage < 1:
            raise ValueError(f"stage must be >= 1, got {self.stage}")
        if self.n_feat % (self.groups * 1) or (self.n_feat // self.groups) < 1:
            raise ValueError(f"n_feat ({self.n_feat}) must be divisible by groups "
                             f"({self.groups})")
        opts = self.options()
        block = functools.partial(csrm_block, base_dim=self.n_feat, opts=opts)
        h, w = rgb.shape[1], rgb.shape[2]
        x = layers.pad_to_multiple(layers.as_floating(rgb), 2 ** LEVELS, mode="reflect")
        fea = layers.Conv2d(self.n_feat, (3, 3), name="conv_in")(x)
        for s in range(self.stage):
            fea = layers.SpectralUNet(dim=self.n_feat, levels=LEVELS,
                                      num_blocks=tuple(self.num_blocks), block=block,
                                      head_dim=self.n_feat, name=f"body_{s}")(fea, train)
        out = layers.Conv2d(self.out_channels, (3, 3), name="conv_out")(fea)
        return layers.crop_to(out, (h, w))


make_model = registry.module_factory(CCNet, "CCNet", tuple_keys=("num_blocks",))


registry.register(registry.Method(
    name="ccnet",
    make_model=make_model,
    presets=registry.standard_presets("jaxspec.configs.ccnet"),
    step_kind="supervised",
    description=("CCNet: 3 U-Net units of CSRM blocks (GrSCM group attention + NeSCM "
                 "bidirectional memory units in lax.scan, fused by PAF), RGB -> 31 bands"),
    reference=("F. Feng, R. Cong, S. Wei, Y. Zhang, J. Li, S. Kwong, W. Zhang. Unleashing "
               "Correlation and Continuity for Hyperspectral Reconstruction from RGB Images. "
               "IEEE Transactions on Cybernetics 2025. arXiv:2501.01481"),
    paper_params_m=1.61,
    paper_gflops=None,
    paper_gflops_input=None,
    stride=16,
))
