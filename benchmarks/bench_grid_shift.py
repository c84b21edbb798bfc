"""How much does a block placed off the network's 2**n_levels grid change the prediction, compared with what
re-sampling the posterior changes anyway?

Packages accept every image size (step 1), so bioimageio.core's blockwise prediction may place the last block
along a side off the grid; the network then computes on a shifted grid. This script measures, on a real test image
of a run (its first test field, normalised like the run's input):

- `shift d`: posterior means (no latent noise) of a crop on the grid vs the same pixels from a crop shifted by d
  pixels (d = 16 = one grid cell is the control: equal up to float round-off);
- `resample K`: two MMSE estimates of K samples with different seeds (what any re-run, or a block with other
  latent noise, differs by), and the MMSE of K samples on vs off the grid (same seed).

All as the RMS difference over the crop's interior (the halo away from its borders) divided by the std of the
prediction there, per channel.

    python benchmarks/bench_grid_shift.py weights/w2s_mito_actin_small --json benchmarks/results/grid_shift_cpu.json
    python benchmarks/bench_grid_shift.py weights/w2s_mito_actin_small --quick   # smoke run: 288-px crop, K = 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

from denoisplit_zoo.data import prepare_data  # noqa: E402
from denoisplit_zoo.package.writer import package_halo  # noqa: E402
from denoisplit_zoo.run_folder import load_run, resolve_data_path  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--crop", type=int, default=448, help="crop side, pixels (a multiple of the grid)")
    ap.add_argument("--samples", type=int, nargs="+", default=[5, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run: --crop 288 --samples 2")
    args = ap.parse_args()
    if args.quick:
        args.crop, args.samples = 288, [2]
    C.set_threads(args.threads)
    run = load_run(args.run)
    cfg = run.config.data.model_copy(update={"path": resolve_data_path(run, None)})
    img = np.asarray(prepare_data(cfg, run.config.train.patch_size).test.inputs[0], np.float32)
    x = (img - run.norm.input_mean) / run.norm.input_std
    g, h, n = 2**run.config.model.n_levels, package_halo(run), args.crop
    o = g  # crop origin on the grid
    if img.shape[0] < n + 2 * g or img.shape[1] < n + 2 * g or n <= 2 * (h + g):
        raise SystemExit(f"the test image ({img.shape}) is too small for --crop {n} and halo {h}")
    lo, hi = h + g, n - h - g  # interior of the on-grid crop, crop coordinates

    def pred(sampler, dy):
        t = torch.from_numpy(np.ascontiguousarray(x[o + dy:o + dy + n, o + dy:o + dy + n]))[None, None]
        with torch.no_grad():
            y = sampler(t)[0, :2].numpy()
        return y[:, lo - dy:hi - dy, lo - dy:hi - dy]  # the same image pixels whatever the shift

    means = run.sampler(1, 0, sample_latents=False).eval()
    base = pred(means, 0)
    sig = base.std(axis=(1, 2))

    def rel(a, b):
        return [float(v) for v in np.sqrt(((a - b) ** 2).mean(axis=(1, 2))) / sig]

    rows = [{"what": f"shift {d} px (posterior means)", "rel_rms": rel(base, pred(means, d))} for d in (1, 3, 5, 8, g)]
    for k in args.samples:
        s1, s2 = run.sampler(k, 1).eval(), run.sampler(k, 2).eval()
        a = pred(s1, 0)
        rows.append({"what": f"resample: MMSE of K={k}, seed 1 vs 2", "rel_rms": rel(a, pred(s2, 0))})
        rows.append({"what": f"MMSE of K={k}, shift 5 px vs on grid", "rel_rms": rel(a, pred(s1, 5))})
    for r in rows:
        r["ch_a"], r["ch_b"] = r["rel_rms"]
    names = run.channel_names
    print(f"run {args.run}, grid {g} px, halo {h} px, crop {n} px, interior {hi - lo} px; RMS difference / std of "
          "the prediction")
    print(C.markdown_table(rows, [("comparison", "what", 0), (names[0], "ch_a", 3), (names[1], "ch_b", 3)]))
    C.write_json(args.json, {"run": args.run, "grid": g, "halo": h, "crop": n, "channels": names, "rows": rows,
                             "machine": C.machine_info(torch.device("cpu"))})


if __name__ == "__main__":
    main()
