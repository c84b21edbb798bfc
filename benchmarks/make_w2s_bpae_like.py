"""W2S clean mitochondria / actin (channels 0 / 2) recast as camera counts with the quickstart sample's brightness
ratio: the training data of the bundled `w2s_bpae_like_small` model that `denoisplit-zoo quickstart` fine-tunes.

Why: W2S's 8-bit copy stretched every image to 0-255 on its own, so its two structures are equally bright, while in
the quickstart's BPAE field (the same kind of slide: BPAE cells, MitoTracker / phalloidin) the actin is ~8x brighter
than the mitochondria (99th percentiles above the camera offset ~16,000 vs ~2,000 counts). A model pretrained at a
1:1 ratio and the heavy noise of the quality table (Gaussian x2) blurs the actin and mixes the dim mitochondria
into it; pretrained on this recast it starts from the demo's mixing ratio. The noise is added by training itself
(`--gaussian` / `--poisson`, the paper's protocol), so this writes clean frames only.

Writes OUT/actin/fovNNN.tif and OUT/mito/fovNNN.tif (uint16; a folder the `train --data` reader takes, with the
sub-folder names as channel names). The W2S data have no licence for redistribution: keep OUT out of the repository.

    python benchmarks/make_w2s_bpae_like.py ../shared/data/w2s_train_fov001-080.npz --out /tmp/w2s_bpae_like

`--mito-p99 16000` makes both structures equally bright instead: the training data of `w2s_balanced_small`, the
model the quickstart's default `--brightness balanced` fine-tunes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

# Targets for each channel's 99th percentile above the offset, and the offset, in camera counts: the quickstart
# sample's (shared/data/README.md: background ~200 in the sum of two channels, actin maxima 43k, mito 5k).
ACTIN_P99, MITO_P99, OFFSET = 16_000.0, 2_000.0, 100.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path, help="W2S npz with `clean` (N, 3, Y, X) uint8")
    ap.add_argument("--out", type=Path, required=True, help="new folder")
    ap.add_argument("--mito-p99", type=float, default=MITO_P99,
                    help=f"mitochondria's 99th percentile above the offset, counts (default {MITO_P99:g}, the raw "
                         f"sample's; {ACTIN_P99:g} = as bright as the actin)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new folder")
    with np.load(args.npz, allow_pickle=False) as z:
        clean, fov = z["clean"], z["fov"]
    mito, actin = clean[:, 0].astype(np.float64), clean[:, 2].astype(np.float64)
    scale_m = args.mito_p99 / np.percentile(mito, 99)
    scale_a = ACTIN_P99 / np.percentile(actin, 99)
    tmp = args.out.with_name(args.out.name + ".tmp")
    for name in ("actin", "mito"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(fov):
        for name, arr, s in (("actin", actin, scale_a), ("mito", mito, scale_m)):
            tifffile.imwrite(tmp / name / f"fov{int(f):03d}.tif", np.round(OFFSET + s * arr[i]).astype(np.uint16))
    tmp.rename(args.out)
    print(f"{len(fov)} fields -> {args.out}: actin x{scale_a:.1f}, mito x{scale_m:.2f} counts per 8-bit level, "
          f"offset {OFFSET:g}; ratio of 99th percentiles {ACTIN_P99 / args.mito_p99:g}")


if __name__ == "__main__":
    main()
