"""GMM noise model: fit recovers Poisson+Gaussian noise, likelihood is finite and differentiable, npz round trip."""

import numpy as np
import pytest
import torch

from denoisplit_zoo.errors import UserError
from denoisplit_zoo.noise_model import GMMNoiseModel, fit_noise_model, pairs_from_frames


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    signal = rng.uniform(10, 1000, 400_000).astype(np.float32)
    factor, sigma = 2.0, 20.0
    noisy = rng.poisson(signal / factor) * factor + rng.normal(0, sigma, signal.shape)
    return fit_noise_model(signal, noisy.astype(np.float32), n_iterations=400, batch_size=20_000,
                           progress=False), factor, sigma


@pytest.mark.parametrize("level", [30.0, 100.0, 300.0, 600.0, 900.0])
def test_fit_matches_generating_noise_within_10_percent(fitted, level):
    nm, factor, sigma = fitted
    mean, var = nm.moments(torch.tensor([level]))
    true_var = factor * level + sigma**2
    assert abs(float(mean) - level) < 0.1 * np.sqrt(true_var)
    assert abs(float(var) - true_var) / true_var < 0.10


def test_log_prob_is_finite_for_extreme_inputs_and_has_gradients(fitted):
    nm = fitted[0]
    obs = torch.tensor([0.0, 1e9, -1e9, 5e3, 1e-30])
    sig = torch.tensor([1e9, -1e9, 0.0, 5e3, 0.0], requires_grad=True)
    lp = nm.log_prob(obs, sig)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(sig.grad).all()


def test_npz_round_trip_without_pickle(fitted, tmp_path):
    nm = fitted[0]
    nm.save(tmp_path / "nm.npz")
    with np.load(tmp_path / "nm.npz", allow_pickle=False) as z:
        assert z["weight"].shape == (18, 4)
    nm2 = GMMNoiseModel.load(tmp_path / "nm.npz")
    x, s = torch.tensor([100.0, 400.0]), torch.tensor([110.0, 390.0])
    torch.testing.assert_close(nm.log_prob(x, s), nm2.log_prob(x, s))


def test_not_a_noise_model_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(UserError, match="not a noise model"):
        GMMNoiseModel.load(tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError):
        GMMNoiseModel.load(tmp_path / "bad.npz")


def test_repeated_frames_give_pairs_against_their_average():
    frames = np.stack([np.full((4, 4), v, np.float32) for v in (1.0, 3.0)])
    signal, obs = pairs_from_frames(frames)
    assert np.all(signal == 2.0) and sorted(set(obs.tolist())) == [1.0, 3.0]
    with pytest.raises(UserError):
        pairs_from_frames(frames[:1])
