"""Peak memory of `denoisplit-zoo predict` on a large image: a zarr input predicted block by block (OME-Zarr
outputs), the same image as a tiled TIFF with `--blockwise`, and as a TIFF predicted in memory. Each configuration runs in a fresh worker process (its
peak RSS, VmHWM, is its own), through the real CLI (`cli.main`).

The model: `--model RUN_OR_ZIP`, default a `tiny` run trained here for 20 steps on synthetic data (the memory of
the prediction is what is measured, not its quality). The images: `--sizes` (default 4096 and 8192) square,
uint16, random, zarr chunks 1024², TIFF tiles 512²; K = `--samples` (default 2), `--tile` (default 512).

    python benchmarks/bench_blockwise.py --json benchmarks/results/blockwise_cpu.json
    python benchmarks/bench_blockwise.py --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402


def worker(spec: dict) -> dict:
    from denoisplit_zoo.cli import main

    t0 = time.perf_counter()
    rc = main(["predict", spec["model"], spec["input"], "--out", spec["out"], "--samples", str(spec["samples"]),
               "--tile", str(spec["tile"]), "--no-progress", "--threads", str(spec["threads"]), *spec["extra"]])
    return {"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mb": C.peak_rss_mb()}


def tiny_run(root: Path) -> str:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from synthetic import write_npz

    from denoisplit_zoo.cli import main

    write_npz(root / "data.npz", n=6, size=64)
    (root / "over.yaml").write_text("noise_model: {n_iterations: 50, batch_size: 20000}\n")
    rc = main(["train", "--data", str(root / "data.npz"), "--preset", "tiny", "--config", str(root / "over.yaml"),
               "--max-steps", "20", "--gaussian", "1", "--poisson", "1", "--out", str(root / "run")])
    assert rc == 0
    return str(root / "run")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192],
                    help="square image sizes: the blockwise rows' peak memory should not grow with them")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024² image")
    C.add_worker_option(ap)
    args = ap.parse_args()
    if C.serve_worker(args, worker):
        return
    if args.quick:
        args.sizes = [512, 1024]
    import numpy as np
    import tifffile
    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or tiny_run(root)
        rows = []
        for size in args.sizes:
            rng = np.random.default_rng(0)
            big = root / f"big{size}"
            big.mkdir()
            z = zarr.open_array(str(big / "img.zarr"), mode="w", shape=(size, size), chunks=(1024, 1024),
                                dtype="uint16")
            for y in range(0, size, 1024):  # written by stripes: this process never holds the image either
                z[y:y + 1024] = rng.integers(0, 200, size=(min(1024, size - y), size), dtype=np.uint16)
            with tifffile.TiffWriter(big / "img.tif", bigtiff=True) as tw:  # tiled, as large microscopy TIFFs are
                tw.write(np.asarray(z[:]), photometric="minisblack", tile=(512, 512))
            for name, inp, extra in (("zarr, block by block", big / "img.zarr", []),
                                     ("TIFF --blockwise", big / "img.tif", ["--blockwise"]),
                                     ("TIFF, in memory", big / "img.tif", [])):
                spec = {"model": model, "input": str(inp), "out": str(big / f"out_{len(rows)}"), "extra": extra,
                        "samples": args.samples, "tile": args.tile, "threads": args.threads}
                r = C.run_worker(__file__, spec)
                disk = inp.stat().st_size if inp.is_file() else sum(p.stat().st_size for p in inp.rglob("*")
                                                                     if p.is_file())
                rows.append({"input": name, "size": f"{size}²", "pixels": size ** 2, "input_mb": disk / 2**20, **r})
                print(f"  {size}² {name}: {r}", flush=True)
            shutil.rmtree(big)
    print(C.markdown_table(rows, [("image", "size", 0), ("input", "input", 0), ("on disk MB", "input_mb", 0),
                                  ("exit", "rc", 0), ("s", "seconds", 0), ("peak RSS MB", "peak_rss_mb", 0)]))
    import torch

    C.write_json(args.json, {"benchmark": "blockwise", "machine": C.machine_info(torch.device("cpu")),
                             "sizes": args.sizes, "samples": args.samples, "tile": args.tile, "threads": args.threads,
                             "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": rows})


if __name__ == "__main__":
    main()
