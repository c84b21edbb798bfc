"""The three CPU inference choices of sampling.predict_image, one at a time: what each costs or gains.

1. Halo tolerance (sampling.HALO_TOLERANCE): for each trained run, the measured halo at 1e-6 / 1e-4 / 1e-3 and the
   seam error it leaves: posterior means (eps = 0) of the run's first test image predicted with 128-px tiles vs
   as one tile (halo 256), max |difference| / max |output| and rms difference / output std.
2. NHWC (sampling.cpu_channels_last) and heap-reused memory (allocator.heap_allocations): seconds of one
   `sample_tile` call (bottom-up once, K top-down passes in one chunk) on a (`--tile` + 2 * halo)-px tile, for the four
   combinations, per network width (random weights of the tiny / small / paper presets and the trained runs).

Every number is measured by this script on the machine it runs on (median of `--reps` calls after one warm-up).

    python benchmarks/bench_cpu_paths.py --runs runs/gpu/w2s_small_denoisplit runs/gpu/w2s_paper_denoisplit \
        runs/gpu/w2s_small_usplit --threads 2 --json benchmarks/results/cpu_paths.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PRESETS = ("tiny", "small", "paper")
TOLERANCES = (1e-6, 1e-4, 1e-3)


def halo_rows(run_dir: str) -> list[dict]:
    from denoisplit_zoo.evaluation import load_eval_data
    from denoisplit_zoo.run_folder import load_run
    from denoisplit_zoo.sampling import measure_halo, predict_image

    run = load_run(run_dir)
    s = run.sampler(1, 0, False).eval()
    ev = load_eval_data(run)
    test = (run.data_split or {}).get("test") or [0]
    img = ev.inputs[test[0]].astype(np.float32)
    with torch.no_grad():
        whole = predict_image(s, img, run.norm, tile=4096, halo=256)["mean"]
    rows = []
    for tol in TOLERANCES:
        t0 = time.perf_counter()
        halo = measure_halo(s.vae, tolerance=tol)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            tiled = predict_image(s, img, run.norm, tile=128, halo=halo)["mean"]
        d = tiled - whole
        rows.append({"run": run_dir, "tolerance": tol, "halo": halo, "measure_s": secs,
                     "fed_px_512": 512 + 2 * halo, "flop_ratio_vs_1e-6": None,
                     "max_rel": float(np.abs(d).max() / np.abs(whole).max()),
                     "rms_rel_std": float(np.sqrt((d ** 2).mean()) / whole.std())})
    base = rows[0]["fed_px_512"] ** 2
    for r in rows:
        r["flop_ratio_vs_1e-6"] = base / r["fed_px_512"] ** 2
    return rows


def timing_rows(name: str, sampler, halo: int, k: int, reps: int, tile: int) -> list[dict]:
    from denoisplit_zoo.allocator import heap_allocations
    from denoisplit_zoo.sampling import cpu_channels_last, sample_tile

    x = torch.randn(1, 1, tile + 2 * halo, tile + 2 * halo, generator=torch.Generator().manual_seed(0))
    sampler.n_samples = k
    rows, ref = [], None
    for nhwc in (False, True):
        for heap in (False, True):
            layout = cpu_channels_last(sampler.vae) if nhwc else contextlib.nullcontext()
            with torch.no_grad(), layout, heap_allocations(heap):
                out = sample_tile(sampler, x, chunk=k)[0]
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    sample_tile(sampler, x, chunk=k)
                    times.append(time.perf_counter() - t0)
            ref = out if ref is None else ref
            rows.append({"model": name, "tile_px": x.shape[-1], "k": k, "nhwc": nhwc, "heap": heap,
                         "seconds": statistics.median(times), "max_abs_diff": float((out - ref).abs().max())})
    plain = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = plain / r["seconds"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", default=[], help="trained run folders (their data must be readable)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS),
                    help="random-weight networks for the timing part")
    ap.add_argument("--samples", type=int, default=4, help="K of the timed sample_tile call")
    ap.add_argument("--tile", type=int, default=256, help="kept tile centre of the timed call (px)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    threads = C.set_threads(args.threads)
    from denoisplit_zoo.config import build_run_config
    from denoisplit_zoo.model import SplitSampler
    from denoisplit_zoo.run_folder import load_run
    from denoisplit_zoo.sampling import measure_halo

    halos = [r for run in args.runs for r in halo_rows(run)]
    timings = []
    for p in args.presets:
        m = build_run_config(p, {"data": {"path": "unused.npz"}}).model
        torch.manual_seed(0)
        s = SplitSampler(m.n_levels, m.z_dim, m.n_filters, m.dropout, 2, 64).eval()
        timings += timing_rows(f"{p} (random weights)", s, measure_halo(s.vae), args.samples, args.reps, args.tile)
    for run_dir in args.runs:
        run = load_run(run_dir)
        s = run.sampler(args.samples, 0, True).eval()
        timings += timing_rows(run_dir, s, measure_halo(s.vae), args.samples, args.reps, args.tile)

    print(f"\nHalo tolerance (posterior means, 128-px tiles vs one tile; {threads} threads)")
    print(C.markdown_table(halos, [("run", "run", 0), ("tolerance", "tolerance", 6), ("halo px", "halo", 0),
                                   ("512 tile fed as", "fed_px_512", 0), ("FLOPs ÷ at 1e-6", "flop_ratio_vs_1e-6", 2),
                                   ("seam max / max", "max_rel", 7), ("seam rms / std", "rms_rel_std", 7),
                                   ("measure s", "measure_s", 1)]))
    print(f"\nsample_tile seconds, K = {args.samples} in one chunk, median of {args.reps}")
    print(C.markdown_table(timings, [("model", "model", 0), ("tile px", "tile_px", 0), ("NHWC", "nhwc", 0),
                                     ("heap", "heap", 0), ("seconds", "seconds", 3), ("× plain", "speedup", 2),
                                     ("max |Δ| vs plain", "max_abs_diff", 7)]))
    C.write_json(args.json, {"benchmark": "cpu_paths", "machine": C.machine_info(torch.device("cpu")),
                             "threads": threads, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                             "halo": halos, "timing": timings})


if __name__ == "__main__":
    main()
