"""Soak check: many consecutive `predict` calls of one package in one process, through the Python API a notebook
uses (`cli_predict.predict_files`: read the zip, check its hashes, build the sampler, predict, write TIFFs). Memory
must stay flat (RSS growth reported) and every call must write the same numbers (the latent noise is a counter-based
hash of the seed, so repeated calls are bit-identical).

    python benchmarks/bench_soak.py --calls 200 --json benchmarks/results/soak_cpu.json

The package is exported (without the bioimageio self-test: this checks our reader and sampler, not bioimageio.core)
from a bundled model (default weights/w2s_mito_actin_small) into a temp folder; the input is a 128 x 128 crop of
the model's first test image (or a synthetic image where its data is not available: `writer.make_test_input`).
Prints a table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Resident set size of this process now (Linux /proc; MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "w2s_mito_actin_small"), help="run folder to export")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4, help="posterior samples K per call")
    ap.add_argument("--size", type=int, default=128, help="input size (pixels, square)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="20 calls")
    args = ap.parse_args()
    calls = 20 if args.quick else args.calls

    import tifffile
    import torch

    from denoisplit_zoo.cli_predict import predict_files
    from denoisplit_zoo.export import export_package
    from denoisplit_zoo.package.writer import make_test_input
    from denoisplit_zoo.run_folder import load_run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        zip_path = tmp / "model.zip"
        export_package(args.model, zip_path, n_samples=args.samples, self_test=False)
        raw, _ = make_test_input(load_run(args.model), args.size)
        tifffile.imwrite(tmp / "img.tif", raw[0, 0])
        rss, seconds, first, identical = [], [], None, True
        for i in range(calls):
            t0 = time.perf_counter()
            written = predict_files(str(zip_path), [str(tmp / "img.tif")], tmp / "out", progress=False,
                                    device="cpu", overwrite=True)
            seconds.append(time.perf_counter() - t0)
            out = np.stack([tifffile.imread(p) for p in sorted(written) if "uncertainty" not in p.name])
            if first is None:
                first = out
            identical &= bool(np.array_equal(out, first))
            rss.append(rss_mib())
    head, tail = float(np.mean(rss[:10])), float(np.mean(rss[-10:]))
    res = {"calls": calls, "samples": args.samples, "size": args.size, "threads": args.threads,
           "rss_mib_first10": head, "rss_mib_last10": tail, "rss_growth_mib": tail - head,
           "rss_mib_max": float(np.max(rss)), "seconds_per_call_median": float(np.median(seconds)),
           "identical_outputs": identical, "rss_mib": rss, "seconds": seconds, "model": args.model,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "command": " ".join(sys.argv)}
    print("| calls | K | input | RSS first 10 (MiB) | RSS last 10 (MiB) | growth (MiB) | max (MiB) | s / call | "
          "outputs identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {calls} | {args.samples} | {args.size}² | {head:.1f} | {tail:.1f} | {tail - head:+.1f} | "
          f"{res['rss_mib_max']:.1f} | {res['seconds_per_call_median']:.3f} | {'yes' if identical else '**no**'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
