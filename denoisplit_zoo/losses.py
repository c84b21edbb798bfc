"""Training objectives: denoiSplit (noise-model likelihood + image-size KL) and the uSplit baseline.

Both share the network, the data and the loop; they differ only in the two functions selected by `loss_terms`:

                 reconstruction                                      KL weight of level l (per-level sample sums)
    denoisplit   -mean log p_NM_c(noisy target_c | predicted clean_c)  1 / (H * W)          (summed over levels)
                 in raw intensity units, per-channel GMM
    usplit       Gaussian NLL with predicted log-variance,             1 / (L * C_l*H_l*W_l) (mean over levels of the
                 normalised target units                                                     per-element KL)

so uSplit weighs level l by (H * W) / (L * C_l * H_l * W_l) less than denoiSplit: the high-resolution levels,
which carry most latent elements, lose most (paper Eq. 3; reference notes section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .noise_model import GMMNoiseModel


def kl_level_weights(kind: str, latent_shapes: Sequence[Sequence[int]], image_pixels: int) -> list[float]:
    """Weight applied to each level's per-sample KL sum. latent_shapes: (C_l, H_l, W_l) per level;
    image_pixels: H * W of the training patch."""
    if kind == "denoisplit":
        return [1.0 / image_pixels for _ in latent_shapes]
    if kind == "usplit":
        n = len(latent_shapes)
        return [1.0 / (n * math.prod(s)) for s in latent_shapes]
    raise ValueError(f"unknown loss {kind!r}")


def kl_term(kls: Sequence[torch.Tensor], weights: Sequence[float], free_bits: float) -> torch.Tensor:
    """sum_l w_l * mean_b max(KL_{l,b}, free_bits). kls[l]: (B,) per-sample KL sums of level l (nats).
    denoiSplit clamps before the batch mean (free bits per sample and level); with uSplit's free_bits = 0 the
    clamp only keeps a negative one-sample MC estimate from rewarding the model."""
    return sum(w * kl.clamp(min=free_bits).mean() for w, kl in zip(weights, kls))


def noise_model_nll(pred_norm: torch.Tensor, target_raw: torch.Tensor, noise_models: Sequence[GMMNoiseModel],
                    target_mean: torch.Tensor, target_std: torch.Tensor) -> torch.Tensor:
    """Mean over channels and pixels of -log p_NM_c(target_c | signal_c).

    pred_norm (B, 2, H, W): the network's clean estimates in normalised target units; un-normalised with the
    per-channel target stats (target_mean/std: (2,)) to raw units, where the noise models live.
    target_raw (B, 2, H, W): the noisy targets in raw intensity units. Computed in fp32."""
    signal = pred_norm.float() * target_std.view(1, 2, 1, 1) + target_mean.view(1, 2, 1, 1)
    ll = [nm.log_prob(target_raw[:, c].float(), signal[:, c]) for c, nm in enumerate(noise_models)]
    return -torch.stack(ll, dim=1).mean()


def gaussian_nll(pred: torch.Tensor, target_raw: torch.Tensor, target_mean: torch.Tensor,
                 target_std: torch.Tensor) -> torch.Tensor:
    """uSplit likelihood: pred (B, 4, H, W) = two means and two log-variances (clamped >= -5 by the model), all in
    normalised target units; targets normalised with the per-channel stats. Mean over channels and pixels."""
    t = (target_raw.float() - target_mean.view(1, 2, 1, 1)) / target_std.view(1, 2, 1, 1)
    mu, lv = pred[:, :2].float(), pred[:, 2:].float()
    return (0.5 * ((t - mu) ** 2 / lv.exp() + lv + math.log(2 * math.pi))).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def loss_terms(kind: str, pred: torch.Tensor, kls: Sequence[torch.Tensor], target_raw: torch.Tensor, *,
               latent_shapes: Sequence[Sequence[int]], noise_models: Sequence[GMMNoiseModel] | None,
               target_mean: torch.Tensor, target_std: torch.Tensor, kl_weight: float = 1.0,
               free_bits: float = 1.0, kl_formulation: str | None = None) -> LossTerms:
    """The full objective for one batch. pred: the network head output (B, 2 or 4, H, W); kls: per-level (B,)
    KL sums; latent_shapes: (C_l, H_l, W_l) per level for this patch size. kl_formulation: the KL weighting
    ("denoisplit" / "usplit"), by default the loss's own."""
    if kind == "denoisplit":
        if noise_models is None:
            raise ValueError("the denoisplit loss needs the two noise models")
        rec = noise_model_nll(pred, target_raw, noise_models, target_mean, target_std)
    elif kind == "usplit":
        rec = gaussian_nll(pred, target_raw, target_mean, target_std)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    image_pixels = pred.shape[-2] * pred.shape[-1]
    kl = kl_term(kls, kl_level_weights(kl_formulation or kind, latent_shapes, image_pixels), free_bits)
    return LossTerms(rec + kl_weight * kl, rec.detach(), kl.detach())
