"""Fusion (HSI super-resolution) pairs synthesised on the fly from any HSI dataset.

``config.fusion`` (a mapping) holds the fields of :class:`Degradation`; for every example the
HR cube ``X`` (H, W, C), H and W multiples of the scale s, is

1. normalised (``normalize``: ``"minmax"`` = (X - min X) / (max X - min X) over the whole cube,
   the CAVE/DAEM convention, so metrics are on data in [0, 1]; ``"max"`` = X / max X;
   ``"none"``),
2. degraded with :func:`jaxspec.physics.make_sr_pair`::

       lr_hsi = D_s(B * X) [+ noise at snr_hsi dB]     (H/s, W/s, C)
       hr_msi = X R        [+ noise at snr_msi dB]     (H, W, M)

   with the PSF B of the protocol and the SRF R = ``physics.get_srf(srf, wavelengths=bands)``.

PSF protocols (``protocol`` x ``psf``):

* ``psf="gaussian"``: ``gaussian_psf(psf_size, sigma)`` (defaults: size 2s+1, sigma s/2);
  ``psf="anisotropic"``: ``anisotropic_gaussian_psf(psf_size, sigma_x, sigma_y, theta)``;
  ``psf="daem"``: ``physics.daem_psf(daem_index, psf_size (default s), rng)`` -- the six
  anisotropic kernels of the DAEM protocol with multiplicative noise (``daem_noise``).
* ``protocol="consistent"``: one PSF for every image (DAEM's "consistent degradation"); for
  ``daem`` the noise of the kernel is drawn once from ``seed``.
* ``protocol="imagewise"``: a PSF per image, deterministic in ``(seed, example index)``:
  gaussian sigma ~ U(sigma_range); anisotropic sigma_x, sigma_y ~ U(sigma_range), theta ~
  U(0, pi); daem: kernel index ~ U{0..5} and fresh multiplicative noise.

``mode`` is the operator of :func:`jaxspec.physics.make_sr_pair`: ``"same"`` (same-size
convolution with ``boundary``, decimation at ``offset``; even kernels, e.g. DAEM's 32x32 centred
at pixel size//2, are padded with one zero row/column at the bottom/right to the odd grid with
the same centre) or ``"daem"`` (the DAEM code's zero-padded valid correlation with stride s;
the default for ``psf="daem"``). Every example also carries
its degradation: ``srf`` (C, M) and ``psf`` (k, k), which methods may read as side inputs.
The noise key is ``fold_in(PRNGKey(seed), index)``, so a pair depends only on (seed, index).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import numpy as np

PROTOCOLS = ("consistent", "imagewise")
PSFS = ("gaussian", "anisotropic", "daem")
NORMALIZE = ("minmax", "max", "none")
MODES = ("same", "daem")


@dataclasses.dataclass(frozen=True)
class Degradation:
    scale: int = 8
    psf: str = "gaussian"
    psf_size: int | None = None              # default 2s+1 (gaussian) / s (daem)
    sigma: float | None = None               # gaussian sigma (pixels); default s/2
    sigma_x: float | None = None             # anisotropic (default s/2 and s/4)
    sigma_y: float | None = None
    theta: float = 0.0
    sigma_range: tuple[float, float] | None = None  # imagewise draws (default (s/4, s/2))
    daem_index: int = 5                      # DAEM kernel for the consistent protocol
    daem_noise: float = 0.2                  # multiplicative kernel noise U(-n, n)
    srf: str = "nikon_d5100"
    snr_hsi: float | None = None             # dB, None = no noise
    snr_msi: float | None = None
    protocol: str = "consistent"
    normalize: str = "minmax"
    boundary: str = "reflect"
    offset: int = 0                          # decimation phase
    mode: str | None = None                  # make_sr_pair operator: "same" | "daem"
                                             # (None: "daem" for psf="daem", else "same")

    def __post_init__(self):
        if int(self.scale) != self.scale or self.scale < 1:
            raise ValueError(f"fusion.scale must be a positive integer, got {self.scale!r}")
        for name, value, allowed in (("psf", self.psf, PSFS), ("protocol", self.protocol,
                                     PROTOCOLS), ("normalize", self.normalize, NORMALIZE)):
            if value not in allowed:
                raise ValueError(f"fusion.{name} must be one of {allowed}, got {value!r}")
        if self.mode is None:
            object.__setattr__(self, "mode", "daem" if self.psf == "daem" else "same")
        if self.mode not in MODES:
            raise ValueError(f"fusion.mode must be one of {MODES}, got {self.mode!r}")
        if self.sigma_range is not None:
            lo, hi = self.sigma_range
            if not 0 < lo <= hi:
                raise ValueError(f"fusion.sigma_range must be (lo, hi) with 0 < lo <= hi, got "
                                 f"{self.sigma_range!r}")
            object.__setattr__(self, "sigma_range", (float(lo), float(hi)))

    @property
    def kernel_size(self) -> int:
        """The PSF side as drawn (may be even for daem)."""
        if self.psf_size is not None:
            return int(self.psf_size)
        return self.scale if self.psf == "daem" else 2 * self.scale + 1

    @property
    def psf_size_odd(self) -> int:
        k = self.kernel_size
        return k if k % 2 else k + 1

    @property
    def psf_shape_size(self) -> int:
        """Side of the ``psf`` arrays handed to models (the kernel as used by the operator)."""
        return self.kernel_size if self.mode == "daem" else self.psf_size_odd

    def margin(self) -> int:
        """HR pixels (a multiple of s) around a training window so that the window's pair
        equals the full image's pair inside it."""
        s, k = self.scale, self.kernel_size
        if self.mode == "daem":
            p = (k - s) // 2
            need = max(p, k - s - p, 0)
        else:
            need = self.psf_size_odd // 2
        return -(-need // s) * s

    def msi_bands(self, bands: int | None = None) -> int:
        from jaxspec import physics
        return int(physics.get_srf(self.srf).shape[1])

    def srf_matrix(self, wavelengths) -> np.ndarray:
        from jaxspec import physics
        wl = np.asarray(wavelengths, np.float32)
        return np.asarray(physics.get_srf(self.srf, wavelengths=wl), np.float32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- PSFs ---------------------------------------------------------------------------
    def psf_for(self, index: int, seed: int = 0) -> np.ndarray:
        """The (k, k) PSF of example ``index`` (odd k, sums to 1)."""
        from jaxspec import physics
        s, k = self.scale, self.kernel_size
        imagewise = self.protocol == "imagewise"
        rng = np.random.default_rng([int(seed) % 2**32, int(index) if imagewise else 0, 7])
        lo, hi = self.sigma_range or (s / 4, s / 2)
        if self.psf == "gaussian":
            sigma = rng.uniform(lo, hi) if imagewise else (self.sigma or s / 2)
            p = physics.gaussian_psf(k, float(sigma))
        elif self.psf == "anisotropic":
            if imagewise:
                sx, sy, th = rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(0, np.pi)
            else:
                sx, sy, th = self.sigma_x or s / 2, self.sigma_y or s / 4, self.theta
            p = physics.anisotropic_gaussian_psf(k, float(sx), float(sy), float(th))
        else:
            daem_psf = getattr(physics, "daem_psf", None)
            if daem_psf is None:
                raise ValueError("fusion.psf='daem' needs physics.daem_psf (the DAEM protocol "
                                 "kernels); it is not in this jaxspec")
            idx = int(rng.integers(6)) if imagewise else int(self.daem_index)
            p = daem_psf(idx, k, rng if self.daem_noise else None, noise=self.daem_noise)
        p = np.asarray(p, np.float32)
        if p.shape[0] % 2 == 0 and self.mode == "same":
            p = np.pad(p, ((0, 1), (0, 1)))   # centred at size//2: the odd grid with that centre
        return p / p.sum()

    # ---- synthesis ----------------------------------------------------------------------
    def normalise(self, hsi: np.ndarray) -> np.ndarray:
        x = np.asarray(hsi, np.float32)
        if self.normalize == "none":
            return x
        hi = float(x.max())
        if self.normalize == "max":
            return x / max(hi, 1e-12)
        lo = float(x.min())
        return (x - lo) / max(hi - lo, 1e-12)

    def synthesize(self, hsi, wavelengths, index: int, seed: int = 0, *,
                   noise_index: int | None = None, normalize: bool = True
                   ) -> dict[str, np.ndarray]:
        """{hsi, lr_hsi, hr_msi, srf, psf} for one HR cube (H, W, C), H, W multiples of s.
        The PSF is that of example ``index``; the noise key is ``fold_in(PRNGKey(seed),
        noise_index)`` (default ``index``)."""
        import jax
        x = self.normalise(hsi) if normalize else np.asarray(hsi, np.float32)
        h, w = x.shape[:2]
        if h % self.scale or w % self.scale:
            raise ValueError(f"fusion: image {h}x{w} is not a multiple of the scale "
                             f"{self.scale}; crop it first")
        if wavelengths is None:
            raise ValueError(f"fusion: the data needs band centres ('bands') to build the SRF "
                             f"{self.srf!r}")
        srf = self.srf_matrix(wavelengths)
        if srf.shape[0] != x.shape[-1]:
            raise ValueError(f"fusion: {srf.shape[0]} band centres for a cube of "
                             f"{x.shape[-1]} bands")
        psf = self.psf_for(index, seed)
        noisy = self.snr_hsi is not None or self.snr_msi is not None
        key = None
        if noisy:
            key = jax.random.fold_in(jax.random.PRNGKey(int(seed) % 2**31),
                                     int(index if noise_index is None else noise_index))
        with jax.default_device(jax.devices("cpu")[0]):
            lr, hr = _pair_fn(self.scale, self.boundary, self.offset, self.snr_hsi,
                              self.snr_msi, self.mode)(x, psf, srf, key)
        return {"hsi": x, "lr_hsi": np.asarray(lr), "hr_msi": np.asarray(hr), "srf": srf,
                "psf": psf}


@functools.lru_cache(maxsize=None)
def _pair_fn(scale, boundary, offset, snr_hsi, snr_msi, mode="same"):
    import jax

    from jaxspec import physics

    kw = {} if mode == "same" else {"mode": mode}
    if mode == "daem" and not hasattr(physics, "daem_degrade"):
        raise ValueError("fusion.mode='daem' needs physics.daem_degrade (make_sr_pair(mode="
                         "'daem')); it is not in this jaxspec")

    def fn(x, psf, srf, key):
        if mode == "daem":
            return physics.make_sr_pair(x, psf, scale, srf, key=key, snr_db_hsi=snr_hsi,
                                        snr_db_msi=snr_msi, **kw)
        return physics.make_sr_pair(x, psf, scale, srf, key=key, snr_db_hsi=snr_hsi,
                                    snr_db_msi=snr_msi, boundary=boundary, offset=offset, **kw)
    return jax.jit(fn)


def degradation_from_config(config) -> Degradation:
    """The :class:`Degradation` of ``config.fusion`` (unknown keys raise ``ValueError``)."""
    d = dict(getattr(config, "fusion", None) or {})
    names = {f.name for f in dataclasses.fields(Degradation)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown config.fusion keys {sorted(unknown)}; valid: {sorted(names)}")
    if isinstance(d.get("sigma_range"), list):
        d["sigma_range"] = tuple(d["sigma_range"])
    return Degradation(**d)


def crop_to_scale(hsi: np.ndarray, scale: int) -> np.ndarray:
    """Drop the bottom/right rows/columns so H and W are multiples of ``scale``."""
    h, w = hsi.shape[:2]
    return hsi[:h - h % scale, :w - w % scale]


def _reflect_window(x: np.ndarray, y0: int, x0: int, size: int, margin: int,
                    fill: str = "reflect") -> np.ndarray:
    """``x[y0 - margin : y0 + size + margin, x0 - margin : ...]`` with the parts outside the image
    filled by reflection (the values a reflect-boundary blur of the full image sees) or zeros
    (``fill="constant"``: the zero border of the DAEM operator)."""
    h, w = x.shape[:2]
    ya, yb = y0 - margin, y0 + size + margin
    xa, xb = x0 - margin, x0 + size + margin
    win = x[max(ya, 0):min(yb, h), max(xa, 0):min(xb, w)]
    pads = ((max(-ya, 0), max(yb - h, 0)), (max(-xa, 0), max(xb - w, 0)), (0, 0))
    if any(p for pair in pads for p in pair):
        win = np.pad(win, pads, mode=fill)
    return win


def train_pair(example: Mapping[str, Any], deg: Degradation, rng: np.random.Generator, *,
               crop: int, seed: int, augment: str = "dihedral") -> dict:
    """A random ``crop`` x ``crop`` fusion training pair (crop a multiple of s).

    The HR window starts at a multiple of s (on the decimation grid of the full image) and is
    synthesised with a margin (:meth:`Degradation.margin`: the PSF's reach rounded up to a
    multiple of s, reflect- or, for the DAEM operator, zero-filled outside the image), then cut: without augmentation the pair equals the same crop of the full-image
    pair exactly (tested). ``augment`` (dihedral / flips) transforms the HR window (with its
    symmetric margin) before the degradation. The PSF follows the protocol with the source index
    ``example["_index"]``; the noise is drawn from ``rng``."""
    s = deg.scale
    if crop % s:
        raise ValueError(f"fusion: crop {crop} must be a multiple of the scale {s}")
    hsi = crop_to_scale(np.asarray(example["hsi"], np.float32), s)
    h, w = hsi.shape[:2]
    if crop > h or crop > w:
        raise ValueError(f"crop size {crop} is larger than the image {h}x{w}; use a smaller crop")
    y0 = int(rng.integers(0, (h - crop) // s + 1)) * s
    x0 = int(rng.integers(0, (w - crop) // s + 1)) * s
    m = deg.margin()
    # normalise on the full image (as evaluation does), then cut the window
    win = _reflect_window(deg.normalise(hsi), y0, x0, crop, m,
                          "constant" if deg.mode == "daem" else "reflect")
    from jaxspec.data.pipeline import dihedral
    win = dihedral(win, rng, augment)
    pair = deg.synthesize(win, example.get("bands"), int(example.get("_index", 0)), seed,
                          noise_index=int(rng.integers(2**31)), normalize=False)
    ms = m // s
    out = {"hsi": pair["hsi"][m:m + crop, m:m + crop],
           "lr_hsi": pair["lr_hsi"][ms:ms + crop // s, ms:ms + crop // s],
           "hr_msi": pair["hr_msi"][m:m + crop, m:m + crop],
           "srf": pair["srf"], "psf": pair["psf"]}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


class FusionSource:
    """Random-access view of an HSI source whose examples become fusion pairs.

    ``source[i]`` -> ``{"hsi", "lr_hsi", "hr_msi", "srf", "psf", "name"}`` synthesised from
    example ``i`` (full image cropped to multiples of s) -- evaluation and ``fuse`` use this;
    the training loader crops first and synthesises per crop (:func:`fusion_example`)."""

    def __init__(self, source, degradation: Degradation, seed: int = 0):
        self.source, self.deg, self.seed = source, degradation, int(seed)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ex = self.source[i]
        return fusion_example(ex, self.deg, index=int(i), seed=self.seed,
                              hsi=crop_to_scale(np.asarray(ex["hsi"], np.float32),
                                                self.deg.scale))


def fusion_example(example: Mapping[str, Any], deg: Degradation, *, index: int, seed: int,
                   hsi: np.ndarray | None = None) -> dict:
    """Example dict -> fusion example (``hsi`` replaced by the normalised HR cube)."""
    out = {k: v for k, v in example.items() if k not in ("hsi", "rgb")}
    out.update(deg.synthesize(example["hsi"] if hsi is None else hsi, example.get("bands"),
                              index, seed))
    return out
