"""Export a trained run as weights that sample the posterior inside the graph, and the bioimage.io package around them.

The exported module is `model.SplitSampler` (normalised input (B, 1, Y, X) -> (B, 4, Y, X) = MMSE A, MMSE B,
calibrated std A, std B in normalised target units; latent noise from a counter-based hash with a stored seed), so
the three weight formats below compute the same numbers:

  weights.pt              pytorch_state_dict of SplitSampler (architecture: model.py shipped verbatim; the parent)
  weights_torchscript.pt  torch.jit.script of the same module
  weights.onnx            legacy exporter, opset 17 -> IR 8 (what deepImageJ's onnxruntime-java loads), dynamic b/y/x

`export_package` writes the zip (via bmz.py) and refuses to leave it behind unless bioimageio.core's test passes.
`load_package_sampler` reads a zip back WITHOUT importing its python file (packaged code runs only when the user
asks for it): the state dict is loaded with weights_only=True into this package's own SplitSampler.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch

from .calibration import MIN_SCALE
from .errors import UserError
from .fileio import load_yaml
from .model import SplitSampler
from .normalization import Normalization
# the package contract (file names, tensor ids, opset, ...) is package/layout.py's; the names are re-exported here
# because the writer and its tests use them
from .package.layout import (ARCH_KEYS, ARCHITECTURE_FILE, INPUT_NAME, MAX_ONNX_IR, ONNX_FILE,  # noqa: F401
                             ONNX_OPSET, OUTPUT_NAME, PACKAGE_SAMPLES, PACKAGE_SEED, STATE_DICT_FILE, TEST_INPUT_FILE,
                             TEST_OUTPUT_FILE, TORCHSCRIPT_FILE, min_input_size, postprocessing_gain_offset)
from .run_folder import resolve_data_path

# ---------------------------------------------------------------------------------------------------- the module
def architecture_kwargs(run, n_samples: int, seed: int, noise: bool = True) -> dict:
    """SplitSampler(**kwargs) for `run` (a run_folder.Run): what the package's pytorch_state_dict entry declares."""
    m, cfg = run.config.model, run.config
    return dict(n_levels=m.n_levels, z_dim=m.z_dim, n_filters=m.n_filters, dropout=m.dropout,
                out_channels=m.out_channels, patch_size=cfg.train.patch_size, n_samples=int(n_samples),
                seed=int(seed), noise=bool(noise), n_gaussians=cfg.noise_model.n_gaussians,
                n_coeffs=cfg.noise_model.n_coeffs)


def export_sampler(run, n_samples: int = PACKAGE_SAMPLES, seed: int = PACKAGE_SEED, noise: bool = True) -> SplitSampler:
    """The module the package ships, built from `architecture_kwargs` (so the declared kwargs are proven to rebuild
    it: strict load of the run's sampler state) with every buffer filled. Eval mode."""
    if n_samples < 1:
        raise UserError(f"--samples must be >= 1, got {n_samples}")
    if not 0 <= seed < 2**31:
        raise UserError(f"seed must be in [0, 2**31), got {seed}")
    sampler = SplitSampler(**architecture_kwargs(run, n_samples, seed, noise))
    sampler.load_state_dict(run.sampler(n_samples, seed, noise).state_dict(), strict=True)
    return sampler.eval()


def package_halo(run) -> int:
    """Output halo (pixels) declared in the package: the run's measured effective receptive field (Run.halo)
    rounded up to a multiple of 2**n_levels, so blocks stay aligned with the network's down-sampling grid."""
    step = 2**run.config.model.n_levels
    return -(-int(run.halo) // step) * step


# ------------------------------------------------------------------------------------------------------ weights
def save_state_dict(sampler: SplitSampler, path: Path) -> None:
    """Plain tensors only (loadable with torch.load(weights_only=True))."""
    state = {k: v.detach().cpu().contiguous() for k, v in sampler.state_dict().items()}
    torch.save(state, path)


def save_torchscript(sampler: SplitSampler, path: Path) -> None:
    """torch.jit.script (not trace: the sample loop and padding depend on the input shape), then prove that a plain
    torch.jit.load reads the archive back."""
    scripted = torch.jit.script(sampler)
    scripted.save(str(path))
    torch.jit.load(str(path), map_location="cpu")


def save_onnx(sampler: SplitSampler, path: Path, example: torch.Tensor) -> None:
    """Legacy exporter (dynamo=False): the default dynamo exporter writes IR 10 / opset >= 18, which
    onnxruntime-java in deepImageJ cannot load. Batch, y and x are dynamic."""
    dyn = {0: "b", 2: "y", 3: "x"}
    with torch.no_grad():
        torch.onnx.export(sampler, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAME: dyn}, do_constant_folding=True)


