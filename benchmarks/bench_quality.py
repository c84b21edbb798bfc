"""Quality on W2S: denoiSplit loss vs uSplit loss vs two floors, per channel pair and noise setting.

Protocol:
- data: the W2S training fields (`--data`, 80 fields of 512 x 512, three channels); the run's split is 80/10/10 % of
  the FIELDS (data.split_indices, seed 0): 10 % are held out as the test set and are never used for training,
  early stopping, learning-rate decisions or calibration (those use the validation fields).
- channel pairs `--pairs` (default 0,2 and 0,1); noise settings: Gaussian x {`--gaussian`} (std = factor x std of the
  mean of the two clean channels, data.synthetic_noise) with Poisson (`--poisson`, factor 1) on the clean frames,
  and `--real-noise`: input = the sum of the two REAL noisy frames, training targets = the noisy frames, evaluation
  against the clean frames (mapped onto the noisy frames' intensity scale per image; RI-PSNR is range-invariant).
- methods: `denoisplit` and `usplit` trained by training.train with the same preset and the same budget: `--steps`
  optimizer steps (the fair budget on a shared CPU) or `--minutes`; the best validation checkpoint is evaluated.
  Then calibrated on the validation fields (calibration.calibrate_run) and evaluated on the test fields
  (evaluation.evaluate_run, K = `--samples`). Floors, on the same test fields: `naive` = input / 2 for both
  channels, `no_split` = the clean sum / 2 for both channels (a perfect denoiser that does not split).
- metrics: RI-PSNR per channel and mean, gain over naive, split gain per channel (RI-PSNR - max(floors); > 0 =
  split), verdict, r(error, input noise) (how much of the input noise the prediction carries), MS-SSIM mean,
  calibration slope (RMSE vs RMV on the test fields with the validation-fitted scale; ideal 1), sum vs blur (the
  two outputs added against the clean sum, minus the best Gaussian filter of the input: < 0 = a weaker denoiser
  than a blur, metrics.denoising_check; rows evaluated before it existed show none).

Resumable: every (setting, method) writes OUT/results/<setting>_<method>.json and is skipped when it exists; a run
folder without results (interrupted) is trained again from scratch so every method gets exactly the same budget.
`--jobs N` deals the trainings round-robin to N worker processes, one core each.

    python benchmarks/bench_quality.py --quick --threads 1 --out /tmp/bq
    python benchmarks/bench_quality.py --data ../shared/data/w2s_train_fov001-080.npz --preset small --steps 1000 \
        --pairs 0,2 --gaussian 2 4 --early-stop-patience 100000 --samples 20 --calibration-images 4 --threads 1 \
        --jobs 2 --device cpu --out benchmarks/results/quality_small_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_DATA = "../shared/data/w2s_train_fov001-080.npz"


def quick_subset(data: str, out: Path, n: int = 10, size: int = 256) -> str:
    """--quick: the first n fields, top-left size x size, as OUT/quick_subset.npz (split 8/1/1). Preparing the data
    (Poisson + Gaussian noise on every field) is most of a tiny run's time on the full 80 x 512^2 file."""
    path = out / "quick_subset.npz"
    if not path.is_file():
        with np.load(data) as z:
            arrays = {k: z[k][:n, :, :size, :size] for k in ("clean", "noisy")}
        np.savez(path, **arrays)
    return str(path)


def settings(args) -> list[dict]:
    out = []
    for pair in args.pairs:
        a, b = (int(v) for v in pair.split(","))
        for g in args.gaussian:
            out.append({"name": f"ch{a}{b}_g{g:g}_p{args.poisson:g}", "channels": [a, b],
                        "noise": {"gaussian": float(g), "poisson": float(args.poisson)}, "kind": "synthetic"})
        if args.real_noise:
            out.append({"name": f"ch{a}{b}_real", "channels": [a, b], "noise": {"gaussian": 0.0, "poisson": 0.0},
                        "kind": "real"})
    return out


# trained methods: the objective's config keys. "altered" = the paper's Altered uSplit ablation: uSplit's Gaussian
# likelihood with denoiSplit's KL (per image pixel, free bits 1), isolating what the noise-model likelihood adds.
METHODS = {"denoisplit": {"loss": "denoisplit"}, "usplit": {"loss": "usplit"},
           "altered": {"loss": "usplit", "kl_formulation": "denoisplit", "free_bits": 1.0}}


