"""MCGA: Mixture of Codebooks + Grayscale-Aware attention (arXiv 2507.09885), two stages.

* Stage 1 (``--method mcga_vq``, task ``hsi2hsi``): :class:`MCGAVQ`, a multi-scale VQ-VAE on the
  HSI alone. Alg. 1 (:class:`MSQuantization`): a random subset of ``C^m = 2^floor(log2(C/2))``
  bands (fixed evenly spaced subset at inference), then for i = 1..S ``H_i^d = Downsample(f)``
  (``C^m/2^i`` channels at ``H/2^i``), ``H_i^q = Quantize(B_i, H_i^d)``, ``f = phi(Upsample(H_i^q))``.
  Alg. 2 (:class:`MSReconstruction`): for i = S..1 ``R_i^q = Quantize(B_i, H_i^d)``,
  ``R_i = Upsample(Concat(H_i^d, R_i^q))``, ``f = Concat(f, phi(R_i))``; ``X^ = phi(f)``.
  Codebooks ``B_i`` (512 x C^m/2^i, N(0, I) init, :class:`MoC`) are learned by the embedding and
  commitment losses (no EMA), returned as the auxiliary losses ``vq_embed`` / ``vq_commit`` and
  weighted by ``config.aux_loss_weights``; the encoder sees the straight-through estimator
  ``z + sg(q - z)``.
* Stage 2 (``--method mcga``, task ``rgb2hsi``): :class:`MCGA` = :class:`GANet` (a U-Net of
  grayscale-aware blocks whose decoder queries the frozen codebooks at every scale) producing
  ``H_i^GA`` with the Alg. 1 shapes, fed to the frozen stage-1 :class:`MSReconstruction`. The
  codebooks (``moc``) and the decoder (``decoder``) are copied from a stage-1 run with
  ``config.init_from`` and kept bitwise unchanged with ``config.frozen`` (see
  :func:`jaxspec.configs.mcga.stage2`).
* Test-time adaptation: :func:`tta_entropy` (``Method.adapt_loss``) = entropy of
  ``softmax(-distance)`` over the codes at every quantised position (Eq. 17), adapting only the
  GA attention Linear layers (Eq. 6, parameter paths ``.../ga_linear/...``).

Every resolution of the paper's gaps follows ../shared/specs/methods.md §3; deviations are
listed in docs/methods/mcga.md. Arrays are NHWC, bands last.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxspec import registry
from jaxspec.layers import Conv2d, ConvTranspose2d, LayerNorm, Linear, gelu

NUM_CODES = 512          # codewords per dataset and scale (paper: 256 pixel types x 2 levels)
BETA = 0.25              # commitment weight


def masked_bands(channels: int) -> int:
    """``C^m = 2^floor(log2(C / 2))`` (Alg. 1 line 3): 31 -> 8, 224 -> 64, 191 -> 64."""
    if channels < 2:
        raise ValueError(f"MCGA needs at least 2 bands, got {channels}")
    return 2 ** int(math.floor(math.log2(channels / 2)))


def code_dims(channels: int, scales: int, min_dim: int = 0) -> tuple[int, ...]:
    """Code dimension ``C^m / 2^i`` of scale i = 1..S, at least ``min_dim`` (0: literal, so
    ``C^m < 2^S`` is an error; 1 lets 31 bands (C^m = 8) have S = 4 with code dim 1 at the
    coarsest scale, what the paper's ARAD S = 4 ablation needs)."""
    cm = masked_bands(channels)
    dims = tuple(max(cm // 2 ** i, min_dim) for i in range(1, scales + 1))
    if min(dims) < 1:
        raise ValueError(f"{scales} scales need C^m = {cm} >= 2^{scales} (C = {channels} bands; "
                         f"min_code_dim=1 floors the code dims at 1)")
    return dims


def charbonnier(pred, gt, eps: float = 1e-6):
    """Charbonnier loss (Eq. 2): mean sqrt((pred - gt)^2 + eps)."""
    return jnp.mean(jnp.sqrt(jnp.square(pred - gt) + eps))


# ----------------------------------------------------------------------------- quantisation
def sq_distances(z, codebook):
    """``|z - b_n|^2`` for every vector of ``z`` (..., d) and codeword ``b_n`` of (N, d)."""
    return (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ codebook.T
            + jnp.sum(codebook * codebook, -1))


def nearest_code(z, codebook):
    """Index of the nearest codeword of ``codebook`` (N, d) for every vector of ``z`` (..., d):
    ``argmin_n |b_n|^2 - 2 z.b_n`` (``|z|^2`` is the same for every n), the lower index on a
    tie, as ``jnp.argmin``. Up to d = 16 a running minimum over the codewords
    (``fori_loop``), vectorised over the positions: XLA:CPU's (value, index) reduction of an
    argmin runs one element at a time, and the loop is 17x faster for the 62k x 512 search of
    a 482x512 image (146 -> 8 ms), with the same scores (the same operations in the same
    order). Larger d: the matrix form (one matmul). Not differentiable (an index)."""
    z, codebook = lax.stop_gradient(z), lax.stop_gradient(codebook)
    d = z.shape[-1]
    bb = jnp.sum(codebook * codebook, -1)
    if d > 16:
        return jnp.argmin(bb - 2.0 * z @ codebook.T, axis=-1)
    zt = z.reshape(-1, d).T                                  # (d, positions)

    def body(k, carry):
        best, idx = carry
        s = bb[k]
        for j in range(d):
            s = s - 2.0 * codebook[k, j] * zt[j]
        better = s < best                                    # strict: the first minimum wins
        return jnp.where(better, s, best), jnp.where(better, k, idx)

    init = (jnp.full(zt.shape[1:], jnp.inf, zt.dtype), jnp.zeros(zt.shape[1:], jnp.int32))
    _, idx = lax.fori_loop(0, codebook.shape[0], body, init, unroll=8)
    return idx.reshape(z.shape[:-1])


def assignment_entropy(d2):
    """Mean over positions of the entropy of ``P = softmax(-d2)`` over the codes (Eq. 17)."""
    logp = jax.nn.log_softmax(-d2, axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))


def vq_losses(z, q):
    """``(embed, commit)``: ``embed = mean |sg[z] - q|^2`` moves the codewords (the codebook
    loss of VQ-VAE), ``commit = mean |z - sg[q]|^2`` moves the encoder."""
    embed = jnp.mean(jnp.square(lax.stop_gradient(z) - q))
    commit = jnp.mean(jnp.square(z - lax.stop_gradient(q)))
    return embed, commit


def code_statistics(idx, num_codes: int) -> dict:
    """Codebook usage of one batch of assignments: ``perplexity`` exp(H(mean one-hot)) and
    ``usage`` (fraction of codewords used at least once)."""
    counts = jnp.bincount(idx.reshape(-1), length=num_codes).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
    return {"perplexity": perplexity, "usage": jnp.mean((counts > 0).astype(jnp.float32))}


def _sow_entropy(module: nn.Module, z, codebook) -> None:
    """Record the query entropy for test-time adaptation (only when asked for: the distance
    matrix is computed only then)."""
    if module.is_mutable_collection("intermediates") and not module.is_initializing():
        module.sow("intermediates", "entropy", assignment_entropy(sq_distances(z, codebook)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation with a learned ``(num_codes, dim)`` codebook, N(0, I) init.

    Returns ``(q_st, info)``: ``q_st = z + sg(q - z)`` (straight-through), ``info`` holds the
    hard ``idx``, the codeword vectors ``q`` and the losses."""
    num_codes: int
    dim: int

    def setup(self):
        self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                                   (self.num_codes, self.dim))

    def __call__(self, z):
        if z.shape[-1] != self.dim:
            raise ValueError(f"quantizer of dim {self.dim} got vectors of dim {z.shape[-1]}")
        idx = nearest_code(z, self.codebook)
        q = jnp.take(self.codebook, idx, axis=0)
        _sow_entropy(self, z, self.codebook)
        embed, commit = vq_losses(z, q)
        info = {"idx": idx, "q": q, "embed": embed, "commit": commit}
        return z + lax.stop_gradient(q - z), info


class MoC(nn.Module):
    """The (mixture of) codebooks, one :class:`VectorQuantizer` per scale: ``moc(i, z)``.

    A mixture of N stage-1 runs is the same module with ``num_codes = 512 N`` (their codebooks
    concatenated along the code axis). ``interface_width > 0``: the features ``H_i^d`` have that
    many channels and a 1x1 projection per scale (``proj_i``, part of the codebooks: frozen
    with them) maps them to the code dim before the nearest-codeword search (methods.md 3,
    "1x1 projections to/from the code dims around every Quantize"); 0: ``H_i^d`` are the
    code-dim vectors themselves."""
    dims: tuple[int, ...]
    num_codes: int = NUM_CODES
    interface_width: int = 0

    def setup(self):
        self.quantizers = [VectorQuantizer(self.num_codes, d) for d in self.dims]
        if self.interface_width:
            self.projs = [nn.Dense(d, name=f"proj_{i}") for i, d in enumerate(self.dims)]

    def feature_dim(self, i: int) -> int:
        """Channels of ``H_i^d``: ``interface_width`` or the code dim of scale ``i``."""
        return self.interface_width or self.dims[i]

    def __call__(self, i: int, z):
        if self.interface_width:
            z = self.projs[i](z)
        return self.quantizers[i](z)

    def codebook(self, i: int):
        return self.quantizers[i].codebook


def _resize(x, size: tuple[int, int]):
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size[0], size[1], c), method="bilinear")


class ResBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        y = Conv2d(self.width, (3, 3), use_bias=True)(gelu(x))
        y = Conv2d(self.width, (3, 3), use_bias=True)(gelu(y))
        return x + y


class MSQuantization(nn.Module):
    """Alg. 1 encoder: ``f`` (B, H, W, C^m) -> ``[H_1^d, ..., H_S^d]`` (``H_i^d`` of shape
    (B, H/2^i, W/2^i, C^m/2^i)). ``Downsample`` = i strided 3x3 convs at width ``width`` + 2
    residual blocks + 1x1 to the code dim; ``phi(Upsample(.))`` = bilinear x2^i + 3x3 conv."""
    dims: tuple[int, ...]
    width: int = 32

    @nn.compact
    def __call__(self, f, moc: MoC):
        h, w = f.shape[1:3]
        feats, infos = [], []
        for i, d in enumerate(self.dims):
            x = f
            for j in range(i + 1):
                x = Conv2d(self.width, (3, 3), strides=2, use_bias=True,
                           name=f"down{i}_conv{j}")(x if j == 0 else gelu(x))
            for j in range(2):
                x = ResBlock(self.width, name=f"down{i}_res{j}")(x)
            hd = Conv2d(moc.feature_dim(i), (1, 1), use_bias=True, name=f"down{i}_proj")(gelu(x))
            hq, info = moc(i, hd)
            feats.append(hd)
            infos.append(info)
            f = Conv2d(d, (3, 3), use_bias=True, name=f"phi{i}")(_resize(hq, (h, w)))
        return feats, infos


class MSReconstruction(nn.Module):
    """Alg. 2 decoder: ``[H_1^d .. H_S^d]`` -> X^ (B, H, W, out_channels). For i = S..1:
    ``R_i^q = Quantize(B_i, H_i^d)``; ``R_i = Upsample(Concat(H_i^d, R_i^q))`` (bilinear to H x W,
    3x3 conv to ``width``, residual block); ``f = Concat(f, phi(R_i))``; ``X^ = phi(f)``."""
    out_channels: int
    width: int = 32

    @nn.compact
    def __call__(self, feats, size: tuple[int, int], moc: MoC):
        parts, infos = [], []
        for i in reversed(range(len(feats))):
            hd = feats[i]
            rq, info = moc(i, hd)
            infos.append(info)
            r = _resize(jnp.concatenate([hd, rq], -1), size)
            r = Conv2d(self.width, (3, 3), use_bias=True, name=f"up{i}_conv")(r)
            r = ResBlock(self.width, name=f"up{i}_res")(r)
            parts.append(Conv2d(self.width, (3, 3), use_bias=True, name=f"phi{i}")(gelu(r)))
        f = jnp.concatenate(parts, -1)
        out = Conv2d(self.out_channels, (3, 3), use_bias=True, name="phi_out")(gelu(f))
        return out, infos[::-1]   # infos in scale order 1..S


def _vq_aux(infos, num_codes: int, losses: bool) -> dict:
    """Aux dict: summed ``vq_embed``/``vq_commit`` losses (if ``losses``) and per-scale
    ``perplexity_i`` / ``usage_i`` statistics (``stat_`` keys: logged, never added to a loss)."""
    aux = {}
    if losses:
        aux["vq_embed"] = sum(inf["embed"] for inf in infos)
        aux["vq_commit"] = sum(inf["commit"] for inf in infos)
    for k, inf in enumerate(infos):          # infos in scale order 1..S
        stats = code_statistics(inf["idx"], num_codes)
        aux[f"stat_perplexity_{k + 1}"] = stats["perplexity"]
        aux[f"stat_usage_{k + 1}"] = stats["usage"]
    return aux


def _check_input(x, channels: int, scales: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"MCGA {what}: expected (B, H, W, {channels}), got shape {x.shape}")
    m = 2 ** scales
    if x.shape[1] % m or x.shape[2] % m:
        raise ValueError(f"MCGA {what}: H and W must be multiples of 2^scales = {m}, got "
                         f"{x.shape[1:3]} (pad the input, Method.stride)")


# ----------------------------------------------------------------------------- stage 1
class MCGAVQ(nn.Module):
    """Stage 1: multi-scale VQ-VAE (Alg. 1 + 2) on the HSI. Returns ``(X^, aux)``.

    In stage 1, Alg. 2 quantises the same ``H_i^d`` with the same codebook as Alg. 1, so its
    VQ losses equal Alg. 1's: they are computed once and ``L_1 + L_2 = 2 L_1`` is carried by the
    preset's ``aux_loss_weights`` (see docs/methods/mcga.md)."""
    in_channels: int = 31
    out_channels: int = 31
    scales: int = 2
    num_codes: int = NUM_CODES
    width: int = 32
    random_mask: bool = True      # random band subset per image at train time (Alg. 1 Mask)
    interface_width: int = 0      # channels of H_i^d (0: the code dims; see MoC)
    min_code_dim: int = 0         # floor of the code dims (see code_dims)

    def setup(self):
        self.dims = code_dims(self.in_channels, self.scales, self.min_code_dim)
        self.moc = MoC(self.dims, self.num_codes, self.interface_width)
        self.encoder = MSQuantization(self.dims, self.width)
        self.decoder = MSReconstruction(self.out_channels, self.width)

    def mask(self, x, train: bool):
        """Keep C^m of the C bands: a random sorted subset per image at train time, else the
        evenly spaced subset."""
        c, cm = x.shape[-1], masked_bands(self.in_channels)
        if train and self.random_mask:
            keys = jax.random.split(self.make_rng("mask"), x.shape[0])
            idx = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, c)[:cm]))(keys)
        else:
            idx = jnp.broadcast_to(jnp.round(jnp.linspace(0, c - 1, cm)).astype(jnp.int32),
                                   (x.shape[0], cm))
        return jnp.take_along_axis(x, idx[:, None, None, :], axis=-1)

    def __call__(self, hsi, train: bool = False):
        _check_input(hsi, self.in_channels, self.scales, "stage 1 input")
        f = self.mask(hsi, train)
        feats, infos = self.encoder(f, self.moc)
        out, _ = self.decoder(feats, hsi.shape[1:3], self.moc)
        return out, _vq_aux(infos, self.num_codes, losses=True)


# ----------------------------------------------------------------------------- GA operations
def _minmax01(x, mask=None, eps: float = 1e-6):
    """Per-sample min-max normalisation to [0, 1] over all non-batch axes (``mask`` (B, N) of
    valid rows for (B, N, C) inputs)."""
    axes = tuple(range(1, x.ndim))
    if mask is None:
        lo, hi = jnp.min(x, axes, keepdims=True), jnp.max(x, axes, keepdims=True)
    else:
        m = mask[..., None]
        lo = jnp.min(jnp.where(m, x, jnp.inf), axes, keepdims=True)
        hi = jnp.max(jnp.where(m, x, -jnp.inf), axes, keepdims=True)
    return (x - lo) / (hi - lo + eps)


class GAAttention(nn.Module):
    """Eq. 5-6: ``a = softmax(W AvgPool(X) + b)`` (B, C); ``W, b`` are the ``ga_linear`` params
    test-time adaptation updates."""

    @nn.compact
    def __call__(self, xn, mask=None):
        c = xn.shape[-1]
        if mask is None:
            z = jnp.mean(xn, axis=tuple(range(1, xn.ndim - 1)))
        else:
            m = mask[..., None].astype(xn.dtype)
            z = jnp.sum(xn * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
        return jax.nn.softmax(Linear(c, name="ga_linear")(z), axis=-1)


def _bcast(a, x):
    return a.reshape(a.shape[:1] + (1,) * (x.ndim - 2) + a.shape[-1:])


class GAGamma(nn.Module):
    """Eq. 8: ``GA_gamma(X) = X_n^a`` on the [0, 1]-normalised input (+1e-6 against 0^a)."""

    @nn.compact
    def __call__(self, x, mask=None):
        xn = _minmax01(x, mask)
        a = GAAttention()(xn, mask)
        return jnp.power(xn + 1e-6, _bcast(a, xn))


class GALog(nn.Module):
    """Eq. 7 + 9: ``GA_l(X) = (1 + 4 a) log(1 + X_n)``."""

    @nn.compact
    def __call__(self, x, mask=None):
        xn = _minmax01(x, mask)
        a = GAAttention()(xn, mask)
        return (1.0 + 4.0 * _bcast(a, xn)) * jnp.log1p(xn)


class GAFFN(nn.Module):
    """Eq. 14-16: ``X_s = GELU(Conv3(Conv1(X)))`` (2C), split, ``GA_gamma``/``GA_l``, 4C -> C.
    ``ga=False`` (ablation): the two halves pass unchanged (same convs, activations and flow)."""
    ga: bool = True

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xs = gelu(Conv2d(2 * c, (3, 3), name="conv3")(Conv2d(c, (1, 1), name="conv1")(x)))
        x1, x2 = jnp.split(xs, 2, axis=-1)
        if self.ga:
            x1, x2 = GAGamma(name="ga_gamma")(x1), GALog(name="ga_log")(x2)
        y = jnp.concatenate([x1, x2, xs], -1)
        return gelu(Conv2d(c, (1, 1), name="conv_out")(y))


def top_k_cluster_means(x, idx, num_codes: int, k: int):
    """Cluster means of the K most frequent codes: ``x`` (B, N, C), ``idx`` (B, N) code of every
    vector -> ``(means (B, K, C), valid (B, K))``. Static shapes: a fixed-length ``bincount``
    and a top-K by stable sort; codes used by no vector are masked (``valid`` False, mean 0)."""
    k = min(k, num_codes)

    def one(xb, ib):
        counts = jnp.bincount(ib, length=num_codes)
        sums = jax.ops.segment_sum(xb, ib, num_segments=num_codes)
        # the K largest counts, ties to the lower code: what ``lax.top_k`` returns, as a
        # stable sort, which XLA's SPMD partitioner keeps split over the batch (it gathers
        # the global batch's counts in front of a ``top_k``)
        top = jnp.argsort(-counts, stable=True)[:k]
        top_counts = counts[top]
        means = sums[top] / jnp.maximum(top_counts, 1)[:, None].astype(xb.dtype)
        return means, top_counts > 0

    return jax.vmap(one)(x, idx)


class GQA(nn.Module):
    """GA-based quantised self-attention (Eq. 10-13), spectral (C x C) attention.

    Q, K, V by 1x1 convs; Q and K vectors are assigned to their nearest codeword of this scale's
    (frozen) codebook through a 1x1 projection C -> code dim; ``Q^``, ``K^`` (K x C) are the
    cluster means of the ``top_k`` most frequent codes; ``Q~ = GA_l(Q^)``;
    ``A = softmax(Q~^T K^ / sqrt(C))`` (C x C); ``out = A V``. ``full_attention``: Q^ = Q, K^ = K
    over all HW pixels (the paper's "Full-attn" ablation); ``ga=False``: ``Q~ = Q^``."""
    code_dim: int
    num_codes: int
    top_k: int = 256
    full_attention: bool = False
    ga: bool = True

    @nn.compact
    def __call__(self, x, codebook):
        b, h, w, c = x.shape
        q = Linear(c, use_bias=False, name="to_q")(x).reshape(b, h * w, c)
        k = Linear(c, use_bias=False, name="to_k")(x).reshape(b, h * w, c)
        v = Linear(c, use_bias=False, name="to_v")(x).reshape(b, h * w, c)
        if self.full_attention:
            qh, kh, qmask = q, k, None
        else:
            proj = Linear(self.code_dim, name="code_proj")
            cb = lax.stop_gradient(codebook)

            def clusters(t):
                zt = proj(t)
                _sow_entropy(self, zt, cb)
                return top_k_cluster_means(t, nearest_code(zt, cb), self.num_codes, self.top_k)

            qh, qmask = clusters(q)
            kh, kmask = clusters(k)
            kh = kh * kmask[..., None]
        qt = GALog(name="ga_log")(qh, qmask) if self.ga else qh
        if qmask is not None:
            qt = qt * qmask[..., None]
        attn = jax.nn.softmax(jnp.einsum("bkc,bkd->bcd", qt, kh) / math.sqrt(c), axis=-1)
        return jnp.einsum("bcd,bnd->bnc", attn, v).reshape(b, h, w, c)


class GABlock(nn.Module):
    """``x + GQA(LN(x))`` (left out with ``attention=False``), ``x + GA-FFN(LN(x))``; ``ga``
    switches the GA operations of both (the ablation ladder of Table 5)."""
    code_dim: int
    num_codes: int
    top_k: int = 256
    full_attention: bool = False
    attention: bool = True
    ga: bool = True

    @nn.compact
    def __call__(self, x, codebook):
        if self.attention:
            x = x + GQA(self.code_dim, self.num_codes, self.top_k, self.full_attention, self.ga,
                        name="gqa")(LayerNorm(name="norm1")(x), codebook)
        return x + GAFFN(self.ga, name="ffn")(LayerNorm(name="norm2")(x))


class GANet(nn.Module):
    """Stage-2 encoder: RGB (B, H, W, 3) -> ``[H_1^GA .. H_S^GA]`` with the Alg. 1 shapes.

    3x3 conv to ``width``; encoder: per scale a 4x4 stride-2 conv doubling the width
    (``width * 2^i`` at H/2^i) and ``enc_blocks`` GABlocks; decoder from the coarsest scale: 2x2
    transposed conv + skip + 1x1 fuse, then ``H_i`` is projected to the code dim, queries the
    frozen codebook (``H_i^q``, straight-through), ``Concat(H_i, H_i^q)`` is fused by a 1x1 conv,
    ``dec_blocks`` GABlocks give ``H_i^GA`` (projected to the code dim)."""
    dims: tuple[int, ...]
    num_codes: int
    width: int = 32
    enc_blocks: int = 0
    dec_blocks: int = 1
    top_k: int = 256
    full_attention: bool = False
    use_moc: bool = True          # ablation "plain GANet": no codebook query in the decoder
    attention: bool = True        # ablation: GABlocks without their (quantised) attention
    ga: bool = True               # ablation: GA operations replaced by the identity

    @nn.compact
    def __call__(self, rgb, moc: MoC):
        s = len(self.dims)

        def block(i, name):
            return GABlock(self.dims[i], self.num_codes, self.top_k, self.full_attention,
                           self.attention, self.ga, name=name)

        widths = [self.width * 2 ** (i + 1) for i in range(s)]
        x = Conv2d(self.width, (3, 3), use_bias=True, name="embed")(rgb)
        skips = []
        for i in range(s):
            x = Conv2d(widths[i], (4, 4), strides=2, padding=((1, 2), (1, 2)), name=f"down{i}")(x)
            for j in range(self.enc_blocks):
                x = block(i, f"enc{i}_block{j}")(x, moc.codebook(i))
            skips.append(x)
        out = [None] * s
        y = skips[-1]
        for i in reversed(range(s)):
            if i < s - 1:
                y = ConvTranspose2d(widths[i], name=f"up{i}")(y)
                y = Conv2d(widths[i], (1, 1), name=f"skip{i}")(jnp.concatenate([y, skips[i]], -1))
            if self.use_moc:
                hq, _ = moc(i, Conv2d(moc.feature_dim(i), (1, 1), use_bias=True,
                                      name=f"query{i}")(y))
                y = Conv2d(widths[i], (1, 1), use_bias=True, name=f"fuse{i}")(
                    jnp.concatenate([y, hq], -1))
            for j in range(self.dec_blocks):
                y = block(i, f"dec{i}_block{j}")(y, moc.codebook(i))
            out[i] = Conv2d(moc.feature_dim(i), (1, 1), use_bias=True, name=f"out{i}")(y)
        return out


class MCGA(nn.Module):
    """Stage 2: GANet + frozen MoC + frozen stage-1 decoder (Alg. 2). RGB -> (HSI, stats aux).

    ``moc`` and ``decoder`` have the parameter paths of :class:`MCGAVQ`, so ``init_from`` copies
    them from a stage-1 (or mixture) checkpoint."""
    out_channels: int = 31
    scales: int = 2
    num_codes: int = NUM_CODES
    width: int = 32               # stage-1 decoder width (must match the stage-1 run)
    ganet_width: int = 32
    enc_blocks: int = 0
    dec_blocks: int = 1
    top_k: int = 256
    full_attention: bool = False
    use_moc: bool = True
    attention: bool = True
    ga: bool = True
    interface_width: int = 0      # channels of H_i^d (must match the stage-1 run; see MoC)
    min_code_dim: int = 0         # floor of the code dims (must match the stage-1 run)

    def setup(self):
        self.dims = code_dims(self.out_channels, self.scales, self.min_code_dim)
        self.moc = MoC(self.dims, self.num_codes, self.interface_width)
        self.ganet = GANet(self.dims, self.num_codes, self.ganet_width, self.enc_blocks,
                           self.dec_blocks, self.top_k, self.full_attention, self.use_moc,
                           self.attention, self.ga)
        self.decoder = MSReconstruction(self.out_channels, self.width)

    def __call__(self, rgb, train: bool = False):
        _check_input(rgb, 3, self.scales, "stage 2 input")
        feats = self.ganet(rgb, self.moc)
        out, infos = self.decoder(feats, rgb.shape[1:3], self.moc)
        return out, _vq_aux(infos, self.num_codes, losses=False)


# ----------------------------------------------------------------------------- training
def is_stat(name: str) -> bool:
    return name.startswith("stat_")


def _data_loss(config):
    from jaxspec.train import losses as losses_lib
    return losses_lib.get_loss(config.loss)


def mcga_step(model, config, method=None):
    """Step kind ``"mcga"`` (both stages): ``config.loss`` on the task target
    (``"charbonnier"`` = Eq. 2, else a :mod:`jaxspec.train.losses` name) + the VQ aux losses
    weighted by ``config.aux_loss_weights`` (``steps.aux_total``); ``stat_*`` aux entries
    (perplexity, usage) are logged as ``aux/stat_*`` and never added. The optimiser is the
    engine's default one, so ``config.frozen`` gives exactly zero updates."""
    from jaxspec import tasks
    from jaxspec.train import optim, steps
    loss_fn = _data_loss(config)
    schedule = optim.make_schedule(config)
    streams = tuple(getattr(method, "rng_streams", ()) or ())
    task = tasks.of(method)

    def step(state, batch):
        rngs = steps.step_rngs(state, streams)

        def objective(params):
            pred, aux, _ = steps.model_call(task, method, state.apply_fn, {"params": params,
                                            **state.model_state}, batch, rngs=rngs)
            value = loss_fn(pred.astype(jnp.float32), batch[task.target_key])
            losses = {k: v for k, v in aux.items() if not is_stat(k)}
            return value + steps.aux_total(losses, config), (value, aux)

        (loss, (value, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads)
        m = {"loss": loss, "data_loss": value, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(new_state.params),
             "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        m.update({f"aux/{k}": jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return new_state, m

    return step


def tta_entropy(apply_fn, variables, inputs) -> Any:
    """``Method.adapt_loss`` (Eq. 17): sum over every quantisation (GANet queries, Alg. 2, top-K
    Q/K assignments) of the mean entropy of ``softmax(-|z - b|^2)`` over the codes."""
    _, inter = apply_fn(variables, inputs["rgb"], train=False, mutable=["intermediates"])
    return sum(jnp.sum(v) for v in jax.tree.leaves(inter["intermediates"]))


def _vq_presets():
    from jaxspec.configs import mcga as cfg
    return {"paper": cfg.vq_paper, "cpu": cfg.vq_cpu, "smoke": cfg.vq_smoke}


def _stage1_first(config, workdir, **kw):
    from jaxspec.configs import mcga as cfg
    return cfg.train_stage1_first(config, workdir, **kw)


def _register():
    from jaxspec.train import steps
    steps.register_step_kind("mcga")(mcga_step)
    registry.register(registry.Method(
        name="mcga_vq", task="hsi2hsi", step_kind="mcga", rng_streams=("mask",), stride=8,
        make_model=registry.module_factory(MCGAVQ, "mcga_vq"),
        presets=_vq_presets(),
        description="MCGA stage 1: multi-scale VQ-VAE on the HSI (Alg. 1 + 2)",
        reference="Zhou et al., MCGA, arXiv 2507.09885"))
    registry.register(registry.Method(
        name="mcga", task="rgb2hsi", step_kind="mcga", stride=8, adapt_loss=tta_entropy,
        make_model=registry.module_factory(MCGA, "mcga"),
        presets=registry.standard_presets("jaxspec.configs.mcga"),
        before_training=_stage1_first,
        description="MCGA stage 2: grayscale-aware U-Net on a frozen mixture of codebooks",
        reference="Zhou et al., MCGA, arXiv 2507.09885", paper_params_m=0.76))


_register()


# "charbonnier" (Eq. 2) as a named loss, so the engine validates config.loss like any other
from jaxspec.train import losses as _losses_lib  # noqa: E402
_losses_lib.LOSSES["charbonnier"] = charbonnier
