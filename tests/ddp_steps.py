"""Worker of tests/test_distributed.py, started by torchrun (`python -m torch.distributed.run --nproc-per-node 2
-m tests.ddp_steps OUT`): Trainer.step on 2 gloo ranks with different batches; writes OUT/rank<r>.json with, after
every step, whether the ranks' parameters are bit-identical (distributed.World.same_parameters)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from denoisplit_zoo.config import build_run_config
from denoisplit_zoo.distributed import process_group, world_from_env
from denoisplit_zoo.noise_model import GMMNoiseModel
from denoisplit_zoo.normalization import Normalization
from denoisplit_zoo.training import Trainer


def batch(rank: int, step: int, poison: bool = False):
    g = torch.Generator().manual_seed(1000 * rank + step)
    clean = torch.nn.functional.avg_pool2d(torch.rand(4, 2, 32, 32, generator=g), 5, 1, 2) * 200
    noisy = clean + torch.randn(clean.shape, generator=g) * 10
    if poison:
        noisy[0, 0, 0, 0] = float("nan")
    return ((noisy.sum(1, keepdim=True) - 200.0) / 40.0), noisy


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = world_from_env()
    with process_group(world, torch.device("cpu")) as device:
        cfg = build_run_config("tiny", {"data": {"path": "synthetic.npz"}, "train": {"kl_warmup_steps": 0}})
        nms = [GMMNoiseModel.init_for_range(0.0, 255.0, seed=c) for c in range(2)]
        norm = Normalization(200.0, 40.0, [100.0, 100.0], [50.0, 50.0])
        torch.manual_seed(world.rank)  # different initial weights per rank: DDP must start them from rank 0's
        trainer = Trainer(cfg, norm, nms, device, world=world).to_device()
        before_ddp = world.same_parameters(trainer.model)  # False: the check can fail
        trainer.distribute()
        same, losses = [], []
        for step in range(6):
            losses.append(float(trainer.step(*batch(world.rank, step)).total.detach()))
            same.append(world.same_parameters(trainer.model))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        # a non-finite loss on rank 1 alone: every rank must skip the update (else DDP's backward would hang)
        trainer.step(*batch(world.rank, 99, poison=world.rank == 1))
        skipped = all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        same.append(world.same_parameters(trainer.model))
        (out / f"rank{world.rank}.json").write_text(json.dumps(
            {"before_ddp": before_ddp, "same": same, "losses": losses, "skipped_together": skipped, "step": trainer.state.step}))
        trainer.undistribute()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
