"""Metric values on known pairs: RI-PSNR (hand-computed, range invariance), MS-SSIM, MicroSSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from denoisplit_zoo.metrics import channel_metrics, micro_ssim, ms_ssim, ms_ssim_levels, ri_psnr, ri_psnr_frame


def _frames(n=2, h=64, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.normal(size=(n, h, w)), (0, 2, 2)) * 400 + 100).astype(np.float64)


def test_ri_psnr_hand_computed_value():
    """gt = [0, 1, 2, 3], pred = [0, 1, 2, 4]: std(gt) = sqrt(5/3), r = 3 / sqrt(5/3); g = (gt - 1.5) / std;
    p0 = pred - 1.75, a = sum(g p0) / sum(p0^2) = (6.5 / std) / 8.75; mse = mean((g - a p0)^2) = 0.0257143;
    PSNR = 20 log10(r / sqrt(mse)) = 23.2222 dB."""
    gt, pred = np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[0.0, 1.0], [2.0, 4.0]])
    sd = math.sqrt(5 / 3)
    g = (gt.ravel() - 1.5) / sd
    p0 = pred.ravel() - 1.75
    mse = np.mean((g - (6.5 / sd / 8.75) * p0) ** 2)
    assert mse == pytest.approx(0.0257143, rel=1e-5)
    assert ri_psnr(gt, pred) == pytest.approx(20 * math.log10(3 / sd / math.sqrt(mse)), abs=1e-9)
    assert ri_psnr(gt, pred) == pytest.approx(23.2222, abs=1e-4)


def test_ri_psnr_identical_affine_and_per_frame_average():
    gt = _frames()
    noisy = gt + np.random.default_rng(1).normal(size=gt.shape) * 5
    assert ri_psnr(gt, gt) == math.inf
    assert ri_psnr(gt, 3.0 * gt - 40.0) == math.inf  # offset and scale of the prediction do not matter
    assert ri_psnr(gt, 0.01 * noisy + 7) == pytest.approx(ri_psnr(gt, noisy), abs=1e-9)
    frames = [ri_psnr_frame(g, p) for g, p in zip(gt, noisy)]
    assert ri_psnr(gt, noisy) == pytest.approx(np.mean(frames))
    assert 20 < ri_psnr(gt, noisy) < 60
    assert math.isnan(ri_psnr(np.ones((8, 8)), noisy[0, :8, :8]))  # constant ground truth: no range


def test_ms_ssim_identical_noisy_and_small_frames():
    big = _frames(n=1, h=176, w=180)  # > 160 px: the standard five scales
    assert ms_ssim_levels(176, 180) == 5 and ms_ssim_levels(64, 64) == 3 and ms_ssim_levels(8, 8) == 0
    assert ms_ssim(big, big) == pytest.approx(1.0, abs=1e-6)
    noisy = big + np.random.default_rng(2).normal(size=big.shape) * 20
    v = ms_ssim(big, noisy)
    assert 0.5 < v < 1.0
    # our few-scale path with all five scales reproduces pytorch-msssim exactly
    from pytorch_msssim import ms_ssim as ref

    from denoisplit_zoo.metrics import _ms_ssim_few_levels

    x, y = torch.from_numpy(big)[:, None], torch.from_numpy(noisy)[:, None]
    rng_ = float(big.max() - big.min())
    ours = float(_ms_ssim_few_levels(x, y, rng_, 5).mean())
    assert ours == pytest.approx(float(ref(x, y, data_range=rng_)), abs=1e-9)
    small = _frames(n=2)
    with pytest.warns(UserWarning, match="3 of 5 scales"):
        assert ms_ssim(small, small) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(ms_ssim(small[:, :8, :8], small[:, :8, :8]))


def test_micro_ssim_and_channel_metrics():
    gt = _frames(n=2)
    noisy = gt + np.random.default_rng(3).normal(size=gt.shape) * 30
    assert micro_ssim(gt, gt) == pytest.approx(1.0, abs=1e-6)
    assert micro_ssim(gt, noisy) < micro_ssim(gt, gt + np.random.default_rng(3).normal(size=gt.shape) * 3)
    m = channel_metrics(np.stack([gt, gt], 1), np.stack([gt, noisy], 1), ["A", "B"])
    assert m["ri_psnr"]["A"] == math.inf and np.isfinite(m["ri_psnr"]["B"])
    assert m["ms_ssim"]["A"] == pytest.approx(1.0, abs=1e-6) and m["ms_ssim"]["B"] < 1
    assert m["ms_ssim_mean"] == pytest.approx((m["ms_ssim"]["A"] + m["ms_ssim"]["B"]) / 2)
    assert set(m) >= {"ri_psnr", "ri_psnr_mean", "ms_ssim", "ms_ssim_mean", "micro_ssim", "micro_ssim_mean"}
