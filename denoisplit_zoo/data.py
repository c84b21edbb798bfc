"""Data: read two channels, make the paper's synthetic noise, split, normalise, cut patches.

Units: every array here is float32 in RAW intensity units (camera counts / file values) unless its name says
"normalised". The model input is the SUM of the two noisy channels (a superimposed image is physically a sum); the
model sees it normalised, while targets stay raw because the noise models and the likelihood work in raw units.

Accepted `--data` layouts (docs/contracts.md):
1. `.npz` with `clean` and/or `noisy`, each (N, C, Y, X) or (C, Y, X); `channels` picks two of C.
2. A folder with one sub-folder per channel holding TIFFs with matching names (clean data), or `clean/` and `noisy/`
   sub-folders each laid out that way. A flat folder of TIFFs is read as one stack per channel (file = channel).
3. "a.tif,b.tif": two TIFF stacks (N, Y, X) or (Y, X), channel A and channel B, clean data (`channels` ignored).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import DataConfig
from .errors import UserError
from .fileio import one_line, read_tiff, write_json
from .normalization import Normalization

SPLITS = ("train", "val", "test")
_TIFF_SUFFIXES = (".tif", ".tiff")




# ----------------------------------------------------------------------------------------------------------- reading
def as_float32(a: np.ndarray, where) -> np.ndarray:
    """Pixels as float32 (the package's working type). float64 values beyond float32's range (+-3.4e38) would
    silently become inf: that is a UserError naming the file instead (NaN/inf already in the file pass through and
    are reported by the finiteness check)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(a, dtype=np.float32)
    if a.dtype.kind == "f" and a.dtype.itemsize > 4 and np.isinf(out).any():
        finite = np.isfinite(a)
        if (np.isinf(out) & finite).any():
            big = float(np.abs(a[finite]).max())
            raise UserError(f"{where}: values beyond float32's range (max |x| {big:.3g}); rescale the data")
    return out


def read_image(path: str | Path) -> np.ndarray:
    """One image or stack from a TIFF or a .npy file (never unpickled) as float32 raw intensities; a one-line
    UserError for a missing, unreadable, non-numeric or non-finite file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"missing file: {p}")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:  # truncated file, bad header, object array (needs pickle)
            raise UserError(f"{p} is not a readable .npy file ({one_line(e)})") from None
        if not isinstance(arr, np.ndarray):  # np.load opens a zip (.npz) whatever the file is called
            arr.close()
            raise UserError(f"{p} is an .npz archive, not one .npy array")
    else:
        arr = read_tiff(p)
    if arr.dtype.kind not in "biuf":
        raise UserError(f"{p}: dtype {arr.dtype}; expected integer or float pixels")
    arr = as_float32(arr, p)
    if not np.isfinite(arr).all():
        raise UserError(f"{p}: contains NaN or inf")
    return arr


@dataclass
class RawData:
    """Two channels of one data set, raw units, (N, 2, Y, X) float32; either array may be absent (not both)."""

    clean: np.ndarray | None
    noisy: np.ndarray | None
    channel_names: list[str]
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.clean if self.clean is not None else self.noisy).shape


def _npz_channels(path: Path, key: str, channels: tuple[int, int]) -> np.ndarray:
    """Read `key` from an npz, keeping only two channels, one (image, channel) plane at a time.

    The zip member is streamed rather than loaded whole, so only the two selected channels ever exist as float32
    (compressed npz files cannot be memory-mapped). Never unpickles.
    """
    fmt = np.lib.format
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:  # rare header versions: fall back to numpy's own reader
            shape, fortran, dtype = None, True, None
        if fortran:  # column-major data cannot be streamed plane by plane; load it (still without pickle)
            with np.load(path, allow_pickle=False) as z:
                arr = z[key]
            shape, dtype = arr.shape, arr.dtype
        if dtype.hasobject or dtype.kind not in "biuf":
            raise UserError(f"{path}: '{key}' has dtype {dtype}; expected integer or float pixels")
        if len(shape) not in (3, 4):
            raise UserError(f"{path}: '{key}' has shape {shape}; expected (N, C, Y, X) or (C, Y, X)")
        n, c, h, w = shape if len(shape) == 4 else (1, *shape)
        if any(not 0 <= ch < c for ch in channels):
            raise UserError(f"{path}: channel index {channels} out of range; '{key}' has {c} channels (0..{c - 1})")
        if fortran:
            return np.ascontiguousarray(as_float32(arr.reshape(n, c, h, w)[:, list(channels)], f"{path}: '{key}'"))
        out = np.empty((n, 2, h, w), np.float32)
        plane = h * w * dtype.itemsize
        for i in range(n):
            for ch in range(c):
                buf = f.read(plane)
                if len(buf) != plane:
                    raise UserError(f"{path}: '{key}' is truncated (image {i}, channel {ch})")
                if ch in channels:
                    out[i, channels.index(ch)] = as_float32(np.frombuffer(buf, dtype).reshape(h, w), f"{path}: '{key}'")
        f.read()  # reaching the end of the member makes zipfile verify its CRC
        return out


def _load_npz(path: Path, channels: tuple[int, int]) -> RawData:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
        arrays = {k: _npz_channels(path, k, channels) if f"{k}.npy" in names else None for k in ("clean", "noisy")}
    except UserError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, bad npy header ...
        raise UserError(f"{path} is not a readable npz file ({one_line(e)})") from None
    if arrays["clean"] is None and arrays["noisy"] is None:
        raise UserError(f"{path}: npz has neither 'clean' nor 'noisy' (found: {', '.join(sorted(names)) or 'none'})")
    return RawData(arrays["clean"], arrays["noisy"], [f"ch{c}" for c in channels], str(path))


def _read_tiff(path: Path) -> np.ndarray:
    """One TIFF as (N, Y, X) float32 (a 2-D image becomes N = 1)."""
    arr = read_tiff(path)  # one-line UserError on a missing, truncated or non-TIFF file
    if arr.dtype.kind not in "biuf":
        raise UserError(f"{path}: dtype {arr.dtype}; expected integer or float pixels")
    if arr.ndim not in (2, 3):
        raise UserError(f"{path}: shape {arr.shape}; expected a 2-D image (Y, X) or a stack (N, Y, X)")
    return as_float32(arr[None] if arr.ndim == 2 else arr, path)


def _stack_pair(a: Path, b: Path) -> np.ndarray:
    """Two files (channel A, channel B) -> (N, 2, Y, X)."""
    xa, xb = _read_tiff(a), _read_tiff(b)
    if xa.shape != xb.shape:
        raise UserError(f"{b}: shape {xb.shape} differs from {a}: {xa.shape}; the two channels must match")
    return np.stack([xa, xb], axis=1)


def _concat(parts: list[np.ndarray], where: Path) -> np.ndarray:
    sizes = sorted({p.shape[-2:] for p in parts})
    if len(sizes) > 1:
        raise UserError(f"{where}: images have different sizes {sizes}; all images must have the same size")
    return np.concatenate(parts, axis=0)


def _tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES)


def _pick(items: list, channels: tuple[int, int], where: Path, what: str) -> list:
    if any(not 0 <= c < len(items) for c in channels):
        names = ", ".join(getattr(i, "name", str(i)) for i in items) or "none"
        raise UserError(f"{where}: channel index {channels} out of range; found {len(items)} {what} ({names})")
    return [items[c] for c in channels]


def _load_channel_dirs(root: Path, channels: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """root/<channel>/*.tif (sub-folders sorted by name, files paired by name) -> (N, 2, Y, X), names."""
    dirs = _pick(sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                 channels, root, "channel sub-folders")
    files = [{p.name: p for p in _tiffs(d)} for d in dirs]
    for d, fs in zip(dirs, files):
        if not fs:
            raise UserError(f"{d}: no .tif/.tiff files")
    if files[0].keys() != files[1].keys():
        odd = sorted(files[0].keys() ^ files[1].keys())[0]
        raise UserError(f"{root}: file {odd!r} is not in both {dirs[0].name}/ and {dirs[1].name}/; names must match")
    parts = [_stack_pair(files[0][n], files[1][n]) for n in sorted(files[0])]
    return _concat(parts, root), [d.name for d in dirs]


def _load_folder(root: Path, channels: tuple[int, int]) -> RawData:
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if subdirs and subdirs <= {"clean", "noisy"}:  # root/clean/<ch>/*.tif and/or root/noisy/<ch>/*.tif
        loaded = {k: _load_channel_dirs(root / k, channels) for k in sorted(subdirs)}
        names = [v[1] for v in loaded.values()]
        if len(names) == 2 and names[0] != names[1]:
            raise UserError(f"{root}: channel sub-folders differ between clean/ {names[0]} and noisy/ {names[1]}")
        get = lambda k: loaded[k][0] if k in loaded else None  # noqa: E731
        return RawData(get("clean"), get("noisy"), names[0], str(root))
    if subdirs:
        clean, names = _load_channel_dirs(root, channels)
        return RawData(clean, None, names, str(root))
    a, b = _pick(_tiffs(root), channels, root, "TIFF files (no sub-folders: one stack per channel)")
    return RawData(_stack_pair(a, b), None, [a.stem, b.stem], str(root))


def _validate(arr: np.ndarray, kind: str, raw: RawData, min_size: int) -> None:
    """Per image and channel: big enough, finite, not constant (a constant channel has nothing to split or learn)."""
    n, _, h, w = arr.shape
    if n == 0:
        raise UserError(f"{raw.source}: {kind} data has no images")
    if min(h, w) < min_size:
        raise UserError(f"{raw.source}: {kind} images are {h}x{w} pixels, smaller than the minimum {min_size}x{min_size}")
    for i in range(n):  # per image keeps the temporary boolean masks small
        for c, name in enumerate(raw.channel_names):
            x = arr[i, c]
            if not np.isfinite(x).all():
                raise UserError(f"{raw.source}: {kind} image {i} channel {name} contains NaN or inf values")
            if x.min() == x.max():
                raise UserError(f"{raw.source}: {kind} image {i} channel {name} is constant ({x.flat[0]:g})")


def load_channels(path: str | Path, channels: tuple[int, int], min_size: int = 1) -> RawData:
    """Read two channels of a data set as raw float32 (N, 2, Y, X) arrays; bad input raises a one-line UserError."""
    channels = tuple(int(c) for c in channels)
    if len(channels) != 2 or channels[0] == channels[1]:
        raise UserError(f"--channels needs two different indices, got {channels}")
    p = Path(path)
    if not p.exists() and "," in str(path):  # "a.tif,b.tif": two stacks, channel A then channel B
        stacks = [Path(s.strip()) for s in str(path).split(",")]
        if len(stacks) != 2:
            raise UserError(f"{path}: give exactly two comma-separated TIFF stacks, got {len(stacks)}")
        for s in stacks:
            if not s.is_file():
                raise UserError(f"missing file: {s}")
        raw = RawData(_stack_pair(*stacks), None, [s.stem for s in stacks], str(path))
    elif not p.exists():
        raise UserError(f"missing data path: {p}")
    elif p.is_dir():
        raw = _load_folder(p, channels)
    elif p.suffix.lower() == ".npz":
        raw = _load_npz(p, channels)
    else:
        raise UserError(f"{p}: unsupported data file; give an .npz, a folder of TIFFs, or 'a.tif,b.tif'")
    if raw.clean is not None and raw.noisy is not None and raw.clean.shape != raw.noisy.shape:
        raise UserError(f"{raw.source}: clean shape {raw.clean.shape} differs from noisy shape {raw.noisy.shape}")
    for kind in ("clean", "noisy"):
        if getattr(raw, kind) is not None:
            _validate(getattr(raw, kind), kind, raw, min_size)
    return raw


# ------------------------------------------------------------------------------------------------------------- noise
def _mean_std(a: np.ndarray, fn: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> tuple[float, float]:
    """Mean and population std of fn(a[i]) over all i, in float64, one image at a time (bounded memory)."""
    count = sum(fn(x).size for x in a)
    mean = sum(float(np.sum(fn(x), dtype=np.float64)) for x in a) / count
    var = sum(float(np.sum(np.square(fn(x).astype(np.float64) - mean))) for x in a) / count
    return mean, var**0.5


def synthetic_noise(clean: np.ndarray, gaussian: float, poisson: float, seed: int,
                    sigma_reference: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The paper's noise protocol on raw clean (N, 2, Y, X) data -> (noisy raw float32, info).

    Per channel, first Poisson x <- Poisson(max(x, 0) / F) * F (F = `poisson`, 0 = off; the variance it adds is F*x),
    then Gaussian noise of std sigma = K * std(mean of the two clean channels) (K = `gaussian`), the std taken over
    `sigma_reference` (the clean TRAIN images; default `clean`), independent per channel and pixel, not clipped.
    One fixed realisation per seed (np.random.default_rng(seed)).
    """
    clean = np.asarray(clean)
    ref = clean if sigma_reference is None else np.asarray(sigma_reference)
    for name, a in (("clean", clean), ("sigma_reference", ref)):
        if a.ndim != 4 or a.shape[1] != 2:
            raise UserError(f"synthetic noise: {name} must be (N, 2, Y, X), got {a.shape}")
    if gaussian < 0 or poisson < 0:
        raise UserError(f"synthetic noise levels must be >= 0 (gaussian={gaussian}, poisson={poisson})")
    rng = np.random.default_rng(seed)
    noisy = clean.astype(np.float32, copy=True)
    if poisson > 0:
        try:
            for i in range(len(noisy)):
                noisy[i] = rng.poisson(np.clip(noisy[i], 0, None) / poisson) * poisson
        except ValueError as e:  # lam too large for the sampler
            raise UserError(f"Poisson factor {poisson} is too small for intensities up to {clean.max():g} ({e})") from None
    sigma = 0.0
    if gaussian > 0:
        sigma = gaussian * _mean_std(ref, lambda x: (x[0].astype(np.float64) + x[1]) / 2)[1]
        for i in range(len(noisy)):
            noisy[i] += rng.standard_normal(noisy[i].shape, dtype=np.float32) * np.float32(sigma)
    info = {"gaussian_sigma": float(sigma), "poisson_factor": float(poisson), "gaussian_factor": float(gaussian),
            "seed": int(seed)}
    return noisy, info


# ------------------------------------------------------------------------------------------------------------- split
def _check_fractions(fractions) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
        raise UserError(f"split fractions must be three numbers >= 0 summing to 1, got {fractions}")
    return f


def split_indices(n_images: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[int]]:
    """Reproducible split by image: shuffled with `seed`, each part non-empty, each list sorted.

    Validation/test sizes are int(fraction * n) like the reference (at least 1); train takes the rest.
    """
    _, fv, ft = _check_fractions(fractions)
    if n_images < 3:
        raise UserError(f"need at least 3 images to split into train/val/test, got {n_images}; "
                        "or use a single large image (it will be cut into regions)")
    n_val, n_test = max(1, int(fv * n_images)), max(1, int(ft * n_images))
    while n_images - n_val - n_test < 1:  # keep one training image
        n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
    perm = np.random.default_rng(seed).permutation(n_images).tolist()
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {k: sorted(parts[k]) for k in SPLITS}


def split_regions(image_shape: tuple[int, ...], fractions=(0.8, 0.1, 0.1),
                  patch_size: int = 1) -> dict[str, tuple[slice, slice]]:
    """Cut ONE image (shape (..., Y, X)) along its longer axis into train | val | test stripes, each >= patch_size."""
    _, fv, ft = _check_fractions(fractions)
    h, w = image_shape[-2:]
    axis, length = (1, w) if w >= h else (0, h)
    n_val, n_test = max(patch_size, int(fv * length)), max(patch_size, int(ft * length))
    n_train = length - n_val - n_test
    if n_train < patch_size or min(h, w) < patch_size:
        raise UserError(f"a single {h}x{w} image is too small to cut into train/val/test stripes of at least "
                        f"{patch_size} pixels (patch size); use more images or a smaller patch size")
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, length)}
    full = slice(0, h if axis == 1 else w)
    return {k: (full, slice(*b)) if axis == 1 else (slice(*b), full) for k, b in bounds.items()}


# ------------------------------------------------------------------------------------------------------ normalising
def compute_normalization(noisy_train: np.ndarray) -> Normalization:
    """Statistics of the raw noisy TRAIN targets (N, 2, Y, X); the input stats are those of their channel sum."""
    im, is_ = _mean_std(noisy_train, lambda x: x[0].astype(np.float64) + x[1])
    tm, ts = zip(*(_mean_std(noisy_train[:, c]) for c in range(2)))
    if min(is_, *ts) <= 0:
        raise UserError("training data is constant; cannot normalise it")
    return Normalization(im, is_, list(tm), list(ts))


# ---------------------------------------------------------------------------------------------------------- patches
@dataclass
class SplitData:
    """One split, raw units: inputs (N, Y, X) = noisy[:, 0] + noisy[:, 1]; targets (N, 2, Y, X) noisy;
    clean (N, 2, Y, X) or None, for evaluation only (it may be on another intensity scale)."""

    inputs: np.ndarray
    targets: np.ndarray
    clean: np.ndarray | None = None


def make_split_data(noisy: np.ndarray, clean: np.ndarray | None) -> SplitData:
    noisy = np.ascontiguousarray(noisy, dtype=np.float32)
    if noisy.ndim != 4 or noisy.shape[1] != 2:
        raise UserError(f"expected noisy targets (N, 2, Y, X), got {noisy.shape}")
    if clean is not None:
        clean = np.ascontiguousarray(clean, dtype=np.float32)
        if clean.shape != noisy.shape:
            raise UserError(f"clean shape {clean.shape} differs from noisy shape {noisy.shape}")
    return SplitData(noisy[:, 0] + noisy[:, 1], noisy, clean)


def _check_patch(shape: tuple[int, ...], patch_size: int) -> None:
    h, w = shape[-2:]
    if min(h, w) < patch_size:
        raise UserError(f"images are {h}x{w} pixels, smaller than the patch size {patch_size}; "
                        "use a smaller patch size or larger images")


class PatchDataset(torch.utils.data.Dataset):
    """Random patch_size x patch_size crops of the training images.

    Item i -> (normalised input (1, P, P), RAW targets (2, P, P)), float32 tensors. Image i % N, crop position drawn
    from a generator seeded by (seed, epoch, i): reproducible, and `set_epoch(e)` gives new crops per epoch (call it
    before iterating; DataLoader workers copy the dataset when iteration starts). Epoch length defaults to the
    reference's N * (Y // P) * (X // P).
    """

    def __init__(self, data: SplitData, norm: Normalization, patch_size: int, epoch_length: int | None = None,
                 seed: int = 0):
        _check_patch(data.inputs.shape, patch_size)
        self.inputs = norm.normalize_input(data.inputs).astype(np.float32, copy=False)  # normalised once, not per item
        self.targets = data.targets
        self.patch_size, self.seed, self.epoch = int(patch_size), int(seed), 0
        n, h, w = self.inputs.shape
        self.epoch_length = int(epoch_length) if epoch_length is not None else n * (h // patch_size) * (w // patch_size)
        if self.epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.epoch_length:
            raise IndexError(i)
        n, h, w = self.inputs.shape
        p = self.patch_size
        rng = np.random.default_rng([self.seed % 2**64, self.epoch % 2**64, i])
        t, y, x = i % n, int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        # .copy(): never hand out views of the data set (an in-place op in training would corrupt it)
        inp = self.inputs[t, None, y:y + p, x:x + p].copy()
        tgt = self.targets[t, :, y:y + p, x:x + p].copy()
        return torch.from_numpy(inp), torch.from_numpy(tgt)


def validation_tiles(data: SplitData, norm: Normalization, patch_size: int,
                     max_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping top-left aligned P x P tiles of every image: ((T, 1, P, P) normalised inputs, (T, 2, P, P) raw
    targets). With `max_tiles`, an evenly spaced (deterministic) subset over all tiles of all images."""
    _check_patch(data.inputs.shape, patch_size)
    n, h, w = data.inputs.shape
    p = patch_size
    coords = [(t, y, x) for t in range(n) for y in range(0, h - p + 1, p) for x in range(0, w - p + 1, p)]
    if max_tiles is not None and len(coords) > max_tiles:
        coords = [coords[k] for k in np.linspace(0, len(coords) - 1, max(1, max_tiles)).round().astype(int)]
    inp = np.stack([data.inputs[t, None, y:y + p, x:x + p] for t, y, x in coords])
    tgt = np.stack([data.targets[t, :, y:y + p, x:x + p] for t, y, x in coords])
    return torch.from_numpy(norm.normalize_input(inp).astype(np.float32)), torch.from_numpy(tgt.astype(np.float32))


# ------------------------------------------------------------------------------------------------------------ glue
@dataclass
class PreparedData:
    train: SplitData
    val: SplitData
    test: SplitData
    norm: Normalization
    channel_names: list[str]
    noise_info: dict
    split: dict = field(default_factory=dict)  # what data_split.json holds


def prepare_data(cfg: DataConfig, patch_size: int, out_dir: Path | None = None) -> PreparedData:
    """load -> split (by image, or by regions of a single image) -> noise -> per-split data -> train normalisation.

    Noise: real `noisy` data is used as is (clean, if present, only for evaluation). Clean-only data gets the synthetic
    protocol (sigma reference = clean TRAIN images). If a synthetic level (cfg.noise.gaussian/poisson > 0) is asked
    for and the data has clean images, the synthetic protocol is applied to them even when real noisy images exist
    (the W2S file supports both uses). Writes out_dir/data_split.json atomically when out_dir is given.
    """
    raw = load_channels(cfg.path, cfg.channels, min_size=patch_size)
    n = raw.shape[0]
    if n == 1:
        regions = split_regions(raw.shape, cfg.split, patch_size)
        split = {k: [0] for k in SPLITS} | {"mode": "regions"}
        take = lambda a, k: np.ascontiguousarray(a[:, :, regions[k][0], regions[k][1]])  # noqa: E731
    else:
        regions = None
        split = split_indices(n, cfg.split, cfg.split_seed) | {"mode": "images"}
        take = lambda a, k: a[split[k]]  # noqa: E731  (fancy indexing copies)

    synthetic_asked = cfg.noise.gaussian > 0 or cfg.noise.poisson > 0
    if raw.clean is None and synthetic_asked:
        raise UserError(f"{raw.source}: synthetic noise (gaussian/poisson) needs clean images; this data has only noisy")
    if raw.noisy is not None and not synthetic_asked:
        noisy, info = raw.noisy, {"kind": "real"}
    else:
        noisy, info = synthetic_noise(raw.clean, cfg.noise.gaussian, cfg.noise.poisson, cfg.noise.seed,
                                      sigma_reference=take(raw.clean, "train"))
        info = {"kind": "synthetic", **info}
        raw.noisy = None  # real noisy images (if any) are not used: free them before the splits are copied
    parts = {k: make_split_data(take(noisy, k), None if raw.clean is None else take(raw.clean, k)) for k in SPLITS}
    norm = compute_normalization(parts["train"].targets)

    if regions is not None:
        split["regions"] = {k: [[s.start, s.stop] for s in v] for k, v in regions.items()}
    split |= {"noise": info, "source": raw.source, "channels": list(cfg.channels), "channel_names": raw.channel_names}
    if out_dir is not None:
        write_json(Path(out_dir) / "data_split.json", split)
    return PreparedData(parts["train"], parts["val"], parts["test"], norm, raw.channel_names, info, split)
