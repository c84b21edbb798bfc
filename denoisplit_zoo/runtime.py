"""Where computations run: the device and the number of CPU threads, shared by training, calibration, evaluation,
prediction, export and the quickstart (one module below all of them, so none has to import another stage for it)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'; a one-line UserError when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# How long cpu_threads() watches the machine before choosing (seconds): long enough for a busy core to show as busy
# in /proc/stat's 10 ms ticks, short against any heavy command.
LOAD_SAMPLE_S = 0.2


def _cpu_ticks(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """/proc/stat: (idle + iowait, total) jiffies of each CPU in `cpus`; None where /proc/stat is unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *vals = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(vals) >= 5:
            v = [int(x) for x in vals[:8]]
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out or None


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM's binding)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cpu_threads(requested: int | str = "auto") -> int:
    """Intra-op threads for a heavy command: `requested` if a number, else ("auto") OMP_NUM_THREADS where the
    environment sets it, else the CPUs of this process's affinity mask that other processes leave idle, measured
    over LOAD_SAMPLE_S (at least 1).

    Why not simply the core count (torch's default): torch's threads meet at a barrier in every parallel region, so
    with one other busy process on a 2-core machine one of two threads is always descheduled and the other waits —
    a `small` training step went 0.55 s -> 4-8 s; with one thread per free core it costs one core's speed instead
    (benchmarks/bench_under_load.py, docs/threads.md). The choice is made once, at the start of the command."""
    if requested != "auto":
        return int(requested)
    launcher = os.environ.get("OMP_NUM_THREADS", "")
    if launcher.isdigit() and int(launcher) > 0:  # set by the user or a launcher (torchrun, SLURM scripts): theirs
        return int(launcher)
    cpus = allowed_cpus()
    before = _cpu_ticks(cpus)
    if before is None:
        return len(cpus)
    time.sleep(LOAD_SAMPLE_S)
    after = _cpu_ticks(cpus) or {}
    idle = 0.0
    for c, (i0, t0) in before.items():
        i1, t1 = after.get(c, (i0, t0))
        idle += (i1 - i0) / (t1 - t0) if t1 > t0 else 1.0
    return max(1, min(len(cpus), math.floor(idle + 0.5)))


def use_threads(requested: int | str = "auto") -> int:
    """Set torch's intra-op threads for this process (cpu_threads) and return the number. The CLI calls it for every
    heavy command; the Python API leaves torch's setting to the caller (a notebook may call this itself)."""
    n = cpu_threads(requested)
    torch.set_num_threads(n)
    return n
