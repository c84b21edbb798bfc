"""Property / fuzz tests (hypothesis, issue 7): the readers either return finite float32 data of the right shape or
raise a one-line UserError, whatever the bytes; the synthetic noise protocol; the tiler for any image size and halo;
the GMM likelihood and its gradient for any finite input. Few examples each, one torch thread: seconds, not minutes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from denoisplit_zoo.data import Normalization, load_channels, synthetic_noise
from denoisplit_zoo.errors import UserError
from denoisplit_zoo.model import SplitSampler
from denoisplit_zoo.noise_model import GMMNoiseModel
from denoisplit_zoo.sampling import predict_image

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(FAST, max_examples=40)  # milliseconds per example


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _valid_or_user_error(load):
    """Run a reader: a result must be finite float32 (N, 2, Y, X); a failure must be a one-line UserError."""
    try:
        raw = load()
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return None
    for a in (raw.clean, raw.noisy):
        if a is not None:
            assert a.dtype == np.float32 and a.ndim == 4 and a.shape[1] == 2 and np.isfinite(a).all()
    return raw


# ---------------------------------------------------------------------------------------------------- readers
_DTYPES = st.sampled_from(["uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
                           "complex64", "U2"])


@CHEAP
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=5), dtype=_DTYPES, key=st.sampled_from(["clean", "noisy",
       "other"]), fill=st.sampled_from(["random", "zeros", "nan", "max"]), seed=st.integers(0, 2**16))
def test_npz_reader_any_shape_and_dtype(shape, dtype, key, fill, seed):
    rng = np.random.default_rng(seed)
    if dtype == "U2":
        arr = np.full(shape, "ab")
    else:
        dt = np.dtype(dtype)
        if fill == "max" and dt.kind in "iu":
            arr = np.full(shape, np.iinfo(dt).max, dt)
        elif fill == "max" and dt.kind == "f":
            arr = np.full(shape, np.finfo(dt).max, dt)
        else:
            arr = (rng.normal(100, 30, shape) if fill != "zeros" else np.zeros(shape)).astype(dt)
        if fill == "nan" and dt.kind in "fc" and arr.size:
            arr.flat[rng.integers(arr.size)] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npz"
        np.savez(path, **{key: arr})
        raw = _valid_or_user_error(lambda: load_channels(path, (0, 1)))
    if raw is not None:  # only a well-formed, finite, non-constant (N, C>=2, Y, X) array of numbers gets through
        assert key in ("clean", "noisy") and arr.ndim in (3, 4) and np.dtype(arr.dtype).kind in "biuf"
        want = (arr if arr.ndim == 4 else arr[None])[:, :2].astype(np.float32)
        np.testing.assert_array_equal(getattr(raw, key), want)


@CHEAP
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
       fmt=st.sampled_from(["npz", "npz_compressed", "tiff"]))
def test_corrupted_files_give_data_or_a_user_error(cut, flips, fmt):
    """Truncate a valid file anywhere and overwrite random bytes: never any exception but UserError."""
    rng = np.random.default_rng(0)
    clean = rng.integers(1, 500, (3, 2, 12, 10)).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if fmt == "tiff":
            tifffile.imwrite(tmp / "a.tif", clean[:, 0])
            tifffile.imwrite(tmp / "b.tif", clean[:, 1])
            victim, source = tmp / "a.tif", f"{tmp / 'a.tif'},{tmp / 'b.tif'}"
        else:
            (np.savez_compressed if fmt == "npz_compressed" else np.savez)(tmp / "x.npz", clean=clean)
            victim = source = tmp / "x.npz"
        data = bytearray(victim.read_bytes())
        for pos, val in flips:
            data[int(pos * (len(data) - 1))] = val
        victim.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
        _valid_or_user_error(lambda: load_channels(source, (0, 1)))


@CHEAP
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".tif", ".npy"]))
def test_image_reader_on_random_bytes(data, suffix):
    from denoisplit_zoo.data import read_image

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(data)
        try:
            arr = read_image(str(path))
        except UserError as e:
            assert "\n" not in str(e)
        else:
            assert arr.dtype == np.float32 and np.isfinite(arr).all()


# ---------------------------------------------------------------------------------------------- noise protocol
@FAST
@given(gaussian=st.sampled_from([0.0, 0.5, 1.0, 4.0]), poisson=st.sampled_from([0.0, 0.25, 1.0, 8.0]),
       seed=st.integers(0, 2**31), level=st.floats(50.0, 5000.0))
def test_noise_protocol_properties(gaussian, poisson, seed, level):
    rng = np.random.default_rng(1)
    clean = (level * rng.uniform(0.2, 1.0, (3, 2, 48, 48))).astype(np.float32)
    noisy, info = synthetic_noise(clean, gaussian, poisson, seed)
    again, _ = synthetic_noise(clean, gaussian, poisson, seed)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape and np.isfinite(noisy).all()
    np.testing.assert_array_equal(noisy, again)  # one fixed realisation per seed
    if gaussian == 0 and poisson == 0:
        np.testing.assert_array_equal(noisy, clean)
        return
    assert not np.array_equal(noisy, synthetic_noise(clean, gaussian, poisson, seed + 1)[0])
    sigma = gaussian * float(np.std((clean[:, 0].astype(np.float64) + clean[:, 1]) / 2))
    assert info["gaussian_sigma"] == pytest.approx(sigma, rel=1e-6)
    resid = noisy.astype(np.float64) - clean
    n = resid.size
    # unbiased: E[noisy] = clean (Poisson keeps the mean, the Gaussian is centred); variance = F*x + sigma^2
    var = poisson * clean.astype(np.float64) + sigma**2
    assert abs(resid.mean()) < 5 * np.sqrt(var.mean() / n)
    assert (resid**2).mean() == pytest.approx(var.mean(), rel=0.08)
    if gaussian == 0:  # pure Poisson: non-negative multiples of F
        q = noisy / poisson
        assert (noisy >= 0).all() and np.allclose(q, np.round(q), atol=1e-3 * max(1.0, float(q.max()) * 1e-4))


# ------------------------------------------------------------------------------------------------------ the tiler
_NORM = Normalization(200.0, 60.0, [90.0, 110.0], [40.0, 50.0])


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    return SplitSampler(3, 4, 8, 0.0, 2, 32, n_samples=1, seed=3, sample_latents=False).eval()  # multiple = 8


@FAST
@given(h=st.integers(1, 70), w=st.integers(1, 70), halo_blocks=st.integers(0, 3), tile=st.sampled_from([16, 40, 64]),
       value=st.sampled_from(["random", "zeros", "saturated"]))
def test_tiler_any_size_and_halo(sampler, h, w, halo_blocks, tile, value):
    img = {"random": np.random.default_rng(h * 71 + w).uniform(0, 400, (h, w)),
           "zeros": np.zeros((h, w)), "saturated": np.full((h, w), 65535.0)}[value].astype(np.float32)
    res = predict_image(sampler, img, _NORM, tile=tile, halo=8 * halo_blocks, chunk=1)
    assert res["mean"].shape == res["std"].shape == (2, h, w)
    assert np.isfinite(res["mean"]).all() and (res["std"] == 0).all()  # noise off, K = 1
    assert res["halo"] == 8 * halo_blocks


def test_tiler_with_a_large_halo_is_independent_of_the_tiling(sampler):
    """With a halo of the measured size, tile size does not change the result (<= 1e-4 relative)."""
    img = np.random.default_rng(5).uniform(0, 400, (37, 53)).astype(np.float32)
    one = predict_image(sampler, img, _NORM, tile=64, halo=64)["mean"]
    many = predict_image(sampler, img, _NORM, tile=16, halo=64)["mean"]
    assert np.abs(one - many).max() <= 1e-4 * np.abs(one).max()


# -------------------------------------------------------------------------------------------- GMM likelihood
_F32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # the whole float32 range, subnormals included
_ANY = st.one_of(_F32, st.floats(-1e-30, 1e-30), st.floats(-1e4, 1e4),
                 st.sampled_from([0.0, -0.0, 3.4028234663852886e38, -3.4028234663852886e38, 1e-45]))


@CHEAP
@given(obs=st.lists(_ANY, min_size=1, max_size=12), sig=st.lists(_ANY, min_size=1, max_size=12),
       lo=st.floats(-1e4, 1e4), width=st.floats(1.0, 1e6), scale=st.floats(0.0, 3.0), seed=st.integers(0, 999),
       min_sigma=st.sampled_from([1e-6, 0.125, 10.0]))
def test_gmm_log_likelihood_and_gradient_are_finite_for_any_finite_input(obs, sig, lo, width, scale, seed, min_sigma):
    n = min(len(obs), len(sig))
    nm = GMMNoiseModel.init_for_range(lo, lo + width, min_sigma=min_sigma, seed=seed)
    with torch.no_grad():
        nm.weight.mul_(scale)  # from flat to steep polynomials
    assume(torch.isfinite(nm.weight).all())
    x = torch.tensor(obs[:n], dtype=torch.float32)
    s = torch.tensor(sig[:n], dtype=torch.float32, requires_grad=True)
    lp = nm.log_prob(x, s)
    assert torch.isfinite(lp).all(), (x, s, lp)
    lp.sum().backward()
    assert torch.isfinite(s.grad).all(), (x, s, s.grad)
    mean, var = nm.moments(s.detach().clamp(lo - width, lo + 2 * width))
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
