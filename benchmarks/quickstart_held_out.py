"""Where the quickstart's held-out stripes lie, and whether a model fine-tuned on the rest of the field splits them.

The quickstart trains on ONE field and holds out two 110-px stripes of it (quickstart.held_out_shift rolls the
columns so that they fall where it wants). For each column roll in --shifts ("rule" = held_out_shift's choice), this
fine-tunes the quickstart's model exactly as the quickstart does (its config, its pretrained start, its noise models)
for --steps optimizer steps, then scores with the product's own evaluation (evaluation.evaluate_run: RI-PSNR, floors,
split gain, K posterior samples)
- the test stripe, and
- the densest 220-px window of the TRAINING stripe (most signal of both structures), from its clean images with a
  fresh draw of the run's noise: what the model does on content it was trained on.
A model that splits the second but not the first has learnt this field's training stripe, not the structures.

    python benchmarks/quickstart_held_out.py [--shifts rule 440 210 640] [--steps 600] [--samples 20] \
        [--brightness balanced] [--out DIR] [--threads N] [--json PATH] [--quick]

One CPU-heavy job: run nothing else meanwhile (DEVELOPERS.md). ~3 min per shift on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from denoisplit_zoo import quickstart as qs  # noqa: E402
from denoisplit_zoo.data import prepare_data, split_regions  # noqa: E402
from denoisplit_zoo.evaluation import evaluate_run  # noqa: E402
from denoisplit_zoo.fileio import atomic_path  # noqa: E402
from denoisplit_zoo.sample_data import BRIGHTNESS, DEMO_GAUSSIAN, DEMO_POISSON, demo_images  # noqa: E402
from denoisplit_zoo.training import train  # noqa: E402

WINDOW = 220  # px: the training-stripe window scored (twice a held-out stripe)


def signal_shares(images: dict, shift: int, columns: slice) -> dict:
    """Share of each structure's signal above its minimum in `columns` of the images rolled by `shift`."""
    return {n: float(np.roll(c, shift)[columns].sum()) for n, c in qs.column_shares(images).items()}


def densest_window(images: dict, shift: int, train_cols: slice) -> slice:
    """The WINDOW-px column window inside the training stripe holding the most signal of both structures."""
    cols = sum(np.roll(c, shift) for c in qs.column_shares(images).values())
    sums = np.convolve(cols[train_cols], np.ones(WINDOW), mode="valid")
    x0 = train_cols.start + int(np.argmax(sums))
    return slice(x0, x0 + WINDOW)


def write_window(folder: Path, images: dict, shift: int, cols: slice) -> Path:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    for name in qs.CHANNELS:
        with atomic_path(folder / f"{name}.tif") as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(np.roll(images[name], shift, axis=1)[:, cols]))
    return folder


def one_shift(images: dict, shift: int, args, work: Path) -> dict:
    root = work / f"shift_{shift}"
    data = qs.write_sample_data(root / "bpae_sample", images, shift)
    cfg = qs._build_config(data, "small", DEMO_GAUSSIAN, DEMO_POISSON, 0, "cpu", qs.PRETRAINED[args.brightness])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": args.steps,
                                                                        "max_minutes": None})})
    prepared = prepare_data(cfg.data, cfg.train.patch_size)
    noise_models = qs.fit_noise_models(cfg, prepared, False)
    del prepared
    t0 = time.monotonic()
    res = train(cfg, root / "run", noise_models=noise_models, progress=False)
    seconds = time.monotonic() - t0
    width = images["actin"].shape[1]
    regions = split_regions(images["actin"].shape, qs.SPLIT_FRACTIONS)
    test_cols, train_cols = regions["test"][1], regions["train"][1]
    window = densest_window(images, shift, train_cols)
    scored = {}
    for what, folder in (("test", None), ("train window", write_window(root / "train_window", images, shift, window))):
        m = evaluate_run(root / "run", root / f"report_{what.replace(' ', '_')}",
                         data=None if folder is None else str(folder), n_samples=args.samples, progress=False,
                         device="cpu")
        scored[what] = {"ri_psnr": m["ri_psnr"], "no_split": m["floors"]["no_split"], "split_gain": m["split_gain"],
                        "split_status": m["split_status"]}
    return {"shift": shift,
            "test_original_x": [(test_cols.start - shift) % width, (test_cols.stop - 1 - shift) % width + 1],
            "train_window_original_x": [(window.start - shift) % width, (window.stop - 1 - shift) % width + 1],
            "test_signal_share": signal_shares(images, shift, test_cols),
            "val_signal_share": signal_shares(images, shift, regions["val"][1]),
            "steps": res.step, "best_val_loss": res.best_val_loss, "train_seconds": round(seconds, 1), **scored}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shifts", nargs="+", default=["rule", "440", "210", "640"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--brightness", choices=BRIGHTNESS, default="balanced")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="20 steps, K = 4, the rule's shift only")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.shifts = 20, 4, ["rule"]
    C.set_threads(args.threads or (1 if args.quick else None))
    images, _ = demo_images(args.brightness)
    shifts = [qs.held_out_shift(images) if s == "rule" else int(s) for s in args.shifts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        rows = [one_shift(images, s, args, work) for s in shifts]
    table = []
    for r in rows:
        t, w = r["test"], r["train window"]
        table.append({
            "roll": f"{r['shift']}{' (rule)' if r['shift'] == shifts[0] and args.shifts[0] == 'rule' else ''}",
            "test": "{}-{}".format(*r["test_original_x"]),
            "share": " / ".join(f"{100 * r['test_signal_share'][n]:.0f} %" for n in qs.CHANNELS),
            "steps": r["steps"],
            "ri": " / ".join(f"{t['ri_psnr'][n]:.2f} ({t['no_split'][n]:.2f})" for n in qs.CHANNELS),
            "gain": " / ".join(f"{t['split_gain'][n]:+.2f}" for n in qs.CHANNELS),
            "window": "{}-{}".format(*r["train_window_original_x"]),
            "wgain": " / ".join(f"{w['split_gain'][n]:+.2f}" for n in qs.CHANNELS)})
    print(C.markdown_table(table, [
        ("roll (px)", "roll", 0), ("test stripe (original x)", "test", 0), ("signal in test: actin / mito", "share", 0),
        ("steps", "steps", 0), ("test: RI-PSNR actin / mito (no split)", "ri", 0), ("test: split gain", "gain", 0),
        ("densest training window (original x)", "window", 0), ("window: split gain", "wgain", 0)]))
    C.write_json(args.json, {"command": " ".join(sys.argv), "machine": C.machine_info(torch.device("cpu")),
                             "brightness": args.brightness, "steps": args.steps, "samples": args.samples,
                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
