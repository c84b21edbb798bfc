"""The VSE network of denoiSplit: a Ladder (hierarchical) VAE that maps ONE noisy superimposed image to TWO clean
structure images, plus the in-graph posterior sampler that the exported bioimage.io weights run.

This file is self-contained (it imports only torch) because the bioimage.io package ships it verbatim as the
architecture source of the `pytorch_state_dict` weights. Everything in it is TorchScript-scriptable and exports to
ONNX with the legacy exporter.

Units: the network sees the input normalised with the training input mean/std and predicts the two structures in
per-channel normalised target units (prediction * target_std[c] + target_mean[c] = raw intensity).

Reading order: blocks (ResidualBlock, Merge, ...), the two passes (bottom-up, top-down), LadderVAE, then the
counter-based Gaussian noise and `SplitSampler`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# Building blocks (reference: 'bacdbacd' gated residual blocks, ELU, BatchNorm, Dropout2d, 3x3 'same' convs)


class Gate(nn.Module):
    """1x1 conv to 2C channels, ELU(a) * sigmoid(g): lets a residual branch switch itself off."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        # the conv's two halves as two convs: the same numbers and parameters, but contiguous outputs (a channel
        # slice of an NHWC map is strided, which slows ELU and sigmoid on the CPU)
        c = self.conv.out_channels // 2
        w, b = self.conv.weight, self.conv.bias
        assert b is not None
        return F.elu(F.conv2d(x, w[:c], b[:c])) * torch.sigmoid(F.conv2d(x, w[c:], b[c:]))


class ResidualBlock(nn.Module):
    """x + [BN, ELU, conv3x3, Dropout2d] x 2 (+ gate). Shape-preserving: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, c: int, dropout: float, gated: bool = True):
        super().__init__()
        layers: List[nn.Module] = []
        for _ in range(2):
            layers += [nn.BatchNorm2d(c), nn.ELU(), nn.Conv2d(c, c, 3, padding=1), nn.Dropout2d(dropout)]
        if gated:
            layers.append(Gate(c))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


class Merge(nn.Module):
    """Concatenate two (B, C, H, W) maps, 1x1 conv back to C, gated residual block (the 'residual' merge)."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 1)
        self.res = ResidualBlock(c, dropout)

    def forward(self, a, b):
        return self.res(self.conv(torch.cat([a, b], dim=1)))


class Down(nn.Module):
    """Stride-2 conv then a gated residual block: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.res = ResidualBlock(c, dropout)

    def forward(self, x):
        return self.res(self.conv(x))


class Up(nn.Module):
    """Stride-2 transposed conv then a gated residual block: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)
        self.res = ResidualBlock(c, dropout)

    def forward(self, x):
        return self.res(self.conv(x))


def stable_std(logvar):
    """Std from a log-variance clipped at 20, with the reference's 'stable exponential': exp(lv) for lv <= 0,
    1 + lv above (linear growth keeps large log-variances from exploding), plus 1e-6."""
    lv = logvar.clamp(max=20.0)
    var = torch.where(lv <= 0, torch.exp(lv.clamp(max=0.0)), 1.0 + lv) + 1e-6
    return var.sqrt()


