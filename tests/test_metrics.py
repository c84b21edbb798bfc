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


# ---- floors: what a split must beat

def _two_structures(n=3, size=96, seed=1):
    """Two different smooth structures (N, 2, Y, X) and their noisy sum (N, Y, X)."""
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.normal(size=(n, size, size)), (0, 1.5, 1.5)).clip(0) * 300 + 10
    b = gaussian_filter(rng.normal(size=(n, size, size)), (0, 5, 5)).clip(0) * 900 + 20
    clean = np.stack([a, b], axis=1)
    noisy_sum = clean.sum(1) + rng.normal(scale=60.0, size=(n, size, size))
    return clean, noisy_sum


def test_floors_perfect_split_beats_both_and_no_split_prediction_does_not():
    from denoisplit_zoo.metrics import split_quality

    clean, inputs = _two_structures()
    names = ["a", "b"]
    perfect = clean + np.random.default_rng(2).normal(scale=1.0, size=clean.shape)  # a split, slightly noisy
    no_split = np.repeat(clean.sum(1, keepdims=True) / 2, 2, axis=1)

    def judge(pred):
        ri = channel_metrics(clean, pred, names)["ri_psnr"]
        return ri, split_quality(clean, pred, inputs, names, ri, clean=True)

    ri, q = judge(perfect)
    fl = q["floors"]
    assert fl["no_split"]["a"] > fl["naive"]["a"]  # the clean sum beats the noisy one
    for n in names:
        assert q["split_gain"][n] == pytest.approx(ri[n] - max(fl["naive"][n], fl["no_split"][n]))
        assert q["split_gain"][n] > 5 and q["split_status"][n] == "split"
    assert q["correlation"]["pred"]["a~b"] == pytest.approx(q["correlation"]["clean"]["a~b"], abs=0.02)

    ri, q = judge(no_split)  # the perfect denoiser that does not split sits exactly on its own floor
    for n in names:
        assert ri[n] == pytest.approx(q["floors"]["no_split"][n])
        assert q["split_gain"][n] == pytest.approx(0.0, abs=1e-9) and q["split_status"][n] == "not split"
    assert q["correlation"]["pred"]["a~b"] == pytest.approx(1.0)


def test_floors_naive_is_input_over_two_and_no_clean_means_unknown():
    from denoisplit_zoo.metrics import describe_split, split_floors, split_quality

    clean, inputs = _two_structures()
    fl = split_floors(clean, inputs, ["a", "b"], clean=True)
    assert fl["naive"]["a"] == pytest.approx(ri_psnr(clean[:, 0], inputs / 2))
    assert fl["naive"]["mean"] == pytest.approx((fl["naive"]["a"] + fl["naive"]["b"]) / 2)
    q = split_quality(clean, clean, inputs, ["a", "b"], {"a": 30.0, "b": 30.0}, clean=False)
    assert q["floors"]["no_split"] is None
    assert q["split_gain"] == {"a": None, "b": None} and set(q["split_status"].values()) == {"unknown"}
    assert "clean" not in q["correlation"]
    assert "cannot be judged" in describe_split(q["split_status"], q["split_gain"])
    assert "not split" in describe_split({"a": "split", "b": "not split"}, {"a": 1.0, "b": -0.5})


def test_error_vs_input_noise_tells_a_denoiser_from_a_model_that_passes_the_noise():
    """r(pred - clean, input - clean sum): ~1 for input / 2 (and for uSplit's pass-through), ~0 for a denoiser."""
    from denoisplit_zoo.metrics import split_quality

    clean, inputs = _two_structures()
    names = ["a", "b"]
    passes = clean + (inputs - clean.sum(1))[:, None] / 2  # splits, but keeps half the input noise in each
    for pred, lo, hi in ((np.repeat(inputs[:, None] / 2, 2, axis=1), 0.5, 1.0), (passes, 0.99, 1.0),
                         (clean + np.random.default_rng(3).normal(size=clean.shape), -0.05, 0.05)):
        ri = channel_metrics(clean, pred, names)["ri_psnr"]
        r = split_quality(clean, pred, inputs, names, ri, clean=True)["correlation"]["error_vs_input_noise"]
        assert all(lo <= v <= hi for v in r.values()), r


