"""Calibrate (with and without clean data) and evaluate trained W2S runs; used on a lent GPU for the numbers in
the issue-3 closing note and README. Run from the repo root:

    python benchmarks/gpu_w2s_eval.py RUN [RUN ...] --samples 50 --out OUT_DIR
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from denoisplit_zoo.calibration import calibrate_run
from denoisplit_zoo.evaluation import evaluate_run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    summary = {}
    for run in map(Path, a.runs):
        t0 = time.time()
        clean = calibrate_run(run, without_clean=False, n_samples=a.samples, progress=False)
        shutil.copy(run / "calibration.json", run / "calibration_clean.json")
        noisy = calibrate_run(run, without_clean=True, n_samples=a.samples, progress=False)  # the realistic one
        metrics = evaluate_run(run, out / run.name, n_samples=a.samples, progress=False)
        for f in ("calibration.json", "calibration_clean.json", "calibration.png"):
            shutil.copy(run / f, out / run.name / f)
        summary[run.name] = {
            "ri_psnr": metrics["ri_psnr"], "ri_psnr_mean": metrics["ri_psnr_mean"],
            "ms_ssim": metrics["ms_ssim"], "ms_ssim_mean": metrics["ms_ssim_mean"],
            "scale_clean": {k: v["scale"] for k, v in clean["channels"].items()},
            "scale_without_clean": {k: v["scale"] for k, v in noisy["channels"].items()},
            "test_calibration": metrics["calibration"], "seconds": round(time.time() - t0, 1)}
        print(json.dumps({run.name: summary[run.name]}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
