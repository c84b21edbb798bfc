"""Training on several processes with torch.distributed: which process this is, and the few collective operations
training needs (docs/distributed.md).

Processes are started by torchrun (`torchrun --nproc-per-node N -m denoisplit_zoo train ...`, or
`denoisplit-zoo train --nproc N`, which runs torchrun's elastic agent), under SLURM through `srun torchrun ...`.
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is the single process of world size 1, for which
nothing here does anything (training then runs exactly the single-process code path).

Backends: NCCL on CUDA, gloo on the CPU. Nothing is pickled between processes: status and numbers travel as
tensors.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

# Seeds of rank r's torch RNG (latent draws, dropout) are seed + r * RANK_SEED_STRIDE; rank 0 keeps the seed
# itself, so world size 1 draws exactly what a single process draws.
RANK_SEED_STRIDE = 1_000_003
# How long a process waits at a collective for the others (rank 0 fitting noise models while the others wait
# is the longest wait by design: minutes). A failed process is killed by torchrun long before this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank (0 .. size-1), size, and its index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run folder, the log and the checkpoints, and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------------------------------ collectives
    # Every collective is a no-op at world size 1 (no process group exists then).

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is True on any (ranks must agree to stop, to skip a step, ...)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def from_main(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's numbers on every rank (decisions taken on them then agree to the bit)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return [float(v) for v in t.tolist()]

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """The mean over ranks of each number."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) / self.size for v in t.tolist()]

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor, in rank order (here: the RNG states a checkpoint keeps)."""
        if not self.distributed:
            return [t]
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        parts = [torch.empty_like(t, device=dev) for _ in range(self.size)]
        dist.all_gather(parts, t.to(dev))
        return [p.to(t.device) for p in parts]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) into every rank's module: the ranks' models are then
        identical, not only their parameters."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b.data, 0)

    def same_parameters(self, module: torch.nn.Module) -> bool:
        """Whether every rank holds bit-identical parameters (a checksum per parameter compared across ranks)."""
        if not self.distributed:
            return True
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).flatten()
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def world_from_env() -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; world size 1 without them."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process group")
    return World(rank, size, _env_int("LOCAL_RANK", 0))


@contextlib.contextmanager
def process_group(world: World, device: torch.device):
    """Join the process group for the duration (NCCL on CUDA, each rank on GPU LOCAL_RANK; gloo on the CPU) and
    yield the device this rank trains on. World size 1: no group, the device unchanged."""
    if not world.distributed:
        yield device
        return
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """`denoisplit-zoo train --nproc N`: run `python -m denoisplit_zoo <argv>` as N processes on this machine under
    torchrun's elastic agent (standalone rendezvous on a free local port, no restarts) and return the exit code:
    0, that of the first failed rank (rank 0 has printed the one-line reason; the agent stops the others), or
    128 + the signal that stopped the agent (SIGTERM, SIGINT: it stops the workers, which save nothing half-way).

    Threads: torchrun gives every worker OMP_NUM_THREADS=1 unless it is set; here each worker gets its share of
    this process's CPUs instead (at least 1), unless OMP_NUM_THREADS is set."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .runtime import allowed_cpus

    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(allowed_cpus()) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"denoisplit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    # the agent's loggers (each with its own level) print multi-line failure reports and signal notices: rank 0's
    # own line says what went wrong
    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
             if n.startswith("torch.distributed.elastic")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "denoisplit_zoo", *argv)
        return 0
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        first = next((f for r, f in failures if r == 0), failures[0][1])
        return int(first.exitcode) if first.exitcode and first.exitcode > 0 else 1
    except SignalException as e:  # SIGTERM / SIGINT: the agent has stopped the workers (rank 0 said so)
        return 128 + int(e.sigval)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
