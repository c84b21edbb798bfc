"""Posterior sampling, whole-image prediction by tiles, and the measured halo.

Everything runs through `model.SplitSampler` (the module the exported package runs), so a run folder and its
exported zip give the same numbers for the same K and seed:

- `sample_tile`: bottom-up ONCE per tile, the K top-down passes in chunks of `chunk` samples (bounded memory). The
  latent noise of each chunk is the matching slice of the counter-based noise `SplitSampler` draws for all K at once,
  so chunking is invisible: same numbers as `sampler(x)`.
- `predict_blocks`: any image size (also smaller than a patch, or 1 px): reflect padding by the halo, large tiles whose
  origins sit on the network's 2**n_levels grid, only each tile's centre kept (every pixel computed once), handed
  to a sink; it reads only the tiles, so a zarr array larger than memory works too. `predict_image`: the same into
  numpy arrays.
- `measure_halo`: the network's measured effective receptive field radius (the halo tiles need).

Units: `sample_tile` works in NORMALISED units (input normalised with the training input stats, outputs in per-channel
normalised target units); `predict_image` takes and returns RAW units.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .allocator import heap_allocations
from .config import DEFAULT_TILE
from .errors import UserError
from .model import LadderVAE, SplitSampler

# --------------------------------------------------------------------------------------------------------- the halo

# Tile seams of at most ~3.3e-4 of the output maximum (measured below): 12x under 8-bit quantisation, far under the
# Monte-Carlo error of the MMSE and the model's own error, for 1.3-1.6x fewer FLOPs than 1e-6 at 512-px tiles.
HALO_TOLERANCE = 1e-3


def _grad_map(model: LadderVAE, size: int, seed: int) -> np.ndarray:
    """|d out / d input| (size, size), float64, for the central 2**n_levels block of both output channels.

    Posterior means (eps = 0) and eval mode: the deterministic part of the network. The cotangent is a fixed random
    +-1 pattern over the block and both channels, so every sub-pixel phase of the stride-2 grid is probed in one
    backward pass (a cancellation that hides a whole tail is practically impossible with random signs)."""
    m = model.multiple
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same probe on every device
    x = torch.randn(1, 1, size, size, generator=g).to(device).requires_grad_(True)  # typical normalised input
    bu = model.bottom_up(x)
    eps = [torch.zeros(1, model.z_dim, v.shape[2], v.shape[3], device=device) for v in bu]
    out, _ = model.top_down(bu, eps, False)
    c0 = size // 2 - m // 2
    cot = torch.zeros_like(out[:, :2])
    signs = torch.randint(0, 2, (2, m, m), generator=g).float() * 2 - 1
    cot[0, :, c0:c0 + m, c0:c0 + m] = signs.to(device)
    (grad,) = torch.autograd.grad(out[:, :2], x, cot)
    return grad[0, 0].abs().double().cpu().numpy()


def _tail_mass(grad: np.ndarray, m: int) -> tuple[np.ndarray, float]:
    """(tail, total): tail[d] = sum of |grad| farther than d pixels (Chebyshev distance) from the central m x m
    block, total = sum of |grad|."""
    size = grad.shape[0]
    c0 = size // 2 - m // 2
    idx = np.arange(size)
    dist1 = np.maximum(np.maximum(c0 - idx, idx - (c0 + m - 1)), 0)
    dist = np.maximum(dist1[:, None], dist1[None, :])
    mass = np.bincount(dist.ravel(), grad.ravel())
    total = float(grad.sum())
    return total - np.cumsum(mass), total


def measure_halo(model: LadderVAE, size: int | None = None, tolerance: float = HALO_TOLERANCE,
                 max_size: int = 2048, seed: int = 0) -> int:
    """The network's measured effective receptive-field radius in input pixels, rounded UP to a multiple of
    2**n_levels: the halo each side of a tile needs so that tiled and untiled predictions agree (<= 1e-3 relative).

    Criterion: take the gradient of the central 2**n_levels x 2**n_levels output block (both channels, posterior
    means, eval mode, a random-normal input) with respect to the input; the radius r is the smallest Chebyshev
    distance from that block such that all |gradient| farther than r is at most `tolerance` (1e-3) of the total.
    The measurement input starts at `size` (default 16 * 2**n_levels, at least 256) and doubles (up to `max_size`)
    while more than `tolerance` of the gradient still lies in the outermost 2**n_levels pixels, i.e. until the
    input is large enough that the (decaying) tail is not cut off. The theoretical receptive field is much larger
    (every 3x3 conv at every level adds to it) but its outer part carries a negligible weight.

    Why 1e-3 (it was 1e-6): the halo is most of a tile's cost (a 512-px tile with a 176-px halo is fed as 864 px).
    Trained W2S models (posterior means, 128-px tiles vs one tile; benchmarks/bench_cpu_paths.py): small denoiSplit
    176 -> 96 px, max seam error 3.0e-4 of the output maximum (rms 1.7e-4 of its std); paper denoiSplit
    176 -> 128 px, 2.2e-4; small uSplit 128 -> 48 px, 3.3e-4. At 1e-6 the seams were <= 6e-7; the 1e-3 seams are
    still 12x below 8-bit quantisation and far below the Monte-Carlo error of K = 50 samples.
    Random-weight values: tiny 40 px, small 48, paper 48 (at 1e-6: 56 / 112 / 112); 0.2-2 s on one CPU thread.

    The model's train/eval mode is restored afterwards; parameter gradients are not touched.
    """
    m = model.multiple
    size = int(size) if size else max(256, 16 * m)
    size = -(-size // m) * m
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            while True:
                tail, total = _tail_mass(_grad_map(model, size, seed), m)
                if not total > 0:  # a dead network (all-zero gradient): nothing to cover
                    return m
                inside = tail <= tolerance * total
                radius = int(np.argmax(inside)) if inside.any() else tail.size
                outer = tail[max(0, tail.size - 1 - m)]  # mass in the outermost m pixels of the measurement input
                if outer <= tolerance * total or size * 2 > max_size:
                    break
                size *= 2
    finally:
        model.train(was_training)
    return max(m, -(-radius // m) * m)


# ---------------------------------------------------------------------------------------------- sampling one tile

def auto_chunk(sampler: SplitSampler, height: int, width: int, budget_bytes: Optional[float] = None) -> int:
    """Samples per top-down batch so that the activations of one chunk stay near `budget_bytes` (default: 1.5 GB
    on the CPU, 40 % of the free memory on a GPU). Rough, deliberately high estimate per sample: ~12 float32 feature
    maps of n_filters channels plus a latent map, at the tile's full resolution."""
    vae = sampler.vae
    if budget_bytes is None:
        device = next(vae.parameters()).device
        budget_bytes = 1.5e9
        if device.type == "cuda":
            budget_bytes = 0.4 * torch.cuda.mem_get_info(device)[0]
    c = vae.first[0].out_channels
    per_sample = 4.0 * height * width * (12 * c + vae.z_dim)
    return int(max(1, min(sampler.n_samples, budget_bytes // per_sample)))


@torch.no_grad()
def sample_tile(sampler: SplitSampler, x_norm: torch.Tensor, chunk: Optional[int] = None,
                return_samples: bool = False, on_chunk: Optional[Callable[[int], None]] = None):
    """Posterior sampling of one batch of tiles, NORMALISED units.

    x_norm (B, 1, Y, X) normalised input -> (mean (B, 2, Y, X), std (B, 2, Y, X), samples (K, B, 2, Y, X) or None).
    mean = MMSE estimate, std = unbiased sample std times the sampler's calibration scale (zeros for K = 1): exactly
    what `sampler(x_norm)` returns, but the K top-down passes run `chunk` samples at a time (default: `auto_chunk`).
    The bottom-up pass runs once. Mean and variance accumulate in float64 (sums of x and x**2) so no chunk has to
    keep the others' samples. `on_chunk(n)` is called after each chunk of n samples (progress bars).
    """
    vae = sampler.vae
    k = int(sampler.n_samples)
    xp, box = vae.pad(x_norm)
    chunk = int(chunk) if chunk else auto_chunk(sampler, xp.shape[-2], xp.shape[-1])
    chunk = max(1, min(chunk, k))
    bu = vae.bottom_up(xp)
    s1 = s2 = None
    kept = []
    for k0 in range(0, k, chunk):
        n = min(chunk, k - k0)
        s = sampler.chunk(bu, box, k0, n)  # the slice of the latent noise all K would get: chunking is invisible
        if return_samples:
            kept.append(s)
        sd = s.double()
        s1 = sd.sum(0) if s1 is None else s1 + sd.sum(0)
        s2 = (sd * sd).sum(0) if s2 is None else s2 + (sd * sd).sum(0)
        if on_chunk is not None:
            on_chunk(n)
    mean = s1 / k
    if k > 1:
        std = ((s2 - s1 * mean) / (k - 1)).clamp(min=0).sqrt()
    else:
        std = torch.zeros_like(mean)
    std = std * sampler.calibration_scale.view(1, 2, 1, 1).double()
    samples = torch.cat(kept, 0) if return_samples else None
    return mean.to(x_norm.dtype), std.to(x_norm.dtype), samples


# ------------------------------------------------------------------------------------------ whole-image prediction

@contextmanager
def cpu_channels_last(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with NHWC (channels_last) parameters while on the CPU, then restore its memory format.

    Why: oneDNN's NHWC convolutions and the elementwise ops between them make posterior sampling 1.29-1.80x faster
    on the CPU (tiny / small / paper widths and three trained W2S runs; benchmarks/bench_cpu_paths.py); the
    arithmetic is the same up to float round-off (<= 2e-6 absolute). CUDA is left as it is (not measured there).
    A model that is already NHWC (training on the CPU) is left alone."""
    # a weight with one input channel is 'contiguous' in both formats: judge by the others
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    convert = any(p.device.type == "cpu" and not p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer coordinates onto [0, n) by mirror reflection without repeating the edge pixel (numpy's
    'reflect'), repeated as often as needed, so padding may exceed the image size; n = 1 maps everything to 0."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    j = np.mod(idx, period)
    return np.where(j >= n, period - j, j)


def tile_core(tile: int, m: int) -> int:
    """The centre kept from each tile: `tile` rounded down to a multiple of m (the network's 2**n_levels), >= m."""
    return max(m, (int(tile) // m) * m)


def _tile_layout(length: int, tile: int, m: int) -> tuple[int, int]:
    """(core, count): the centre kept from each tile (tile_core, at most the image rounded up to the grid) and the
    number of tiles."""
    core = tile_core(tile, m)
    core = min(core, -(-length // m) * m)  # a small image is one tile, rounded up to the grid
    return core, -(-length // core)


# Receives each tile's kept centre: (image slices (Y, X), mean (2, ey, ex), std (2, ey, ex), samples (K, 2, ey, ex) or
# None), raw units.
BlockSink = Callable[[tuple[slice, slice], np.ndarray, np.ndarray, Optional[np.ndarray]], None]


def predict_blocks(sampler: SplitSampler, source, norm, put: BlockSink, tile: int = DEFAULT_TILE,
                   halo: Optional[int] = None, chunk: Optional[int] = None, progress: bool = False,
                   return_samples: bool = False, desc: str = "samples x tiles") -> dict:
    """The tiled posterior loop over a 2-D RAW image `source` (Y, X): a numpy array, or any array sliced like one
    (a zarr array, a memory map) of which only each tile and its halo are read, so memory is bounded by the tile,
    not the image. Each tile's kept centre goes to `put` in raw units (see BlockSink). Returns dict(tiles, halo).

    Tiling: the image is reflect-padded by `halo` (default: `measure_halo(sampler.vae)`) on every side (repeated
    reflection for images smaller than the halo; edge for a 1-px axis). Tiles of `tile` (rounded down to a multiple
    of 2**n_levels) + 2 * halo pixels start on multiples of 2**n_levels of the padded frame, so every tile sees the
    same stride-2 grid as one big tile would; only each tile's centre is kept, so every pixel is computed once.
    Tiles are gathered on the fly (no padded copy of the image)."""
    if len(source.shape) != 2 or min(source.shape) < 1:
        raise UserError(f"expected a 2-D image (Y, X), got shape {tuple(source.shape)}")
    vae = sampler.vae
    m = vae.multiple
    if halo is None:
        halo = measure_halo(vae)
    halo = -(-int(halo) // m) * m
    h, w = (int(v) for v in source.shape)
    cy, ny = _tile_layout(h, tile, m)
    cx, nx = _tile_layout(w, tile, m)
    k = int(sampler.n_samples)
    device = next(vae.parameters()).device
    tm = np.asarray(norm.target_mean, np.float32).reshape(2, 1, 1)
    ts = np.asarray(norm.target_std, np.float32).reshape(2, 1, 1)
    chunk = int(chunk) if chunk else auto_chunk(sampler, cy + 2 * halo, cx + 2 * halo)
    bar = tqdm(total=ny * nx * k, desc=desc, unit="pass", disable=not progress or ny * nx * k < 4, leave=False)
    # NHWC and heap-reused activations on the CPU: together 1.3-2.25x faster sampling, same numbers
    # (benchmarks/bench_cpu_paths.py; allocator.py)
    with cpu_channels_last(vae), heap_allocations(device.type == "cpu"):
        for i in range(ny):
            for j in range(nx):
                y0, x0 = i * cy, j * cx  # image coordinates of the kept centre; the tile starts halo earlier
                rows = reflect_index(np.arange(y0 - halo, y0 + cy + halo), h)
                cols = reflect_index(np.arange(x0 - halo, x0 + cx + halo), w)
                # one rectangular read covering the tile (reflected rows / columns lie inside it)
                r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
                window = np.asarray(source[r0:r1, c0:c1], dtype=np.float32)
                raw = window[np.ix_(rows - r0, cols - c0)]
                if not np.isfinite(raw).all():
                    raise UserError("image contains NaN or inf")
                t = torch.from_numpy(np.ascontiguousarray(norm.normalize_input(raw).astype(np.float32)))
                mu, sd, smp = sample_tile(sampler, t[None, None].to(device), chunk, return_samples,
                                          on_chunk=bar.update)
                ey, ex = min(cy, h - y0), min(cx, w - x0)  # the last tile may stick out of the image
                keep = (slice(halo, halo + ey), slice(halo, halo + ex))
                mean = mu[0][(slice(None), *keep)].cpu().numpy() * ts + tm
                std = sd[0][(slice(None), *keep)].cpu().numpy() * ts
                if not (np.isfinite(mean).all() and np.isfinite(std).all()):  # never hand out NaN/inf predictions
                    raise UserError(f"the prediction is not finite: the input's intensities ({raw.min():.4g} .. "
                                    f"{raw.max():.4g}) are too far outside the training data's (mean "
                                    f"{norm.input_mean:.4g}, std {norm.input_std:.4g})")
                samples = smp[:, 0][(slice(None), slice(None), *keep)].cpu().numpy() * ts + tm \
                    if return_samples else None
                put((slice(y0, y0 + ey), slice(x0, x0 + ex)), mean, std, samples)
    bar.close()
    return {"tiles": ny * nx, "halo": halo}


def predict_image(sampler: SplitSampler, image_raw: np.ndarray, norm, tile: int = DEFAULT_TILE, halo: Optional[int] = None,
                  chunk: Optional[int] = None, progress: bool = False, return_samples: bool = False) -> dict:
    """Whole-image posterior prediction in memory, RAW units in and out (predict_blocks into numpy arrays).

    image_raw (Y, X) = the superimposed image (sum of the two channels) -> dict(
        mean (2, Y, X) raw MMSE estimates, std (2, Y, X) raw calibrated std (normalised std * target_std),
        samples (K, 2, Y, X) raw if return_samples, tiles (int), halo (int))."""
    img = np.asarray(image_raw, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise UserError(f"expected a 2-D image (Y, X), got shape {img.shape}")
    if not np.isfinite(img).all():
        raise UserError("image contains NaN or inf")
    h, w = img.shape
    mean = np.empty((2, h, w), np.float32)
    std = np.empty((2, h, w), np.float32)
    samples = np.empty((int(sampler.n_samples), 2, h, w), np.float32) if return_samples else None

    def put(out, mu, sd, smp):
        mean[(slice(None), *out)] = mu
        std[(slice(None), *out)] = sd
        if samples is not None:
            samples[(slice(None), slice(None), *out)] = smp

    res = predict_blocks(sampler, img, norm, put, tile, halo, chunk, progress, return_samples)
    return {"mean": mean, "std": std, "samples": samples, **res}


def predict_stack(sampler: SplitSampler, images_raw: np.ndarray, norm, tile: int = DEFAULT_TILE, halo: Optional[int] = None,
                  chunk: Optional[int] = None, progress: bool = True, desc: str = "images") -> dict:
    """predict_image over (N, Y, X) raw images -> dict(mean (N, 2, Y, X), std (N, 2, Y, X), halo), raw units.
    The halo is measured once for all images."""
    images = np.asarray(images_raw, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise UserError(f"expected images (N, Y, X) or (Y, X), got shape {images.shape}")
    if halo is None:
        halo = measure_halo(sampler.vae)
    means, stds = [], []
    cpu = next(sampler.vae.parameters()).device.type == "cpu"
    # entered once for the stack (predict_image's own blocks then do nothing): no weight conversion, heap trim and
    # fresh page faults per image
    with cpu_channels_last(sampler.vae), heap_allocations(cpu):
        for img in tqdm(images, desc=desc, disable=not progress or len(images) < 2, leave=False):
            r = predict_image(sampler, img, norm, tile, halo, chunk, progress=progress)
            means.append(r["mean"])
            stds.append(r["std"])
    return {"mean": np.stack(means), "std": np.stack(stds), "halo": halo}


__all__ = ["measure_halo", "sample_tile", "predict_blocks", "predict_image", "predict_stack", "reflect_index",
           "auto_chunk", "HALO_TOLERANCE"]
