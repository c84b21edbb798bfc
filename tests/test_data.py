"""Tests for denoisplit_zoo.data: readers, validation, noise protocol, split, normalisation, patches (CPU, small)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from denoisplit_zoo.config import DataConfig, NoiseConfig
from denoisplit_zoo.data import (
    Normalization,
    PatchDataset,
    compute_normalization,
    load_channels,
    make_split_data,
    prepare_data,
    split_indices,
    split_regions,
    synthetic_noise,
    validation_tiles,
)
from denoisplit_zoo.errors import UserError

from .synthetic import write_tiff_folder


def _images(shape, seed=0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, size=shape).astype(dtype)


# ------------------------------------------------------------------------------------------------------- readers
def test_npz_round_trip(tmp_path):
    clean, noisy = _images((4, 3, 16, 20)), _images((4, 3, 16, 20), seed=1)
    np.savez_compressed(tmp_path / "d.npz", clean=clean, noisy=noisy, fov=np.arange(4))
    raw = load_channels(tmp_path / "d.npz", (2, 0))
    assert raw.channel_names == ["ch2", "ch0"]
    assert raw.clean.dtype == np.float32 and raw.clean.shape == (4, 2, 16, 20)
    np.testing.assert_array_equal(raw.clean, clean[:, [2, 0]].astype(np.float32))
    np.testing.assert_array_equal(raw.noisy, noisy[:, [2, 0]].astype(np.float32))


def test_npz_single_image_and_noisy_only(tmp_path):
    noisy = _images((3, 8, 9)).astype(np.float32)  # (C, Y, X) -> N = 1
    np.savez(tmp_path / "d.npz", noisy=noisy)
    raw = load_channels(str(tmp_path / "d.npz"), (0, 1))
    assert raw.clean is None and raw.noisy.shape == (1, 2, 8, 9)
    np.testing.assert_array_equal(raw.noisy[0], noisy[:2])


def test_tiff_folder_layout(tmp_path):
    arr = _images((3, 3, 10, 12))
    write_tiff_folder(tmp_path / "data", arr)
    raw = load_channels(tmp_path / "data", (0, 2))
    assert raw.channel_names == ["actin", "nuclei"] and raw.noisy is None
    np.testing.assert_array_equal(raw.clean, arr[:, [0, 2]])


def test_tiff_clean_noisy_layout_and_stacks_in_files(tmp_path):
    clean, noisy = _images((4, 2, 8, 8)), _images((4, 2, 8, 8), seed=3)
    for kind, a in (("clean", clean), ("noisy", noisy)):
        for c, name in enumerate(("a", "b")):
            (tmp_path / kind / name).mkdir(parents=True)
            tifffile.imwrite(tmp_path / kind / name / "s1.tif", a[:3, c])  # a stack (N, Y, X)
            tifffile.imwrite(tmp_path / kind / name / "s2.tiff", a[3, c])  # a 2-D image
    raw = load_channels(tmp_path, (0, 1))
    assert raw.channel_names == ["a", "b"]
    np.testing.assert_array_equal(raw.clean, clean)
    np.testing.assert_array_equal(raw.noisy, noisy)


def test_two_stacks_and_flat_folder(tmp_path):
    a, b = _images((5, 8, 8)), _images((5, 8, 8), seed=2)
    tifffile.imwrite(tmp_path / "actin.tif", a)
    tifffile.imwrite(tmp_path / "mito.tif", b)
    raw = load_channels(f"{tmp_path / 'actin.tif'},{tmp_path / 'mito.tif'}", (5, 9))  # channels ignored
    assert raw.channel_names == ["actin", "mito"] and raw.clean.shape == (5, 2, 8, 8)
    np.testing.assert_array_equal(raw.clean[:, 1], b)
    flat = load_channels(tmp_path, (1, 0))  # a flat folder: one stack per channel, sorted by name
    assert flat.channel_names == ["mito", "actin"]
    np.testing.assert_array_equal(flat.clean[:, 0], b)


def _bad_inputs(tmp: Path):
    """(name, path, channels, min_size) for every kind of bad input; each must give a one-line UserError."""
    good = _images((3, 3, 8, 8)).astype(np.float32)
    np.savez_compressed(tmp / "good.npz", clean=good)
    data = (tmp / "good.npz").read_bytes()
    (tmp / "trunc.npz").write_bytes(data[: len(data) // 2])
    (tmp / "garbage.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp / "plain.npz", clean=good)
    corrupt = bytearray((tmp / "plain.npz").read_bytes())
    corrupt[300:340] = bytes(40)  # inside the array data: caught by the zip CRC
    (tmp / "corrupt.npz").write_bytes(bytes(corrupt))
    np.savez(tmp / "nokeys.npz", images=good)
    np.savez(tmp / "ndim.npz", clean=good[0, 0])
    np.savez(tmp / "objects.npz", clean=np.array([None, 1], dtype=object))
    np.savez(tmp / "shapes.npz", clean=good, noisy=good[:, :, :7])
    nan = good.copy(); nan[1, 2, 3, 3] = np.nan
    np.savez(tmp / "nan.npz", clean=nan)
    inf = good.copy(); inf[0, 0, 0, 0] = np.inf
    np.savez(tmp / "inf.npz", noisy=inf)
    const = good.copy(); const[2, 1] = 7.0
    np.savez(tmp / "const.npz", clean=const)
    tifffile.imwrite(tmp / "a.tif", good[:, 0])
    tifffile.imwrite(tmp / "small.tif", good[:, 1, :4])
    tifffile.imwrite(tmp / "c.tif", good[:, 2])
    (tmp / "a_trunc.tif").write_bytes((tmp / "a.tif").read_bytes()[:100])
    tifffile.imwrite(tmp / "4d.tif", good[None])
    write_tiff_folder(tmp / "mismatch", good.astype(np.uint16))
    (tmp / "mismatch" / "mito" / "img00.tif").rename(tmp / "mismatch" / "mito" / "other.tif")
    return [
        ("missing", tmp / "nope.npz", (0, 1), 1),
        ("missing stack", f"{tmp / 'a.tif'},{tmp / 'nope.tif'}", (0, 1), 1),
        ("truncated npz", tmp / "trunc.npz", (0, 1), 1),
        ("not a zip", tmp / "garbage.npz", (0, 1), 1),
        ("corrupt npz", tmp / "corrupt.npz", (0, 1), 1),
        ("no clean/noisy", tmp / "nokeys.npz", (0, 1), 1),
        ("wrong ndim", tmp / "ndim.npz", (0, 1), 1),
        ("object dtype", tmp / "objects.npz", (0, 1), 1),
        ("channel out of range", tmp / "good.npz", (0, 3), 1),
        ("negative channel", tmp / "good.npz", (-1, 0), 1),
        ("same channel", tmp / "good.npz", (1, 1), 1),
        ("clean vs noisy shape", tmp / "shapes.npz", (0, 1), 1),
        ("nan", tmp / "nan.npz", (0, 2), 1),
        ("inf", tmp / "inf.npz", (0, 1), 1),
        ("constant", tmp / "const.npz", (0, 1), 1),
        ("too small", tmp / "good.npz", (0, 1), 9),
        ("channel shapes differ", f"{tmp / 'a.tif'},{tmp / 'small.tif'}", (0, 1), 1),
        ("three stacks", f"{tmp / 'a.tif'},{tmp / 'c.tif'},{tmp / 'a.tif'}", (0, 1), 1),
        ("truncated tiff", f"{tmp / 'a_trunc.tif'},{tmp / 'c.tif'}", (0, 1), 1),
        ("4-d tiff", f"{tmp / '4d.tif'},{tmp / 'c.tif'}", (0, 1), 1),
        ("unsupported file", tmp / "a.tif", (0, 1), 1),
        ("folder names differ", tmp / "mismatch", (0, 1), 1),
        ("folder channel out of range", tmp / "mismatch", (0, 5), 1),
    ]


def test_bad_inputs_give_one_line_user_errors(tmp_path):
    for name, path, channels, min_size in _bad_inputs(tmp_path):
        with pytest.raises(UserError) as e:
            load_channels(path, channels, min_size=min_size)
        msg = str(e.value)
        assert "\n" not in msg and msg, name
        if name not in ("same channel", "three stacks"):
            assert Path(str(path).split(",")[0]).name in msg or "nope" in msg, (name, msg)


# --------------------------------------------------------------------------------------------------- properties
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(2, 4), st.integers(2, 9), st.integers(2, 9)),
       dtype=DTYPES, three_d=st.booleans(), compressed=st.booleans(), fortran=st.booleans(), seed=st.integers(0, 99))
def test_npz_reader_property(shape, dtype, three_d, compressed, fortran, seed):
    n, c, h, w = shape
    arr = np.random.default_rng(seed).integers(0, 100, size=shape).astype(dtype)
    arr[..., 0, 0], arr[..., 0, 1] = 0, 1  # never constant
    stored = arr[0] if three_d else arr
    stored = np.asfortranarray(stored) if fortran else stored
    channels = (c - 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npz"
        (np.savez_compressed if compressed else np.savez)(path, clean=stored)
        raw = load_channels(path, channels)
    want = (arr[:1] if three_d else arr)[:, list(channels)].astype(np.float32)
    assert raw.clean.dtype == np.float32
    np.testing.assert_array_equal(raw.clean, want)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9), dtype=DTYPES, two_d=st.booleans())
def test_tiff_stack_reader_property(n, h, w, dtype, two_d):
    rng = np.random.default_rng(n * 100 + h * 10 + w)
    a, b = (rng.integers(0, 100, size=(n, h, w)).astype(dtype) for _ in range(2))
    for x in (a, b):
        x[:, 0, 0], x[:, 0, 1] = 0, 1
    if two_d:
        a, b = a[0], b[0]
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = Path(tmp) / "a.tif", Path(tmp) / "b.tif"
        tifffile.imwrite(pa, a)
        tifffile.imwrite(pb, b)
        raw = load_channels(f"{pa},{pb}", (0, 1))
    np.testing.assert_array_equal(raw.clean, np.stack([a, b], axis=-3).reshape(raw.clean.shape).astype(np.float32))


# -------------------------------------------------------------------------------------------------------- noise
def test_noise_protocol_statistics():
    # two intensity levels per channel (a "constant-ish" image): variance must be F*x + sigma^2 at each level
    clean = np.empty((4, 2, 128, 128), np.float32)
    clean[:, 0, :64], clean[:, 0, 64:] = 200.0, 1000.0
    clean[:, 1, :64], clean[:, 1, 64:] = 500.0, 50.0
    ref = np.random.default_rng(0).normal(300, 40, size=(3, 2, 64, 64)).astype(np.float32)
    K, F = 1.5, 4.0
    noisy, info = synthetic_noise(clean, gaussian=K, poisson=F, seed=7, sigma_reference=ref)
    sigma = K * np.std(ref.mean(axis=1, dtype=np.float64))
    assert info == {"gaussian_sigma": pytest.approx(sigma, rel=1e-6), "poisson_factor": F, "gaussian_factor": K,
                    "seed": 7}
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    for c in range(2):
        for rows in (slice(0, 64), slice(64, 128)):
            x = float(clean[0, c, rows][0, 0])
            resid = (noisy - clean)[:, c, rows]
            assert abs(resid.mean()) < 0.05 * np.sqrt(F * x + sigma**2)
            assert resid.var() == pytest.approx(F * x + sigma**2, rel=0.05), (c, x)
    # noise is independent between channels
    r = (noisy - clean).reshape(4, 2, -1)
    assert abs(np.corrcoef(r[:, 0].ravel(), r[:, 1].ravel())[0, 1]) < 0.02
    # default sigma reference = the clean data itself
    _, info2 = synthetic_noise(clean, K, 0.0, 7)
    assert info2["gaussian_sigma"] == pytest.approx(K * np.std(clean.mean(axis=1, dtype=np.float64)), rel=1e-6)


def test_noise_seed_and_edge_cases():
    clean = _images((2, 2, 16, 16)).astype(np.float32)
    a, _ = synthetic_noise(clean, 1.0, 10.0, seed=1)
    b, _ = synthetic_noise(clean, 1.0, 10.0, seed=1)
    c, _ = synthetic_noise(clean, 1.0, 10.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    off, info = synthetic_noise(clean, 0.0, 0.0, seed=1)
    np.testing.assert_array_equal(off, clean)
    assert info["gaussian_sigma"] == 0.0
    neg = clean - 2000  # negative intensities have no photons: Poisson of max(x, 0) is 0, Gaussian is not clipped
    p, _ = synthetic_noise(neg, 0.0, 10.0, seed=1)
    assert (p == 0).all()
    g, _ = synthetic_noise(neg, 1.0, 0.0, seed=1)
    assert (g < 0).all()
    with pytest.raises(UserError):
        synthetic_noise(clean[:, :1], 1.0, 0.0, seed=1)
    with pytest.raises(UserError):
        synthetic_noise(clean, -1.0, 0.0, seed=1)


# -------------------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("n", [3, 4, 7, 10, 54, 80])
def test_split_indices(n):
    s = split_indices(n, (0.8, 0.1, 0.1), seed=3)
    assert s == split_indices(n, (0.8, 0.1, 0.1), seed=3)
    parts = [s[k] for k in ("train", "val", "test")]
    assert all(p and p == sorted(p) for p in parts)
    assert sorted(sum(parts, [])) == list(range(n))
    if n == 80:
        assert [len(p) for p in parts] == [64, 8, 8]
        assert s != split_indices(n, seed=4)


def test_split_errors_and_regions():
    for n in (0, 1, 2):
        with pytest.raises(UserError, match="single large image"):
            split_indices(n)
    with pytest.raises(UserError):
        split_indices(10, (0.5, 0.5, 0.5))
    r = split_regions((680, 1100), (0.8, 0.1, 0.1), patch_size=128)
    assert [r[k][1] for k in ("train", "val", "test")] == [slice(0, 844), slice(844, 972), slice(972, 1100)]
    assert all(r[k][0] == slice(0, 680) for k in r)
    tall = split_regions((1, 300, 40), (0.6, 0.2, 0.2), patch_size=32)
    assert [tall[k][0] for k in ("train", "val", "test")] == [slice(0, 180), slice(180, 240), slice(240, 300)]
    with pytest.raises(UserError, match="too small"):
        split_regions((100, 200), patch_size=70)  # 200 < 3 * 70


# ------------------------------------------------------------------------------------------ normalisation, patches
def test_normalization_round_trip():
    noisy = np.random.default_rng(0).normal([[[100.0]], [[5000.0]]], [[[10.0]], [[300.0]]], (6, 2, 16, 16))
    norm = compute_normalization(noisy.astype(np.float32))
    s = noisy[:, 0] + noisy[:, 1]
    assert norm.input_mean == pytest.approx(s.mean(), rel=1e-6) and norm.input_std == pytest.approx(s.std(), rel=1e-5)
    assert norm.target_std == pytest.approx([noisy[:, 0].std(), noisy[:, 1].std()], rel=1e-5)
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    t = noisy[:3].astype(np.float32)
    nt = norm.normalize_target(t)
    assert nt.dtype == np.float32 and abs(nt[:, 1].mean()) < 0.1 and abs(nt[:, 1].std() - 1) < 0.1
    np.testing.assert_allclose(norm.denormalize_target(nt), t, rtol=1e-5)
    tt = torch.from_numpy(t)
    torch.testing.assert_close(norm.denormalize_target(norm.normalize_target(tt)), tt, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(norm.normalize_target(tt), torch.from_numpy(nt))
    assert norm.normalize_input(torch.ones(2, 1, 4, 4, dtype=torch.int64)).dtype == torch.float32
    for bad in ({}, {**norm.to_dict(), "extra": 1}, {**norm.to_dict(), "input_std": 0},
                {**norm.to_dict(), "target_mean": [1.0]}, {**norm.to_dict(), "target_std": "x"}, [1, 2]):
        with pytest.raises(UserError):
            Normalization.from_dict(bad)


def test_patch_dataset_and_validation_tiles():
    noisy = _images((3, 2, 40, 50)).astype(np.float32)
    data = make_split_data(noisy, noisy + 1)
    np.testing.assert_array_equal(data.inputs, noisy[:, 0] + noisy[:, 1])
    norm = compute_normalization(data.targets)
    ds = PatchDataset(data, norm, patch_size=16, seed=5)
    assert len(ds) == 3 * 2 * 3
    x, y = ds[4]
    assert x.shape == (1, 16, 16) and y.shape == (2, 16, 16) and x.dtype == y.dtype == torch.float32
    # input normalised, targets raw, both from the same crop of image 4 % 3
    torch.testing.assert_close(x[0] * norm.input_std + norm.input_mean, y[0] + y[1], rtol=1e-5, atol=1e-2)
    same = PatchDataset(data, norm, patch_size=16, seed=5)
    assert all(torch.equal(ds[i][0], same[i][0]) for i in range(len(ds)))
    first = [ds[i][1] for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i][1]) for i, a in enumerate(first))
    assert PatchDataset(data, norm, 16, epoch_length=7).__len__() == 7
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(UserError, match="40x50"):
        PatchDataset(make_split_data(noisy[:, :, :41], None), norm, patch_size=48)

    xi, yi = validation_tiles(data, norm, patch_size=16)
    assert xi.shape == (18, 1, 16, 16) and yi.shape == (18, 2, 16, 16)
    torch.testing.assert_close(yi[1], torch.from_numpy(noisy[0, :, 0:16, 16:32]))
    xs, ys = validation_tiles(data, norm, patch_size=16, max_tiles=4)
    assert xs.shape[0] == 4 and torch.equal(ys[0], yi[0]) and torch.equal(ys[-1], yi[-1])


def test_patch_items_are_copies():
    noisy = _images((1, 2, 16, 16)).astype(np.float32)
    data = make_split_data(noisy, None)
    ds = PatchDataset(data, compute_normalization(noisy), patch_size=16)
    _, y = ds[0]
    y += 1e6
    assert data.targets.max() < 1e6


# ------------------------------------------------------------------------------------------------------- glue
def test_prepare_data_images_synthetic(tmp_path):
    clean = _images((10, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", clean=clean)
    cfg = DataConfig(path=str(tmp_path / "d.npz"), channels=(0, 2), noise=NoiseConfig(gaussian=1.0, poisson=2.0))
    p = prepare_data(cfg, patch_size=16, out_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "data_split.json").read_text())
    assert saved["mode"] == "images" and saved["channels"] == [0, 2] and saved["noise"]["kind"] == "synthetic"
    assert sorted(saved["train"] + saved["val"] + saved["test"]) == list(range(10))
    train_clean = clean[saved["train"]][:, [0, 2]]
    assert p.noise_info["gaussian_sigma"] == pytest.approx(np.std(train_clean.mean(axis=1, dtype=np.float64)), 1e-5)
    np.testing.assert_array_equal(p.test.clean, clean[saved["test"]][:, [0, 2]])
    assert p.norm == compute_normalization(p.train.targets)
    again = prepare_data(cfg, patch_size=16)
    np.testing.assert_array_equal(again.val.targets, p.val.targets)  # fixed noise realisation


def test_prepare_data_real_noise_and_regions(tmp_path):
    clean, noisy = _images((1, 2, 40, 120)), _images((1, 2, 40, 120), seed=9)
    np.savez(tmp_path / "one.npz", clean=clean, noisy=noisy)
    p = prepare_data(DataConfig(path=str(tmp_path / "one.npz")), patch_size=16, out_dir=tmp_path)
    assert p.split["mode"] == "regions" and p.noise_info == {"kind": "real"}
    # 120 px wide: val and test get max(patch, int(0.1 * 120)) = 16 px, train the rest
    assert p.split["regions"] == {"train": [[0, 40], [0, 88]], "val": [[0, 40], [88, 104]],
                                  "test": [[0, 40], [104, 120]]}
    widths = [p.split["regions"][k][1] for k in ("train", "val", "test")]
    np.testing.assert_array_equal(p.train.targets, noisy[:, :, :, : widths[0][1]])
    np.testing.assert_array_equal(p.test.clean, clean[:, :, :, widths[2][0]:])
    with pytest.raises(UserError, match="needs clean"):
        np.savez(tmp_path / "noisy.npz", noisy=noisy)
        prepare_data(DataConfig(path=str(tmp_path / "noisy.npz"), noise=NoiseConfig(gaussian=1)), patch_size=16)
    np.savez(tmp_path / "wide.npz", clean=_images((1, 2, 50, 120)))
    with pytest.raises(UserError, match="too small"):  # 120 px cannot hold three 45 px stripes
        prepare_data(DataConfig(path=str(tmp_path / "wide.npz")), patch_size=45)
    with pytest.raises(UserError, match="smaller than the minimum 48x48"):
        prepare_data(DataConfig(path=str(tmp_path / "one.npz")), patch_size=48)
