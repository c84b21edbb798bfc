"""Experiment, not a product feature: `denoisplit-zoo train` with per-channel free bits (Kingma et al. 2016, IAF)
in place of the paper's 1 nat per sample and level, to test whether keeping latent channels open helps a run whose
latents have collapsed (benchmarks/latent_usage.py; docs/quality.md, "Longer pretraining does not close the gap").

    python benchmarks/free_bits_experiment.py LAMBDA -- train --data ... --init-from ... --out RUN

LAMBDA: nats per latent position. For each level and latent channel, the KL summed over positions and averaged over
the batch is floored at LAMBDA x positions; a channel below the floor pays the floor and gets no KL gradient (its
reconstruction gradient still flows), so the model may use it for free up to LAMBDA. The paper's per-level free
bits (train.free_bits) still apply on top and are inactive at these magnitudes. The run's validation loss is the
reconstruction NLL alone, so it stays comparable with runs on the paper's loss; its logged KL includes the floors.
"""

from __future__ import annotations

import sys

import torch

import denoisplit_zoo.model as model_module
from denoisplit_zoo.cli import main


def channel_free_bits_kl(lam: float):
    """A drop-in for model._mc_kl: (B,) per-sample KL sums with each channel's batch mean floored at lam x h x w."""

    def kl(z, eps, std_q, p_params):
        element = model_module.mc_kl_elements(z, eps, std_q, p_params)
        per_channel = element.sum(dim=(2, 3))  # (B, C) nats
        floor = lam * element.shape[2] * element.shape[3]
        open_ = per_channel.mean(0, keepdim=True) >= floor
        return torch.where(open_, per_channel, torch.full_like(per_channel, floor)).sum(1)

    return kl


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__.split("\n\n")[1].strip())
    model_module._mc_kl = channel_free_bits_kl(float(sys.argv[1]))
    sys.exit(main(sys.argv[3:]))