def test_a_ghost_of_the_other_structure_is_not_split_even_above_the_floors():
    """Where one structure dominates the sum, the dim one's no-split floor is low: a prediction that is the
    bright structure's ghost may beat it, and is still not a split (r with the other clean structure is higher)."""
    from denoisplit_zoo.metrics import describe_split, split_quality, split_status

    assert split_status({"a": 0.5, "b": 0.2}, {"a": False, "b": True}) == {"a": "split", "b": "not split"}
    clean, inputs = _two_structures()
    noise = np.random.default_rng(4).normal(size=clean.shape[:1] + clean.shape[2:])
    ghost = np.stack([clean[:, 0] + noise, 0.05 * clean[:, 0] + clean[:, 1].mean()], axis=1)  # b: a's ghost
    ri = channel_metrics(clean, ghost, ["a", "b"])["ri_psnr"]
    q = split_quality(clean, ghost, inputs, ["a", "b"], ri, clean=True)
    assert q["resembles_other"] == {"a": False, "b": True}
    assert q["split_status"]["b"] == "not split" and q["split_status"]["a"] == "split"
    assert "resembles the other structure" in describe_split(q["split_status"], q["split_gain"], q["resembles_other"])


def test_a_glow_in_the_right_place_without_the_structure_is_not_split():
    """A prediction that has a structure's low-frequency intensity (where it lies) but not its detail can beat both
    floors; the band-pass detail check calls it not split, and a sharp prediction passes it."""
    from scipy.ndimage import gaussian_filter

    from denoisplit_zoo.metrics import DETAIL_MIN_R, describe_split, split_quality

    rng = np.random.default_rng(5)
    n, size = 2, 128
    fine = gaussian_filter(rng.normal(size=(n, size, size)), (0, 1, 1))  # detail at the band-pass scale
    glow = gaussian_filter(rng.normal(size=(n, size, size)), (0, 12, 12))  # a diffuse background
    a = (fine.clip(0) * 400 + glow * 4000).clip(0) + 10  # a structure on a strong diffuse background
    b = gaussian_filter(rng.normal(size=(n, size, size)), (0, 1.5, 1.5)).clip(0) * 3000 + 10  # the bright one
    clean = np.stack([a, b], axis=1)
    inputs = clean.sum(1) + rng.normal(scale=20.0, size=(n, size, size))
    blurred = np.stack([gaussian_filter(a, (0, 6, 6)), b + rng.normal(size=b.shape)], axis=1)  # a: the glow only
    sharp = clean + rng.normal(size=clean.shape)
    names = ["a", "b"]
    for pred, want in ((blurred, "not split"), (sharp, "split")):
        ri = channel_metrics(clean, pred, names)["ri_psnr"]
        q = split_quality(clean, pred, inputs, names, ri, clean=True)
        assert q["split_gain"]["a"] > 0 and not q["resembles_other"]["a"]  # the floors alone would call it split
        assert q["split_status"]["a"] == want and q["lacks_detail"]["a"] == (want == "not split")
        assert (q["correlation"]["detail"]["a"] < DETAIL_MIN_R) == (want == "not split")
        assert q["split_status"]["b"] == "split"
    q = split_quality(clean, blurred, inputs, names, channel_metrics(clean, blurred, names)["ri_psnr"], clean=True)
    assert "fine structure is missing" in describe_split(q["split_status"], q["split_gain"], q["resembles_other"],
                                                         q["correlation"]["detail"])


def test_denoising_check_tells_a_good_denoiser_from_one_a_blur_beats():
    """The two outputs added against the clean sum, beside the best Gaussian filter of the input: a near-perfect
    denoiser is ahead of the blur, an over-smoothed one (what an undertrained VAE gives) behind it, and the report
    sentence says so."""
    from denoisplit_zoo.metrics import BLUR_SIGMAS, describe_denoising, split_quality

    clean, inputs = _two_structures()
    names = ["a", "b"]
    good = clean + np.random.default_rng(5).normal(scale=2.0, size=clean.shape)
    smooth = gaussian_filter(clean, (0, 0, 4, 4))  # a split, but far blurrier than the structures
    ri = channel_metrics(clean, good, names)["ri_psnr"]
    d = split_quality(clean, good, inputs, names, ri, clean=True)["denoising"]
    assert d["blur_sigma"] in BLUR_SIGMAS and d["noisy"] < d["blur"] < d["model"] and d["margin"] > 0
    assert d["blur"] == pytest.approx(ri_psnr(clean.sum(1), gaussian_filter(inputs, (0, d["blur_sigma"],
                                                                                      d["blur_sigma"]))))
    assert "ahead of the blur" in describe_denoising(d)
    d = split_quality(clean, smooth, inputs, names, channel_metrics(clean, smooth, names)["ri_psnr"],
                      clean=True)["denoising"]
    assert d["margin"] < 0 and "less well than a blur" in describe_denoising(d)
    assert split_quality(clean, good, inputs, names, ri, clean=False)["denoising"] is None
