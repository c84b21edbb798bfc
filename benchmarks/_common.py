"""Helpers shared by the benchmark scripts (not part of the product): machine description, measured fp32 matmul
rate, peak memory, markdown tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def set_threads(n: int | None) -> int:
    """Use n intra-op threads (None: leave torch's default). Returns the thread count in effect."""
    if n:
        torch.set_num_threads(int(n))
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_avg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        info["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    """Measured dense matmul rate (GFLOP/s) of an n x n x n product, best of `reps` after one warm-up, with the
    current thread count (and, on CUDA, the current TF32 settings)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of THIS process's address space so far (MB). Linux: VmHWM of /proc/self/status, not
    ru_maxrss, which survives execve: a worker started by a 3-GB parent would report the parent's 3 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(script: str, spec: dict, timeout: float | None = None) -> dict:
    """Run `python script --worker JSON` in a fresh process (so its peak RSS is this configuration's alone) and parse
    the last stdout line as JSON. Failures come back as {"error": ...}."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"worker rc={p.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def add_worker_option(ap) -> None:
    """The hidden `--worker JSON` option of scripts that run each configuration in a fresh process (run_worker)."""
    import argparse

    ap.add_argument("--worker", help=argparse.SUPPRESS)


def serve_worker(args, worker) -> bool:
    """If this process is a worker (`--worker JSON`), run `worker(spec)`, print its result as the last JSON line
    (what run_worker parses) and return True."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return True


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """columns: (header, key, digits)."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k), d) for _, k, d in columns) + " |")
    return "\n".join(out)


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(p)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