def run_config(args, st: dict, method: str):
    from denoisplit_zoo.config import build_run_config

    return build_run_config(args.preset, {
        "data": {"path": str(Path(args.data).resolve()), "channels": tuple(st["channels"]), "noise": st["noise"],
                 "split": (0.8, 0.1, 0.1)},
        "train": {**METHODS[method], "max_minutes": args.minutes, "max_steps": args.steps, "device": args.device,
                  **({"early_stop_patience": args.early_stop_patience} if args.early_stop_patience else {}),
                  **({"lr_patience": args.lr_patience} if args.lr_patience else {}),
                  **({"amp": args.amp} if args.amp is not None else {})}})


FLOORS = ("naive", "no_split")


def floor(args, st: dict, kind: str) -> dict:
    """A floor on the clean test fields (on the targets' intensity scale), same split and noise as the trained
    methods: `naive` = input / 2 for both channels, `no_split` = the clean sum / 2 for both channels (a perfect
    denoiser that does not split). Channel names are the run's (ch<I>, ch<J>), as evaluate_run reports them."""
    from denoisplit_zoo.calibration import clean_on_target_scale
    from denoisplit_zoo.data import prepare_data
    from denoisplit_zoo.metrics import channel_metrics

    cfg = run_config(args, st, "denoisplit")
    prepared = prepare_data(cfg.data, cfg.train.patch_size, None)
    test = prepared.test
    n = len(test.inputs) if args.max_images is None else min(args.max_images, len(test.inputs))
    clean = clean_on_target_scale(test.clean[:n], test.targets[:n], prepared.noise_info.get("kind", "synthetic"))
    both = test.inputs[:n] if kind == "naive" else clean[:, 0] + clean[:, 1]
    pred = np.repeat(both[:, None] / 2, 2, axis=1).astype(np.float32)
    m = channel_metrics(clean, pred, prepared.channel_names)
    return {"ri_psnr": m["ri_psnr"], "ri_psnr_mean": m["ri_psnr_mean"], "ms_ssim": m["ms_ssim"],
            "ms_ssim_mean": m["ms_ssim_mean"], "calibration_slope": None, "n_images": int(n),
            "test_fields": prepared.split.get("test")}


def extendable(args, r: dict, run_dir: Path) -> bool:
    """--extend: a cached result trained for fewer than --steps that ran its whole step budget and still has its
    last checkpoint can be resumed (exact resume) to --steps instead of training again from step 0."""
    return bool(args.extend and args.steps and r.get("steps", 0) < args.steps and r.get("stopped") == "max_steps"
                and (run_dir / "checkpoints" / "last.pt").is_file())


def trained(args, st: dict, method: str, run_dir: Path, extend: bool = False) -> dict:
    from denoisplit_zoo.calibration import calibrate_run
    from denoisplit_zoo.evaluation import evaluate_run
    from denoisplit_zoo.training import train

    if run_dir.exists() and not extend:  # interrupted earlier: same budget for everyone, so start again
        shutil.rmtree(run_dir)
    t0 = time.time()
    res = train(run_config(args, st, method), run_dir, resume=extend, progress=False)
    train_wall = time.time() - t0
    C.write_json(str(run_dir / "bench_train_done.json"), {"steps": res.step, "seconds": res.seconds})
    calib = None
    if args.samples >= 2 and not args.no_calibrate:
        calib = calibrate_run(run_dir, n_samples=args.samples, max_images=args.calibration_images or args.max_images,
                              progress=False, device=args.device)
    ev = evaluate_run(run_dir, run_dir / "eval_test", n_samples=args.samples, max_images=args.max_images,
                      progress=False, device=args.device)
    cal = ev.get("calibration", {})
    slopes = {n: c.get("slope") for n, c in cal.items()}
    ok = [v for v in slopes.values() if v is not None]
    return {"ri_psnr": ev["ri_psnr"], "ri_psnr_mean": ev["ri_psnr_mean"], "ms_ssim": ev["ms_ssim"],
            "ms_ssim_mean": ev["ms_ssim_mean"], "floors": ev["floors"], "split_gain": ev["split_gain"],
            "split_status": ev["split_status"], "correlation": ev["correlation"],
            "denoising": ev.get("denoising"), "calibration_slope": slopes,
            "calibration_slope_mean": float(np.mean(ok)) if ok else None,
            "calibration_scale": {n: c.get("scale") for n, c in cal.items()}, "calibrated_on": "val" if calib else None,
            "n_images": ev["n_images"], "steps": res.step, "train_seconds": res.seconds, "train_wall": train_wall,
            "stopped": res.stopped_because, "best_val_loss": res.best_val_loss, "run": str(run_dir)}


