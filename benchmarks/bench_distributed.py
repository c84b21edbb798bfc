"""Training throughput at world size 1 vs N (torch.distributed, gloo on the CPU / NCCL on CUDA): samples/s of
training.Trainer.step wrapped in DistributedDataParallel, on synthetic batches (bench_training's), each rank with
its own batch of the preset's size (effective batch N x batch_size).

Every world size runs as its own `torchrun --standalone --nproc-per-node N` job; `N = 1` is the single-process path
(no process group, no DDP: what training does at world size 1). Threads per rank: `--threads` (default: the CPUs
of this process's affinity mask divided by N, at least 1), so the N ranks together use the same cores as world
size 1 — on a 2-core CPU two ranks cannot be faster than one process with both cores; the point is the overhead.

    python benchmarks/bench_distributed.py --preset small --nprocs 1 2 --json benchmarks/results/distributed_cpu.json
    python benchmarks/bench_distributed.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402
from bench_training import preset_dims, synthetic_batches  # noqa: E402


def worker(spec: dict) -> None:
    """One rank (started by torchrun): warm-up + timed steps; rank 0 prints the JSON line."""
    import torch

    from denoisplit_zoo.config import build_run_config
    from denoisplit_zoo.distributed import process_group, world_from_env
    from denoisplit_zoo.noise_model import GMMNoiseModel
    from denoisplit_zoo.normalization import Normalization
    from denoisplit_zoo.training import Trainer

    torch.set_num_threads(spec["threads"])
    world = world_from_env()
    with process_group(world, torch.device(spec["device"])) as device:
        (_, _, _, _), (patch, batch) = preset_dims(spec["preset"])
        cfg = build_run_config(spec["preset"], {"data": {"path": "synthetic.npz"}, "train": {"kl_warmup_steps": 0}})
        nms = [GMMNoiseModel.init_for_range(0.0, 255.0, seed=c).to(device) for c in range(2)]
        norm = Normalization(200.0, 40.0, [100.0, 100.0], [50.0, 50.0])
        torch.manual_seed(0)
        trainer = Trainer(cfg, norm, nms, device, world=world).to_device().distribute()
        batches = synthetic_batches(4, batch, patch, device, seed=world.rank)
        fmt = trainer.fmt
        batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]
        from denoisplit_zoo.allocator import heap_allocations

        with heap_allocations(device.type == "cpu"):
            for i in range(spec["warmup"]):
                trainer.step(*batches[i % 4])
            world.barrier()
            C.sync(device)
            t0 = time.perf_counter()
            for i in range(spec["steps"]):
                trainer.step(*batches[i % 4])
            C.sync(device)
            secs = time.perf_counter() - t0
        same = world.same_parameters(trainer.model)
        if world.main:
            print(json.dumps({"seconds": secs, "step_s": secs / spec["steps"], "batch_per_rank": batch,
                              "samples_s": spec["steps"] * batch * world.size / secs, "identical_weights": same}),
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads per rank (default: CPUs / N)")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 3 steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.preset, args.steps, args.warmup = "tiny", 3, 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = []
    for n in args.nprocs:
        threads = args.threads or max(1, cpus // n)
        spec = {"preset": args.preset, "device": args.device, "steps": args.steps, "warmup": args.warmup,
                "threads": threads}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        r = json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": p.stderr.strip()[-300:]}
        row = {"world_size": n, "threads_per_rank": threads, **r}
        if rows and "samples_s" in r and "samples_s" in rows[0]:
            row["vs_world_1"] = r["samples_s"] / rows[0]["samples_s"]
        rows.append(row)
        print(f"  world size {n}: " + (r["error"] if "error" in r else
              f"{r['samples_s']:.1f} samples/s, {r['step_s']:.2f} s/step, identical weights {r['identical_weights']}"),
              flush=True)
    print(C.markdown_table(rows, [("world size", "world_size", 0), ("threads / rank", "threads_per_rank", 0),
                                  ("batch / rank", "batch_per_rank", 0), ("s / step", "step_s", 2),
                                  ("samples / s", "samples_s", 1), ("× world 1", "vs_world_1", 2),
                                  ("identical weights", "identical_weights", 0)]))
    import torch

    C.write_json(args.json, {"benchmark": "distributed", "machine": C.machine_info(torch.device(args.device)),
                             "preset": args.preset, "steps": args.steps, "warmup": args.warmup,
                             "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": rows})


if __name__ == "__main__":
    main()
