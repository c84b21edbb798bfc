"""The normalisation contract between training, sampling and the exported package: statistics of the TRAIN split
in raw intensity units (RUN_DIR/normalization.json, and `config.denoisplit.normalization` of a package)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .errors import UserError


def _affine(x, mean, std, per_channel: bool, inverse: bool):
    """(x - mean) / std or its inverse, for numpy arrays or torch tensors; per-channel stats broadcast over dim -3."""
    if isinstance(x, torch.Tensor):
        x = x if x.is_floating_point() else x.float()
        m, s = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (mean, std))
    else:
        x = np.asarray(x)
        x = x if x.dtype.kind == "f" else x.astype(np.float32)
        m, s = (np.asarray(v, dtype=x.dtype) for v in (mean, std))
    if per_channel:
        if x.ndim < 3 or x.shape[-3] != len(mean):
            raise ValueError(f"expected (..., {len(mean)}, Y, X) targets, got shape {tuple(x.shape)}")
        m, s = m.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
    return x * s + m if inverse else (x - m) / s


@dataclass
class Normalization:
    """Statistics of the TRAIN split in raw units (stored as normalization.json in the run folder).

    input_*: of the model input = sum of the two noisy channels; target_*: per channel, of the noisy targets.
    """

    input_mean: float
    input_std: float
    target_mean: list[float]
    target_std: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Normalization":
        keys = {"input_mean", "input_std", "target_mean", "target_std"}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise UserError(f"normalization: expected keys {sorted(keys)}, got {got}")
        try:
            im, is_ = float(d["input_mean"]), float(d["input_std"])
            tm, ts = [float(v) for v in d["target_mean"]], [float(v) for v in d["target_std"]]
        except (TypeError, ValueError):
            raise UserError("normalization: values must be numbers (target_* lists of two numbers)") from None
        vals = [im, is_, *tm, *ts]
        if len(tm) != 2 or len(ts) != 2 or not np.isfinite(vals).all() or min(is_, *ts) <= 0:
            raise UserError(f"normalization: need finite values, positive stds and two target channels, got {d}")
        return cls(im, is_, tm, ts)

    def normalize_input(self, x):
        """Raw input (sum of the two channels) -> normalised; numpy or torch, any shape."""
        return _affine(x, self.input_mean, self.input_std, per_channel=False, inverse=False)

    def normalize_target(self, t):
        """Raw targets (..., 2, Y, X) -> normalised per channel."""
        return _affine(t, self.target_mean, self.target_std, per_channel=True, inverse=False)

    def denormalize_target(self, y):
        """Normalised predictions (..., 2, Y, X) -> raw units."""
        return _affine(y, self.target_mean, self.target_std, per_channel=True, inverse=True)
