"""GMM noise model p(noisy | signal) for one channel, in RAW intensity units (PPN2V / HDN / denoiSplit).

Six Gaussians whose means, variances and weights are cubic polynomials of the normalised signal
s_hat = (s - min_signal) / (max_signal - min_signal), clamped to [-1, 2] (no extrapolation beyond one range width):

    mu_k(s)    = sum_i W[k, i] s_hat^i                         re-centred so that sum_k alpha_k mu_k = s
    var_k(s)   = max(sum_i exp(W[K+k, i]) s_hat^i, min_sigma)   (min_sigma clamps the VARIANCE)
    alpha_k(s) = softmax_k(sum_i W[2K+k, i] s_hat^i)
    p(x | s)   = sum_k alpha_k N(x; mu_k, var_k) + 1e-10

log p is finite, with a finite gradient, for every finite observation and signal (tests/test_fuzz.py).
Stored as npz (`weight`, `min_signal`, `max_signal`, `min_sigma`, `n_gaussians`, `n_coeffs`), never pickle.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import NM_BATCH, NM_COEFFS, NM_GAUSSIANS, NM_ITERATIONS, NM_LR, NM_MIN_SIGMA
from .errors import UserError
from .fileio import read_npz, write_npz

_Z_MAX = 1e4  # |standardised residual| beyond which a component's density is 0 in any float format
_LOG_TOL = math.log(1e-10)  # the reference adds 1e-10 to the density; we add it in log space (same value, stable)


class GMMNoiseModel(nn.Module):
    """log p(noisy | signal), differentiable w.r.t. the signal; both arguments in raw intensity units.
    `min_sigma` (PPN2V's name, kept for its files) is a VARIANCE: each component's variance is clamped at >= it
    (raw units^2)."""

    def __init__(self, weight: torch.Tensor, min_signal: float, max_signal: float, min_sigma: float = NM_MIN_SIGMA):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] % 3:
            raise UserError(f"noise-model weight must be (3*n_gaussians, n_coeffs), got {tuple(weight.shape)}")
        if not max_signal > min_signal:
            raise UserError(f"noise-model signal range is empty ({min_signal} .. {max_signal})")
        self.n_gaussians = weight.shape[0] // 3
        self.n_coeffs = weight.shape[1]
        self.weight = nn.Parameter(weight.float().clone(), requires_grad=False)
        self.register_buffer("min_signal", torch.tensor(float(min_signal)))
        self.register_buffer("max_signal", torch.tensor(float(max_signal)))
        if not self.max_signal > self.min_signal:  # equal once rounded to float32
            raise UserError(f"noise-model signal range is empty in float32 ({min_signal} .. {max_signal})")
        self.min_sigma = float(min_sigma)

    @classmethod
    def init_for_range(cls, min_signal: float, max_signal: float, n_gaussians: int = NM_GAUSSIANS,
                       n_coeffs: int = NM_COEFFS, min_sigma: float = NM_MIN_SIGMA, seed: int = 0) -> "GMMNoiseModel":
        """Fresh model (PPN2V init: W ~ N(0, 1), linear variance coefficient = log of the signal range)."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(3 * n_gaussians, n_coeffs, generator=g)
        w[n_gaussians: 2 * n_gaussians, 1] = math.log(max(max_signal - min_signal, 1e-6))
        return cls(w, min_signal, max_signal, min_sigma)

    def _poly(self, rows: torch.Tensor, s_hat: torch.Tensor) -> torch.Tensor:
        """rows (K, P), s_hat (...) -> (K, ...) polynomial values."""
        powers = torch.stack([s_hat**i for i in range(self.n_coeffs)], dim=0)  # (P, ...)
        return torch.tensordot(rows, powers, dims=1)

    def components(self, signal: torch.Tensor):
        """signal (...) raw -> (mu, var, log_alpha), each (K, ...), raw units."""
        k = self.n_gaussians
        w = self.weight
        # The polynomials are fitted on [0, 1]; far outside it a cubic explodes (overflow -> NaN). Beyond one range
        # width on either side the component shapes are frozen at the boundary (the mixture mean still follows the
        # signal exactly, below): no effect on any signal the fit saw, finite for every finite signal.
        s_hat = ((signal - self.min_signal) / (self.max_signal - self.min_signal)).clamp(-1.0, 2.0)
        mu = self._poly(w[:k], s_hat)
        var = self._poly(torch.exp(w[k: 2 * k]), s_hat).clamp(min=self.min_sigma)
        log_alpha = torch.log_softmax(self._poly(w[2 * k:], s_hat), dim=0)
        mu = mu - (log_alpha.exp() * mu).sum(0, keepdim=True) + signal  # mixture mean == signal
        return mu, var, log_alpha

    def log_prob(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Element-wise log p(observation | signal) (broadcast shapes), raw units, always computed in fp32
        (squared residuals of raw intensities overflow fp16). Finite for any finite input: >= log(1e-10)."""
        observation = observation.float()
        signal = signal.float()
        mu, var, log_alpha = self.components(signal)
        # The residual is clamped to +-_Z_MAX standard deviations, where the density has long underflowed
        # (exp(-0.5 * 1e8) == 0), BEFORE dividing: value and gradient stay finite even when observation - mu
        # overflows float32 (the clamp's zero gradient never meets an inf).
        sd = var.sqrt()
        resid = torch.clamp(observation.unsqueeze(0) - mu, min=-_Z_MAX * sd, max=_Z_MAX * sd)
        log_n = -0.5 * (resid / sd) ** 2 - 0.5 * torch.log(2 * math.pi * var)
        lse = torch.logsumexp(log_alpha + log_n, dim=0)
        return torch.logaddexp(lse, torch.full_like(lse, _LOG_TOL))

    def moments(self, signal: torch.Tensor):
        """Mean and variance of p(. | signal) (raw units): what the noise model says a pixel of that signal does."""
        mu, var, log_alpha = self.components(signal)
        a = log_alpha.exp()
        mean = (a * mu).sum(0)
        return mean, (a * (var + mu**2)).sum(0) - mean**2

    # ---- persistence (npz, no pickle)

    def save(self, path) -> None:
        write_npz(path, weight=self.weight.detach().cpu().numpy(), min_signal=np.float32(self.min_signal),
                  max_signal=np.float32(self.max_signal), min_sigma=np.float32(self.min_sigma),
                  n_gaussians=np.int64(self.n_gaussians), n_coeffs=np.int64(self.n_coeffs))

    @classmethod
    def load(cls, path) -> "GMMNoiseModel":
        z = read_npz(path)
        key = "weight" if "weight" in z else "trained_weight"  # PPN2V / CAREamics files use trained_weight
        missing = [k for k in (key, "min_signal", "max_signal") if k not in z]
        if missing:
            raise UserError(f"{path}: not a noise model (missing {', '.join(missing)})")
        w = torch.from_numpy(np.asarray(z[key], dtype=np.float32))
        if not torch.isfinite(w).all():
            raise UserError(f"{path}: noise-model weights are not finite")
        return cls(w, float(np.ravel(z["min_signal"])[0]), float(np.ravel(z["max_signal"])[0]),
                   float(np.ravel(z.get("min_sigma", NM_MIN_SIGMA))[0]))

    def to_dict(self) -> dict:
        """Plain-JSON description (for the bioimage.io rdf config)."""
        return {"weight": self.weight.detach().cpu().tolist(), "min_signal": float(self.min_signal),
                "max_signal": float(self.max_signal), "min_sigma": self.min_sigma,
                "n_gaussians": self.n_gaussians, "n_coeffs": self.n_coeffs}


def fit_noise_model(signal: np.ndarray, observation: np.ndarray, n_gaussians: int = NM_GAUSSIANS,
                    n_coeffs: int = NM_COEFFS, min_sigma: float = NM_MIN_SIGMA, n_iterations: int = NM_ITERATIONS,
                    batch_size: int = NM_BATCH, lr: float = NM_LR, seed: int = 0, progress: bool = True,
                    device: str | torch.device = "cpu") -> GMMNoiseModel:
    """Fit a GMM noise model to (clean signal, noisy observation) pixel pairs, raw units (`min_sigma`: the
    components' minimum VARIANCE, raw units^2).

    Adam, `batch_size` random pairs per iteration, loss = mean -log p(x | s) (PPN2V recipe). The signal range is the
    min/max over both arrays (PPN2V). Returns the model after the final iteration."""
    s = np.asarray(signal, dtype=np.float32).ravel()
    x = np.asarray(observation, dtype=np.float32).ravel()
    if s.shape != x.shape:
        raise UserError(f"signal and observation differ in size ({s.size} vs {x.size} pixels)")
    if s.size < 16:
        raise UserError(f"too few pixel pairs to fit a noise model ({s.size})")
    if not (np.isfinite(s).all() and np.isfinite(x).all()):
        raise UserError("signal or observation contains NaN or inf")
    lo, hi = float(min(s.min(), x.min())), float(max(s.max(), x.max()))
    if hi <= lo:
        raise UserError("signal and observation are constant: nothing to fit")
    model = GMMNoiseModel.init_for_range(lo, hi, n_gaussians, n_coeffs, min_sigma, seed).to(device)
    model.weight.requires_grad_(True)
    opt = torch.optim.Adam([model.weight], lr=lr)
    st, xt = torch.from_numpy(s).to(device), torch.from_numpy(x).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    bs = min(batch_size, s.size)
    bar = tqdm(range(n_iterations), desc="noise model", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, s.size, (bs,), generator=g, device=device)
        loss = -model.log_prob(xt[idx], st[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(nll=f"{loss.item():.4f}")
    model.weight.requires_grad_(False)
    return model.cpu()


def pairs_from_frames(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repeated noisy frames of one field (T, Y, X) -> (signal, observation) pairs: the clean estimate is the
    average over frames, each frame an observation of it."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise UserError(f"need a stack of at least 2 noisy frames (T, Y, X), got shape {frames.shape}")
    mean = frames.mean(0, keepdims=True)
    return np.broadcast_to(mean, frames.shape).ravel(), frames.ravel()


def load_noise_models(folder: Path) -> list[GMMNoiseModel]:
    """The two per-channel models of a run folder (noise_models/ch0.npz, ch1.npz)."""
    return [GMMNoiseModel.load(Path(folder) / f"ch{c}.npz") for c in range(2)]
