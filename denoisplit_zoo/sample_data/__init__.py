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
# then Gaussian noise of std DEMO_GAUSSIAN x std(mean of the two clean channels over the training stripe) (~1,840
# counts here). F = 1 treats a camera count as one detected photon (the sample's gain is not documented; F = 1 is the
# paper's own setting). The level is chosen for a realistic demonstration, not the hardest case: at Gaussian x0.1
# (std ~184 counts, printed by the quickstart) the mitochondria, ~9x dimmer than the actin (99th percentiles ~2,000
# vs ~16,000 counts above the camera offset), peak at ~10x the noise std: visibly grainy, as in a moderately lit
# widefield acquisition. x0.25 (peak ~4x) and x2 (peak ~0.5x, the mitochondria buried) were the earlier defaults;
# measured (README, docs/quality.md): no level tried is split by a 10-minute CPU quickstart, and x0.1 with a
# pretrained model trained at x0.1 comes closest. Defined here, with the data, so that the CLI's --help can quote
# it without importing torch.
DEMO_GAUSSIAN = 0.1
DEMO_POISSON = 1.0


def _resource(name: str):
    if name not in BPAE_FILES:
        raise KeyError(f"unknown sample channel {name!r}; choose one of {', '.join(BPAE_FILES)}")
    return importlib.resources.files(__name__).joinpath(BPAE_FILES[name])


def read_bpae(name: str) -> np.ndarray:
    """One BPAE channel ('actin', 'mito' or 'nuclei') as a (680, 1100) uint16 array of camera counts."""
    import tifffile

    with importlib.resources.as_file(_resource(name)) as path:
        return tifffile.imread(str(path))


def copy_bpae(name: str, dest) -> Path:
    """Copy one BPAE channel's TIFF byte for byte to `dest` (a file path, written atomically); returns `dest`."""
    from ..fileio import atomic_open

    dest = Path(dest)
    with _resource(name).open("rb") as src, atomic_open(dest) as dst:
        shutil.copyfileobj(src, dst)
    return dest
