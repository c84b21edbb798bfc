"""Peak memory of an exported package's whole-image prediction, and of the documented `bioimageio predict` command.

Two questions, each configuration in a fresh worker process (its peak RSS, VmHWM, is its own):

1. What does running the K top-down passes in chunks inside the graph save? The package's module (built by this
   project's reader from the zip: no packaged code is imported) runs one image with `samples_per_pass` = K (one
   pass over all K samples, what packages before the chunking did) and with the packaged default, in eager PyTorch
   and as ONNX in onnxruntime (the file exported here from the same module).
   (at `--graph-size`, default 500x650: one pass over K = 16 at 1000 x 1300 would need more than this machine's
   24 GiB in eager PyTorch; memory is linear in the pixels, so KB / pixel carries over).
2. What do users pay with the README's command? `bioimageio predict ZIP --inputs image.tif --weight-format F`
   whole (F = onnx at every size, also the default pytorch_state_dict at the largest), and with `--blockwise N`
   (onnx, largest size), on float32 TIFFs, one CPU thread; the peak RSS of the `bioimageio` process.

    python benchmarks/bench_package_memory.py ZIP --json benchmarks/results/package_memory_cpu.json
    python benchmarks/bench_package_memory.py ZIP --quick   # smoke run: 200 x 300 and 100 x 100, no blocks
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402


def _image(h: int, w: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (h, w)).astype("float32")


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    from denoisplit_zoo.package.reader import load_package_sampler
    from denoisplit_zoo.package.writer import predict_raw, save_onnx

    torch.set_num_threads(spec["threads"])
    sampler, _, norm, _ = load_package_sampler(spec["zip"])
    if spec["passes"]:
        sampler.samples_per_pass = spec["passes"]
    h, w = spec["size"]
    raw = (norm.input_mean + norm.input_std * (_image(h, w) - 0.5) * 3.4)[None, None]
    base = C.peak_rss_mb()
    t0 = time.perf_counter()
    if spec["engine"] == "torch":
        out = predict_raw(sampler, raw, norm)
    else:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            save_onnx(sampler, path, torch.zeros(1, 1, 64, 64))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = spec["threads"]
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            x = ((raw - norm.input_mean) / norm.input_std).astype(np.float32)
            base = C.peak_rss_mb()
            t0 = time.perf_counter()
            out = sess.run(None, {"input": x})[0]
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": C.peak_rss_mb(), "before_run_mb": base,
            "finite": bool(np.isfinite(out).all()), "shape": list(out.shape)}


def bioimageio_predict(zip_path: str, tif: Path, out_dir: Path, blockwise, threads: int, fmt: str) -> dict:
    """The README's command in its own process; peak RSS from the children's rusage (this wrapper is small)."""
    cli = Path(sys.executable).with_name("bioimageio")
    cmd = [str(cli), "predict", zip_path, "--inputs", str(tif), "--outputs", str(out_dir / "{output_id}.tif"),
           "--weight-format", fmt]
    if blockwise is not None:
        cmd += ["--blockwise", str(blockwise)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out_dir)
    res = {"command": " ".join(["bioimageio", "predict", "ZIP", "--inputs", tif.name, *cmd[5:]]),
           "rc": p.returncode, "seconds": time.perf_counter() - t0}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["peak_rss_mb"] = peak / 1024.0 if peak > before else None  # ru_maxrss is the max over children so far
    outs = sorted(out_dir.glob("*.tif"))
    if p.returncode != 0 or not outs:
        res["error"] = ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1][:300]
    else:
        import tifffile

        res["output_shape"] = list(tifffile.imread(outs[0]).shape)
    return res


def cli_worker(spec: dict) -> dict:
    return bioimageio_predict(spec["zip"], Path(spec["tif"]), Path(spec["out"]), spec["blockwise"], spec["threads"],
                              spec["format"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zip", nargs="?")
    ap.add_argument("--sizes", nargs="+", default=["680x1100", "1000x1300"], help="HxW")
    ap.add_argument("--graph-size", default="500x650", help="HxW of the in-graph before / after rows")
    ap.add_argument("--blockwise", type=int, nargs="*", default=[511],
                    help="bioimageio predict --blockwise N values to measure on the largest size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-graph", action="store_true", help="only the bioimageio predict rows")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run: --sizes 200x300 --graph-size 100x100, no blocks")
    C.add_worker_option(ap)
    ap.add_argument("--cli-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if C.serve_worker(args, worker):
        return
    if args.cli_worker:
        print(json.dumps(cli_worker(json.loads(args.cli_worker))), flush=True)
        return
    if args.zip is None:
        ap.error("name the package zip")
    if args.quick:
        args.sizes, args.graph_size, args.blockwise = ["200x300"], "100x100", []
    import tifffile

    from denoisplit_zoo.package.reader import load_package_sampler

    sampler, _, norm, _ = load_package_sampler(args.zip)
    k, default_passes = int(sampler.n_samples), int(sampler.samples_per_pass)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    rows = []
    largest = max(sizes, key=lambda s: s[0] * s[1])
    gh, gw = (int(v) for v in args.graph_size.lower().split("x"))
    if not args.skip_graph:
        for engine in ("torch", "onnx"):
            for passes in sorted({k, default_passes, 1}, reverse=True):
                spec = {"zip": args.zip, "size": [gh, gw], "engine": engine, "passes": passes, "threads": args.threads}
                r = C.run_worker(__file__, spec)
                r.update(kind="graph", engine=engine, size=f"{gh}x{gw}", samples_per_pass=passes, k=k)
                if "peak_rss_mb" in r:
                    r["kb_per_pixel"] = 1024.0 * (r["peak_rss_mb"] - r["before_run_mb"]) / (gh * gw)
                print(json.dumps(r), flush=True)
                rows.append(r)
    with tempfile.TemporaryDirectory(prefix="bench-pkgmem-") as tmp:
        for h, w in sizes:
            tif = Path(tmp) / f"image_{h}x{w}.tif"
            raw = norm.input_mean + norm.input_std * (_image(h, w) - 0.5) * 3.4
            tifffile.imwrite(tif, raw.astype("float32"))
            modes = [("onnx", None)]
            if (h, w) == largest:
                modes += [("pytorch_state_dict", None)] + [("onnx", bw) for bw in args.blockwise]
            for fmt_, bw in modes:
                out = Path(tmp) / f"out_{h}x{w}_{fmt_}_{bw}"
                out.mkdir()
                spec = {"zip": str(Path(args.zip).resolve()), "tif": str(tif), "out": str(out), "blockwise": bw,
                        "threads": args.threads, "format": fmt_}
                cmd = [sys.executable, __file__, args.zip, "--cli-worker", json.dumps(spec)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                r = json.loads(lines[-1]) if lines else {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                r.update(kind="bioimageio predict", size=f"{h}x{w}", weight_format=fmt_, blockwise=bw, k=k)
                if r.get("peak_rss_mb"):
                    r["kb_per_pixel"] = 1024.0 * r["peak_rss_mb"] / (h * w)
                print(json.dumps(r), flush=True)
                rows.append(r)
                shutil.rmtree(out, ignore_errors=True)
    result = {"machine": C.machine_info(__import__("torch").device("cpu")), "zip": str(args.zip), "k": k,
              "default_samples_per_pass": default_passes, "threads": args.threads, "rows": rows}
    C.write_json(args.json, result)
    print(C.markdown_table([r for r in rows if r["kind"] == "graph"], [
        ("engine", "engine", 0), ("size", "size", 0), ("K", "k", 0), ("samples per pass", "samples_per_pass", 0),
        ("peak RSS MB", "peak_rss_mb", 0), ("KB / pixel", "kb_per_pixel", 1), ("s", "seconds", 1)]))
    print(C.markdown_table([r for r in rows if r["kind"] != "graph"], [
        ("size", "size", 0), ("--weight-format", "weight_format", 0), ("--blockwise", "blockwise", 0),
        ("rc", "rc", 0), ("peak RSS MB", "peak_rss_mb", 0), ("KB / pixel (incl. start-up)", "kb_per_pixel", 1),
        ("s", "seconds", 1), ("output", "output_shape", 0), ("error", "error", 0)]))


if __name__ == "__main__":
    main()
