"""TFDS builder for HySpecNet-11k (Fuchs & Demir 2023): 11,483 EnMAP L2A patches.

Source: ``patches/<tile>/<tile>-<patch>/<tile>-<patch>-SPECTRAL_IMAGE.TIF``: GeoTIFF, 224
bands, 128 x 128, int16 surface reflectance x 10000, nodata -32768.

Processing (the official ``-DATA.npy`` conversion): drop the water-vapour bands, 0-based
126-140 and 160-166 (:data:`INVALID_BANDS`), leaving 202; clip to [0, 10000]; divide by 10000.

Common schema: ``hsi`` float32 (128, 128, 202) reflectance in [0, 1]; ``bands`` (202,) nm, the
nominal EnMAP band centres (:data:`ENMAP_WAVELENGTHS_NM`; the exact centres vary slightly per
scene and are only in each tile's METADATA.XML; note VNIR and SWIR overlap at 902-993 nm, so
``bands`` is not monotonic); ``rgb`` float32 linear RGB rendered through the config's SRF
(zero outside 360-830 nm; ``srf`` stored); ``label`` int32 (128, 128): 1 where every band of
the pixel is valid, 0 where any band was nodata; ``name`` ``<tile>-<patch>``.

Splits: ``splits/<difficulty>/{train,val,test}.csv`` (70/20/10): config ``easy`` (split by
patch) or ``hard`` (split by tile); ``val`` -> ``validation``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS_RAW = 224
#: 0-based indices of the water-vapour bands dropped by HySpecNet-11k (torchgeo, official code).
INVALID_BANDS = tuple(range(126, 141)) + tuple(range(160, 167))
VALID_BANDS = tuple(i for i in range(N_BANDS_RAW) if i not in INVALID_BANDS)
N_BANDS = len(VALID_BANDS)  # 202
SCALE = 10000.0
NODATA = -32768
#: Nominal centre wavelengths (nm) of EnMAP's 224 bands (bands 1-91 VNIR, 92-224 SWIR), from
#: EnMAP_Spectral_Bands_update.xlsx (enmap.org; as tabulated in torchgeo's EnMAP dataset).
ENMAP_WAVELENGTHS_NM = np.array([
    418.416, 424.043, 429.457, 434.686, 439.758, 444.699, 449.539, 454.306,
    459.031, 463.730, 468.411, 473.080, 477.744, 482.411, 487.087, 491.780,
    496.497, 501.243, 506.020, 510.829, 515.672, 520.551, 525.467, 530.424,
    535.422, 540.463, 545.551, 550.687, 555.873, 561.112, 566.405, 571.756,
    577.166, 582.636, 588.171, 593.773, 599.446, 605.193, 611.017, 616.923,
    622.921, 628.987, 635.112, 641.294, 647.537, 653.841, 660.207, 666.637,
    673.131, 679.691, 686.319, 693.014, 699.780, 706.617, 713.524, 720.501,
    727.545, 734.654, 741.826, 749.060, 756.353, 763.703, 771.108, 778.567,
    786.078, 793.639, 801.249, 808.905, 816.608, 824.355, 832.145, 839.976,
    847.847, 855.757, 863.703, 871.683, 879.693, 887.729, 895.789, 903.870,
    911.968, 920.081, 928.204, 936.335, 944.470, 952.608, 960.748, 968.892,
    977.037, 985.186, 993.338, 901.961, 911.571, 921.320, 931.203, 941.218,
    951.360, 961.628, 972.016, 982.523, 993.144, 1003.880, 1014.720, 1025.660,
    1036.700, 1047.840, 1059.070, 1070.390, 1081.780, 1093.260, 1104.810, 1116.430,
    1128.100, 1139.840, 1151.620, 1163.440, 1175.300, 1187.200, 1199.110, 1211.050,
    1223.000, 1234.970, 1246.940, 1258.930, 1270.920, 1282.920, 1294.910, 1306.900,
    1318.880, 1330.850, 1342.820, 1354.760, 1366.690, 1378.600, 1390.480, 1461.100,
    1472.740, 1484.340, 1495.890, 1507.400, 1518.870, 1530.290, 1541.670, 1553.010,
    1564.300, 1575.550, 1586.760, 1597.910, 1609.020, 1620.090, 1631.110, 1642.070,
    1653.000, 1663.870, 1674.700, 1685.470, 1696.200, 1706.870, 1717.500, 1728.080,
    1738.600, 1749.080, 1759.510, 1939.140, 1948.690, 1958.200, 1967.660, 1977.080,
    1986.450, 1995.790, 2005.080, 2014.330, 2023.540, 2032.700, 2041.830, 2050.920,
    2059.960, 2068.970, 2077.930, 2086.860, 2095.740, 2104.590, 2113.400, 2122.170,
    2130.900, 2139.600, 2148.260, 2156.880, 2165.470, 2174.020, 2182.530, 2191.010,
    2199.450, 2207.860, 2216.240, 2224.580, 2232.890, 2241.160, 2249.400, 2257.610,
    2265.790, 2273.930, 2282.040, 2290.120, 2298.170, 2306.190, 2314.170, 2322.130,
    2330.050, 2337.940, 2345.810, 2353.640, 2361.440, 2369.210, 2376.950, 2384.660,
    2392.340, 2400.000, 2407.620, 2415.210, 2422.780, 2430.320, 2437.820, 2445.300,
], dtype=np.float32)
BANDS = ENMAP_WAVELENGTHS_NM[list(VALID_BANDS)]
_CSV = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}

EXPECTED_LAYOUT = """\
  <manual_dir>/patches/<tile>/<tile>-<patch>/<tile>-<patch>-SPECTRAL_IMAGE.TIF
  <manual_dir>/splits/easy/{train,val,test}.csv and splits/hard/{train,val,test}.csv
  (manual_dir may also be the folder holding hyspecnet-11k/)"""


@dataclasses.dataclass(eq=False)
class HySpecNetConfig(builder_utils.RenderConfig):
    """``difficulty``: ``"easy"`` (split by patch) or ``"hard"`` (split by tile); ``srf``: RGB
    rendering SRF."""
    difficulty: str = "easy"


class Builder(builder_utils.RealDatasetBuilder):
    """HySpecNet-11k: EnMAP 128 x 128 patches, 202 valid bands 418-2445 nm."""

    name = "hyspecnet11k"
    BUILDER_CONFIGS = [
        HySpecNetConfig(name="easy", description="Patch-wise 70/20/10 split.", difficulty="easy"),
        HySpecNetConfig(name="hard", description="Tile-wise 70/20/10 split.", difficulty="hard"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download HySpecNet-11k from https://hyspecnet.rsim.berlin/ (all hyspecnet-11k-*.tar.gz parts)
and extract so that manual_dir holds:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    LABEL = RENDERED = True
    HSI_SCALE = "reflectance, clip(int16, 0, 10000) / 10000"
    HOMEPAGE = "https://hyspecnet.rsim.berlin/"
    CITATION = ("Fuchs & Demir, HySpecNet-11k: A Large-Scale Hyperspectral Dataset for "
                "Benchmarking Learning-Based Hyperspectral Image Compression Methods, "
                "IGARSS 2023.")
    LICENSE = "CC BY 4.0 (HySpecNet-11k); EnMAP data (c) DLR."

    def _extra_metadata(self) -> dict:
        return {"invalid_bands": list(INVALID_BANDS)}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        base = find_base(root)
        split_dir = base / "splits" / self.builder_config.difficulty
        out = {}
        for split, csv in _CSV.items():
            path = split_dir / csv
            if not path.is_file():
                raise self.layout_error(root, str(path))
            tifs = read_split_csv(path, base / "patches")
            if not tifs:
                raise ValueError(f"{path}: no entries")
            out[split] = self._generate_examples(tifs)
        return out

    def _generate_examples(self, tifs):
        srf = readers.srf_on_bands(self.builder_config.srf, BANDS)
        for tif in tifs:
            hsi, label = load_patch(tif)
            name = tif.name[: -len("-SPECTRAL_IMAGE.TIF")]
            yield name, builder_utils.rendered_example(hsi, BANDS, name, srf, label)


def find_base(root: Path) -> Path:
    """``root`` if it holds ``patches/`` and ``splits/``, else ``root/hyspecnet-11k``."""
    for cand in (root, root / "hyspecnet-11k", *sorted(root.glob("*"))):
        if (cand / "patches").is_dir() and (cand / "splits").is_dir():
            return cand
    first = "patches/" if not (root / "patches").is_dir() else "splits/"
    raise Builder.layout_error(root, first)


def read_split_csv(path: Path, patches: Path) -> list[Path]:
    """TIF paths for a split CSV: one relative path per line (``...-DATA.npy`` as shipped, or
    the TIF itself); ``-DATA.npy`` is replaced by ``-SPECTRAL_IMAGE.TIF`` (as torchgeo does)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rel = line.strip().strip(",")
        if not rel or rel.lower() in ("path", "filename"):
            continue
        if rel.endswith("-DATA.npy"):
            rel = rel[: -len("-DATA.npy")] + "-SPECTRAL_IMAGE.TIF"
        if not rel.endswith("-SPECTRAL_IMAGE.TIF"):
            raise ValueError(f"{path}:{n}: unexpected entry {rel!r}")
        tif = patches / rel
        if not tif.is_file():
            raise FileNotFoundError(f"hyspecnet11k: {tif} (listed in {path}:{n}) not found")
        out.append(tif)
    return out


def load_patch(tif: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(hsi (H, W, 202) = clip(x[..., valid], 0, 10000) / 10000, label (H, W))``."""
    raw, nodata = readers.read_geotiff_int16(tif)
    if raw.shape[-1] != N_BANDS_RAW:
        raise ValueError(f"{tif}: {raw.shape[-1]} bands, expected {N_BANDS_RAW}")
    x = raw[..., list(VALID_BANDS)]
    nd = NODATA if nodata is None else nodata
    label = np.all(x != nd, axis=-1).astype(np.int32)
    hsi = np.clip(x.astype(np.float32), 0.0, SCALE) / np.float32(SCALE)
    return readers.check_cube(hsi, tif, N_BANDS), label