def _latent(q_params: torch.Tensor, eps: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q parameters (B, 2z, h, w) -> (z, eps, std_q): z = mu_q + std_q * eps; eps None draws torch.randn."""
    # fp32 even under autocast: the KL sums ~10^5 elements and the variance exponentials need the range
    mu_q, lv_q = q_params.float().chunk(2, dim=1)
    std_q = stable_std(lv_q)
    if eps is None:
        eps = torch.randn_like(mu_q)
    return mu_q + std_q * eps, eps, std_q


def mc_kl_elements(z: torch.Tensor, eps: torch.Tensor, std_q: torch.Tensor, p_params: torch.Tensor) -> torch.Tensor:
    """One-sample Monte-Carlo KL per latent element, log q(z) - log p(z) -> (B, z, h, w) nats (reference:
    analytical_kl=False). The log(2*pi) terms cancel."""
    mu_p, lv_p = p_params.float().chunk(2, dim=1)
    std_p = stable_std(lv_p)
    log_q = -0.5 * eps * eps - torch.log(std_q)
    log_p = -0.5 * ((z - mu_p) / std_p) ** 2 - torch.log(std_p)
    return log_q - log_p


def _mc_kl(z: torch.Tensor, eps: torch.Tensor, std_q: torch.Tensor, p_params: torch.Tensor) -> torch.Tensor:
    """mc_kl_elements summed over (z, h, w) -> (B,): what the loss takes per level."""
    return mc_kl_elements(z, eps, std_q, p_params).flatten(1).sum(1)


class TopLayer(nn.Module):
    """The top of the hierarchy: q from the last bottom-up value, p = a learned prior map (8x8 for 128 patches,
    zeros at init = N(0, 1); paper: learn_top_prior). Output: Up(conv(z)) at twice the resolution."""

    def __init__(self, c: int, z_dim: int, dropout: float, prior_size: int):
        super().__init__()
        self.prior = nn.Parameter(torch.zeros(1, 2 * z_dim, prior_size, prior_size))
        self.conv_q = nn.Conv2d(c, 2 * z_dim, 3, padding=1)
        self.conv_z = nn.Conv2d(z_dim, c, 3, padding=1)
        self.up = Up(c, dropout)

    def prior_params(self, b: int, h: int, w: int) -> torch.Tensor:
        """(b, 2z, h, w). Tiled when the latent is larger than the training patch's (only the KL uses it)."""
        p = self.prior
        p = p.repeat(1, 1, (h + p.shape[2] - 1) // p.shape[2], (w + p.shape[3] - 1) // p.shape[3])
        return p[:, :, :h, :w].expand(b, -1, -1, -1)

    def forward(self, bu: torch.Tensor, eps: Optional[torch.Tensor], compute_kl: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """bu (B, C, h, w), eps (B, z, h, w) or None -> (x (B, C, 2h, 2w), kl (B,))."""
        z, eps, std_q = _latent(self.conv_q(bu), eps)
        if compute_kl:
            kl = _mc_kl(z, eps, std_q, self.prior_params(z.shape[0], z.shape[2], z.shape[3]))
        else:
            kl = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return self.up(self.conv_z(z)), kl


class TopDownLayer(nn.Module):
    """A lower level of the generative path: p from the layer above (conv), q from Merge(bottom-up, above),
    z = mu_q + std_q * eps, then Up(SkipMerge(conv(z), above)) (stochastic skip) at twice the resolution."""

    def __init__(self, c: int, z_dim: int, dropout: float):
        super().__init__()
        self.conv_p = nn.Conv2d(c, 2 * z_dim, 3, padding=1)
        self.merge_q = Merge(c, dropout)
        self.conv_q = nn.Conv2d(c, 2 * z_dim, 3, padding=1)
        self.conv_z = nn.Conv2d(z_dim, c, 3, padding=1)
        self.skip = Merge(c, dropout)
        self.up = Up(c, dropout)

    def forward(self, bu: torch.Tensor, above: torch.Tensor, eps: Optional[torch.Tensor],
                compute_kl: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """bu, above (B, C, h, w); eps (B, z, h, w) or None -> (x (B, C, 2h, 2w), kl (B,))."""
        z, eps, std_q = _latent(self.conv_q(self.merge_q(bu, above)), eps)
        if compute_kl:
            kl = _mc_kl(z, eps, std_q, self.conv_p(above))
        else:
            kl = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return self.up(self.skip(self.conv_z(z), above)), kl


class LadderVAE(nn.Module):
    """denoiSplit's VSE: (B, 1, H, W) normalised input -> (B, out_channels, H, W).

    out_channels = 2: normalised clean estimates of the two structures (noise-model likelihood).
    out_channels = 4: two means then two log-variances (the uSplit Gaussian head; log-variances clamped >= -5).
    No lateral context and no initial downscaling (paper). Any H, W: padded to a multiple of 2**n_levels, cropped back.
    """

    def __init__(self, n_levels: int = 4, z_dim: int = 128, n_filters: int = 64, dropout: float = 0.1,
                 out_channels: int = 2, patch_size: int = 128):
        super().__init__()
        c = n_filters
        self.n_levels = n_levels
        self.z_dim = z_dim
        self.out_channels = out_channels
        self.multiple = 2**n_levels
        self.first = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ELU(), ResidualBlock(c, dropout, gated=False))
        self.down = nn.ModuleList([Down(c, dropout) for _ in range(n_levels)])
        self.top = TopLayer(c, z_dim, dropout, prior_size=max(1, patch_size // self.multiple))
        # levels n_levels-2 ... 0, in the order the top-down pass visits them
        self.td = nn.ModuleList([TopDownLayer(c, z_dim, dropout) for _ in range(n_levels - 1)])
        self.final = ResidualBlock(c, dropout)
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)

    def bottom_up(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 1, H, W) with H, W multiples of 2**n_levels -> n_levels maps (B, C, H/2^(i+1), W/2^(i+1))."""
        h = self.first(x)
        values: List[torch.Tensor] = []
        for layer in self.down:
            h = layer(h)
            values.append(h)
        return values

    def top_down(
        self, bu: List[torch.Tensor], eps: Optional[List[torch.Tensor]] = None, compute_kl: bool = False
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Bottom-up values -> (raw head output (B, out_channels, H, W), per-level KL list of (B,)).

        eps[i]: (B, z_dim, H/2^(i+1), W/2^(i+1)) latent noise for level i (zeros = posterior means), or None for
        torch.randn. To draw K samples of one image, repeat the bottom-up values K times along the batch."""
        top = self.n_levels - 1
        e: Optional[torch.Tensor] = None
        if eps is not None:
            e = eps[top]
        x, kl = self.top(bu[top], e, compute_kl)
        kls: List[torch.Tensor] = [kl]
        for j, layer in enumerate(self.td):
            i = top - 1 - j
            if eps is not None:
                e = eps[i]
            x, kl = layer(bu[i], x, e, compute_kl)
            kls.insert(0, kl)
        out = self.head(self.final(x))
        if self.out_channels == 4:
            out = torch.cat([out[:, :2], out[:, 2:].clamp(min=-5.0)], dim=1)
        return out, kls

    def pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Centre zero-pad (B, 1, H, W) to multiples of 2**n_levels (zero = the input mean, after normalisation).
        Returns the padded tensor and [top, left, H, W] for `crop`."""
        h, w = x.shape[-2], x.shape[-1]
        ph = (self.multiple - h % self.multiple) % self.multiple
        pw = (self.multiple - w % self.multiple) % self.multiple
        top, left = ph // 2, pw // 2
        return F.pad(x, [left, pw - left, top, ph - top]), [top, left, h, w]

    @staticmethod
    def crop(y: torch.Tensor, box: List[int]) -> torch.Tensor:
        return y[..., box[0]: box[0] + box[2], box[1]: box[1] + box[3]]

    def latent_shapes(self, height: int, width: int) -> List[Tuple[int, int, int]]:
        """(C_l, H_l, W_l) of every level's latent for a (.., height, width) input that is a multiple of
        2**n_levels (used to weight the KL; not part of the graph)."""
        return [(self.z_dim, height >> (i + 1), width >> (i + 1)) for i in range(self.n_levels)]

    def forward(self, x: torch.Tensor, compute_kl: bool = True) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Training pass with torch.randn latent noise: (B, 1, H, W) -> ((B, out_channels, H, W), KL per level)."""
        xp, box = self.pad(x)
        out, kls = self.top_down(self.bottom_up(xp), None, compute_kl)
        return self.crop(out, box), kls


# ----------------------------------------------------------------------------------------------------------------
# Counter-based Gaussian noise: a pure function of (seed, stream, element index) built from int64 * + % and
# float log/sqrt/cos, so eager PyTorch, TorchScript and ONNX Runtime draw the same numbers (torch.randn and ONNX's
# RandomNormal cannot: different generators, and bioimage.io's reproducibility test needs identical outputs).


def _mix(h: torch.Tensor, c: int) -> torch.Tensor:
    # every product stays below 2**62 (h < 2**31 - 1), so int64 never overflows
    h = (h * 48271 + c) % 2147483647
    h = (h * h + 1013904223) % 2147483647
    h = (h * 16807 + c * 3) % 2147483647
    return (h * h + 12345) % 2147483647


def counter_normal(shape: List[int], seed: int, stream: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """Standard-normal float32 tensor of `shape`: elements [start, start + numel) of the stream (seed, stream).

    Pair j of the stream hashes j twice into two uniforms and Box-Muller turns them into elements 2j (cos) and
    2j + 1 (sin), so slices of one stream (`start`) reproduce the same numbers as the whole, and each normal costs
    one hash (mean/std/kurtosis/lag-1 correlation checked in tests/test_model.py). Valid below 2**31 pairs."""
    n = 1
    for s in shape:
        n = n * s
    first = start // 2
    j = torch.arange(first, (start + n + 1) // 2, dtype=torch.int64, device=device)
    key = (seed * 1000003 + stream * 7919 + 17) % 2147483647
    h1 = _mix((j + key) % 2147483647, 101)
    h2 = _mix((h1 + j) % 2147483647, 307)
    u1 = (h1.to(torch.float32) + 1.0) / 2147483648.0  # (0, 1]: log is finite
    u2 = h2.to(torch.float32) / 2147483648.0
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 6.283185307179586 * u2
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1).reshape(-1)
    offset = start - 2 * first
    return z[offset: offset + n].reshape(shape)


# Posterior samples per top-down pass inside the exported graph. The K passes run in chunks of this size, so peak
# memory grows with the chunk, not with K. One at a time is the least memory and no slower on the CPU (500 x 650
# image, K = 16, one thread; benchmarks/bench_package_memory.py): eager PyTorch 14.4 / 4.4 / 1.5 KB per pixel in
# 91 / 75 / 65 s for chunks of 16 / 4 / 1, onnxruntime 11.3 / 3.2 / 0.9 KB per pixel in 34 / 29 / 29 s.
# `sampling.sample_tile` (this project's own predict) picks its chunk from a memory budget instead.
SAMPLES_PER_PASS = 1


class SplitSampler(nn.Module):
    """Posterior sampling inside the graph: normalised input (B, 1, Y, X) -> (B, 4, Y, X) =
    [MMSE A, MMSE B, calibrated std A, calibrated std B], all in normalised target units.

    The bottom-up pass runs once; the K top-down passes run SAMPLES_PER_PASS at a time with counter-based latent
    noise (seed, stream = level; sample k always gets the same slice of the stream, so the chunking does not change
    the numbers). `sample_latents=False` takes the posterior means instead (eps = 0): deterministic, std 0, for halo
    checks.
    Buffers carry what a package needs to be self-describing: the calibration scales, the normalisation and the two
    GMM noise models (weights (2, 3*n_gaussians, n_coeffs), signal ranges, min_sigma; raw units). The noise models
    are not used at inference: they are the likelihood the network was trained against, kept for provenance.
    """

    def __init__(self, n_levels: int = 4, z_dim: int = 128, n_filters: int = 64, dropout: float = 0.1,
                 out_channels: int = 2, patch_size: int = 128, n_samples: int = 50, seed: int = 42,
                 sample_latents: bool = True, n_gaussians: int = 6, n_coeffs: int = 4):
        super().__init__()
        self.vae = LadderVAE(n_levels, z_dim, n_filters, dropout, out_channels, patch_size)
        self.n_samples = n_samples
        self.seed = seed
        self.sample_latents = sample_latents
        self.samples_per_pass = SAMPLES_PER_PASS
        self.register_buffer("calibration_scale", torch.ones(2))
        self.register_buffer("input_mean", torch.zeros(1))
        self.register_buffer("input_std", torch.ones(1))
        self.register_buffer("target_mean", torch.zeros(2))
        self.register_buffer("target_std", torch.ones(2))
        self.register_buffer("nm_weight", torch.zeros(2, 3 * n_gaussians, n_coeffs))
        self.register_buffer("nm_min_signal", torch.zeros(2))
        self.register_buffer("nm_max_signal", torch.ones(2))
        self.register_buffer("nm_min_sigma", torch.ones(2))

    def chunk(self, bu: List[torch.Tensor], box: List[int], k0: int, n: int) -> torch.Tensor:
        """Posterior samples k0 .. k0 + n - 1 of a batch: bottom-up features `bu` of the padded input (each
        (B, C, h_i, w_i)) and the crop `box` of LadderVAE.pad -> (n, B, 2, Y, X), normalised target units."""
        b = bu[0].shape[0]
        eps: List[torch.Tensor] = []
        for i, v in enumerate(bu):
            shape = [n * b, self.vae.z_dim, v.shape[2], v.shape[3]]
            if self.sample_latents:
                # rows are sample-major (sample * B + image): this chunk's slice of the stream all K would use
                start = k0 * b * self.vae.z_dim * v.shape[2] * v.shape[3]
                eps.append(counter_normal(shape, self.seed, i, v.device, start).to(v.dtype))
            else:
                eps.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
        out, _ = self.vae.top_down([v.repeat(n, 1, 1, 1) for v in bu], eps, False)
        out = self.vae.crop(out[:, :2], box)
        return out.reshape(n, b, 2, out.shape[-2], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, box = self.vae.pad(x)
        bu = self.vae.bottom_up(xp)
        k = self.n_samples
        c = min(self.samples_per_pass, k)
        first = self.chunk(bu, box, 0, c)
        # sums of differences from the first chunk's mean: float32 sums of squares without cancellation
        shift = first.mean(0)
        d = first - shift
        s1 = d.sum(0)
        s2 = (d * d).sum(0)
        for k0 in range(c, k, c):
            d = self.chunk(bu, box, k0, min(c, k - k0)) - shift
            s1 = s1 + d.sum(0)
            s2 = s2 + (d * d).sum(0)
        mean = shift + s1 / k
        if k > 1:
            std = ((s2 - s1 * s1 / k) / (k - 1)).clamp(min=0.0).sqrt()
        else:
            std = torch.zeros_like(mean)
        std = std * self.calibration_scale.view(1, 2, 1, 1)
        return torch.cat([mean, std], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
