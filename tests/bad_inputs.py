"""Bad inputs for the command line: the files, the commands, and how to run them. Shared by
tests/test_robustness.py (which asserts: exit 2, exactly one stderr line, no traceback, nothing left in the output
folder) and by the generator of docs/bad_inputs.md, so the table there is made of real runs:

    OMP_NUM_THREADS=1 python -m tests.bad_inputs        # from the repository root; rewrites docs/bad_inputs.md

Every path in a case is relative to the folder `write_inputs` filled; `{run}` is a trained run folder and `{pkg}` a
folder of package zips (see `write_packages`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tifffile
import torch
import yaml

from denoisplit_zoo.package import layout as L

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import two_structures  # noqa: E402

FAST_CONFIG = "noise_model: {n_iterations: 30, batch_size: 10000}\ntrain: {val_every: 5}\n"
TRAIN = ["train", "--preset", "tiny", "--config", "fast.yaml", "--max-steps", "2", "--gaussian", "1", "--poisson", "1"]
PRED_OPTS = ["--samples", "2", "--no-progress"]
I32, I64 = np.iinfo(np.int32), np.iinfo(np.int64)


# ------------------------------------------------------------------------------------------------------ the files
def write_inputs(root: Path) -> Path:
    """Every bad (and extreme-but-valid) input file, in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    clean = two_structures(6, 64)  # (6, 2, 64, 64) float32, ~20..250
    (root / "fast.yaml").write_text(FAST_CONFIG)
    (root / "folder.zip").mkdir(exist_ok=True)  # `export --out` onto a folder
    np.savez(root / "good.npz", clean=clean)
    np.savez(root / "ndim.npz", clean=clean[0, 0])
    np.savez(root / "five_d.npz", clean=clean[None])
    np.savez(root / "shapes.npz", clean=clean, noisy=clean[..., :60])
    np.savez(root / "one_channel.npz", clean=clean[:, :1])
    nan = clean.copy()
    nan[1, 0, 3, 3] = np.nan
    np.savez(root / "nan.npz", clean=nan)
    inf = clean.copy()
    inf[2, 1, 5, 5] = np.inf
    np.savez(root / "inf.npz", noisy=inf)
    const = clean.copy()
    const[2, 1] = 7.0
    np.savez(root / "constant.npz", clean=const)
    huge = clean.astype(np.float64)
    huge[0, 0, 5, 5] = 1e300
    np.savez(root / "float64_huge.npz", clean=huge)
    np.savez(root / "objects.npz", clean=np.array([None, 1], dtype=object))
    np.savez(root / "strings.npz", clean=np.array(["a", "b"]))
    np.savez(root / "empty.npz", clean=np.zeros((0, 2, 64, 64), np.float32))
    # integers at their dtype's limits (valid: must train with finite losses, or fail cleanly)
    sat = np.clip(clean * 400, 0, 65535).astype(np.uint16)  # saturated blobs at 65535
    np.savez(root / "uint16_saturated.npz", clean=sat)
    np.savez(root / "int32_extremes.npz", clean=np.where(clean > 100, I32.max, I32.min).astype(np.int32))
    np.savez(root / "int64_extremes.npz", clean=np.where(clean > 100, I64.max, I64.min).astype(np.int64))
    good = (root / "good.npz").read_bytes()
    (root / "truncated.npz").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[400:440] = bytes(40)  # inside the array data: the zip CRC catches it
    (root / "corrupt.npz").write_bytes(bytes(corrupt))
    (root / "garbage.npz").write_bytes(b"this is not a zip file" * 10)
    np.savez(root / "nokeys.npz", images=clean)
    # TIFF stacks, one per channel
    tifffile.imwrite(root / "a.tif", clean[:, 0])
    tifffile.imwrite(root / "b.tif", clean[:, 1])
    tifffile.imwrite(root / "b_small.tif", clean[:, 1, :48, :40])
    tifffile.imwrite(root / "b_4d.tif", clean[None, :, 1])
    tif = (root / "a.tif").read_bytes()
    (root / "a_truncated.tif").write_bytes(tif[: len(tif) // 3])
    (root / "a_garbage.tif").write_bytes(b"II*\x00" + b"\xff" * 200)  # TIFF magic, nonsense after it
    # single superimposed images for predict
    img = (clean[0, 0] + clean[0, 1]).astype(np.float32)
    tifffile.imwrite(root / "img.tif", img)
    tifffile.imwrite(root / "img_4d.tif", img[None, None, None])
    np.save(root / "img_1d.npy", img[0])
    bad = img.copy()
    bad[3, 3] = np.nan
    tifffile.imwrite(root / "img_nan.tif", bad)
    bad = img.copy()
    bad[4, 4] = -np.inf
    np.save(root / "img_inf.npy", bad)
    bad = img.astype(np.float64)
    bad[4, 4] = 1e300
    np.save(root / "img_float64_huge.npy", bad)
    np.save(root / "img_objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    (root / "img_truncated.tif").write_bytes((root / "img.tif").read_bytes()[:1000])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (64, 64), }"
    (root / "img_truncated.npy").write_bytes(np.lib.format.magic(1, 0) + header)  # header cut short, no data
    (root / "img_garbage.tif").write_bytes(b"hello world" * 20)
    tifffile.imwrite(root / "img_zeros.tif", np.zeros((64, 64), np.float32))
    tifffile.imwrite(root / "img_uint16_max.tif", np.full((40, 50), 65535, np.uint16))
    ext = np.full((24, 24), I32.min, np.int32)
    ext[::2] = I32.max
    tifffile.imwrite(root / "img_int32_extremes.tif", ext)
    tifffile.imwrite(root / "img_1px.tif", np.full((1, 1), 123, np.uint16))
    tifffile.imwrite(root / "img_complex.tif", np.ones((8, 8), np.complex64))
    tifffile.imwrite(root / "img_3e38.tif", np.full((64, 64), 3e38, np.float32))
    rgb = np.clip(np.stack([img, img[::-1], img[:, ::-1]], -1), 0, 255).astype(np.uint8)
    tifffile.imwrite(root / "img_rgb.tif", rgb)  # (64, 64, 3) RGB: a shape rule reads 64 images of 64 x 3 px
    tifffile.imwrite(root / "img_channels.tif", np.stack([img, img]), imagej=True, metadata={"axes": "CYX"})
    # export
    Case("export-out-folder", "`export --out` names an existing folder", ["export", "{run}", "--out", "folder.zip"],
         None, "is a folder"),
    Case("export-out-under-file", "`export --out` below a regular file", ["export", "{run}", "--out",
         "fast.yaml/model.zip"], "fast.yaml/model.zip", "is a file"),
    # noise-model fit pairs
    tifffile.imwrite(root / "nm_clean.tif", clean[:, 0])
    tifffile.imwrite(root / "nm_noisy_small.tif", clean[:3, 0])
    tifffile.imwrite(root / "nm_constant.tif", np.full((4, 16, 16), 5, np.uint16))
    # configs
    (root / "big_patch.yaml").write_text("train: {val_every: 5, patch_size: 128}\n")
    (root / "typo.yaml").write_text("train: {val_evry: 5}\n")
    (root / "unknown_section.yaml").write_text("trian: {val_every: 5}\n")
    (root / "mistyped.yaml").write_text("train: {val_every: five}\n")
    (root / "negative.yaml").write_text("train: {lr: -0.1}\n")
    (root / "not_mapping.yaml").write_text("train: 5\n")
    (root / "list.yaml").write_text("- train\n- data\n")
    (root / "broken.yaml").write_text("train: {val_every: [5\n")
    (root / "python_tag.yaml").write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    # output locations that cannot be created
    (root / "a_file").write_text("a regular file: nothing can be created below it\n")
    (root / "not_empty").mkdir(exist_ok=True)
    (root / "not_empty" / "notes.txt").write_text("mine\n")
    return root


def write_packages(root: Path, run: Path) -> Path:
    """root/pkg/*.zip: a good minimal package of `run` (what load_package_sampler reads) and broken variants."""
    pkg = root / "pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    good = make_package(run, pkg / "good.zip")
    members = {n: zipfile.ZipFile(good).read(n) for n in zipfile.ZipFile(good).namelist()}

    def variant(name: str, change: Callable[[dict], None]) -> None:
        m = dict(members)
        change(m)
        with zipfile.ZipFile(pkg / name, "w") as z:
            for n, data in m.items():
                z.writestr(n, data)

    variant("no_rdf.zip", lambda m: m.pop("rdf.yaml"))
    variant("tampered_weights.zip", lambda m: m.update({L.STATE_DICT_FILE: _retensor(m[L.STATE_DICT_FILE])}))
    variant("tampered_code.zip",
            lambda m: m.update({L.ARCHITECTURE_FILE: m[L.ARCHITECTURE_FILE] + b"\nimport os  # injected\n"}))
    variant("zip_slip.zip", lambda m: m.update({"../../evil.py": b"print('escaped')\n"}))
    variant("missing_weights.zip", lambda m: m.pop(L.STATE_DICT_FILE))
    variant("rdf_not_ours.zip", lambda m: m.update({"rdf.yaml": b"type: model\nname: someone else's model\n"}))
    laughs = b"".join(b"l%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 9) if i else b"lol")
                      for i in range(9))  # 9 levels of 9 aliases: ~10^8 nodes when expanded
    variant("yaml_aliases.zip", lambda m: m.update({"rdf.yaml": laughs + m["rdf.yaml"]}))
    variant("huge_architecture.zip", lambda m: m.update({"rdf.yaml": _edit_rdf(
        m["rdf.yaml"], lambda d: d["architecture"].update(n_filters=10**7))}))  # ~10^14 parameters if built
    variant("architecture_too_big_for_weights.zip", lambda m: m.update({"rdf.yaml": _edit_rdf(
        m["rdf.yaml"], lambda d: d["architecture"].update(n_filters=1024, n_levels=8, z_dim=1024))}))  # in limits
    variant("bad_channel_names.zip", lambda m: m.update({"rdf.yaml": _edit_rdf(
        m["rdf.yaml"], lambda d: d.update(channel_names=["only one"]))}))
    variant("bad_normalization.zip", lambda m: m.update({"rdf.yaml": _edit_rdf(
        m["rdf.yaml"], lambda d: d.update(normalization={"input_mean": "high"}))}))
    variant("oversized_weights.zip", _oversized_weights)
    (pkg / "garbage.zip").write_bytes(b"PK\x03\x04 not really a zip" * 5)
    data = good.read_bytes()
    (pkg / "truncated.zip").write_bytes(data[: len(data) // 2])
    return pkg


def _edit_rdf(rdf: bytes, change: Callable[[dict], None]) -> bytes:
    """rdf.yaml with `change` applied to its config.denoisplit (hashes of the files stay right)."""
    d = yaml.safe_load(rdf)
    change(d["config"]["denoisplit"])
    return yaml.safe_dump(d, sort_keys=False).encode()


def _oversized_weights(m: dict) -> None:
    """weights.pt padded with a 64 MB tensor (sha256 updated: only the size is wrong), for a network of ~0.1 MB:
    the reader must refuse it before reading it into memory."""
    state = torch.load(io.BytesIO(m[L.STATE_DICT_FILE]), weights_only=True)
    state["padding"] = torch.zeros(16 * 2**20)
    buf = io.BytesIO()
    torch.save(state, buf)
    m[L.STATE_DICT_FILE] = buf.getvalue()
    d = yaml.safe_load(m["rdf.yaml"])
    d["weights"]["pytorch_state_dict"]["sha256"] = _sha(m[L.STATE_DICT_FILE])
    m["rdf.yaml"] = yaml.safe_dump(d, sort_keys=False).encode()


def _retensor(blob: bytes) -> bytes:
    state = torch.load(io.BytesIO(blob), weights_only=True)
    state["calibration_scale"] = state["calibration_scale"] * 10
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_package(run: Path, out: Path, n_samples: int = 3, seed: int = 5, formats=("pytorch_state_dict",)) -> Path:
    """A minimal package zip of `run`: rdf.yaml (config.denoisplit + weights with sha256), weights.pt, model.py and,
    if asked, TorchScript / ONNX weights. Not a full bioimage.io export (no self-test: seconds, not a minute), but
    exactly what `package.reader.load_package_sampler` and the three runtimes read."""
    from denoisplit_zoo.package import writer as ex
    from denoisplit_zoo.run_folder import load_run

    r = load_run(run)
    sampler = ex.export_sampler(r, n_samples, seed)
    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in sampler.state_dict().items()}, buf)
    files[L.STATE_DICT_FILE] = buf.getvalue()
    files[L.ARCHITECTURE_FILE] = L.MODEL_SOURCE.read_bytes()
    kwargs = ex.architecture_kwargs(r, n_samples, seed)
    weights = {"pytorch_state_dict": {"source": L.STATE_DICT_FILE, "sha256": _sha(files[L.STATE_DICT_FILE]),
                                      "architecture": {"source": L.ARCHITECTURE_FILE,
                                                       "sha256": _sha(files[L.ARCHITECTURE_FILE]),
                                                       "callable": "SplitSampler", "kwargs": kwargs}}}
    if "torchscript" in formats:
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(sampler), buf)
        files[L.TORCHSCRIPT_FILE] = buf.getvalue()
        weights["torchscript"] = {"source": L.TORCHSCRIPT_FILE, "sha256": _sha(files[L.TORCHSCRIPT_FILE])}
    if "onnx" in formats:
        tmp = out.with_suffix(".onnx.tmp")
        ex.save_onnx(sampler, tmp, torch.zeros(1, 1, 64, 64))
        files[L.ONNX_FILE] = tmp.read_bytes()
        tmp.unlink()
        weights["onnx"] = {"source": L.ONNX_FILE, "sha256": _sha(files[L.ONNX_FILE]), "opset_version": L.ONNX_OPSET}
    rdf = {"format_version": "0.5.4", "type": "model", "name": "minimal test package", "weights": weights,
           "config": {"denoisplit": {"architecture": kwargs, "normalization": r.norm.to_dict(),
                                     "channel_names": list(r.channel_names), "halo": 64}}}
    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return out


# ---------------------------------------------------------------------------------------------- simulated faults
@contextlib.contextmanager
def full_disk(fail_when: Callable[[Path], bool] = lambda p: True):
    """A full disk, for real: every file the package writes goes through fileio.atomic_open, whose `open(tmp, "wb")`
    is redirected here to /dev/full, so the kernel answers the write with ENOSPC (errno 28) exactly as a full disk
    does. `fail_when(temp_path)` picks which writes hit the full disk (default: all)."""
    from denoisplit_zoo import fileio

    if not Path("/dev/full").exists():
        import pytest

        pytest.skip("no /dev/full on this system")
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and fail_when(Path(file)):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    fileio.open = fake_open  # module global shadows the builtin inside fileio only
    try:
        yield
    finally:
        del fileio.open


# ------------------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    id: str
    what: str  # the input, in words
    argv: list  # the command, without the program name
    out: Optional[str]  # output path that must not exist afterwards (error cases)
    needle: str = ""  # a word the message (error) or a warning line (ok) must contain
    expect: str = "error"  # "error": exit 2, one line; "ok": exit 0 and finite outputs
    setup: Optional[str] = None  # "full_disk"


def _train(data: str, *extra: str, out: str = "out_run") -> list:
    return [*TRAIN, "--data", data, *extra, "--out", out]


def _predict(model: str, *inputs: str, out: str = "out_pred") -> list:
    return ["predict", model, *inputs, "--out", out, *PRED_OPTS]


def _fit(*args: str, out: str = "out_nm/nm.npz") -> list:
    return ["noise-model", "fit", "--iterations", "5", "--batch-size", "1000", *args, "--out", out]


CASES = [
    # training data: shape and size
    Case("npz-ndim", "npz `clean` with 2 dims (Y, X)", _train("ndim.npz"), "out_run", "shape"),
    Case("npz-5d", "npz `clean` with 5 dims", _train("five_d.npz"), "out_run", "shape"),
    Case("npz-one-channel", "npz with 1 channel, --channels 0 1", _train("one_channel.npz"), "out_run", "channel"),
    Case("npz-empty", "npz with 0 images", _train("empty.npz"), "out_run", "no images"),
    Case("clean-noisy-shapes", "npz `clean` and `noisy` of different sizes", _train("shapes.npz"), "out_run",
         "differs"),
    Case("channel-sizes", "two TIFF stacks of different sizes (channel pair)", _train("a.tif,b_small.tif"), "out_run",
         "must match"),
    Case("tiff-4d", "TIFF stack with 4 dims", _train("a.tif,b_4d.tif"), "out_run", "shape"),
    Case("channel-range", "--channels 0 5 on a 2-channel npz", _train("good.npz", "--channels", "0", "5"), "out_run",
         "out of range"),
    Case("channel-same", "--channels 1 1", _train("good.npz", "--channels", "1", "1"), "out_run", "differ"),
    Case("too-small", "64 x 64 images, patch size 128", _train("good.npz", "--config", "big_patch.yaml"), "out_run",
         "smaller"),
    # training data: values
    Case("nan", "NaN pixel in `clean`", _train("nan.npz"), "out_run", "NaN"),
    Case("inf", "inf pixel in `noisy`", _train("inf.npz"), "out_run", "inf"),
    Case("constant", "one image's channel constant", _train("constant.npz"), "out_run", "constant"),
    Case("float64-huge", "float64 1e300 (beyond float32)", _train("float64_huge.npz"), "out_run", "float32"),
    Case("int64-extremes-poisson", "int64 at +-9.2e18 with --poisson 1", _train("int64_extremes.npz"), "out_run",
         "Poisson"),
    Case("uint16-saturated", "uint16 with saturated 65535 blobs", _train("uint16_saturated.npz"), None,
         expect="ok"),
    Case("int32-extremes", "int32 at 2**31-1 / -2**31", _train("int32_extremes.npz"), None, expect="ok"),
    Case("int64-extremes", "int64 at +-9.2e18, Gaussian noise only", _train("int64_extremes.npz", "--poisson", "0"),
         None, expect="ok"),
    Case("objects", "npz of Python objects (pickle)", _train("objects.npz"), "out_run", "dtype"),
    Case("strings", "npz of strings", _train("strings.npz"), "out_run", "dtype"),
    # training data: broken files
    Case("npz-truncated", "npz cut in half", _train("truncated.npz"), "out_run", "npz"),
    Case("npz-corrupt", "npz with zeroed bytes (CRC)", _train("corrupt.npz"), "out_run", "npz"),
    Case("npz-garbage", "npz that is not a zip", _train("garbage.npz"), "out_run", "npz"),
    Case("npz-nokeys", "npz without clean/noisy", _train("nokeys.npz"), "out_run", "neither"),
    Case("tiff-truncated", "TIFF cut to a third", _train("a_truncated.tif,b.tif"), "out_run", "TIFF"),
    Case("tiff-garbage", "TIFF magic, then garbage", _train("a_garbage.tif,b.tif"), "out_run", "TIFF"),
    Case("data-missing", "--data that does not exist", _train("nope.npz"), "out_run", "missing"),
    Case("data-unsupported", "--data a .txt file", _train("fast.yaml"), "out_run", "unsupported"),
    # configuration
    Case("config-typo", "config key typo `train.val_evry`", _train("good.npz", "--config", "typo.yaml"), "out_run",
         "val_every"),
    Case("config-unknown-section", "unknown section `trian`",
         _train("good.npz", "--config", "unknown_section.yaml"), "out_run", "train"),
    Case("config-mistyped", "`train.val_every: five`", _train("good.npz", "--config", "mistyped.yaml"), "out_run",
         "val_every"),
    Case("config-range", "`train.lr: -0.1`", _train("good.npz", "--config", "negative.yaml"), "out_run", "lr"),
    Case("config-not-mapping", "`train: 5`", _train("good.npz", "--config", "not_mapping.yaml"), "out_run",
         "mapping"),
    Case("config-list", "config file that is a list", _train("good.npz", "--config", "list.yaml"), "out_run",
         "mapping"),
    Case("config-broken-yaml", "unterminated YAML", _train("good.npz", "--config", "broken.yaml"), "out_run", "YAML"),
    Case("config-python-tag", "YAML `!!python/object/apply` tag", _train("good.npz", "--config", "python_tag.yaml"),
         "out_run", "YAML"),
    Case("config-missing", "--config that does not exist", _train("good.npz", "--config", "nope.yaml"), "out_run",
         "missing"),
    # output folders and the disk
    Case("out-under-file", "--out below a regular file (unwritable)", _train("good.npz", out="a_file/run"),
         "a_file/run", "Not a directory"),
    Case("out-not-empty", "--out a non-empty folder that is not a run", _train("good.npz", out="not_empty"), None,
         "not empty"),
    Case("resume-not-run", "--resume on a folder that is not a run", [*TRAIN, "--resume", "--out", "not_empty"],
         None, "not a run folder"),
    Case("train-disk-full", "disk full while writing the run folder", _train("good.npz"), "out_run",
         "No space left", setup="full_disk"),
    # predict: inputs
    Case("predict-4d", "TIFF with 5 dims", _predict("{run}", "img_4d.tif"), "out_pred", "shape"),
    Case("predict-1d", ".npy with 1 dim", _predict("{run}", "img_1d.npy"), "out_pred", "shape"),
    Case("predict-nan", "NaN pixel", _predict("{run}", "img_nan.tif"), "out_pred", "NaN"),
    Case("predict-inf", "-inf pixel (.npy)", _predict("{run}", "img_inf.npy"), "out_pred", "inf"),
    Case("predict-float64-huge", "float64 1e300 (.npy)", _predict("{run}", "img_float64_huge.npy"), "out_pred",
         "float32"),
    Case("predict-objects", ".npy of Python objects", _predict("{run}", "img_objects.npy"), "out_pred", "npy"),
    Case("predict-complex", "complex64 TIFF", _predict("{run}", "img_complex.tif"), "out_pred", "dtype"),
    Case("predict-rgb-tiff", "RGB TIFF (64 x 64 x 3, uint8)", _predict("{run}", "img_rgb.tif"), "out_pred", "colour"),
    Case("predict-channel-tiff", "ImageJ hyperstack with 2 channels (CYX)", _predict("{run}", "img_channels.tif"),
         "out_pred", "channels"),
    Case("train-rgb-tiff", "RGB TIFF as one channel of the training pair", _train("img_rgb.tif,b.tif"), "out_run",
         "colour"),
    Case("predict-tiff-truncated", "truncated TIFF", _predict("{run}", "img_truncated.tif"), "out_pred", "TIFF"),
    Case("predict-npy-truncated", "truncated .npy", _predict("{run}", "img_truncated.npy"), "out_pred", "npy"),
    Case("predict-tiff-garbage", "not a TIFF", _predict("{run}", "img_garbage.tif"), "out_pred", "TIFF"),
    Case("predict-second-bad", "good input, then a NaN input", _predict("{run}", "img.tif", "img_nan.tif"),
         "out_pred", "NaN"),
    Case("predict-zeros", "all-zero image", _predict("{run}", "img_zeros.tif"), None, expect="ok"),
    Case("predict-uint16-max", "uint16 image, all 65535 (model trained on 20..250: a warning)",
         _predict("{run}", "img_uint16_max.tif"), None, "training stds", expect="ok"),
    Case("predict-int32-extremes", "int32 rows at 2**31-1 / -2**31 (~10^7 training stds out: float32 keeps no "
         "image detail)", _predict("{run}", "img_int32_extremes.tif"), "out_pred", "training stds"),
    Case("predict-3e38", "constant 3e38 image (float32, ~10^36 training stds out)", _predict("{run}", "img_3e38.tif"),
         "out_pred", "training stds"),
    Case("predict-1px", "1 x 1 pixel image", _predict("{run}", "img_1px.tif"), None, expect="ok"),
    Case("predict-seed-range", "--seed 2**31 (beyond the latent-noise hash)", [*_predict("{run}", "img.tif"),
         "--seed", str(2**31)], "out_pred", "seed"),
    Case("predict-out-under-file", "--out below a regular file", _predict("{run}", "img.tif", out="a_file/pred"),
         "a_file/pred", "Not a directory"),
    Case("predict-disk-full", "disk full while writing predictions", _predict("{run}", "img.tif"), "out_pred",
         "No space left", setup="full_disk"),
    # predict: models
    Case("model-missing", "model path that does not exist", _predict("nope", "img.tif"), "out_pred", "missing"),
    Case("run-truncated-ckpt", "run folder with a truncated checkpoint", _predict("run_badckpt", "img.tif"),
         "out_pred", "checkpoint"),
    Case("zip-no-rdf", "package zip without rdf.yaml", _predict("{pkg}/no_rdf.zip", "img.tif"), "out_pred",
         "rdf.yaml"),
    Case("zip-tampered-weights", "package with edited weights.pt", _predict("{pkg}/tampered_weights.zip", "img.tif"),
         "out_pred", "sha256"),
    Case("zip-tampered-code", "package with edited model.py", _predict("{pkg}/tampered_code.zip", "img.tif"),
         "out_pred", "sha256"),
    Case("zip-slip", "package with a `../../evil.py` member", _predict("{pkg}/zip_slip.zip", "img.tif"), "out_pred",
         "unsafe"),
    Case("zip-missing-weights", "package without weights.pt", _predict("{pkg}/missing_weights.zip", "img.tif"),
         "out_pred", "weights.pt"),
    Case("zip-not-ours", "a zip whose rdf.yaml is not a denoisplit package", _predict("{pkg}/rdf_not_ours.zip",
         "img.tif"), "out_pred", "denoisplit"),
    Case("zip-yaml-aliases", "rdf.yaml with nested aliases (billion laughs)",
         _predict("{pkg}/yaml_aliases.zip", "img.tif"), "out_pred", "aliases"),
    Case("zip-huge-architecture", "rdf.yaml declares n_filters 10^7 (~10^14 parameters)",
         _predict("{pkg}/huge_architecture.zip", "img.tif"), "out_pred", "n_filters"),
    Case("zip-architecture-vs-weights", "rdf.yaml declares a ~10^9-parameter network within the limits; weights.pt "
         "holds 0.1 MB", _predict("{pkg}/architecture_too_big_for_weights.zip", "img.tif"), "out_pred", "too few"),
    Case("zip-bad-channel-names", "rdf.yaml `channel_names: [only one]`",
         _predict("{pkg}/bad_channel_names.zip", "img.tif"), "out_pred", "channel_names"),
    Case("zip-bad-normalization", "rdf.yaml `normalization: {input_mean: high}`",
         _predict("{pkg}/bad_normalization.zip", "img.tif"), "out_pred", "normalization"),
    Case("zip-oversized-weights", "weights.pt of 64 MB for a 0.1 MB network (sha256 right)",
         _predict("{pkg}/oversized_weights.zip", "img.tif"), "out_pred", "implausibly large"),
    Case("zip-garbage", "a .zip that is not a zip", _predict("{pkg}/garbage.zip", "img.tif"), "out_pred", "zip"),
    Case("zip-truncated", "package zip cut in half", _predict("{pkg}/truncated.zip", "img.tif"), "out_pred", "zip"),
    # noise-model fit
    Case("nm-shapes", "--clean and --noisy of different shapes", _fit("--clean", "nm_clean.tif", "--noisy",
         "nm_noisy_small.tif"), "out_nm", "shape"),
    Case("nm-nan", "NaN in --noisy", _fit("--noisy", "img_nan.tif"), "out_nm", "NaN"),
    Case("nm-constant", "constant frames", _fit("--noisy", "nm_constant.tif"), "out_nm", "constant"),
    Case("nm-out-suffix", "--out without .npz", _fit("--noisy", "nm_clean.tif", out="out_nm/nm.bin"), "out_nm",
         ".npz"),
    Case("nm-iterations-0", "--iterations 0", _fit("--clean", "nm_clean.tif", "--noisy", "nm_clean.tif",
         "--iterations", "0"), "out_nm", "positive integer"),
    Case("nm-batch-0", "--batch-size 0", _fit("--clean", "nm_clean.tif", "--noisy", "nm_clean.tif",
         "--batch-size", "0"), "out_nm", "positive integer"),
    Case("nm-min-sigma-negative", "--min-sigma -1", _fit("--clean", "nm_clean.tif", "--noisy", "nm_clean.tif",
         "--min-sigma", "-1"), "out_nm", "> 0"),
]


# --------------------------------------------------------------------------------------------------- running them
@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    outcome: str  # for "ok" cases: what was checked (finite outputs); else ""


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def command(case: Case, run: str, pkg: str) -> list[str]:
    return [a.replace("{run}", run).replace("{pkg}", pkg) for a in case.argv]


def run_case(case: Case, root: Path, run: str = "run", pkg: str = "pkg") -> Result:
    """Run one case through `denoisplit_zoo.cli.main` in `root` (one torch thread); stdout/stderr captured."""
    from denoisplit_zoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    setup = full_disk() if case.setup == "full_disk" else contextlib.nullcontext()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with chdir(root), setup, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(command(case, run, pkg))
    finally:
        torch.set_num_threads(old)
    outcome = check_ok(case, root) if case.expect == "ok" and rc == 0 else ""
    return Result(rc, out.getvalue(), err.getvalue(), outcome)


def check_ok(case: Case, root: Path) -> str:
    """An "ok" case's outputs are finite; returns a one-line summary (raises AssertionError otherwise)."""
    import json

    if case.argv[0] == "train":
        run = root / case.argv[case.argv.index("--out") + 1]
        log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
        losses = [e[k] for e in log for k in ("train_loss", "val_loss")]
        assert log and np.isfinite(losses).all(), log
        shutil.rmtree(run)
        return f"trained; losses finite (val_loss {log[-1]['val_loss']:.3f})"
    out = root / case.argv[case.argv.index("--out") + 1]
    files = sorted(out.glob("*.tif"))
    arrays = [tifffile.imread(f) for f in files]
    assert len(files) == 3 and all(np.isfinite(a).all() for a in arrays), files
    span = f"{min(float(a.min()) for a in arrays[:2]):.4g} .. {max(float(a.max()) for a in arrays[:2]):.4g}"
    shutil.rmtree(out)
    return f"3 files, all finite (means {span})"


def leftovers(case: Case, root: Path) -> list[str]:
    """What a failed command left behind: its output path (if it should not exist) and any temp file anywhere."""
    left = [str(p.relative_to(root)) for p in root.rglob(".*.tmp*")]
    if case.out and (root / case.out).exists():
        left.append(case.out)
    return left


def prepare_run_copies(root: Path, run: Path) -> None:
    """root/run_badckpt: a copy of the run whose checkpoints are truncated."""
    bad = root / "run_badckpt"
    if not bad.exists():
        shutil.copytree(run, bad)
        for ck in (bad / "checkpoints").glob("*.pt"):
            ck.write_bytes(ck.read_bytes()[:500])


# ------------------------------------------------------------------------------------------------ the generator
def generate(doc: Path) -> None:
    """Run every case in a scratch folder (training a tiny run for the predict cases) and write the table."""
    import tempfile

    from denoisplit_zoo.cli import main

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_inputs(Path(tmp))
        with chdir(root), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", "--data", "good.npz", "--preset", "tiny", "--gaussian", "1", "--poisson", "1",
                         "--max-steps", "10", "--config", "fast.yaml", "--out", "run"]) == 0
        prepare_run_copies(root, root / "run")
        write_packages(root, root / "run")
        rows = []
        for case in CASES:
            res = run_case(case, root)
            lines = res.stderr.strip().splitlines()
            if case.expect == "ok":
                msg = f"exit {res.rc}: {res.outcome or (lines[-1] if lines else '')}"
            else:
                msg = f"exit {res.rc}: `{lines[-1] if lines else ''}`" + ("" if len(lines) == 1 else
                                                                         f" ({len(lines)} stderr lines!)")
            left = leftovers(case, root)
            if left:
                msg += f" — LEFT BEHIND: {', '.join(left)}"
            cmd = "denoisplit-zoo " + " ".join(command(case, "run", "pkg"))
            rows.append(f"| {case.what} | `{cmd}` | {msg} |".replace("|x|", "\\|x\\|"))
            for p in ("out_run", "out_pred", "out_nm"):
                shutil.rmtree(root / p, ignore_errors=True)
    head = ["# Bad inputs and what the CLI says", "",
            "Generated by `OMP_NUM_THREADS=1 python -m tests.bad_inputs` (every row is a real run of "
            "`denoisplit_zoo.cli.main`; tests/test_robustness.py asserts the same cases: exit 2, exactly one stderr "
            "line, no traceback, nothing left in the output folder and no temp file anywhere). Rows marked "
            "'exit 0' are extreme but valid inputs: they must work with finite outputs. `run` is a tiny trained run, "
            "`pkg/*.zip` minimal packages of it (tests/bad_inputs.py:write_packages); `disk full` is a real ENOSPC "
            "from /dev/full (tests/bad_inputs.py:full_disk).", "",
            "| input | command | result |", "|---|---|---|"]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    generate(Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md")
