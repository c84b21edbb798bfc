"""Train denoiSplit on W2S on a GPU machine and pack the run for the trip back (used for weights/ and the
GPU throughput numbers; see benchmarks/README.md). Run from the repo root:

    python benchmarks/gpu_train_w2s.py --data W2S.npz --channels 0 1 --loss denoisplit --minutes 6 --out RUN --pack OUT.tar
"""

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import torch

from denoisplit_zoo.config import build_run_config
from denoisplit_zoo.training import train


def pack(run: Path, dest: Path) -> None:
    """Tar the run folder with a slim best.pt (model + training state; no optimizer) and no last.pt."""
    with tarfile.open(dest, "w") as tar:
        for f in sorted(run.rglob("*")):
            if f.is_dir() or f.name == "last.pt":
                continue
            if f.name == "best.pt":
                ck = torch.load(f, map_location="cpu", weights_only=True)
                buf = io.BytesIO()
                torch.save({"model": ck["model"], "state": ck["state"]}, buf)
                info = tarfile.TarInfo(str(f.relative_to(run.parent)))
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
            else:
                tar.add(f, arcname=str(f.relative_to(run.parent)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--channels", nargs=2, type=int, default=[0, 1])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--loss", default="denoisplit")
    ap.add_argument("--gaussian", type=float, default=2.0)
    ap.add_argument("--poisson", type=float, default=1.0)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", required=True)
    a = ap.parse_args()
    cfg = build_run_config(a.preset, {
        "data": {"path": a.data, "channels": tuple(a.channels), "noise": {"gaussian": a.gaussian, "poisson": a.poisson}},
        "train": {"loss": a.loss, "max_minutes": a.minutes}})
    t0 = time.time()
    res = train(cfg, a.out, progress=False)
    info = {"loss": a.loss, "preset": a.preset, "steps": res.step, "train_seconds": res.seconds,
            "wall_seconds": time.time() - t0, "best_val_loss": res.best_val_loss, "stopped": res.stopped_because,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}
    Path(a.out, "gpu_train_info.json").write_text(json.dumps(info, indent=2))
    pack(Path(a.out), Path(a.pack))
    print(json.dumps(info))
