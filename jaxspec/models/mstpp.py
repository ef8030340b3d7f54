"""MST++: Multi-stage Spectral-wise Transformer (Cai et al., CVPRW 2022), NTIRE 2022 winner.

Faithful Flax port of ``MST_Plus_Plus`` from ``caiyuanhao1998/MST-plus-plus``
(``train_code/architecture/MST_Plus_Plus.py``; see /work/shared/specs/mstpp.md §3 and
docs/methods/mstpp.md):

1. reflect-pad bottom/right so H, W are multiples of 8;
2. ``conv_in``: 3x3 conv ``in_channels -> n_feat``, no bias;
3. ``stage`` single-stage spectral transformers (SSTs) in sequence, each an MST U-Net
   (:class:`jaxspec.layers.SpectralUNet`, 2 levels, blocks ``(1, 1, 1)``, channels
   ``n_feat -> 2 n_feat -> 4 n_feat``, head dim ``n_feat``) with its own residual;
4. ``conv_out``: 3x3 conv ``n_feat -> out_channels``, no bias;
5. global residual: ``+ conv_in(x)`` (the features, not the RGB);
6. crop to the input size. The output is linear (no activation, no clamp).

Default configuration: 1,619,625 parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxspec import registry
from jaxspec.layers import Conv2d, SpectralUNet, as_floating, crop_to, pad_to_multiple

STRIDE = 8   # 2 down-sampling levels need x4; the reference pads to x8


class MSTPlusPlus(nn.Module):
    """MST++ (``MST_Plus_Plus(in_channels=3, out_channels=31, n_feat=31, stage=3)``).

    ``__call__(rgb, train=False)``: ``(B, H, W, in_channels)`` float -> ``(B, H, W,
    out_channels)`` float32, any ``H, W`` (internally reflect-padded to multiples of 8).
    ``dw_impl`` selects the depthwise-conv implementation (``"auto" | "shift" | "lax"``); it
    changes neither the parameters nor (beyond float rounding) the output.
    """
    in_channels: int = 3
    out_channels: int = 31
    n_feat: int = 31
    stage: int = 3
    dw_impl: str = "auto"

    @nn.compact
    def __call__(self, rgb: jax.Array, train: bool = False) -> jax.Array:
        if rgb.ndim != 4:
            raise ValueError(f"MSTPlusPlus expects rgb of shape (B, H, W, {self.in_channels}); "
                             f"got {tuple(rgb.shape)}")
        if rgb.shape[-1] != self.in_channels:
            raise ValueError(f"MSTPlusPlus(in_channels={self.in_channels}) got an input with "
                             f"{rgb.shape[-1]} channels")
        if self.out_channels != self.n_feat:
            raise ValueError(f"MST++'s global residual adds conv_in features to the output: "
                             f"out_channels ({self.out_channels}) must equal n_feat "
                             f"({self.n_feat})")
        if self.stage < 1:
            raise ValueError(f"stage must be >= 1, got {self.stage}")
        h, w = rgb.shape[1], rgb.shape[2]
        x = pad_to_multiple(as_floating(rgb), STRIDE, mode="reflect")
        x = Conv2d(self.n_feat, (3, 3), name="conv_in")(x)
        hfeat = x
        for s in range(self.stage):
            hfeat = SpectralUNet(dim=self.n_feat, levels=2, num_blocks=(1, 1, 1),
                                 impl=self.dw_impl, name=f"body_{s}")(hfeat, train)
        out = Conv2d(self.out_channels, (3, 3), name="conv_out")(hfeat) + x
        return crop_to(out, (h, w))


def analytic_macs(height: int, width: int, n_feat: int = 31, stage: int = 3,
                  in_channels: int = 3, out_channels: int = 31) -> int:
    """Multiply-accumulates of one MST++ forward pass, counted with fvcore's conventions.

    This is the counter behind the paper's "FLOPS" (``my_summary`` = fvcore
    ``FlopCountAnalysis`` / 2**30, i.e. GMACs): convolutions, linears and the two attention
    matmuls count MACs, LayerNorm counts 5 per element, a transposed conv counts
    ``N_in * C_in * C_out * k^2``; activations, softmax, L2-normalisation and additions count 0.
    The input is first padded to a multiple of 8 as the model does. Per SST, with
    ``N_l = N / 4^l``, ``C_l = 2^l C`` and ``d = C`` (head dim):

    * MSAB(C_l): ``4 N C_l^2`` (q, k, v, proj) ``+ 2 N C_l d`` (K Q^T, A V) ``+ 18 N C_l``
      (pos_emb) ``+ 5 N C_l`` (LN) ``+ 8 N C_l^2 + 36 N C_l`` (FFN);
    * embedding/mapping ``9 N C^2`` each, down-convs ``16 N_{l+1} C_l C_{l+1}``, up-convs
      ``4 N_{l+1} C_{l+1} C_l``, fusions ``2 N_l C_l^2``.

    ``analytic_macs(256, 256) / 2**30 = 20.76`` (paper quotes 23.05) and
    ``analytic_macs(482, 512) / 2**30 = 79.15`` (a user measured 79.14 with fvcore, MST++
    issue #56).
    """
    h = height + (-height) % STRIDE
    w = width + (-width) % STRIDE
    n, c, d = h * w, n_feat, n_feat

    def msab(n_l, c_l):
        return (4 * n_l * c_l * c_l + 2 * n_l * c_l * d + 18 * n_l * c_l + 5 * n_l * c_l
                + 8 * n_l * c_l * c_l + 36 * n_l * c_l)

    ns, cs = [n, n // 4, n // 16], [c, 2 * c, 4 * c]
    sst = 2 * 9 * n * c * c
    sst += 2 * msab(ns[0], cs[0]) + 2 * msab(ns[1], cs[1]) + msab(ns[2], cs[2])
    sst += 16 * ns[1] * cs[0] * cs[1] + 16 * ns[2] * cs[1] * cs[2]
    sst += 4 * ns[2] * cs[2] * cs[1] + 4 * ns[1] * cs[1] * cs[0]
    sst += 2 * ns[0] * cs[0] * cs[0] + 2 * ns[1] * cs[1] * cs[1]
    return 9 * n * in_channels * c + stage * sst + 9 * n * c * out_channels


_ARCH_KEYS = ("in_channels", "out_channels", "n_feat", "stage", "dw_impl")


make_model = registry.module_factory(MSTPlusPlus, "MST++", allowed=_ARCH_KEYS)


registry.register(registry.Method(
    name="mstpp",
    make_model=make_model,
    presets=registry.standard_presets("jaxspec.configs.mstpp"),
    step_kind="supervised",
    description="MST++: 3 spectral-wise transformer U-Nets (S-MSA), RGB -> 31 bands",
    reference=("Y. Cai, J. Lin, Z. Lin, H. Wang, Y. Zhang, H. Pfister, R. Timofte, L. Van Gool. "
               "MST++: Multi-stage Spectral-wise Transformer for Efficient Spectral "
               "Reconstruction. CVPR Workshops (NTIRE) 2022. arXiv:2204.07908"),
    paper_params_m=1.62,
    paper_gflops=23.05,
    paper_gflops_input=(256, 256),
    stride=STRIDE,
))
