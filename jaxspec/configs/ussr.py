"""USSR presets (paper / cpu / smoke), the Table 3 ablation ladder and the Table 5 GAN
regularisers. The architecture (``MODEL``) is the same in every preset.

* ``model.loss``: "code" (default; the authors' code weights) or "paper" (Eq. 8-13), plus
  ``model.loss_overrides`` ({field of jaxspec.models.ussr.LossWeights: value}, e.g. an ablation
  row, or ``{'syn': 10, 'syn_srf': 1}`` for the synthetic pairs of docs/methods/ussr.md
  deviation 9); the phase losses read them from the model (``USSR.loss_weights``);
* ``streams``: the RGB (+ material label) stream reads ``train[:50%]``, the HSI stream
  ``train[50%:]`` of the dataset -- different scenes, so no RGB image has its own cube among the
  real cubes; the engine's batch is ``{"rgb": {"rgb", "label"}, "hsi": {"hsi"}}``;
* optimisers (methods.md §4 (b), implemented by ``ussr.engine_phases``): run lr 1e-4 (Adam,
  G + M), D Adam 5e-4, E1 + E2 + SE SGD 1e-3 momentum 0.9; ``OPTIM`` records the authors'
  values (``ussr.make_optimizers`` takes them as keywords).

* ``paper`` -- batch 24, 128x128 crops, 50 epochs x 208 iterations = 10,400 iterations,
  constant learning rates; the data sources of the paper (PASCAL-Context RGB, ICVL HSI) are not
  available here, so the preset names ``spectral_scenes`` splits: switch ``dataset`` for a real
  builder.
* ``cpu`` -- 32x32 crops, batch 4, 300 iterations on the built-in data.
* ``smoke`` -- 2 iterations on 16x16 crops, for tests.
"""
from __future__ import annotations

from jaxspec.configs.base import CPU_BUILTIN, SMOKE, Config, make_preset

MODEL = dict(bands=31, stages=4, srf_dictionary="auto", n_classes=13, segmenter_width=32,
             segmenter_blocks=3, sem_clip_scale=2.0, loss="code", loss_overrides={},
             prior_lambda=0.0)

OPTIM = dict(lr_gen=1e-4, lr_dis=5e-4, lr_sem=1e-3, sem_momentum=0.9, sem_wd=1e-4,
             sem_poly=0.9)
STREAMS = {"rgb": {"split": "train[:50%]", "keys": ["rgb", "label"], "seed": 1},
           "hsi": {"split": "train[50%:]", "keys": ["hsi"], "seed": 2}}

#: Table 3 of the paper (ICVL PSNR / ASSIM / SAM of each row), as LossWeights overrides.
ABLATION_LADDER = (
    ("adversarial", dict(bp=0.0, pos=0.0, smooth=0.0, l1gc=False, sem=0.0), (14.47, 0.121, 63.34)),
    ("+S_bp", dict(pos=0.0, smooth=0.0, l1gc=False, sem=0.0), (20.48, 0.781, 35.70)),
    ("+S_pos", dict(pos=1e-2, smooth=0.0, l1gc=False, sem=0.0), (21.72, 0.783, 30.64)),
    ("+S_1", dict(pos=1e-2, l1gc=False, sem=0.0), (26.11, 0.882, 14.44)),
    ("+L1-GC", dict(pos=1e-2, sem=0.0), (34.51, 0.983, 7.04)),
    ("+S_sem", dict(pos=1e-2), (37.83, 0.991, 4.01)),
)
#: Table 5: GAN regularisers (PSNR / SSIM / SAM on ICVL).
REGULARISERS = (
    ("1-GP", dict(l1gc=False, gp="one"), (28.15, 0.944, 12.60)),
    ("0-GP", dict(l1gc=False, gp="zero"), (33.33, 0.984, 6.29)),
    ("L1-GC", dict(), (37.83, 0.991, 4.01)),
)


def paper() -> Config:
    return make_preset(
        "ussr", "paper", MODEL, CPU_BUILTIN, crop=128, batch_size=24, steps=50 * 208,
        schedule="constant", lr=OPTIM["lr_gen"], max_eval_images=None, eval_every=208,
        ckpt_every=208, log_every=20, streams=STREAMS)


def cpu() -> Config:
    return make_preset("ussr", "cpu", MODEL, CPU_BUILTIN, crop=32, batch_size=4, steps=300,
                       schedule="constant", lr=OPTIM["lr_gen"], eval_every=100, ckpt_every=100,
                       streams=STREAMS)


def smoke() -> Config:
    # grouped-conv depthwise (same parameters and outputs): XLA:CPU compiles it ~2x faster
    return make_preset("ussr", "smoke", {**MODEL, "dw_impl": "lax"}, SMOKE, schedule="constant", lr=OPTIM["lr_gen"],
                       rgb_norm="none", streams=STREAMS)


def loss_weights(config: Config):
    """``LossWeights`` of a config: ``model.loss`` ("code" | "paper") with
    ``model.loss_overrides`` applied (what the phase losses read from the model)."""
    from jaxspec.models.ussr import LossWeights

    model = dict(config.model)
    kind = model.get("loss", "code")
    if kind not in ("code", "paper"):
        raise ValueError(f"ussr: model.loss must be 'code' or 'paper', got {kind!r}")
    base = LossWeights.code if kind == "code" else LossWeights.paper
    return base(**dict(model.get("loss_overrides") or {}))


def ablation(config: Config, row: str) -> Config:
    """``config`` with the loss of a Table 3 row (``"+S_bp"``, ...) or a Table 5 regulariser
    (``"1-GP"``, ``"0-GP"``, ``"L1-GC"``), paper loss forms."""
    table = {name: over for name, over, _ in ABLATION_LADDER + REGULARISERS}
    if row not in table:
        raise ValueError(f"unknown USSR ablation row {row!r}; rows: {sorted(table)}")
    return config.replace(model={**dict(config.model), "loss": "paper",
                                 "loss_overrides": dict(table[row])})
