"""Robustness protocols: perturbations of rgb2hsi evaluation examples (MCGA Table 1 and beyond).

``python -m jaxspec.evaluate --workdir W --perturb NAME`` applies one of these to every
evaluation image before the model sees it (docs/robustness.md). Each perturbation is a pure
function of the example (its ``rgb``, ``hsi`` and ``name``) and an integer ``seed``; the
random ones draw from a key made of ``(seed, crc32(name))``, so an image gets the same
perturbation whatever its position in the split and whichever other images are evaluated.
RGB values are taken relative to the run's full scale ``s`` (``input.json`` ``native_scale``:
1 for the linear float RGB of the built-in data, 255 for 8-bit sources); write ``u = x / s``.

==================  ===========================================================================
name                what changes (the HSI target is unchanged unless said)
==================  ===========================================================================
``brightness+10``   gamma on the RGB, ``x' = s * max(u, 0) ** (1 / g)`` with ``g = 1.1``
``brightness-10``   the same with ``g = 0.9`` (MCGA Sec. 4.5: "gamma correction ... +-10 %
                    (g = 1.1 and g = 0.9)"; ``1 / g`` so that g = 1.1 brightens, as the paper's
                    labels and "reduced brightness (g = 0.9)" require)
``mixed``           the 16x16 patches of the image permuted, the SAME permutation applied to
                    RGB and HSI (MCGA Sec. 4.4); rows/columns beyond the last full patch stay
``noise``           sensor noise, shot + read (:func:`jaxspec.physics.shot_noise`,
                    :func:`jaxspec.physics.dark_noise`): ``e = Poisson(u npe) + N(0, r^2)``,
                    ``x' = s * max(e, 0) / npe`` with ``npe = 750`` photo-electrons at full
                    scale (the NTIRE 2022 camera's value) and ``r = 10`` e- (the NTIRE 2020
                    real-world camera's documented read noise)
``jpeg``            8-bit codes ``round(255 clip(u, 0, 1))`` through an exact libjpeg round trip
                    at quality 75, 4:2:0 (:func:`jaxspec.physics.apply_jpeg`, backend
                    ``"pil"``), ``x' = s * codes / 255``: the NTIRE 2022 pipeline's 8-bit +
                    JPEG steps on the linear RGB
``srf:NAME``        the RGB re-rendered from the ground-truth HSI through the SRF ``NAME`` of
                    :func:`jaxspec.physics.list_srfs` (``x' = s * project(hsi, get_srf(NAME))``,
                    the built-in data's clean rendering) instead of the SRF of training
==================  ===========================================================================
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from jaxspec.errors import UsageError

FIXED = ("brightness+10", "brightness-10", "mixed", "noise", "jpeg")
BRIGHTNESS_GAMMA = {"brightness+10": 1.1, "brightness-10": 0.9}
PATCH = 16            # MCGA "16 x 16 patch-level self-shuffling"
NOISE_NPE = 750.0     # photo-electrons at full scale (ntire2022_camera default)
NOISE_READ_STD = 10.0  # read noise, electrons (ntire2020_realworld_camera default)
JPEG_QUALITY = 75


def names() -> list[str]:
    """Every accepted ``--perturb`` value (``srf:NAME`` for each SRF jaxspec ships)."""
    from jaxspec import physics
    return list(FIXED) + [f"srf:{n}" for n in physics.list_srfs()]


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One parsed protocol (see the module docstring); ``srf`` only for ``kind == "srf"``."""
    name: str
    kind: str                       # brightness | mixed | noise | jpeg | srf
    gamma: float | None = None
    patch: int = PATCH
    npe: float = NOISE_NPE
    read_std: float = NOISE_READ_STD
    quality: int = JPEG_QUALITY
    srf: str | None = None

    @property
    def tag(self) -> str:
        """File-name form of the name (``srf:nikon_d5100`` -> ``srf-nikon_d5100``)."""
        return self.name.replace(":", "-")

    @property
    def changes_target(self) -> bool:
        return self.kind == "mixed"

    def record(self, seed: int) -> dict:
        """What the eval JSON records about the perturbation."""
        rec: dict[str, Any] = {"name": self.name, "kind": self.kind, "seed": int(seed)}
        if self.kind == "brightness":
            rec.update(gamma=self.gamma, formula="x' = s * max(x / s, 0) ** (1 / gamma)")
        elif self.kind == "mixed":
            rec.update(patch=self.patch, applied_to=["rgb", "hsi"])
        elif self.kind == "noise":
            rec.update(npe=self.npe, read_std_electrons=self.read_std)
        elif self.kind == "jpeg":
            rec.update(quality=self.quality, subsampling="4:2:0", backend="pil")
        else:
            rec.update(srf=self.srf)
        return rec


