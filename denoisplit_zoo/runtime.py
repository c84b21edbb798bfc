"""Where computations run: the device choice shared by training, calibration, evaluation, prediction and the
quickstart (one module below all of them, so none has to import another stage for it)."""

from __future__ import annotations

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'; a one-line UserError when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
