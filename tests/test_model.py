"""VSE architecture: parameter counts of the presets, any input size, the split bottom-up / top-down API."""

import pytest
import torch

from denoisplit_zoo.config import build_run_config
from denoisplit_zoo.model import LadderVAE, SplitSampler, count_parameters
from denoisplit_zoo.run_folder import build_model


def test_paper_preset_has_the_papers_parameter_count():
    cfg = build_run_config("paper", {"data": {"path": "x.npz"}})
    n = count_parameters(build_model(cfg))
    assert n == 3_002_882  # reference: "Model has 3.003M parameters" (noise-model variant, 2-channel head)


def test_usplit_head_adds_two_output_channels():
    cfg = build_run_config("paper", {"data": {"path": "x.npz"}, "train": {"loss": "usplit"}})
    assert count_parameters(build_model(cfg)) == 3_004_036


@pytest.mark.parametrize("preset,lo,hi", [("small", 300_000, 1_000_000), ("tiny", 1_000, 50_000)])
def test_smaller_presets_are_smaller(preset, lo, hi):
    n = count_parameters(build_model(build_run_config(preset, {"data": {"path": "x.npz"}})))
    assert lo < n < hi


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 17, 45), (1, 1, 64, 64), (1, 1, 100, 33)])
def test_any_input_size_is_padded_and_cropped_back(shape):
    torch.manual_seed(0)
    m = LadderVAE(n_levels=3, z_dim=4, n_filters=8, out_channels=2, patch_size=32).eval()
    out, kls = m(torch.randn(shape))
    assert out.shape == (shape[0], 2, shape[2], shape[3])
    assert len(kls) == 3 and all(k.shape == (shape[0],) for k in kls)
    assert torch.isfinite(out).all()


def test_bottom_up_once_then_batched_top_down_equals_full_passes():
    torch.manual_seed(0)
    m = LadderVAE(n_levels=3, z_dim=4, n_filters=8, patch_size=32).eval()
    x = torch.randn(1, 1, 32, 48)
    bu = m.bottom_up(x)
    k = 3
    eps = [torch.randn(k, 4, v.shape[2], v.shape[3]) for v in bu]
    batched, _ = m.top_down([v.repeat(k, 1, 1, 1) for v in bu], eps)
    for i in range(k):
        single, _ = m.top_down(m.bottom_up(x), [e[i: i + 1] for e in eps])
        torch.testing.assert_close(batched[i: i + 1], single, rtol=1e-5, atol=1e-5)


def test_zero_latent_noise_gives_the_posterior_mean_deterministically():
    torch.manual_seed(0)
    s = SplitSampler(n_levels=3, z_dim=4, n_filters=8, patch_size=32, n_samples=4, sample_latents=False).eval()
    y = s(torch.randn(1, 1, 32, 32))
    assert torch.all(y[:, 2:] == 0)  # identical samples -> zero spread


def test_sampler_is_scriptable_and_matches_eager():
    torch.manual_seed(0)
    s = SplitSampler(n_levels=3, z_dim=4, n_filters=8, patch_size=32, n_samples=3).eval()
    x = torch.randn(1, 1, 40, 24)
    torch.testing.assert_close(torch.jit.script(s)(x), s(x), rtol=0, atol=0)


def test_counter_noise_is_standard_normal_and_sliceable():
    import numpy as np

    from denoisplit_zoo.model import counter_normal

    z = counter_normal([400_000], seed=3, stream=1, device=torch.device("cpu")).numpy().astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 0.05
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01  # neighbours (incl. each Box-Muller pair) uncorrelated
    other = counter_normal([400_000], seed=4, stream=1, device=torch.device("cpu")).numpy()
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01
    # any slice of the stream reproduces the same numbers (odd offsets included)
    part = counter_normal([3, 7], seed=3, stream=1, device=torch.device("cpu"), start=1001).numpy()
    np.testing.assert_array_equal(part.ravel(), z[1001:1022].astype(np.float32))
