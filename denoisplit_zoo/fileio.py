"""Atomic writes and safe reads. Nothing here unpickles: json, yaml (safe), npz (allow_pickle=False), torch
(weights_only=True).

Every file the package writes goes through `atomic_path` (a temp file beside the target, fsynced, then renamed), so
a reader - or a process killed with SIGKILL at any moment - sees the old file or the complete new one, never a
half-written one. A SIGKILL can leave the temp file itself behind (`.NAME.XXXX.tmp.SUFFIX`); `remove_stale_temps`
clears those. `OutputSet` makes a command's outputs all-or-nothing: files written inside it are removed again (and the
folders it created) if the command fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import yaml

from .errors import UserError

_ACTIVE_SETS: list["OutputSet"] = []
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp.SUF")


def one_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to its first sentence when long (library messages can be essays)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        end = first.find(". ")
        first = first[:end + 1] if 0 < end < limit else first[:limit] + "..."
    return f"{type(e).__name__}: {first}"


def _mkdirs(folder: Path) -> None:
    """mkdir -p, telling every active OutputSet which folders it created."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    for s in _ACTIVE_SETS:
        s.dirs.extend(reversed(missing))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform/filesystem lets a folder be opened or fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`, on any error it is
    removed (an OSError without a file name gets `path` as its file name, so the CLI's one-line message says where).

    A reader therefore sees the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    _mkdirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        # A new file is registered with the active OutputSets BEFORE the rename: a Ctrl-C landing between the two
        # would otherwise leave a file that no cleanup knows (a first config.yaml makes a folder "a run"). A file
        # that already existed is registered only once replaced: a failure must never delete what was there.
        new = not path.exists()
        if new:
            for s in _ACTIVE_SETS:
                s.files.append(path)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    if not new:
        for s in _ACTIVE_SETS:
            s.files.append(path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """`atomic_path` for a folder (a zarr store): yield a temporary folder beside `path`; on success it is renamed
    onto `path` (an existing `path` is replaced: the caller decides whether that is allowed), on any error it is
    removed. The active OutputSets remove a NEW folder again if their block fails later."""
    path = Path(path)
    _mkdirs(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        new = not path.exists()
        if new:
            for s in _ACTIVE_SETS:
                s.trees.append(path)
            os.replace(tmp, path)
        else:  # rename the old one aside first: a folder cannot replace a non-empty folder in one rename
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)  # the earlier output back where it was
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`atomic_path`, opened for binary writing: write into the yielded file object."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files `atomic_path` left in `folder` when its process was killed mid-write (SIGKILL, power loss).
    Only names of the form `.NAME.XXXXXXXX.tmp[.SUFFIX]` are touched. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and _TEMP_NAME.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class OutputSet:
    """All-or-nothing outputs: `with OutputSet(folder):` - if the block raises (any exception, also Ctrl-C), every
    file `atomic_path` wrote inside it is deleted again, then every folder it created (only if empty: nothing of
    anyone else is ever removed). `commit()` keeps everything written so far even if the block fails later (e.g. a
    training run once its first checkpoint exists: from then on it can be resumed)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.files: list[Path] = []
        self.trees: list[Path] = []  # folders written whole by atomic_dir (zarr stores): removed with their contents
        self.dirs: list[Path] = []
        self.committed = False

    def __enter__(self) -> "OutputSet":
        _ACTIVE_SETS.append(self)
        if self.folder is not None:
            _mkdirs(self.folder)
        return self

    def commit(self) -> None:
        self.committed = True
        self.files.clear()
        self.trees.clear()
        self.dirs.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE_SETS.remove(self)
        if exc_type is None or self.committed:
            return
        for p in reversed(self.files):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        for t in reversed(self.trees):
            shutil.rmtree(t, ignore_errors=True)
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty


def write_bytes(path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({one_line(e)})") from None


def write_yaml(path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


MAX_YAML_NODES = 1_000_000  # far above any rdf.yaml or config (a few thousand nodes)


def _expanded_size(obj, memo: dict) -> int:
    """Nodes of a loaded document counted as a reader walking it would meet them (a shared, aliased node once per
    reference), memoised per object so nested aliases cost linear time to count."""
    key = id(obj)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle (a recursive alias) counts once instead of forever
    if isinstance(obj, dict):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in obj.items())
    elif isinstance(obj, list):
        n = 1 + sum(_expanded_size(v, memo) for v in obj)
    else:
        n = 1
    memo[key] = n
    return n


def load_yaml(text: str | bytes) -> Any:
    """yaml.safe_load, refused (yaml.YAMLError) when aliases expand it beyond MAX_YAML_NODES: a few hundred bytes
    of nested aliases ("billion laughs") load as shared objects in no time, but expand to ~10^9 nodes for every
    consumer that walks the document."""
    data = yaml.safe_load(text)
    if _expanded_size(data, {}) > MAX_YAML_NODES:
        raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_NODES:,} nodes through nested aliases")
    return data


def read_yaml(path) -> Any:
    try:
        return load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None


def write_npz(path, **arrays) -> None:
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def read_npz(path) -> dict[str, np.ndarray]:
    """Load every array of an npz eagerly, refusing pickled objects."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except ValueError as e:  # object arrays need pickle
        raise UserError(f"{path}: refusing to load ({one_line(e)})") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError on truncated files
        raise UserError(f"{path} is not a readable npz file ({one_line(e)})") from None


def torch_save(path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()  # serialise in memory: torch's own file writer turns a full disk into an opaque RuntimeError
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def torch_load(path, map_location="cpu") -> Any:
    """Load a checkpoint / state dict with weights_only=True: tensors and plain containers only."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except Exception as e:
        raise UserError(f"{path} is not a loadable checkpoint ({one_line(e)})") from None


def read_tiff(path) -> np.ndarray:
    """A single-channel TIFF image or stack as a numpy array, interpreted by its own metadata (tifffile's series
    axes), not by its shape: a missing, truncated or non-TIFF file, and one that holds colour samples or several
    channels per pixel, is a one-line UserError that says how to convert it. tifffile's own log messages (e.g.
    "invalid page offset" on a truncated file) are silenced: the error says it once.

    Accepted: axes YX, or one stack axis + YX (frames, z, time: N images). Refused: interleaved colour (YXS, e.g.
    an RGB TIFF from an image editor, which a shape rule would read as 64 images of 64 x 3 px), a channel axis C
    of size > 1 (ImageJ hyperstacks), anything with more than one stack axis. A planar (S, Y, X) series is read as
    S frames: tifffile itself writes every (3, Y, X) stack that way, so it is not evidence of colour."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            axes = series.axes
            arr = np.asarray(series.asarray())
    except Exception as e:  # TiffFileError, ValueError, OSError, struct.error on truncated or non-TIFF files
        raise UserError(f"{path} is not a readable TIFF file ({one_line(e)})") from None
    finally:
        log.setLevel(level)
    if arr.size == 0:
        raise UserError(f"{path} is not a readable TIFF file (no pixel data)")
    shape = "x".join(map(str, arr.shape))
    # tifffile itself writes any (..., Y, X, 3|4) array with photometric RGB, so a trailing S axis is colour only
    # when it is the smallest of the three (every real colour image; a 2 x 3 px "stack" is not one)
    if axes.endswith("S") and arr.ndim >= 3 and 1 < arr.shape[-1] < min(arr.shape[-3:-1]):
        raise UserError(f"{path} is a colour TIFF (axes {axes}, {shape}: {arr.shape[-1]} samples per pixel); this "
                        "tool reads one grey channel per file: save the mixed image as a single-channel TIFF "
                        "(Fiji: Image > Type > 32-bit; Python: tifffile.imwrite(out, img[..., 0]))")
    if "C" in axes and arr.shape[axes.index("C")] > 1:
        raise UserError(f"{path} holds {arr.shape[axes.index('C')]} channels (axes {axes}, {shape}); this tool "
                        "reads one channel per file: save each channel (or the mixed image) as its own TIFF "
                        "(Fiji: Image > Color > Split Channels)")
    return arr


def json_safe(obj):
    """NaN / inf -> None: strict JSON has neither (e.g. the regression of a single bin, a perfect RI-PSNR)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
