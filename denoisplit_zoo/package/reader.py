"""Reading a package zip back, for `predict`, `train --init-from` and the tests, WITHOUT importing its python file
(packaged code runs only when the user asks a zoo tool to run it): rdf.yaml and the state dict are read from the zip
in memory, every file rdf.yaml lists is checked against its sha256, member names that could escape a folder are
refused, and the tensors (torch.load weights_only=True) go into this package's own SplitSampler.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

import torch

from ..errors import UserError
from ..fileio import load_yaml
from ..model import SplitSampler
from ..normalization import Normalization
from .layout import ARCH_KEYS, ARCH_LIMITS, LEGACY_ARCH_KEYS


_MAX_RDF_BYTES = 50 * 2**20


def _safe_member(name: str) -> bool:
    """A zip member name that cannot escape a folder: relative, no '..', no backslashes or drive letters."""
    if not name or "\\" in name or ":" in name or name.startswith("/"):
        return False
    return ".." not in PurePosixPath(name).parts


def _member_blocks(zf: zipfile.ZipFile, name: str, limit: int, missing: str):
    """Yield the blocks of package member `name`, with one-line errors for a missing (`missing` says why it should
    be there), implausibly large or corrupt member."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise UserError(f"{zf.filename}: package {missing}") from None
    if info.file_size > limit:
        raise UserError(f"{zf.filename}: {name} is implausibly large ({info.file_size} bytes)")
    try:
        with zf.open(info) as f:
            yield from iter(lambda: f.read(1 << 20), b"")
    except Exception as e:  # BadZipFile (CRC mismatch), zlib.error, EOFError on a truncated or corrupt member
        raise UserError(f"{zf.filename}: {name} is corrupt ({type(e).__name__}: {e})") from None


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    return b"".join(_member_blocks(zf, name, limit, f"has no {name}"))


def _rdf_config(rdf: dict, zip_path) -> dict:
    cfg = rdf.get("config") if isinstance(rdf, dict) else None
    den = cfg.get("denoisplit") if isinstance(cfg, dict) else None
    if not isinstance(den, dict) or not isinstance(den.get("architecture"), dict):
        raise UserError(f"{zip_path}: not a denoisplit-zoo package (rdf.yaml has no config.denoisplit.architecture)")
    return den


def _listed_files(node, found: dict) -> dict:
    """Every {source: <file in the package>, sha256: ...} entry anywhere in rdf.yaml -> {source: sha256}."""
    if isinstance(node, dict):
        src, sha = node.get("source"), node.get("sha256")
        if isinstance(src, str) and isinstance(sha, str) and "://" not in src:
            found[src] = sha
        for v in node.values():
            _listed_files(v, found)
    elif isinstance(node, list):
        for v in node:
            _listed_files(v, found)
    return found


def _check_listed_files(zf: zipfile.ZipFile, rdf: dict, zip_path, skip: str, limit: int) -> None:
    """Every file rdf.yaml lists with a sha256 must be in the zip and match it (an edited model.py, TorchScript or
    ONNX file, test tensor ... means a tampered or corrupt package). `limit`: the largest member read, in bytes."""
    # config is this tool's own metadata, not a list of package files: a fine-tuned run's provenance holds
    # {source: <the model it started from>, sha256: <that checkpoint>}, which no package contains
    for source, sha in _listed_files({k: v for k, v in rdf.items() if k != "config"}, {}).items():
        if source == skip:
            continue
        if not _safe_member(source):
            raise UserError(f"{zip_path}: rdf.yaml lists an unsafe file name ({source!r})")
        h = hashlib.sha256()
        for block in _member_blocks(zf, source, limit, f"lacks {source}, which rdf.yaml lists"):
            h.update(block)
        if h.hexdigest() != sha.lower():
            raise UserError(f"{zip_path}: {source} does not match its sha256 in rdf.yaml (corrupt or edited package)")


def architecture(raw, zip_path) -> dict:
    """config.denoisplit.architecture -> SplitSampler kwargs, every key known (earlier names renamed) and every value
    of the right type and within ARCH_LIMITS: a package cannot make this process build a network of 10^12
    parameters, or one whose seed aliases another's noise. One UserError line naming the key otherwise."""
    if not isinstance(raw, dict):
        raise UserError(f"{zip_path}: config.denoisplit.architecture is not a mapping")
    kwargs = {LEGACY_ARCH_KEYS.get(k, k): v for k, v in raw.items()}
    unknown = sorted(set(map(str, kwargs)) - set(ARCH_KEYS))
    if unknown:
        raise UserError(f"{zip_path}: unknown architecture keys {unknown}")
    for key, value in kwargs.items():
        kind, lo, hi = ARCH_LIMITS[key]
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
            and lo <= value <= hi)
        if not ok:
            what = "true or false" if kind is bool else f"a{'n integer' if kind is int else ' number'} in {lo} .. {hi}"
            raise UserError(f"{zip_path}: config.denoisplit.architecture.{key} must be {what}, got {value!r}")
        kwargs[key] = kind(value)
    return kwargs


