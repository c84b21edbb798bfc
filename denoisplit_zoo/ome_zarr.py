"""Zarr and OME-Zarr images for `predict`: read lazily, write atomically, so an image larger than memory is
predicted block by block (sampling.predict_blocks reads only each tile and its halo; the outputs are written
tile by tile into chunked zarr arrays).

Inputs: a zarr array (Y, X) or (N, Y, X), or an OME-Zarr image group (NGFF 0.4 or 0.5: `multiscales`, its first
dataset = full resolution) whose axes are y, x and at most one more non-singleton axis (t or z: the stack); a
channel axis must have one channel (the superimposed image). `predict --blockwise` reads TIFFs the same way,
through tifffile's zarr view of the file (a tiled TIFF is read tile by tile; a striped one strip by strip). Outputs: OME-Zarr 0.4 images (zarr format 2, the
version most viewers read: napari, Fiji/MoBIE, ome-zarr-py), one per channel mean and one uncertainty image with a
`c` axis, chunked by the prediction tile, float32, raw units.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_dir

SUFFIXES = (".ome.zarr", ".zarr")
OME_VERSION = "0.4"


def _zarr():
    """The zarr module (zarr >= 3, a dependency on Python >= 3.11), or a one-line error saying how to get it."""
    try:
        import zarr
    except ImportError:
        raise UserError("zarr / OME-Zarr images need the zarr package (>= 3, Python >= 3.11): pip install 'zarr>=3'") \
            from None
    return zarr


def is_zarr(path) -> bool:
    """A zarr store path: a folder named *.zarr (zarr v2 or v3)."""
    return str(path).rstrip("/").lower().endswith(".zarr")


def zarr_stem(path) -> str:
    name = Path(str(path).rstrip("/")).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "image"
    return name


class Plane:
    """One 2-D (Y, X) plane of a zarr array, sliced lazily: what predict_blocks reads tiles from."""

    def __init__(self, array, lead: tuple[int, ...]):
        self.array, self.lead = array, lead
        self.shape = tuple(array.shape[len(lead):])

    def __getitem__(self, key):
        return self.array[(*self.lead, *key)]


@dataclass
class ZarrInput:
    path: str
    planes: list[Plane]          # the stack's images, each (Y, X)
    stack_axis: str | None       # "t" / "z" (or "n" for a plain 3-D array); None for one image

    def value_range(self) -> tuple[float, float]:
        """(min, max) over the whole image, read chunk row by chunk row (bounded memory); UserError on NaN / inf."""
        lo, hi = np.inf, -np.inf
        for plane in self.planes:
            h = plane.shape[0]
            step = max(1, min(h, (1 << 22) // max(plane.shape[1], 1)))  # 4 M pixels (32 MB as float64) a read
            for y in range(0, h, step):
                block = np.asarray(plane[slice(y, y + step), slice(None)], dtype=np.float64)
                if not np.isfinite(block).all():
                    raise UserError(f"{self.path}: contains NaN or inf values")
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        return lo, hi


def _ome_multiscales(attrs: dict):
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):  # NGFF 0.5 (zarr v3) nests it under "ome"
        ms = attrs["ome"].get("multiscales")
    return ms


def open_input(path: str) -> ZarrInput:
    """A zarr array or OME-Zarr image -> ZarrInput (nothing read but metadata). One-line UserErrors otherwise."""
    zarr = _zarr()

    p = Path(path)
    if not p.exists():
        raise UserError(f"missing file: {path}")
    if p.suffix.lower() in (".tif", ".tiff"):
        return _open_tiff(path)
    try:
        node = zarr.open(store=str(p), mode="r")
    except Exception as e:  # noqa: BLE001  (zarr raises many kinds for a folder that is not a store)
        raise UserError(f"{path}: not a readable zarr store ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    axes = None
    if isinstance(node, zarr.Group):
        ms = _ome_multiscales(dict(node.attrs))
        try:
            first = ms[0]
            array = node[first["datasets"][0]["path"]]
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in first.get("axes", [])] or None
        except (TypeError, KeyError, IndexError) as e:
            raise UserError(f"{path}: a zarr group without OME-Zarr `multiscales` metadata pointing at an image "
                            f"({type(e).__name__}); give the image array itself (e.g. {path}/0)") from None
    else:
        array = node
    return _input(path, array, axes)


def _open_tiff(path: str) -> ZarrInput:
    """A TIFF read lazily through tifffile's zarr view: a tile (or strip) of the file is read when a block needs
    it. Axes from the file's metadata (series axes); colour and multi-channel files refused as in fileio.read_tiff."""
    import tifffile

    zarr = _zarr()

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        array = zarr.open(store, mode="r")
    except Exception as e:  # noqa: BLE001  (a corrupt or unsupported TIFF: tifffile's many error types)
        raise UserError(f"{path}: not a readable TIFF ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    if "S" in axes and shape[axes.index("S")] > 1:
        raise UserError(f"{path}: is a colour TIFF ({axes} {shape}); save the mixed image as a single-channel TIFF")
    names = ["c" if a == "C" else a.lower() if a in "TZYX" else "n" for a in axes]
    return _input(path, array, names)


def _input(path: str, array, axes: list[str] | None) -> ZarrInput:
    """The checks every lazily read input gets: real dtype, axes ending in y, x, one channel, one stack axis."""
    if array.dtype.kind not in "uif":
        raise UserError(f"{path}: dtype {array.dtype} is not a real number type")
    shape = tuple(int(v) for v in array.shape)
    if axes is None:
        if len(shape) not in (2, 3):
            raise UserError(f"{path}: shape {shape}; expected (Y, X) or (N, Y, X) (an OME-Zarr image names its axes)")
        axes = ["n", "y", "x"][-len(shape):]
    if len(axes) != len(shape) or [a.lower() for a in axes[-2:]] != ["y", "x"]:
        raise UserError(f"{path}: axes {axes} for shape {shape}; expected the last two to be y, x")
    lead = [(a.lower(), n) for a, n in zip(axes[:-2], shape[:-2])]
    for a, n in lead:
        if a == "c" and n > 1:
            raise UserError(f"{path}: holds {n} channels; predict takes ONE superimposed image (both structures "
                            "in one channel)")
    stacked = [(i, a) for i, (a, n) in enumerate(lead) if n > 1]
    if len(stacked) > 1:
        raise UserError(f"{path}: axes {axes} of shape {shape} have more than one stack axis "
                        f"({', '.join(a for _, a in stacked)}); predict one of them at a time")
    if min(shape[-2:]) < 1 or (lead and min(n for _, n in lead) < 1):
        raise UserError(f"{path}: shape {shape} is empty")
    if stacked:
        i_stack, name = stacked[0]
        planes = [Plane(array, tuple(k if j == i_stack else 0 for j in range(len(lead))))
                  for k in range(shape[i_stack])]
    else:
        name, planes = None, [Plane(array, tuple(0 for _ in lead))]
    return ZarrInput(str(path), planes, name)


def _axes(names: list[str]) -> list[dict]:
    kind = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return [{"name": n, "type": kind.get(n, "space" if n != "n" else "time")} for n in names]


class Writer:
    """The OME-Zarr outputs of one prediction, each written into a temporary store and renamed into place when all
    tiles are in (`with Writer(...) as w: ... w.put(...)`): a failure or Ctrl-C leaves no half-written image."""

    def __init__(self, targets: dict[str, Path], shapes: dict[str, tuple[int, ...]], axes: dict[str, list[str]],
                 chunks: tuple[int, int], attrs: dict[str, dict]):
        self.targets, self.shapes, self.axes, self.chunks, self.attrs = targets, shapes, axes, chunks, attrs
        self.arrays: dict = {}
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Writer":
        zarr = _zarr()

        with contextlib.ExitStack() as stack:  # a failure while creating one store removes the others again
            for key, path in self.targets.items():
                tmp = stack.enter_context(atomic_dir(path))
                group = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
                shape = self.shapes[key]
                chunks = (1,) * (len(shape) - 2) + tuple(min(c, s) for c, s in zip(self.chunks, shape[-2:]))
                self.arrays[key] = group.create_array("0", shape=shape, chunks=chunks, dtype="float32",
                                                      fill_value=np.nan)
                names = self.axes[key]
                group.attrs.update({"multiscales": [{
                    "version": OME_VERSION, "name": path.name, "axes": _axes(names),
                    "datasets": [{"path": "0", "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0] * len(names)}]}]}],
                    "denoisplit": self.attrs[key]})
            self._stack = stack.pop_all()
        return self

    def put(self, key: str, index: tuple, block: np.ndarray) -> None:
        self.arrays[key][index] = np.asarray(block, dtype=np.float32)

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)