def run_parts(jobs: int) -> None:
    """Run this command as `jobs` concurrent worker processes, each on every jobs-th setting; output prefixed."""
    argv = [a for a in sys.argv[1:]]
    if "--jobs" in argv:
        i = argv.index("--jobs")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--jobs=")]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--part", f"{i}/{jobs}"])
             for i in range(jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"[bench_quality] worker exit codes {codes}; the table below holds what finished", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", nargs="+", default=["0,2", "0,1"])
    ap.add_argument("--gaussian", nargs="+", type=float, default=[1, 2, 4])
    ap.add_argument("--poisson", type=float, default=1.0, help="Poisson factor added with every Gaussian level")
    ap.add_argument("--real-noise", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--losses", nargs="+", default=["denoisplit", "usplit", *FLOORS], choices=[*METHODS, *FLOORS],
                    help="trained methods and floors (altered: uSplit likelihood + denoiSplit KL, the paper's "
                         "ablation)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--minutes", type=float, help="training time budget per trained model (default: none with "
                    "--steps, else 30)")
    ap.add_argument("--steps", type=int, help="optimizer steps per trained model, the same for every method (the "
                    "fair budget on a shared CPU, where minutes buy unequal work)")
    ap.add_argument("--early-stop-patience", type=int,
                    help="validations without improvement before stopping (default: the preset's; set it above "
                         "the budget's validations so every method trains for the whole budget)")
    ap.add_argument("--lr-patience", type=int, help="ReduceLROnPlateau patience in validations (default: preset's)")
    ap.add_argument("--extend", action="store_true",
                    help="resume cached trainings that stopped at fewer than --steps to --steps (exact resume from "
                         "their last checkpoint), then calibrate and evaluate again; the earlier numbers are kept "
                         "in the row's `history`")
    ap.add_argument("--assemble", action="store_true",
                    help="only build the table from cached results (no training; missing rows are listed)")
    ap.add_argument("--samples", type=int, default=20, help="posterior samples K for calibration and evaluation")
    ap.add_argument("--max-images", type=int, help="evaluate / calibrate on at most this many fields")
    ap.add_argument("--calibration-images", type=int, help="calibrate on at most this many validation fields "
                    "(default: --max-images)")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the validation calibration (scale 1)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16/fp16 autocast on CUDA (default: the config's, on)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--jobs", type=int, default=1,
                    help="settings run in this many concurrent processes (each with --threads), then one table")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # "i/N": a --jobs worker runs settings i, i+N, ...
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny preset, 10 fields cropped to 256 px, pair 0,2, Gaussian x2 + real noise, "
                         "6 s per training, K = 4, 1 test field")
    args = ap.parse_args()
    if args.minutes is None and args.steps is None:
        args.minutes = 30.0
    threads = C.set_threads(args.threads)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.preset, args.pairs, args.gaussian, args.minutes = "tiny", ["0,2"], [2.0], 0.1
        args.samples, args.max_images = 4, 1
        args.data = quick_subset(args.data, out)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    todo = settings(args)
    if args.jobs > 1 and not args.part and not args.assemble:
        run_parts(args.jobs)  # every setting's results are then cached: the loop below only assembles the table
    pairs = [(st, m) for st in todo for m in args.losses]
    if args.part:
        # trainings dealt round-robin (not whole settings), so the workers finish together; floors are cheap
        i, n = (int(v) for v in args.part.split("/"))
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= n:
            os.sched_setaffinity(0, {i})  # one core per worker: two 1-thread jobs on one core fight
        trained_pairs = [p for p in pairs if p[1] not in FLOORS]
        pairs = trained_pairs[i::n] + [p for p in pairs if p[1] in FLOORS][i::n]
    rows = []
    for st, method in pairs:
        res_path = out / "results" / f"{st['name']}_{method}.json"
        run_dir = out / "runs" / f"{st['name']}_{method}"
        cached = json.loads(res_path.read_text()) if res_path.is_file() else None
        extend = cached is not None and method not in FLOORS and extendable(args, cached, run_dir)
        if cached is None and args.assemble:
            print(f"{st['name']:18s} {method:10s} (not run)", flush=True)
            continue
        if cached is not None and (not extend or args.assemble):
            r = cached
            print(f"{st['name']:18s} {method:10s} (cached) RI-PSNR {r['ri_psnr_mean']:.2f}", flush=True)
        else:
            t0 = time.time()
            try:
                r = floor(args, st, method) if method in FLOORS else trained(args, st, method, run_dir, extend)
            except Exception as e:  # noqa: BLE001  (report and go on with the other settings)
                print(f"{st['name']:18s} {method:10s} FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"setting": st["name"], "method": method, "error": f"{type(e).__name__}: {e}"})
                continue
            if extend:  # the earlier, shorter budget's numbers: a learning curve at equal evaluation protocol
                r["history"] = [*cached.get("history", []), {k: cached.get(k) for k in (
                    "steps", "samples", "ri_psnr", "ri_psnr_mean", "split_gain", "split_status", "train_seconds")}]
            r.update(setting=st["name"], method=method, channels=st["channels"], noise=st["noise"],
                     kind=st["kind"], preset=args.preset, minutes=args.minutes, budget_steps=args.steps,
                     samples=args.samples, seconds_total=time.time() - t0)
            C.write_json(str(res_path), r)
            print(f"{st['name']:18s} {method:10s} RI-PSNR {r['ri_psnr_mean']:.2f} ({time.time() - t0:.0f} s)",
                  flush=True)
        rows.append(r)

    from denoisplit_zoo.metrics import lacks_detail, resembles_other, split_status

    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["ri_psnr_A"], r["ri_psnr_B"] = list(r["ri_psnr"].values())
        same = {x["method"]: x for x in ok if x["setting"] == r["setting"]}
        for base in ("usplit", "altered"):
            # a difference only at equal optimizer steps (a run continued further is not compared with one that was not)
            if r["method"] == "denoisplit" and base in same and same[base].get("steps") == r.get("steps"):
                r[f"delta_vs_{base}"] = r["ri_psnr_mean"] - same[base]["ri_psnr_mean"]
        if r["method"] not in FLOORS and "naive" in same:
            r["gain_vs_naive"] = r["ri_psnr_mean"] - same["naive"]["ri_psnr_mean"]
        gain = r.get("split_gain") or {}
        if gain and all(g is not None for g in gain.values()):
            r["split_gain_A"], r["split_gain_B"] = list(gain.values())
            # the verdict from the stored numbers with the current rule (results cached by an older version too)
            r["resembles_other"] = resembles_other(r["correlation"]["pred_vs_clean"], list(gain))
            detail = r["correlation"].get("detail")  # absent from results cached before the detail check
            flat = lacks_detail(detail) if detail else None
            r["split_status"] = split_status(gain, r["resembles_other"], flat)
            r["verdict"] = ", ".join(f"{n} {s}" for n, s in r["split_status"].items())
        if r.get("denoising"):  # the two outputs added vs a Gaussian filter of the input (metrics.denoising_check)
            r["sum_vs_blur"] = r["denoising"]["margin"]
        carried = (r.get("correlation") or {}).get("error_vs_input_noise")
        if carried:
            r["noise_carried"] = float(np.mean(list(carried.values())))
    table = C.markdown_table(ok, [
        ("setting", "setting", 0), ("method", "method", 0), ("RI-PSNR A", "ri_psnr_A", 2),
        ("RI-PSNR B", "ri_psnr_B", 2), ("RI-PSNR mean", "ri_psnr_mean", 2), ("vs naive", "gain_vs_naive", 2),
        ("Δ vs uSplit", "delta_vs_usplit", 2), *([("Δ vs altered", "delta_vs_altered", 2)]
                                                 if any("delta_vs_altered" in r for r in ok) else []),
        ("split gain A", "split_gain_A", 2),
        ("split gain B", "split_gain_B", 2), ("verdict", "verdict", 0), ("r(error, input noise)", "noise_carried", 2),
        *([("sum vs blur", "sum_vs_blur", 2)] if any("sum_vs_blur" in r for r in ok) else []),
        ("MS-SSIM mean", "ms_ssim_mean", 4),
        ("calib. slope", "calibration_slope_mean", 3), ("steps", "steps", 0), ("K", "samples", 0),
        ("test fields", "n_images", 0)])
    if args.part:
        return
    print()
    budget = "steps and K as listed per row" if args.assemble else \
        f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"Quality on W2S test fields, preset {args.preset}, {budget}"
          + ("" if args.assemble else f" per training, K = {args.samples}"))
    print(table)
    summary = {"benchmark": "quality", "machine": C.machine_info(device), "threads": threads, "preset": args.preset,
               "minutes": args.minutes, "steps": args.steps, "early_stop_patience": args.early_stop_patience,
               "lr_patience": args.lr_patience, "samples": args.samples, "max_images": args.max_images,
               "calibration_images": args.calibration_images, "data": args.data,
               "quick": args.quick, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "results": rows}
    C.write_json(str(out / "quality.json"), summary)
    (out / "quality.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