def state_dict_bytes(kwargs: dict) -> int:
    """Bytes of the state dict SplitSampler(**kwargs) has, from a network built on the meta device (no memory)."""
    with torch.device("meta"):
        sampler = SplitSampler(**kwargs)
    return sum(t.numel() * t.element_size() for t in sampler.state_dict().values())


def _normalization(den: dict, zip_path) -> Normalization:
    try:
        return Normalization.from_dict(den.get("normalization"))
    except UserError as e:  # its message starts with "normalization: ..."
        raise UserError(f"{zip_path}: config.denoisplit.{e}") from None


def _channel_names(den: dict, zip_path) -> list[str]:
    names = den.get("channel_names", ["A", "B"])
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) and n for n in names)
            and names[0] != names[1]):
        raise UserError(f"{zip_path}: config.denoisplit.channel_names must be two different names, got {names!r}")
    return names


def load_package_sampler(zip_path, n_samples: Optional[int] = None, seed: Optional[int] = None):
    """A package zip -> (SplitSampler in eval mode, channel_names [A, B], normalization.Normalization, meta dict).

    Nothing is extracted and no packaged code is imported: rdf.yaml and the state dict are read from the zip in
    memory, the weights' sha256 is checked against rdf.yaml, and the tensors (weights_only=True) go into this
    package's SplitSampler built from config.denoisplit.architecture. n_samples / seed override the packaged K /
    seed (the network weights are the same; only the Monte-Carlo draw changes)."""
    import yaml

    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise UserError(f"missing file: {zip_path}")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{zip_path} is not a readable zip ({e})") from None
    with zf:
        bad = [n for n in zf.namelist() if not _safe_member(n)]
        if bad:
            raise UserError(f"{zip_path}: refusing a package with unsafe member names ({bad[0]!r})")
        try:
            rdf = load_yaml(_read_member(zf, "rdf.yaml", _MAX_RDF_BYTES))
        except yaml.YAMLError as e:
            raise UserError(f"{zip_path}: rdf.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
        den = _rdf_config(rdf, zip_path)
        kwargs = architecture(den["architecture"], zip_path)
        if n_samples is not None:
            kwargs["n_samples"] = int(n_samples)
        if seed is not None:
            kwargs["seed"] = int(seed)
        norm, names = _normalization(den, zip_path), _channel_names(den, zip_path)
        weights = rdf.get("weights")
        entry = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
        entry = entry if isinstance(entry, dict) else {}
        source, sha = entry.get("source"), entry.get("sha256")
        if not isinstance(source, str) or not _safe_member(source):
            raise UserError(f"{zip_path}: rdf.yaml has no usable weights.pytorch_state_dict.source")
        # the declared architecture says how big its weights are: nothing much larger is read into memory, and
        # nothing is built that the file cannot hold (the serialised tensors are at least their bytes; half of it
        # leaves room for storages two entries share) — else a 0.1 MB package could declare a 10^9-parameter
        # network within ARCH_LIMITS and have this process allocate it before load_state_dict refuses
        need = state_dict_bytes(kwargs)
        limit = 2 * need + (1 << 20)
        blob = _read_member(zf, source, limit)
        if not sha or hashlib.sha256(blob).hexdigest() != str(sha).lower():
            raise UserError(f"{zip_path}: {source} does not match its sha256 in rdf.yaml (corrupt or edited package)")
        if len(blob) < need // 2:
            raise UserError(f"{zip_path}: {source} holds {len(blob)} bytes, too few for the {need} bytes of tensors "
                            "config.denoisplit.architecture declares (the architecture does not match the weights)")
        _check_listed_files(zf, rdf, zip_path, skip=source, limit=4 * limit + (16 << 20))

    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        sampler = SplitSampler(**kwargs)
        sampler.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling refused, shape mismatch: all mean "not our package"
        raise UserError(f"{zip_path}: cannot rebuild the sampler ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    meta = {"name": rdf.get("name"), "halo": den.get("halo"), "n_samples": kwargs.get("n_samples"),
            "seed": kwargs.get("seed"), "sample_latents": kwargs.get("sample_latents", True),
            "calibration": den.get("calibration"), "training": den.get("training"),
            "format_version": rdf.get("format_version"), "source": str(zip_path), "architecture": kwargs}
    return sampler.eval(), names, norm, meta
