"""Small synthetic two-structure data for tests (no ../shared needed): blobs (mitochondria-like) + lines
(actin-like), raw intensities ~ 20..250."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def two_structures(n: int = 6, size: int = 96, seed: int = 0) -> np.ndarray:
    """(n, 2, size, size) float32 clean images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        blobs = np.zeros((size, size))
        for _ in range(max(4, size * size // 800)):
            cy, cx = rng.uniform(0, size, 2)
            blobs += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        lines = np.zeros((size, size))
        for _ in range(5):
            th, c = rng.uniform(0, np.pi), rng.uniform(0, size)
            d = np.abs(np.cos(th) * xx + np.sin(th) * yy - c)
            lines += 150 * np.exp(-(d**2) / (2 * 1.5**2))
        out[i, 0], out[i, 1] = blobs + 20, lines + 20
    return out


def write_npz(path: Path, n: int = 6, size: int = 96, seed: int = 0) -> Path:
    np.savez(path, clean=two_structures(n, size, seed))
    return path


def write_tiff_folder(root: Path, arr: np.ndarray, names=("actin", "mito", "nuclei")) -> Path:
    """arr (N, C, Y, X) -> root/<name>/img<i>.tif: the data reader's per-channel folder layout, names = channel
    names."""
    for c in range(arr.shape[1]):
        (root / names[c]).mkdir(parents=True)
        for i in range(arr.shape[0]):
            tifffile.imwrite(root / names[c] / f"img{i:02d}.tif", arr[i, c])
    return root