def parse(name: str) -> Perturbation:
    """The :class:`Perturbation` of a ``--perturb`` value; :class:`UsageError` listing the
    choices otherwise."""
    from jaxspec import physics
    text = str(name).strip()
    if text in BRIGHTNESS_GAMMA:
        return Perturbation(text, "brightness", gamma=BRIGHTNESS_GAMMA[text])
    if text in ("mixed", "noise", "jpeg"):
        return Perturbation(text, text)
    if text.startswith("srf:") and text[4:] in physics.list_srfs():
        return Perturbation(text, "srf", srf=text[4:])
    raise UsageError(f"--perturb: unknown protocol {name!r}; choose from {names()}")


# ----------------------------------------------------------------------------- the operations
def brightness(rgb, gamma: float, full_scale: float = 1.0) -> np.ndarray:
    """``s * max(x / s, 0) ** (1 / gamma)`` (float32): gamma > 1 brightens, < 1 darkens."""
    if not gamma > 0:
        raise ValueError(f"brightness: gamma must be > 0, got {gamma}")
    u = np.maximum(np.asarray(rgb, np.float32) / np.float32(full_scale), 0.0)
    return (np.float32(full_scale) * u ** np.float32(1.0 / gamma)).astype(np.float32)


def patch_permutation(h: int, w: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of the ``(h // patch) * (w // patch)`` full patches (row-major)."""
    n = (h // patch) * (w // patch)
    return rng.permutation(n)


def shuffle_patches(x, perm: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) with patch ``i`` of the full-patch grid (row-major) replaced by patch
    ``perm[i]``; pixels beyond the last full patch row/column are unchanged."""
    x = np.asarray(x)
    h, w = x.shape[0], x.shape[1]
    nh, nw = h // patch, w // patch
    if perm.shape != (nh * nw,):
        raise ValueError(f"shuffle_patches: permutation of {perm.shape} for a {nh}x{nw} grid")
    out = x.copy()
    grid = x[:nh * patch, :nw * patch].reshape(nh, patch, nw, patch, *x.shape[2:])
    grid = np.swapaxes(grid, 1, 2).reshape(nh * nw, patch, patch, *x.shape[2:])[perm]
    grid = np.swapaxes(grid.reshape(nh, nw, patch, patch, *x.shape[2:]), 1, 2)
    out[:nh * patch, :nw * patch] = grid.reshape(nh * patch, nw * patch, *x.shape[2:])
    return out


def sensor_noise(rgb, key, npe: float = NOISE_NPE, read_std: float = NOISE_READ_STD,
                 full_scale: float = 1.0) -> np.ndarray:
    """Shot + read noise: ``s * max(Poisson(u npe) + N(0, read_std^2), 0) / npe``."""
    import jax

    from jaxspec import physics
    k_shot, k_read = jax.random.split(key)
    u = np.maximum(np.asarray(rgb, np.float32) / np.float32(full_scale), 0.0)
    electrons = physics.shot_noise(k_shot, u, npe, "poisson") * np.float32(npe)
    electrons = physics.dark_noise(k_read, electrons, read_std)
    return (np.float32(full_scale) * np.maximum(np.asarray(electrons), 0.0)
            / np.float32(npe)).astype(np.float32)


def jpeg_roundtrip(rgb, quality: int = JPEG_QUALITY, full_scale: float = 1.0) -> np.ndarray:
    """``s * JPEG_q(round(255 clip(u, 0, 1))) / 255`` through libjpeg (Pillow)."""
    from jaxspec import physics
    u = np.clip(np.asarray(rgb, np.float32) / np.float32(full_scale), 0.0, 1.0)
    codes = np.round(u * 255.0).astype(np.float32)
    out = np.asarray(physics.apply_jpeg(codes, quality, backend="pil"), np.float32)
    return (out * np.float32(full_scale / 255.0)).astype(np.float32)


def rerender(hsi, srf, full_scale: float = 1.0) -> np.ndarray:
    """``s * project(hsi, srf)`` (float32)."""
    from jaxspec import physics
    return (np.float32(full_scale) * np.asarray(physics.project(hsi, srf))).astype(np.float32)


# ----------------------------------------------------------------------------- examples
def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def example_seed(seed: int, name) -> list[int]:
    """The RNG seed words of one example: ``[seed, crc32(name)]``."""
    return [int(seed) % 2**32, zlib.crc32(_text(name).encode())]


def apply(p: Perturbation, example: Mapping[str, Any], seed: int = 0, *,
          full_scale: float = 1.0, srf: np.ndarray | None = None) -> dict:
    """The perturbed copy of one example (``rgb`` (H, W, 3), ``hsi`` (H, W, C), ``name``); other
    keys pass unchanged. ``srf``: the (C, 3) matrix of ``p.srf`` on the HSI's bands (``srf``
    protocols only)."""
    out = dict(example)
    rgb = np.asarray(example["rgb"], np.float32)
    words = example_seed(seed, example.get("name", ""))
    if p.kind == "brightness":
        out["rgb"] = brightness(rgb, p.gamma, full_scale)
    elif p.kind == "mixed":
        hsi = np.asarray(example["hsi"], np.float32)
        if hsi.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"mixed: rgb {rgb.shape} and hsi {hsi.shape} differ in size")
        perm = patch_permutation(rgb.shape[0], rgb.shape[1], p.patch,
                                 np.random.default_rng(words))
        out["rgb"] = shuffle_patches(rgb, perm, p.patch)
        out["hsi"] = shuffle_patches(hsi, perm, p.patch)
    elif p.kind == "noise":
        import jax
        key = jax.random.fold_in(jax.random.key(words[0]), words[1])
        out["rgb"] = sensor_noise(rgb, key, p.npe, p.read_std, full_scale)
    elif p.kind == "jpeg":
        out["rgb"] = jpeg_roundtrip(rgb, p.quality, full_scale)
    elif p.kind == "srf":
        if srf is None:
            raise ValueError(f"{p.name}: the SRF matrix on the HSI's bands is needed")
        out["rgb"] = rerender(example["hsi"], srf, full_scale)
    else:
        raise ValueError(f"unknown perturbation kind {p.kind!r}")
    return out


def perturb_batches(batches: Iterable[Mapping[str, Any]], p: Perturbation, seed: int = 0, *,
                    full_scale: float = 1.0, srf: np.ndarray | None = None
                    ) -> Iterator[dict]:
    """:func:`apply` to every image of every batch (dicts of (B, ...) arrays with ``name``)."""
    n = 0
    for batch in batches:
        b = np.shape(batch["rgb"])[0]
        names_ = batch.get("name")
        keys = [k for k in batch if k != "name" and np.ndim(batch[k]) >= 1
                and np.shape(batch[k])[0] == b]
        rows = []
        for i in range(b):
            ex = {k: np.asarray(batch[k][i]) for k in keys}
            ex["name"] = names_[i] if names_ is not None else f"image_{n:05d}"
            n += 1
            rows.append(apply(p, ex, seed, full_scale=full_scale, srf=srf))
        out = dict(batch)
        for k in keys:
            out[k] = np.stack([r[k] for r in rows])
        yield out
