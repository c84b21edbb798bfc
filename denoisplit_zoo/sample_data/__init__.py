"""Bundled sample data: one BPAE field (actin, mitochondria, nuclei), camera counts, CC-BY 4.0 (see README.md here).

Ships inside the wheel as `denoisplit_zoo.sample_data` (pyproject.toml); read through importlib.resources so it works
from an editable install, a wheel or a zip import alike.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import numpy as np

# structure name -> file in this package
BPAE_FILES = {"actin": "bpae_actin.tif", "mito": "bpae_mito.tif", "nuclei": "bpae_nuclei.tif"}
PIXEL_SIZE_UM = 0.108
LICENSE = "CC-BY-4.0"
ATTRIBUTION = ("BPAE_actin.tif, BPAE_mito.tif, BPAE_nuclei.tif by Robert Haase, BioImageAnalysisNotebooks (data/), "
               "CC-BY 4.0")

# The quickstart's synthetic noise (the paper's protocol, docs/contracts.md): per channel x <- Poisson(x / F) * F,
# then Gaussian noise of std DEMO_GAUSSIAN x std(mean of the two clean channels over the training stripe). F = 1
# treats a camera count as one detected photon (the sample's gain is not documented; F = 1 is the paper's own
# setting). The level is chosen for a realistic demonstration, not the hardest case: at Gaussian x0.1 the std is
# ~293 counts with the default balanced brightness (below; ~189 with the raw counts; the std is taken over the
# quickstart's training stripe, so it moved when its held-out stripes did on 2026-12-04), and structures peaking at
# ~16,000 counts above the background are visibly grainy but clear, as in a well-exposed widefield acquisition.
# x0.25 and x2 were earlier defaults; measured (README, docs/quality.md): with the raw 8:1 counts no level tried
# splits the mitochondria in a 10-minute CPU quickstart (on today's test stripe they come out as a glow without
# their rings), while the balanced mixing splits both. Defined here, with the data, so that the CLI's --help can quote it without
# importing torch.
DEMO_GAUSSIAN = 0.1
DEMO_POISSON = 1.0

# How bright the two stains are against each other in the quickstart's sum. The stains were imaged separately, each
# with its own exposure (README.md here), so their raw counts (actin ~8x the mitochondria at the 99th percentile
# above the background) describe three acquisitions, not one detector seeing both dyes.
#   balanced  the mitochondria scaled about their minimum so that their 99th percentile above it equals the actin's
#             (x7.86 on this field): two stains of about equal brightness, what one aims for when imaging both
#             through one channel, and the mixing of W2S, whose images were each stretched to the same range.
#   raw       the counts as recorded: the clean sum is then nearly the actin, so the actin's no-split floor is high
#             and the dim mitochondria must be found under it: the harder case.
BRIGHTNESS = ("balanced", "raw")
DEMO_BRIGHTNESS = "balanced"
BALANCE_PERCENTILE = 99.0


def _resource(name: str):
    if name not in BPAE_FILES:
        raise KeyError(f"unknown sample channel {name!r}; choose one of {', '.join(BPAE_FILES)}")
    return importlib.resources.files(__name__).joinpath(BPAE_FILES[name])


def read_bpae(name: str) -> np.ndarray:
    """One BPAE channel ('actin', 'mito' or 'nuclei') as a (680, 1100) uint16 array of camera counts."""
    import tifffile

    with importlib.resources.as_file(_resource(name)) as path:
        return tifffile.imread(str(path))


def mito_gain(actin: np.ndarray, mito: np.ndarray) -> float:
    """The factor that gives the mitochondria the actin's brightness ("balanced"): the ratio of the two images'
    BALANCE_PERCENTILE-th percentiles above their minima (raw counts in, a pure number out)."""
    a = float(np.percentile(actin, BALANCE_PERCENTILE) - actin.min())
    m = float(np.percentile(mito, BALANCE_PERCENTILE) - mito.min())
    return a / m


def demo_images(brightness: str = DEMO_BRIGHTNESS) -> tuple[dict, float]:
    """({"actin", "mito": (680, 1100) float32 camera counts}, gain): the clean channels the quickstart sums, the
    mitochondria rescaled about their minimum by `gain` = mito_gain(...) for brightness "balanced", both as recorded
    (gain 1) for "raw"."""
    if brightness not in BRIGHTNESS:
        raise ValueError(f"unknown brightness {brightness!r}; choose one of {', '.join(BRIGHTNESS)}")
    img = {name: read_bpae(name).astype(np.float32) for name in ("actin", "mito")}
    gain = 1.0
    if brightness == "balanced":
        gain = mito_gain(img["actin"], img["mito"])
        low = img["mito"].min()
        img["mito"] = low + (img["mito"] - low) * np.float32(gain)
    return img, gain


def copy_bpae(name: str, dest) -> Path:
    """Copy one BPAE channel's TIFF byte for byte to `dest` (a file path, written atomically); returns `dest`."""
    from ..fileio import atomic_open

    dest = Path(dest)
    with _resource(name).open("rb") as src, atomic_open(dest) as dst:
        shutil.copyfileobj(src, dst)
    return dest
