"""Posterior sampling (chunked == one batch == K independent passes), the measured halo, whole-image tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denoisplit_zoo.data import Normalization
from denoisplit_zoo.model import LadderVAE, SplitSampler, counter_normal
from denoisplit_zoo.run_folder import load_run
from denoisplit_zoo.sampling import cpu_channels_last, measure_halo, predict_image, reflect_index, sample_tile


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tiny_sampler(k: int, seed: int = 3, sample_latents: bool = True) -> SplitSampler:
    torch.manual_seed(0)
    s = SplitSampler(3, 4, 8, 0.0, 2, 32, n_samples=k, seed=seed, sample_latents=sample_latents)
    s.calibration_scale.copy_(torch.tensor([1.5, 0.5]))
    return s.eval()


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Raw superimposed-looking image: smooth structure + noise, ~20..300."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    img = 150 + 240 * gaussian_filter(rng.normal(size=(h, w)), 2) + rng.normal(size=(h, w)) * 10
    return img.astype(np.float32)


def test_counter_normal_slice_is_a_slice_of_the_full_draw():
    full = counter_normal([6, 3, 5, 4], 11, 2, torch.device("cpu"))
    part = counter_normal([3, 3, 5, 4], 11, 2, torch.device("cpu"), start=2 * 60)
    assert torch.equal(part, full[2:5])


def test_chunked_sampling_equals_sampler_and_naive_loop():
    """sample_tile (bottom-up once, chunks of 2) == SplitSampler(x) == K independent full passes with the same eps."""
    k, b = 5, 2
    s = _tiny_sampler(k)
    x = torch.randn(b, 1, 21, 30, generator=torch.Generator().manual_seed(1))  # not a multiple of 8: padded
    mean, std, samples = sample_tile(s, x, chunk=2, return_samples=True)
    with torch.no_grad():
        ref = s(x)
        xp, box = s.vae.pad(x)
        naive = []
        for j in range(k):  # one complete pass (bottom-up included) per sample, eps = that sample's rows
            eps = []
            for i, v in enumerate(s.vae.bottom_up(xp)):
                full = counter_normal([k * b, s.vae.z_dim, v.shape[2], v.shape[3]], s.seed, i, xp.device)
                eps.append(full[j * b:(j + 1) * b])
            out, _ = s.vae.top_down(s.vae.bottom_up(xp), eps, False)
            naive.append(s.vae.crop(out[:, :2], box))
        naive = torch.stack(naive)
    assert samples.shape == (k, b, 2, 21, 30)
    torch.testing.assert_close(samples, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, naive.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, naive.std(0) * s.calibration_scale.view(1, 2, 1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([mean, std], 1), ref, atol=1e-5, rtol=1e-5)
    assert float(std.mean()) > 0  # the latent noise does something
    for chunk in (1, 5, 100):  # chunking is invisible
        m2, s2, _ = sample_tile(s, x, chunk=chunk)
        torch.testing.assert_close(m2, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s2, std, atol=1e-5, rtol=1e-5)


def test_in_graph_passes_do_not_change_the_numbers():
    """SplitSampler runs its K top-down passes `samples_per_pass` at a time (peak memory grows with the chunk, not
    with K): any chunk size, eager or scripted, gives the numbers of one pass over all K."""
    k = 5
    s = _tiny_sampler(k)
    x = torch.randn(2, 1, 19, 26, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        s.samples_per_pass = k
        whole = s(x)
        for spp in (1, 2, 3, 4, 8):
            s.samples_per_pass = spp
            torch.testing.assert_close(s(x), whole, atol=1e-5, rtol=1e-5)
        scripted = torch.jit.script(s)
        torch.testing.assert_close(scripted(x), whole, atol=1e-5, rtol=1e-5)
    assert float(whole[:, 2:].mean()) > 0


def test_tensor_memory_grows_with_the_samples_per_pass_not_with_k():
    """export's memory figure for the model card: one sample per pass holds far less than all K at once, and
    K itself does not change it (the probe runs two passes); the sampler is left as it was."""
    from denoisplit_zoo.package.writer import tensor_bytes_per_pixel

    s = _tiny_sampler(8)
    s.samples_per_pass = 1
    one = tensor_bytes_per_pixel(s, size=64)
    s.n_samples = 32
    assert tensor_bytes_per_pixel(s, size=64) == pytest.approx(one, rel=0.05)
    s.n_samples, s.samples_per_pass = 8, 8
    batch = tensor_bytes_per_pixel(s, size=64)
    assert s.n_samples == 8 and s.samples_per_pass == 8
    assert 0 < one and batch > 2.5 * one


def test_cpu_channels_last_same_numbers_then_restored():
    """predict_image's NHWC fast path: the same samples as the contiguous network, the caller's format kept."""
    s = _tiny_sampler(4)
    x = torch.randn(1, 1, 40, 48, generator=torch.Generator().manual_seed(2))
    plain = sample_tile(s, x, chunk=3)
    with cpu_channels_last(s.vae):
        assert s.vae.head.weight.is_contiguous(memory_format=torch.channels_last)
        fast = sample_tile(s, x, chunk=3)
    assert s.vae.head.weight.is_contiguous() and not s.vae.head.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain[:2], fast[:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    s.vae.to(memory_format=torch.channels_last)  # already NHWC (CPU training): left NHWC
    with cpu_channels_last(s.vae):
        pass
    assert s.vae.head.weight.is_contiguous(memory_format=torch.channels_last)


def test_single_sample_has_zero_std():
    s = _tiny_sampler(1)
    mean, std, _ = sample_tile(s, torch.randn(1, 1, 16, 16))
    assert torch.all(std == 0) and torch.isfinite(mean).all()


def test_measure_halo_tiny_random_weights():
    torch.manual_seed(0)
    net = LadderVAE(3, 4, 8, 0.0, 2, 32).train()
    halo = measure_halo(net)
    assert halo % net.multiple == 0 and net.multiple <= halo <= 128
    assert net.training  # mode restored
    assert all(p.grad is None for p in net.parameters())
    # the criterion is monotone in its tolerance: a looser one never needs more context, a stricter one never less
    assert measure_halo(net, tolerance=1e-2) <= halo <= measure_halo(net, tolerance=1e-5)


def test_reflect_index_matches_numpy_and_handles_tiny_axes():
    a = np.arange(7)
    np.testing.assert_array_equal(a[reflect_index(np.arange(-5, 12), 7)], np.pad(a, 5, mode="reflect"))
    np.testing.assert_array_equal(reflect_index(np.arange(-20, 20), 1), np.zeros(40, int))
    big = reflect_index(np.arange(-50, 53), 3)  # padding far larger than the axis: keeps reflecting
    assert big.min() == 0 and big.max() == 2


def test_tiled_equals_untiled_with_posterior_means(tiny_run):
    """sample_latents=False: tiles of 24 px (origins on the 8-px grid) with the measured halo == one big tile, 1e-3 of the range;
    with a too-small halo the seams show (the check is sensitive)."""
    run = load_run(tiny_run)
    s = run.sampler(2, sample_latents=False)
    halo = measure_halo(run.model)
    img = _smooth_image(53, 70)  # not a multiple of 8 nor of the tile
    whole = predict_image(s, img, run.norm, tile=4096, halo=halo)
    tiled = predict_image(s, img, run.norm, tile=24, halo=halo)
    assert whole["tiles"] == 1 and tiled["tiles"] == 9
    assert whole["mean"].shape == (2, 53, 70) and float(whole["mean"].std()) > 1e-3 * np.abs(whole["mean"]).max()
    scale = np.ptp(whole["mean"])  # the output's range (an offset would make |max| a loose yardstick)
    assert np.abs(tiled["mean"] - whole["mean"]).max() <= 1e-3 * scale
    seams = predict_image(s, img, run.norm, tile=24, halo=8)
    assert np.abs(seams["mean"] - whole["mean"]).max() > 1e-3 * scale


def test_predict_image_units_small_images_and_samples():
    s = _tiny_sampler(3)
    norm = Normalization(300.0, 50.0, [150.0, 100.0], [40.0, 20.0])
    img = _smooth_image(40, 33)
    r = predict_image(s, img, norm, tile=16, halo=16, return_samples=True)
    # raw units: MMSE = mean of the raw samples; std = unbiased std of the normalised samples * scale * target_std
    np.testing.assert_allclose(r["mean"], r["samples"].mean(0), rtol=1e-5, atol=1e-3)
    z = (r["samples"] - np.array(norm.target_mean).reshape(1, 2, 1, 1)) / np.array(norm.target_std).reshape(1, 2, 1, 1)
    expect = z.std(0, ddof=1) * np.array([1.5 * 40.0, 0.5 * 20.0]).reshape(2, 1, 1)
    np.testing.assert_allclose(r["std"], expect, rtol=1e-4, atol=1e-4)
    for shape in [(1, 1), (1, 9), (5, 3), (17, 2)]:  # smaller than the halo and the network's 8-px grid
        out = predict_image(s, img[:shape[0], :shape[1]], norm, tile=16, halo=16)
        assert out["mean"].shape == out["std"].shape == (2, *shape)
        assert np.isfinite(out["mean"]).all() and np.isfinite(out["std"]).all()
