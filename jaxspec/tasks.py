"""Tasks: what goes into a model, what comes out, and how it is scored.

A :class:`Task` is the one place that knows the inputs of a family of methods. The training loop,
the train steps, ``evaluate``, ``predict``, ``jaxspec.load/reconstruct/fuse`` and ``bench/`` all
go through it (big_vision's ``*_task.py``: one evaluation loop, the task object differs).

========== ========================================= ============ ==========================
task       model call                                 target       metrics (per image)
========== ========================================= ============ ==========================
rgb2hsi    ``apply(v, rgb, train=)``                  ``hsi``      every ``metrics.evaluate_all``
                                                                   metric + ``mrae_pos``
hsi2hsi    ``apply(v, hsi, train=)`` (autoencoding)   ``hsi``      same as rgb2hsi
fusion     ``apply(v, lr_hsi, hr_msi, train=)``       ``hsi``      psnr, sam, ergas (scale s),
                                                                   uiqi, ssim, rmse, mrae_pos
========== ========================================= ============ ==========================

* Keyword side inputs: a method lists batch keys in ``Method.side_inputs`` (fusion: ``"srf"``
  (B, C, M) and ``"psf"`` (B, k, k), the known degradation of each example) and receives them as
  keyword arguments: ``apply(v, lr_hsi, hr_msi, train=, srf=..., psf=...)``.
* A model may return ``(output, aux)`` with ``aux`` a dict of scalar auxiliary losses (VQ
  commitment, ...): :func:`split_output`; the train steps add them with
  ``config.aux_loss_weights`` (default weight 1), inference keeps ``output``.
* Data-derived model options: the task fills ``config.model[key]`` for the keys of
  ``Method.data_fields`` (default :attr:`Task.data_fields`) from the dataset (``bands``: C of
  the HSI, ``msi_bands``: M, ``scale``: the fusion factor) -- see :func:`resolve_config`.
* Fusion geometry: the LR grid is the base grid; ``lr_hsi`` has factor 1, ``hr_msi`` and the
  output factor ``s``. ``Method.stride`` is in LR pixels, so HR sizes are padded/tiled in
  multiples of ``s * stride`` and the LR tile is always aligned with the HR tile.
* Fusion metrics are computed on data in [0, 1] (the degradation normalises each HR cube, see
  :mod:`jaxspec.data.fusion`): PSNR with peak 1 after clamping to [0, 1] (equal to the papers'
  x255 / peak 255), SAM in degrees, ERGAS with ``100 / s``, UIQI on 8x8 windows, SSIM (Gaussian
  window, data range 1), all from :mod:`jaxspec.metrics`.
* Zeros in the ground truth (CAVE, Harvard, Chikusei, HySpecNet hold exact zeros): the task's
  ``mrae`` is the NTIRE MRAE (``mean(|p - g| / g)``, :func:`jaxspec.metrics.mrae`, bit for bit)
  on every image whose gt is > 0 everywhere, and the MRAE over the elements with gt > 0
  (``mrae_pos``) on an image with zeros (where the protocol value is inf), so it stays finite
  and a valid selection metric. ``mrae_pos`` is always the gt > 0 value (equal to ``mrae`` on
  data without zeros). :func:`jaxspec.metrics.mrae` itself keeps the reference's inf.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxspec.tasks")

# Direction of every metric for checkpoint selection.
METRIC_MODES = {"mrae": "min", "mrae_pos": "min", "rmse": "min", "sam": "min", "ergas": "min",
                "psnr": "max", "ssim": "max", "uiqi": "max"}


def metric_mode(name: str) -> str:
    """"min" or "max" for a metric name (``ValueError`` for unknown names)."""
    if name not in METRIC_MODES:
        raise ValueError(f"unknown selection metric {name!r}; choose one of "
                         f"{sorted(METRIC_MODES)}")
    return METRIC_MODES[name]


def split_output(out) -> tuple[Any, dict]:
    """``model.apply`` result -> (prediction, aux-loss dict); plain outputs have ``{}``."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise ValueError("a model returning a tuple must return (output, aux_losses_dict); "
                             f"got a tuple of {len(out)}")
        return out[0], dict(out[1])
    return out, {}


