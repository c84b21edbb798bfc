"""Training-step time of the `small` preset while another process keeps a CPU busy: torch's default threads vs one
thread per free core (what `--threads auto` chooses) vs OpenMP's passive wait policy.

The step is bench_training's worker (training.Trainer.step on synthetic batches, the product's CPU loop
`channels_last+heap`), run in a fresh process per configuration. Competitors, started a second before and killed
after each measurement, never pinned:
- `none`: nothing else runs;
- `spin`: one single-threaded Python busy loop (a package install, a compiler, a notebook cell);
- `torch`: a second torch process multiplying 512² matrices with torch's default threads (a second training).

Configurations of the measured process: `default` (torch's default: one thread per core of the affinity mask, what
every command used before `--threads`), `1 thread`, `default + OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep
instead of spinning) and `auto` (runtime.cpu_threads measured with the competitor running, as the CLI does at the
start of a command). Reported: seconds per step and the slowdown against `default` with no competitor.

    python benchmarks/bench_under_load.py --json benchmarks/results/under_load_cpu.json
    python benchmarks/bench_under_load.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
COMPETITORS = {
    "none": None,
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh_()",
}
CONFIGS = ("default", "1 thread", "default + passive wait", "auto")


def measure(config: str, competitor: str, args) -> dict:
    from denoisplit_zoo.runtime import allowed_cpus, cpu_threads

    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(k, None)
    comp = None
    if COMPETITORS[competitor]:
        comp = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], env=env)
        time.sleep(1.0)
    try:
        threads = {"default": len(allowed_cpus()), "1 thread": 1, "default + passive wait": len(allowed_cpus()),
                   "auto": cpu_threads("auto")}[config]
        if config == "default + passive wait":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        spec = {"preset": args.preset, "variant": "channels_last+heap", "device": "cpu", "threads": threads,
                "steps": args.steps, "warmup": args.warmup, "batch_size": None}
        p = subprocess.run([sys.executable, str(HERE / "bench_training.py"), "--worker", json.dumps(spec)],
                           capture_output=True, text=True, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
        r = json.loads(lines[-1])
        return {"threads": threads, "step_s": r["step_ms"] / 1000}
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--competitors", nargs="+", default=list(COMPETITORS), choices=list(COMPETITORS))
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 3 steps")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.steps, args.warmup = "tiny", 3, 1
    from denoisplit_zoo.runtime import allowed_cpus

    print(f"preset {args.preset}, {args.steps} steps after {args.warmup} warm-up, CPUs {sorted(allowed_cpus())}",
          flush=True)
    rows, alone = [], None
    for competitor in args.competitors:
        for config in CONFIGS:
            if competitor == "none" and config == "auto":
                continue  # auto == default when nothing else runs
            r = measure(config, competitor, args)
            row = {"competitor": competitor, "config": config, **r}
            if "error" not in r:
                if competitor == "none" and config == "default":
                    alone = r["step_s"]
                if alone:
                    row["slowdown"] = r["step_s"] / alone
            rows.append(row)
            print(f"  {competitor:6s} {config:24s} " + (str(r["error"]) if "error" in r else
                  f"{r['threads']} threads  {r['step_s']:.2f} s/step"), flush=True)
    print()
    print(C.markdown_table(rows, [("competitor", "competitor", 0), ("configuration", "config", 0),
                                  ("threads", "threads", 0), ("s / step", "step_s", 2),
                                  ("× alone", "slowdown", 2)]))
    C.write_json(args.json, {"benchmark": "under_load", "machine": C.machine_info(__import__("torch").device("cpu")),
                             "preset": args.preset, "steps": args.steps, "warmup": args.warmup,
                             "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": rows})


if __name__ == "__main__":
    main()
