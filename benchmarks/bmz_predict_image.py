"""Predict one image of any size through bioimageio.core from an exported zip and draw input | A | B | stds.

bioimageio's CLI only accepts sizes min + n*step; the Python API pads an xarray with named dims itself, which is
what this uses:  python benchmarks/bmz_predict_image.py model.zip image.tif --out prediction.tif --figure fig.png
"""

import argparse
import time

import numpy as np
import tifffile
import xarray as xr
from bioimageio.core import load_model_description, predict

ap = argparse.ArgumentParser()
ap.add_argument("zip")
ap.add_argument("image")
ap.add_argument("--out", required=True)
ap.add_argument("--figure", required=True)
ap.add_argument("--blocksize", type=int, default=4,
                help="bioimageio.core blocks of min + n*step px (the in-graph K samples of a whole large image "
                     "do not fit in memory)")
a = ap.parse_args()

img = tifffile.imread(a.image).astype(np.float32)
model = load_model_description(a.zip)
t0 = time.time()
sample = predict(model=model, inputs={"input": xr.DataArray(img[None, None], dims=("batch", "channel", "y", "x"))},
                 blocksize_parameter=a.blocksize)
out = sample.members["prediction"].data.values[0]  # (4, Y, X): A mean, B mean, A std, B std (raw units)
seconds = time.time() - t0
tifffile.imwrite(a.out, out.astype(np.float32), imagej=True, metadata={"axes": "CYX"})
names = [str(c) for c in model.outputs[0].axes[1].channel_names]
print(f"input {img.shape} -> prediction {out.shape} {names} in {seconds:.1f} s; finite: {bool(np.isfinite(out).all())}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
panels = [("input (sum)", img, "gray")] + [(n, out[i], "gray" if i < 2 else "magma") for i, n in enumerate(names)]
for ax, (title, im, cmap) in zip(axes, panels):
    lo, hi = np.percentile(im, [1, 99.5])
    ax.imshow(im, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.suptitle(f"bioimageio.core prediction of a {img.shape[0]}x{img.shape[1]} image from {a.zip.split('/')[-1]}")
fig.tight_layout()
fig.savefig(a.figure, dpi=80)