def mrae_pos(pred, gt):
    """Per-image MRAE over the elements with gt > 0: sum |p - g| / g / #(g > 0) ((B,))."""
    pred = jnp.asarray(pred, jnp.float32)
    gt = jnp.asarray(gt, jnp.float32)
    pos = gt > 0
    rel = jnp.where(pos, jnp.abs(pred - gt) / jnp.where(pos, gt, 1.0), 0.0)
    n = jnp.maximum(jnp.sum(pos, axis=(1, 2, 3)), 1)
    return jnp.sum(rel, axis=(1, 2, 3)) / n


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the task needs to know about the data: HSI band count C, MSI/RGB band count M
    (None for hsi2hsi), fusion scale s (1 otherwise), PSF size k and the operator that made
    the LR-HSI (fusion: ``"same"`` or ``"daem"``, :attr:`jaxspec.data.fusion.Degradation.mode`)."""
    bands: int
    msi_bands: int | None = None
    scale: int = 1
    psf_size: int | None = None
    degradation: str | None = None

    QUANTITIES = ("bands", "msi_bands", "scale", "degradation")

    def value(self, quantity: str):
        if quantity not in self.QUANTITIES:
            raise ValueError(f"unknown data quantity {quantity!r}; use "
                             f"{', '.join(self.QUANTITIES)}")
        return getattr(self, quantity)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    input_keys: tuple[str, ...]            # positional model inputs, in order
    target_key: str                        # ground truth of the output
    metric_names: tuple[str, ...]          # keys of eval.json "mean"
    select_metric: str                     # default best-checkpoint metric
    data_fields: Mapping[str, str]         # default model option -> data quantity
    ensemble: bool = True                  # x8 self-ensemble meaningful for this task
    description: str = ""

    # ---- geometry -----------------------------------------------------------------------
    def scale(self, config) -> int:
        """Fusion factor s (1 for same-grid tasks)."""
        if self.name != "fusion":
            return 1
        from jaxspec.data import fusion as fusion_data
        return fusion_data.degradation_from_config(config).scale

    def factors(self, config) -> tuple[dict[str, int], int]:
        """({input key: resolution factor over the base grid}, output factor)."""
        s = self.scale(config)
        if self.name == "fusion":
            return {"lr_hsi": 1, "hr_msi": s}, s
        return {k: 1 for k in self.input_keys}, 1

    def unit(self, config, stride: int) -> int:
        """HR sizes (crop, tile, overlap) must be multiples of this."""
        return self.scale(config) * int(stride)

    # ---- inputs -------------------------------------------------------------------------
    def input_shapes(self, info: DataInfo, size, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """Shapes of every model input (positional + fusion side inputs) for an output size
        ``size`` (an int for square, or (H, W); the training crop for ``init``)."""
        h, w = (size, size) if np.ndim(size) == 0 else tuple(size)
        if self.name == "rgb2hsi":
            return {"rgb": (batch, h, w, info.msi_bands or 3)}
        if self.name == "hsi2hsi":
            return {"hsi": (batch, h, w, info.bands)}
        s = info.scale
        if h % s or w % s:
            raise ValueError(f"fusion: size {(h, w)} must be a multiple of the scale {s}")
        shapes = {"lr_hsi": (batch, h // s, w // s, info.bands),
                  "hr_msi": (batch, h, w, info.msi_bands),
                  "srf": (batch, info.bands, info.msi_bands)}
        if info.psf_size:
            shapes["psf"] = (batch, info.psf_size, info.psf_size)
        return shapes

    def example_inputs(self, info: DataInfo, size, side_inputs=(), batch: int = 1
                       ) -> tuple[tuple, dict]:
        """Zero (args, kwargs) for ``model.init``."""
        shapes = self.input_shapes(info, size, batch=batch)
        args = tuple(jnp.zeros(shapes[k], jnp.float32) for k in self.input_keys)
        kwargs = {k: jnp.zeros(shapes[k], jnp.float32) for k in side_inputs}
        return args, kwargs

    def model_inputs(self, batch: Mapping[str, Any], side_inputs=()) -> tuple[tuple, dict]:
        """(positional, keyword) model inputs from a batch dict (``ValueError`` names a missing
        key)."""
        missing = [k for k in tuple(self.input_keys) + tuple(side_inputs) if k not in batch]
        if missing:
            raise ValueError(f"task {self.name!r}: batch lacks {missing}; it has "
                             f"{sorted(batch)}")
        return (tuple(batch[k] for k in self.input_keys),
                {k: batch[k] for k in side_inputs})

    def apply(self, apply_fn: Callable, variables, batch: Mapping[str, Any], *, side_inputs=(),
              **kw):
        """``apply_fn(variables, *inputs, **side, **kw)`` (raw output, may be a tuple)."""
        args, kwargs = self.model_inputs(batch, side_inputs)
        return apply_fn(variables, *args, **kwargs, **kw)

    def display_input(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """A 3-channel view of the inputs for figures (B, H, W, 3): rgb; three bands of the
        HSI (C/6, C/2, 5C/6); the HR-MSI (first three channels, grey if M < 3)."""
        if self.name == "rgb2hsi":
            return np.asarray(inputs["rgb"])
        x = np.asarray(inputs["hsi" if self.name == "hsi2hsi" else "hr_msi"])
        c = x.shape[-1]
        if self.name == "hsi2hsi" or c > 3:
            idx = [(5 * c) // 6, c // 2, c // 6] if self.name == "hsi2hsi" else [0, 1, 2]
            return x[..., idx]
        return np.repeat(x[..., :1], 3, axis=-1) if c < 3 else x

    # ---- metrics ------------------------------------------------------------------------
    def metrics(self, pred, gt, *, crop_border: int = 0, config=None, scale: int | None = None
                ) -> dict[str, np.ndarray]:
        """Per-image metrics (name -> (B,) numpy) of ``pred`` vs ``gt`` on the centre crop."""
        from jaxspec import metrics as metrics_lib
        s = scale if scale is not None else (self.scale(config) if config is not None else 1)
        vals = metrics_lib.evaluate_all(pred, gt, crop_border=crop_border,
                                        scale=None if self.name != "fusion" else s)
        p = metrics_lib.center_crop(jnp.asarray(pred, jnp.float32), crop_border)
        g = metrics_lib.center_crop(jnp.asarray(gt, jnp.float32), crop_border)
        vals["mrae_pos"] = pos = mrae_pos(p, g)
        if "mrae" in vals:   # the NTIRE value where gt > 0 everywhere, else over gt > 0
            all_pos = jnp.all(g > 0, axis=(1, 2, 3))
            vals["mrae"] = jnp.where(all_pos, vals["mrae"], pos)
        return {k: np.asarray(vals[k]) for k in self.metric_names}


_ALL = ("mrae", "rmse", "psnr", "sam", "ssim", "ergas", "uiqi", "mrae_pos")

TASKS: dict[str, Task] = {
    "rgb2hsi": Task("rgb2hsi", ("rgb",), "hsi", _ALL, "mrae", {"out_channels": "bands"},
                    description="spectral reconstruction: RGB (B,H,W,3) -> HSI (B,H,W,C)"),
    "hsi2hsi": Task("hsi2hsi", ("hsi",), "hsi", _ALL, "mrae",
                    {"in_channels": "bands", "out_channels": "bands"},
                    description="HSI autoencoding: HSI -> HSI (MCGA stage 1)"),
    "fusion": Task("fusion", ("lr_hsi", "hr_msi"), "hsi",
                   ("psnr", "sam", "ergas", "uiqi", "ssim", "rmse", "mrae_pos"), "psnr",
                   {"out_channels": "bands", "msi_channels": "msi_bands", "scale": "scale",
                    "degradation": "degradation"},
                   ensemble=False,
                   description="HSI super-resolution: LR-HSI (B,H/s,W/s,C) + HR-MSI (B,H,W,M) "
                               "-> HR-HSI (B,H,W,C)"),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]


def of(method) -> Task:
    """The task of a registered method (``Method.task``)."""
    return get(getattr(method, "task", "rgb2hsi"))


# ----------------------------------------------------------------------------- config resolution
def data_fields(method) -> dict[str, str]:
    fields = getattr(method, "data_fields", None)
    return dict(of(method).data_fields if fields is None else fields)


def _allowed_keys(method) -> tuple[str, ...] | None:
    return getattr(method.make_model, "allowed_keys", None)


def info_from_config(config, method) -> DataInfo:
    """DataInfo from a (resolved) config alone: ``config.bands`` or the model's band option or
    31; for fusion M and s from the degradation config."""
    task = of(method)
    bands = config.bands
    if bands is None:
        for key, q in data_fields(method).items():
            if q == "bands" and key in config.model:
                bands = int(config.model[key])
                break
    bands = int(bands or 31)
    if task.name == "fusion":
        from jaxspec.data import fusion as fusion_data
        deg = fusion_data.degradation_from_config(config)
        return DataInfo(bands=bands, msi_bands=deg.msi_bands(), scale=deg.scale,
                        psf_size=deg.psf_shape_size, degradation=deg.mode)
    if task.name == "rgb2hsi":
        return DataInfo(bands=bands, msi_bands=3)
    return DataInfo(bands=bands)


def source_bands(source) -> tuple[int, np.ndarray | None]:
    """(C, band centres or None) of a random-access source's first example."""
    try:
        ex = source[0]
    except (IndexError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the first example of the data source: {e}") from e
    if "hsi" not in ex:
        raise ValueError(f"the data has no 'hsi' feature (keys {sorted(ex)})")
    hsi = np.asarray(ex["hsi"])
    if hsi.ndim != 3:
        raise ValueError(f"'hsi' must be (H, W, C), got shape {hsi.shape}")
    bands = ex.get("bands")
    return int(hsi.shape[-1]), (None if bands is None else np.asarray(bands, np.float32))


def resolve_config(config, method, n_bands: int, *, where: str = "data"):
    """Fill the data-derived options into ``config`` (``bands`` and the ``data_fields`` keys of
    ``config.model``); a value the config states that disagrees with the data is a
    ``ValueError`` naming the option, so a mismatch stops the run at start-up."""
    if config.bands is not None and int(config.bands) != n_bands:
        raise ValueError(f"config.bands={config.bands} but the {where} has {n_bands} bands; "
                         f"drop the override (the band count comes from the dataset)")
    config = config.replace(bands=int(n_bands))
    info = info_from_config(config, method)
    allowed = _allowed_keys(method)
    model = dict(config.model)
    for key, quantity in data_fields(method).items():
        if allowed is not None and key not in allowed:
            continue
        if allowed is None and key not in model:
            continue
        value = info.value(quantity)
        if value is None:
            continue
        if key in model and model[key] != value:
            raise ValueError(
                f"config.model.{key}={model[key]} but the {where} gives {quantity}={value} "
                f"(method {method.name!r}, task {of(method).name!r}); remove model.{key} from "
                f"the preset/--set: it is filled from the data")
        model[key] = value
    return config.replace(model=model)


# ----------------------------------------------------------------------------- self-supervision
def fusion_reprojection_loss(scale: int, *, boundary: str = "reflect", msi_weight: float = 1.0):
    """A self-supervised fusion loss for test-time adaptation (``Method.adapt_loss``): the
    prediction Z re-degraded through the known degradation must reproduce the observations,

        L = mean((D_s(B_psf * Z) - lr_hsi)^2) + msi_weight * mean((Z srf - hr_msi)^2),

    with the per-image ``psf`` (B, k, k) and ``srf`` (B, C, M) side inputs (the method must list
    both in ``side_inputs``). Returns ``fn(apply_fn, variables, inputs) -> scalar``."""
    from jaxspec import physics

    def loss(apply_fn, variables, inputs):
        pred, _ = split_output(apply_fn(variables, inputs["lr_hsi"], inputs["hr_msi"],
                                        train=False, srf=inputs["srf"], psf=inputs["psf"]))
        lr_hat = jax.vmap(lambda z, p: physics.spatial_degrade(z, p, scale, boundary))(
            pred, inputs["psf"])
        msi_hat = jnp.einsum("bhwc,bcm->bhwm", pred, inputs["srf"])
        return (jnp.mean(jnp.square(lr_hat - inputs["lr_hsi"]))
                + msi_weight * jnp.mean(jnp.square(msi_hat - inputs["hr_msi"])))
    return loss
