"""Calibration without clean data, checked against clean data: per run and channel, the std scale that
`calibrate --without-clean` ships vs the one the clean references give, from the same posterior samples.

For every run folder given (trained by bench_quality.py, the quickstart, or `denoisplit-zoo train`), on its first
`--max-images` VALIDATION fields with K = `--samples`: calibration.fit_calibration(without_clean=True) for each
`--probes` count. It writes nothing into the runs. Columns per channel:
- `clean`: the clean-reference scale (the closed-form Gaussian-NLL optimum; clean images used only for checking);
- `estimate`: the noisy-target estimate (matched estimating equation) with its 95 % block-bootstrap interval,
  `reliable`, and `shipped` (the estimate, or the fallback s = 1 when unreliable);
- `est / clean`, `shipped / clean`, `MLE / clean` (maximum likelihood, the estimator that cannot go negative);
- `noise / error` and `2 % sens.`: how much noise is subtracted per unit of error, and what a 2 % noise-model error
  does to s;
- reliability slopes against the clean images (RMSE vs RMV over equal-count bins; 1 = calibrated) with the clean
  scale and with the shipped one.
Target (issue 13): shipped / clean within 0.8-1.25, or `reliable` false with the fallback's slope reported.

    python benchmarks/bench_calibration.py RUN_DIR [RUN_DIR ...] --samples 20 --max-images 4 --probes 4 \
        --threads 2 --out benchmarks/results/calibration_small_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def describe(run_dir: Path) -> dict:
    """Setting and method of a run folder from its config (W2S channels, noise, loss)."""
    from denoisplit_zoo.config import load_run_config

    cfg = load_run_config(run_dir / "config.yaml")
    noise = cfg.data.noise
    kind = "real" if noise is None or (not noise.gaussian and not noise.poisson) else \
        f"Gaussian x{noise.gaussian:g} + Poisson x{noise.poisson:g}"
    method = cfg.train.loss if cfg.train.kl_formulation in (None, cfg.train.loss) else \
        f"{cfg.train.loss} + {cfg.train.kl_formulation} KL"
    return {"data": Path(cfg.data.path).name, "channels": list(cfg.data.channels), "noise": kind, "method": method}


def trained_steps(run_dir: Path):
    """The last step in the run's training log (None without one)."""
    log = run_dir / "log.jsonl"
    steps = [json.loads(ln).get("step") for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    return max((v for v in steps if isinstance(v, int)), default=None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--samples", type=int, default=20, help="posterior samples K")
    ap.add_argument("--max-images", type=int, default=4, help="validation fields used")
    ap.add_argument("--probes", type=int, nargs="+", default=[4], help="Hutchinson probe counts to compare")
    ap.add_argument("--assemble", action="store_true",
                    help="no computing: the table from every cached result of the given runs (any probe count)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default="benchmarks/results/calibration")
    args = ap.parse_args()

    from denoisplit_zoo.calibration import (MIN_SCALE, estimator_ratio, estimators_agree, fit_calibration,
                                            shipped_scale)
    from denoisplit_zoo.fileio import sha256_file
    from denoisplit_zoo.run_folder import load_run

    threads = C.set_threads(args.threads)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    rows = []
    for run_dir in args.runs:
        info = describe(run_dir)
        run = load_run(run_dir)
        sha = sha256_file(run.checkpoint)
        steps = trained_steps(run_dir)
        counts = sorted(int(p.stem.rsplit("_p", 1)[1]) for p in (out / "results").glob(f"{run_dir.name}_p*.json")) \
            if args.assemble else args.probes
        for probes in counts:
            cache = out / "results" / f"{run_dir.name}_p{probes}.json"
            res = json.loads(cache.read_text()) if cache.is_file() else None
            # a run continued after it was measured (e.g. 1,000 -> 3,000 steps by --resume) is measured again;
            # results cached before checkpoints were recorded count as current only when assembling
            stale = res is not None and res.get("checkpoint_sha256", sha if args.assemble else None) != sha
            if res is not None and not stale:
                print(f"{run_dir.name} probes {probes}: cached", flush=True)
            elif args.assemble:
                print(f"{run_dir.name} probes {probes}: cached result is of another checkpoint; skipped", flush=True)
                continue
            else:
                t0 = time.time()
                res, _ = fit_calibration(run, without_clean=True, n_samples=args.samples,
                                         max_images=args.max_images, progress=False, device=args.device,
                                         probes=probes)
                res["seconds"] = time.time() - t0
                res["checkpoint_sha256"], res["steps"] = sha, steps
                C.write_json(str(cache), res)
                print(f"{run_dir.name} probes {probes}: {res['seconds']:.0f} s", flush=True)
            for name, c in res["channels"].items():
                chk = res["clean_check"][name]
                lo, hi = c["interval"]
                # the scale today's rule ships (calibration.shipped_scale; results cached by an earlier rule too),
                # and its reliability slope against clean: RMV is linear in s, so the slope scales as 1 / s
                # today's reliability: results cached before the estimator-agreement check get it from their
                # own two estimates (the same numbers scale_check compares)
                agree = c["optimal_scale"] <= MIN_SCALE * (1 + 1e-6) or estimators_agree(c["optimal_scale"],
                                                                                         c["mle_scale"])
                c = {**c, "reliable": bool(c["reliable"] and agree)}
                shipped, method = shipped_scale(c["optimal_scale"], c, noisy=True)
                slope_shipped = None if chk["shipped_slope_vs_clean"] is None else \
                    chk["shipped_slope_vs_clean"] * c["scale"] / shipped
                rows.append({"run": run_dir.name, **info, "steps": res.get("steps", steps), "channel": name,
                             "probes": probes,
                             "clean": chk["scale"], "estimate": c["optimal_scale"],
                             "interval": f"{lo:.3g}–{hi:.3g}", "reliable": c["reliable"], "shipped": shipped,
                             "shipped_how": method, "est_over_clean": chk["estimate_over_clean"],
                             "shipped_over_clean": shipped / chk["scale"],
                             "mle_over_clean": chk["mle_over_clean"], "noise_to_error": c["noise_to_error"],
                             "estimator_ratio": estimator_ratio(c["optimal_scale"], c["mle_scale"]),
                             "sensitivity_2pct": c["sensitivity_2pct"], "slope_clean": chk["slope"],
                             "slope_shipped": slope_shipped, "n_images": res["n_images"],
                             "samples": res["n_samples"],
                             "in_target": bool(0.8 <= shipped / chk["scale"] <= 1.25)})
    table = C.markdown_table(rows, [
        ("run", "run", 0), ("data", "data", 0), ("noise", "noise", 0), ("method", "method", 0), ("steps", "steps", 0),
        ("channel", "channel", 0),
        ("probes", "probes", 0), ("clean", "clean", 3), ("estimate", "estimate", 3), ("95 % interval", "interval", 0),
        ("reliable", "reliable", 0), ("shipped", "shipped", 3), ("est / clean", "est_over_clean", 3),
        ("shipped / clean", "shipped_over_clean", 3), ("MLE / clean", "mle_over_clean", 3),
        ("est. / MLE", "estimator_ratio", 2),
        ("noise / error", "noise_to_error", 1), ("2 % sens.", "sensitivity_2pct", 2),
        ("slope, clean s", "slope_clean", 2), ("slope, shipped s", "slope_shipped", 2),
        ("shipped within 0.8–1.25", "in_target", 0)])
    print(table)
    C.write_json(str(out / "calibration.json"), {
        "benchmark": "calibration_without_clean", "machine": C.machine_info(torch.device("cpu")),
        "threads": threads, "samples": args.samples, "max_images": args.max_images, "probes": args.probes,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows})
    (out / "calibration.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
