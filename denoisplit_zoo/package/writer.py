"""What goes into a package besides its description: the exported module and its three weight formats, and the test
tensors bioimageio.core checks them against.

The exported module is `model.SplitSampler` (normalised input (B, 1, Y, X) -> (B, 4, Y, X) = MMSE A, MMSE B,
calibrated std A, std B in normalised target units; latent noise from a counter-based hash with a stored seed), so
the three weight formats compute the same numbers:

  weights.pt              pytorch_state_dict of SplitSampler (architecture: model.py shipped verbatim; the parent)
  weights_torchscript.pt  torch.jit.script of the same module
  weights.onnx            legacy exporter, opset 17 -> IR 8 (what deepImageJ's onnxruntime-java loads), dynamic b/y/x
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data import prepare_data
from ..errors import UserError
from ..model import SplitSampler
from ..run_folder import resolve_data_path
from .layout import (INPUT_NAME, MAX_ONNX_IR, ONNX_OPSET, OUTPUT_NAME, PACKAGE_SAMPLES, PACKAGE_SEED,
                     postprocessing_gain_offset)

# ---------------------------------------------------------------------------------------------------- the module
def architecture_kwargs(run, n_samples: int, seed: int, sample_latents: bool = True) -> dict:
    """SplitSampler(**kwargs) for `run` (a run_folder.Run): what the package's pytorch_state_dict entry declares."""
    m, cfg = run.config.model, run.config
    return dict(n_levels=m.n_levels, z_dim=m.z_dim, n_filters=m.n_filters, dropout=m.dropout,
                out_channels=m.out_channels, patch_size=cfg.train.patch_size, n_samples=int(n_samples),
                seed=int(seed), sample_latents=bool(sample_latents), n_gaussians=cfg.noise_model.n_gaussians,
                n_coeffs=cfg.noise_model.n_coeffs)


def export_sampler(run, n_samples: int = PACKAGE_SAMPLES, seed: int = PACKAGE_SEED,
                   sample_latents: bool = True) -> SplitSampler:
    """The module the package ships, built from `architecture_kwargs` (so the declared kwargs are proven to rebuild
    it: strict load of the run's sampler state) with every buffer filled. Eval mode."""
    if n_samples < 1:
        raise UserError(f"--samples must be >= 1, got {n_samples}")
    if not 0 <= seed < 2**31:
        raise UserError(f"seed must be in [0, 2**31), got {seed}")
    sampler = SplitSampler(**architecture_kwargs(run, n_samples, seed, sample_latents))
    sampler.load_state_dict(run.sampler(n_samples, seed, sample_latents).state_dict(), strict=True)
    return sampler.eval()


