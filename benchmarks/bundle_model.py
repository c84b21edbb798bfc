"""Copy a trained, calibrated and evaluated run into weights/NAME as a bundled pretrained model (what
`denoisplit-zoo models` lists and `train --init-from NAME` starts from).

Kept: config.yaml, normalization.json, data_split.json, noise_models/, checkpoints/best.pt (not last.pt: the
optimizer state is not needed to fine-tune or export), halo.json, log.jsonl, calibration.json, and the evaluation
report (REPORT_DIR: metrics.json with the floors and split gain, report.md, figures) as report/. provenance.json
records the data, the commands, the code commit, the training summary, the source it was fine-tuned from (if
any) and the test metrics. Nothing of the run is changed.

    python benchmarks/bundle_model.py RUN_DIR REPORT_DIR --name w2s_mito_actin_small \
        --data-name "W2S ..." --channel-names mitochondria actin --command "..."
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("config.yaml", "normalization.json", "data_split.json", "halo.json", "log.jsonl", "calibration.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("report", type=Path, help="the run's evaluation folder (metrics.json, report.md, figures)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-name", required=True, help="what the data is, for provenance.json")
    ap.add_argument("--channel-names", nargs=2, required=True, metavar=("A", "B"))
    ap.add_argument("--command", required=True, help="the command that trained, calibrated and evaluated it")
    ap.add_argument("--machine", default="this project's 2-core CPU (no GPU)")
    ap.add_argument("--licence-note", default="")
    args = ap.parse_args()

    from denoisplit_zoo.fileio import read_json, write_json
    from denoisplit_zoo.run_folder import record_halo

    out = ROOT / "weights" / args.name
    if out.exists():
        sys.exit(f"{out} exists: remove it first (nothing overwritten)")
    if not (args.run / "halo.json").is_file():
        record_halo(args.run)  # runs trained before halo.json existed
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    for name in FILES:
        shutil.copy2(args.run / name, tmp / name)
    shutil.copy2(args.run / "checkpoints" / "best.pt", tmp / "checkpoints" / "best.pt")
    shutil.copytree(args.run / "noise_models", tmp / "noise_models")
    (tmp / "report").mkdir()
    for p in args.report.iterdir():
        if p.is_file() and p.suffix in (".json", ".md", ".png"):
            shutil.copy2(p, tmp / "report" / p.name)

    metrics = read_json(args.report / "metrics.json")
    split = read_json(args.run / "data_split.json")
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines() if line.strip()]
    best = [e for e in log if e.get("best")]
    # a run fine-tuned from another (train --init-from) keeps that source and its sha256 in its own provenance.json
    run_prov = read_json(args.run / "provenance.json") if (args.run / "provenance.json").is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    write_json(tmp / "provenance.json", {
        "data": {"name": args.data_name, "channels": dict(zip(args.channel_names, ["channel A", "channel B"])),
                 "noise": split.get("noise"),
                 "split": {k: split[k] for k in ("train", "val", "test") if k in split}},
        "command": args.command,
        "code": f"denoisplit-zoo commit {commit}",
        "training": {"steps": log[-1]["step"] if log else None, "seconds": log[-1].get("seconds") if log else None,
                     "best_val_loss": best[-1]["val_loss"] if best else None,
                     "best_step": best[-1]["step"] if best else None},
        **({"init_from": run_prov["init_from"]} if "init_from" in run_prov else {}),
        "machine": args.machine,
        "metrics_test_split": {k: metrics.get(k) for k in (
            "ri_psnr", "ri_psnr_mean", "ms_ssim", "floors", "split_gain", "split_status", "resembles_other",
            "n_samples", "n_images")},
        "licence_note": args.licence_note})
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundled {out} ({size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