def onnx_facts(path: Path) -> dict:
    """IR version, default-domain opset and tensor names of an ONNX file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    inits = {i.name for i in m.graph.initializer}
    return {"ir_version": int(m.ir_version), "opset": int(opset),
            "inputs": [i.name for i in m.graph.input if i.name not in inits],
            "outputs": [o.name for o in m.graph.output]}


def check_onnx(path: Path) -> dict:
    """Refuse an ONNX file deepImageJ/ilastik could not use: IR > 8, opset > 17, not exactly one input and output."""
    f = onnx_facts(path)
    if f["ir_version"] > MAX_ONNX_IR or f["opset"] > ONNX_OPSET:
        raise UserError(f"ONNX export has IR {f['ir_version']} / opset {f['opset']}; need IR <= {MAX_ONNX_IR}, "
                        f"opset <= {ONNX_OPSET}")
    if f["inputs"] != [INPUT_NAME] or f["outputs"] != [OUTPUT_NAME]:
        raise UserError(f"ONNX export has inputs {f['inputs']} / outputs {f['outputs']}; need one of each")
    return f


# ------------------------------------------------------------------------------------------------- test tensors
def _synthetic_input(size: int, mean: float, std: float) -> np.ndarray:
    """Deterministic (size, size) raw-unit image (blobs + lines at the training input's mean/std)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    img = np.zeros((size, size))
    for _ in range(max(4, size * size // 800)):
        cy, cx = rng.uniform(0, size, 2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
    for _ in range(5):
        th, c = rng.uniform(0, np.pi), rng.uniform(0, size)
        img += 0.7 * np.exp(-((np.cos(th) * xx + np.sin(th) * yy - c) ** 2) / (2 * 1.5**2))
    img = (img - img.mean()) / (img.std() + 1e-12)
    return (mean + std * img).astype(np.float32)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or symmetric-pad a 2D image to (size, size)."""
    out = img
    for ax in (0, 1):
        n = out.shape[ax]
        if n >= size:
            start = (n - size) // 2
            out = out.take(range(start, start + size), axis=ax)
        else:
            before = (size - n) // 2
            pad = [(0, 0), (0, 0)]
            pad[ax] = (before, size - n - before)
            out = np.pad(out, pad, mode="symmetric")
    return out


def make_test_input(run, size: int) -> tuple[np.ndarray, str]:
    """(1, 1, size, size) float32 raw input and where it came from: a crop of the run's first test image when the
    training data is still readable (nicer cover, realistic test), else a deterministic synthetic image."""
    from .data import prepare_data

    try:  # a relative data path was relative to where `train` ran: resolve_data_path also tries the run folder
        cfg = run.config.data.model_copy(update={"path": resolve_data_path(run, None)})
        prepared = prepare_data(cfg, run.config.train.patch_size)
        img, where = prepared.test.inputs[0], f"test image 0 of {Path(cfg.path).name}"
    except (UserError, OSError, ValueError, IndexError):
        img = _synthetic_input(size, run.norm.input_mean, run.norm.input_std)
        where = "synthetic blobs and lines at the training input's mean/std"
    fitted = _fit(np.asarray(img, dtype=np.float32), size)
    if img.shape != (size, size):
        where += f" (centre crop / symmetric padding from {img.shape[0]}x{img.shape[1]} to {size}x{size})"
    return fitted[None, None].astype(np.float32), where


# bioimageio.core's fixed_zero_mean_unit_variance divides by (std + eps); mirrored so test outputs match it exactly.
_ZMUV_EPS = 1e-6


def predict_raw(sampler: SplitSampler, raw: np.ndarray, norm) -> np.ndarray:
    """What the package computes: raw (B, 1, Y, X) -> preprocessing -> module -> postprocessing -> raw (B, 4, Y, X)."""
    x = (raw.astype(np.float32) - np.float32(norm.input_mean)) / np.float32(norm.input_std + _ZMUV_EPS)
    with torch.no_grad():
        y = sampler(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    gain, offset = postprocessing_gain_offset(norm)
    g = np.asarray(gain, np.float32).reshape(1, -1, 1, 1)
    o = np.asarray(offset, np.float32).reshape(1, -1, 1, 1)
    return (y * g + o).astype(np.float32)


# ------------------------------------------------------------------------------------------------- the package
@dataclass
class ExportResult:
    path: Path
    seconds: float  # wall time of the whole export incl. the self-test
    size_bytes: int
    halo: int  # pixels, output halo declared in the package
    min_size: int  # pixels, smallest valid y/x input size
    step: int  # pixels, valid sizes are min_size + n * step
    n_samples: int
    seed: int
    noise: bool
    test_summary: str = ""  # bioimageio.core's test summary (plain text)
    onnx: dict = field(default_factory=dict)


def export_package(run_dir, out, recipe: Optional[str] = None, n_samples: Optional[int] = None,
                   seed: Optional[int] = None, noise: bool = True, self_test: bool = True,
                   report_dir: Optional[str] = None, allow_collapsed: bool = False) -> ExportResult:
    """Run folder -> bioimage.io model zip at `out`, written atomically and only after bioimageio.core's test
    passes for all three weight formats (offline). `n_samples`/`seed` override the recipe (defaults 16 / 42).
    noise=False exports posterior means (deterministic; for halo checks). A channel whose calibration scale sits at
    the clip floor (its std channel would be ~0) is refused unless allow_collapsed. Returns what was written."""
    from . import bmz
    from .run_folder import load_run

    t0 = time.monotonic()
    out = Path(out)
    if out.suffix != ".zip":
        raise UserError(f"--out must end in .zip, got {out}")
    rec = bmz.load_recipe(recipe) if recipe else None
    if run_dir is None:
        if rec is None or rec.run is None:
            raise UserError("name a run folder (or a recipe with `run:`)")
        run_dir = rec.run
    run = load_run(run_dir)
    collapsed = [n for n, v in zip(run.channel_names, run.calibration_scale) if v <= MIN_SCALE * (1 + 1e-6)]
    if collapsed and not allow_collapsed:
        raise UserError(f"{run_dir}: the calibration scale of {', '.join(collapsed)} is at its clip floor "
                        f"({MIN_SCALE:g}), so its uncertainty channel would be ~0; re-run `denoisplit-zoo calibrate` "
                        "(it now falls back to the posterior std when the estimate is unreliable) or pass "
                        "--allow-collapsed-calibration")
    rec = rec or bmz.Recipe()
    k = n_samples if n_samples is not None else (rec.n_samples or PACKAGE_SAMPLES)
    s = seed if seed is not None else (rec.seed if rec.seed is not None else PACKAGE_SEED)
    sampler = export_sampler(run, k, s, noise)
    step = 2**run.config.model.n_levels
    halo = package_halo(run)
    size = min_input_size(halo, step)

    with tempfile.TemporaryDirectory(prefix="denoisplit-export-") as tmp:
        work = Path(tmp) / "package"
        work.mkdir()
        raw_in, input_source = make_test_input(run, size)
        raw_out = predict_raw(sampler, raw_in, run.norm)
        np.save(work / TEST_INPUT_FILE, raw_in)
        np.save(work / TEST_OUTPUT_FILE, raw_out)
        save_state_dict(sampler, work / STATE_DICT_FILE)
        save_torchscript(sampler, work / TORCHSCRIPT_FILE)
        save_onnx(sampler, work / ONNX_FILE, torch.zeros(1, 1, size, size))
        facts = check_onnx(work / ONNX_FILE)
        # shipped verbatim: the pytorch_state_dict architecture source (imports only torch)
        shutil.copyfile(Path(__file__).with_name("model.py"), work / ARCHITECTURE_FILE)

        ctx = bmz.PackageContext(run=run, recipe=rec, workdir=work, kwargs=architecture_kwargs(run, k, s, noise),
                                 halo=halo, min_size=size, step=step, test_input=raw_in, test_output=raw_out,
                                 test_input_source=input_source, report_dir=report_dir or rec.evaluation,
                                 onnx=facts)
        descr = bmz.build_model_descr(ctx)
        staged = Path(tmp) / "model.zip"
        bmz.save_package(descr, staged)
        summary = bmz.self_test(staged) if self_test else ""
        bmz.move_into_place(staged, out)
    return ExportResult(out, time.monotonic() - t0, out.stat().st_size, halo, size, step, k, s, noise, summary, facts)


# ------------------------------------------------------------------------------------------- reading a package
_MAX_RDF_BYTES = 50 * 2**20
_MAX_WEIGHTS_BYTES = 4 * 2**30


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


def _check_listed_files(zf: zipfile.ZipFile, rdf: dict, zip_path, skip: str) -> None:
    """Every file rdf.yaml lists with a sha256 must be in the zip and match it (an edited model.py, TorchScript or
    ONNX file, test tensor ... means a tampered or corrupt package)."""
    for source, sha in _listed_files(rdf, {}).items():
        if source == skip:
            continue
        if not _safe_member(source):
            raise UserError(f"{zip_path}: rdf.yaml lists an unsafe file name ({source!r})")
        h = hashlib.sha256()
        for block in _member_blocks(zf, source, _MAX_WEIGHTS_BYTES, f"lacks {source}, which rdf.yaml lists"):
            h.update(block)
        if h.hexdigest() != sha.lower():
            raise UserError(f"{zip_path}: {source} does not match its sha256 in rdf.yaml (corrupt or edited package)")


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
        weights = rdf.get("weights")
        entry = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
        entry = entry if isinstance(entry, dict) else {}
        source, sha = entry.get("source"), entry.get("sha256")
        if not isinstance(source, str) or not _safe_member(source):
            raise UserError(f"{zip_path}: rdf.yaml has no usable weights.pytorch_state_dict.source")
        blob = _read_member(zf, source, _MAX_WEIGHTS_BYTES)
        if not sha or hashlib.sha256(blob).hexdigest() != str(sha).lower():
            raise UserError(f"{zip_path}: {source} does not match its sha256 in rdf.yaml (corrupt or edited package)")
        _check_listed_files(zf, rdf, zip_path, skip=source)

    kwargs = dict(den["architecture"])
    unknown = sorted(set(kwargs) - set(ARCH_KEYS))
    if unknown:
        raise UserError(f"{zip_path}: unknown architecture keys {unknown}")
    if n_samples is not None:
        kwargs["n_samples"] = int(n_samples)
    if seed is not None:
        kwargs["seed"] = int(seed)
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        sampler = SplitSampler(**kwargs)
        sampler.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling refused, shape mismatch, bad kwargs: all mean "not our package"
        raise UserError(f"{zip_path}: cannot rebuild the sampler ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    norm = Normalization.from_dict(den.get("normalization"))
    names = [str(n) for n in den.get("channel_names", ["A", "B"])]
    meta = {"name": rdf.get("name"), "halo": den.get("halo"), "n_samples": kwargs.get("n_samples"),
            "seed": kwargs.get("seed"), "noise": kwargs.get("noise", True), "calibration": den.get("calibration"),
            "training": den.get("training"), "format_version": rdf.get("format_version"), "source": str(zip_path),
            "architecture": kwargs}
    return sampler.eval(), names, norm, meta