def package_halo(run) -> int:
    """Output halo (pixels) declared in the package: the run's measured effective receptive field (Run.halo)
    rounded up to a multiple of 2**n_levels, so blocks whose size is a multiple of 2**n_levels start on the network's
    down-sampling grid (bioimageio.core steps blocks by block size - 2 * halo)."""
    step = 2**run.config.model.n_levels
    return -(-int(run.halo) // step) * step


# Side of the input on which export measures the module's tensor memory: a multiple of every grid (2**n_levels <= 256).
MEMORY_PROBE_SIZE = 256


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block. Why: the profiler's C++ side (kineto, torch 2.13) writes two
    "USDT ... profiler_start / profiler_stop" lines to fd 2 on every use, past Python's sys.stderr, and no setting
    turns them off; `export`'s output should not carry them. Python exceptions still propagate normally."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes_per_pixel(sampler: SplitSampler, size: int = MEMORY_PROBE_SIZE) -> float:
    """Peak bytes of tensors per input pixel of one eager forward pass (what the state-dict and TorchScript weights
    hold at most), from torch.profiler's allocation records on a (1, 1, size, size) input. The K samples run
    `samples_per_pass` at a time, so two passes show the peak of any K (one pass, plus the running sums); measured
    this way 0.92 KB / px for the quickstart's `small` package, and 13.4 with all 16 samples in one pass (the
    process's peak RSS in benchmarks/bench_package_memory.py: 1.6 and 14.0)."""
    from torch.profiler import ProfilerActivity, profile

    k = sampler.n_samples
    sampler.n_samples = min(k, 2 * sampler.samples_per_pass)
    x = torch.zeros(1, 1, size, size)
    try:
        with _native_stderr_silenced(), torch.no_grad(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sampler(x)
    finally:
        sampler.n_samples = k
    now = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += e.self_cpu_memory_usage  # allocations and frees (negative) in the op that made them
        peak = max(peak, now)
    return peak / float(size * size)


# ------------------------------------------------------------------------------------------------------ weights
def save_state_dict(sampler: SplitSampler, path: Path) -> None:
    """Plain tensors only (loadable with torch.load(weights_only=True))."""
    state = {k: v.detach().cpu().contiguous() for k, v in sampler.state_dict().items()}
    torch.save(state, path)


def save_torchscript(sampler: SplitSampler, path: Path) -> None:
    """torch.jit.script (not trace: the sample loop and padding depend on the input shape), then prove that a plain
    torch.jit.load reads the archive back."""
    scripted = torch.jit.script(sampler)
    scripted.save(str(path))
    torch.jit.load(str(path), map_location="cpu")


def save_onnx(sampler: SplitSampler, path: Path, example: torch.Tensor) -> None:
    """Legacy exporter (dynamo=False): the default dynamo exporter writes IR 10 / opset >= 18, which
    onnxruntime-java in deepImageJ cannot load. Batch, y and x are dynamic."""
    dyn = {0: "b", 2: "y", 3: "x"}
    with torch.no_grad():
        torch.onnx.export(sampler, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAME: dyn}, do_constant_folding=True)


def onnx_facts(path: Path) -> dict:
    """IR version, default-domain opset and tensor names of an ONNX file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    inits = {i.name for i in m.graph.initializer}
    return {"ir_version": int(m.ir_version), "opset": int(opset),
            "inputs": [i.name for i in m.graph.input if i.name not in inits],
            "outputs": [o.name for o in m.graph.output]}


def check_onnx(path: Path) -> dict:
    """Refuse an ONNX file deepImageJ/ilastik could not use: IR > 8, opset > 17, not exactly one input and output."""
    f = onnx_facts(path)
    if f["ir_version"] > MAX_ONNX_IR or f["opset"] > ONNX_OPSET:
        raise UserError(f"ONNX export has IR {f['ir_version']} / opset {f['opset']}; need IR <= {MAX_ONNX_IR}, "
                        f"opset <= {ONNX_OPSET}")
    if f["inputs"] != [INPUT_NAME] or f["outputs"] != [OUTPUT_NAME]:
        raise UserError(f"ONNX export has inputs {f['inputs']} / outputs {f['outputs']}; need one of each")
    return f


# ------------------------------------------------------------------------------------------------- test tensors
def _synthetic_input(size: int, mean: float, std: float) -> np.ndarray:
    """Deterministic (size, size) raw-unit image (blobs + lines at the training input's mean/std)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    img = np.zeros((size, size))
    for _ in range(max(4, size * size // 800)):
        cy, cx = rng.uniform(0, size, 2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
    for _ in range(5):
        th, c = rng.uniform(0, np.pi), rng.uniform(0, size)
        img += 0.7 * np.exp(-((np.cos(th) * xx + np.sin(th) * yy - c) ** 2) / (2 * 1.5**2))
    img = (img - img.mean()) / (img.std() + 1e-12)
    return (mean + std * img).astype(np.float32)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or symmetric-pad a 2D image to (size, size)."""
    out = img
    for ax in (0, 1):
        n = out.shape[ax]
        if n >= size:
            start = (n - size) // 2
            out = out.take(range(start, start + size), axis=ax)
        else:
            before = (size - n) // 2
            pad = [(0, 0), (0, 0)]
            pad[ax] = (before, size - n - before)
            out = np.pad(out, pad, mode="symmetric")
    return out


def make_test_input(run, size: int) -> tuple[np.ndarray, str]:
    """(1, 1, size, size) float32 raw input and where it came from: a crop of the run's first test image when the
    training data is still readable (nicer cover, realistic test), else a deterministic synthetic image."""
    try:  # a relative data path was relative to where `train` ran: resolve_data_path also tries the run folder
        cfg = run.config.data.model_copy(update={"path": resolve_data_path(run, None)})
        prepared = prepare_data(cfg, run.config.train.patch_size)
        img, where = prepared.test.inputs[0], f"test image 0 of {Path(cfg.path).name}"
    except (UserError, OSError, ValueError, IndexError):
        img = _synthetic_input(size, run.norm.input_mean, run.norm.input_std)
        where = "synthetic blobs and lines at the training input's mean/std"
    fitted = _fit(np.asarray(img, dtype=np.float32), size)
    if img.shape != (size, size):
        where += f" (centre crop / symmetric padding from {img.shape[0]}x{img.shape[1]} to {size}x{size})"
    return fitted[None, None].astype(np.float32), where


# bioimageio.core's fixed_zero_mean_unit_variance divides by (std + eps); mirrored so test outputs match it exactly.
_ZMUV_EPS = 1e-6


def predict_raw(sampler: SplitSampler, raw: np.ndarray, norm) -> np.ndarray:
    """What the package computes: raw (B, 1, Y, X) -> preprocessing -> module -> postprocessing -> raw (B, 4, Y, X)."""
    x = (raw.astype(np.float32) - np.float32(norm.input_mean)) / np.float32(norm.input_std + _ZMUV_EPS)
    with torch.no_grad():
        y = sampler(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    gain, offset = postprocessing_gain_offset(norm)
    g = np.asarray(gain, np.float32).reshape(1, -1, 1, 1)
    o = np.asarray(offset, np.float32).reshape(1, -1, 1, 1)
    return (y * g + o).astype(np.float32)
