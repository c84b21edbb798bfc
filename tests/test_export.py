"""Export (issue 4): the self-tested bioimage.io zip, its consumers' constraints, and reading it back.

One full export (CLI, recipe, K=4, bioimageio.core test of all three weight formats) is shared by most tests
(tests/export_helpers.py); two cheap extra exports cover the noise-off halo check and the failing self-test.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .export_helpers import K, SEED, exported, one_thread

import bioimageio.core  # noqa: E402,F401  (the [bmz] extra: the README test command installs it)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from denoisplit_zoo import export as ex  # noqa: E402
from denoisplit_zoo.package import description, layout, reader, recipe  # noqa: E402
from denoisplit_zoo.errors import UserError  # noqa: E402
from denoisplit_zoo.run_folder import load_run  # noqa: E402


@pytest.fixture(scope="module")
def pkg(tmp_path_factory, tiny_run):
    return exported(tmp_path_factory, tiny_run)


@pytest.fixture(scope="module")
def rdf(pkg):
    with zipfile.ZipFile(pkg["zip"]) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _member(pkg, name: str) -> bytes:
    with zipfile.ZipFile(pkg["zip"]) as zf:
        return zf.read(name)


def _input(shape=(2, 1, 144, 160), seed=0) -> torch.Tensor:
    """Normalised input of a valid size other than the test tensor's (dynamic shapes are exercised)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------- export + test
def test_export_cli_passes_bioimageio_test_for_all_formats(pkg):
    assert pkg["rc"] == 0, pkg["stdout"]
    out = pkg["stdout"]
    for fmt in ("onnx", "pytorch_state_dict", "torchscript"):
        assert f"passed Reproduce test outputs from test inputs ({fmt})" in out
    assert "failed" not in out
    assert pkg["network"] == []  # validation + test_model ran offline
    assert pkg["zip"].is_file()
    assert sorted(p.name for p in pkg["zip"].parent.iterdir()) == ["model.zip"]  # no temp files left behind


def test_rdf_is_written_in_the_format_the_zoo_remote_runtime_reads(rdf):
    """bioimageio.spec 0.5.10 (the zoo's remote test runtime, core 0.10.4) refuses format 0.5.11+ covers /
    documentation objects before testing any weights; the zip carries them as plain file names in format 0.5.10,
    which today's core read too (its self-test passed inside export_package)."""
    from denoisplit_zoo.package.zoo import COMPAT_FORMAT_VERSION

    assert rdf["format_version"] == COMPAT_FORMAT_VERSION == "0.5.10"
    assert rdf["covers"] == ["cover.png"] and rdf["documentation"] == "README.md"


def test_rdf_declares_the_oldest_verified_torch_and_every_size_from_the_minimum(rdf):
    """A runner that builds its environment from the rdf gets the oldest torch the weights were verified on (not the
    exporter's), and bioimageio.core accepts every image size from 2 * halo + 1 up (step 1)."""
    from denoisplit_zoo.package.layout import VERIFIED_TORCH

    assert rdf["weights"]["pytorch_state_dict"]["pytorch_version"] == VERIFIED_TORCH == "2.0.1"
    assert rdf["weights"]["torchscript"]["pytorch_version"] == VERIFIED_TORCH
    assert rdf["config"]["denoisplit"]["exported_with_torch"] == torch.__version__
    halo = rdf["outputs"][0]["axes"][2]["halo"]
    for ax in rdf["inputs"][0]["axes"][2:]:
        assert ax["size"] == {"min": 2 * halo + 1, "step": 1}


def test_zip_layout_and_metadata(pkg, rdf):
    with zipfile.ZipFile(pkg["zip"]) as zf:
        names = set(zf.namelist())
    assert {"rdf.yaml", "README.md", "cover.png", "model.py", "weights.pt", "weights_torchscript.pt", "weights.onnx",
            "test_input.npy", "test_output.npy", "sample_input.tif", "sample_output.tif", "training_config.yaml",
            "calibration.png"} <= names
    assert _member(pkg, "model.py") == layout.MODEL_SOURCE.read_bytes()  # shipped verbatim
    assert rdf["name"] == "denoiSplit test package" and rdf["license"] == "MIT"
    assert all("github_user" not in a for a in rdf["authors"]) and rdf["authors"][0]["name"] == "Test Author"
    assert "careamics" not in [t.lower() for t in rdf["tags"]]
    assert {"denoising", "uncertainty", "test"} <= set(rdf["tags"])
    dois = [c.get("doi") for c in rdf["cite"]]
    assert dois[0] == "10.48550/arXiv.2403.11854" and "10.1234/example.5678" in dois
    weights = rdf["weights"]
    assert weights["pytorch_state_dict"]["architecture"]["callable"] == "SplitSampler"
    assert "parent" not in weights["pytorch_state_dict"]
    assert weights["torchscript"]["parent"] == weights["onnx"]["parent"] == "pytorch_state_dict"
    assert "http" not in _member(pkg, "rdf.yaml").decode()  # nothing for validation to fetch (offline)


def test_model_card_and_cover(pkg):
    card = _member(pkg, "README.md").decode()
    assert "\n# Validation\n" in card and "## How it was trained" in card and "calibration.png" in card
    assert "blobs_mean" in card and f"{K} posterior samples" in card
    assert "$" not in card  # every template placeholder was filled
    png = _member(pkg, "cover.png")
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and w == 2 * h and len(png) < 500_000


def test_one_input_one_output_and_deepimagej_ops(rdf):
    assert len(rdf["inputs"]) == 1 and len(rdf["outputs"]) == 1  # ilastik: single input AND single output
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    assert inp["id"] == "input" and out["id"] == "prediction"
    chan = next(a for a in out["axes"] if a["type"] == "channel")
    assert chan["channel_names"] == ["blobs_mean", "lines_mean", "blobs_std", "lines_std"]
    ops = [p["id"] for p in inp.get("preprocessing", []) + out.get("postprocessing", [])]
    assert set(ops) <= description.DEEPIMAGEJ_OPS and "fixed_zero_mean_unit_variance" in ops and "scale_linear" in ops
    y_in = next(a for a in inp["axes"] if a.get("id") == "y")
    y_out = next(a for a in out["axes"] if a.get("id") == "y")
    step, halo = y_in["size"]["step"], y_out["halo"]
    assert step == 1 and halo % 8 == 0 and y_in["size"]["min"] - 2 * halo == 1  # tiny preset: 2**3 grid


def test_onnx_ir_opset_and_single_io(pkg):
    m = onnx.load_from_string(_member(pkg, "weights.onnx"))
    assert m.ir_version <= 8
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) <= 17
    inits = {i.name for i in m.graph.initializer}
    assert [i.name for i in m.graph.input if i.name not in inits] == ["input"]
    assert [o.name for o in m.graph.output] == ["prediction"]


def test_torchscript_loads_plainly_and_agrees_with_onnx(pkg):
    x = _input()
    with one_thread(), torch.no_grad():
        ts = torch.jit.load(io.BytesIO(_member(pkg, "weights_torchscript.pt")), map_location="cpu")
        y_ts = ts(x).numpy()
    sess = ort.InferenceSession(_member(pkg, "weights.onnx"), providers=["CPUExecutionProvider"])
    (y_onnx,) = sess.run(None, {"input": x.numpy()})
    assert y_ts.shape == y_onnx.shape == (2, 4, 144, 160)
    assert np.abs(y_ts - y_onnx).max() <= 1e-4 * np.abs(y_ts).max()
    assert np.abs(y_ts[:, 2:]).max() > 0  # the std channels are real samples' spread


def test_rdf_config_holds_noise_models_calibration_and_normalisation(pkg, rdf):
    run = load_run(pkg["run"])
    den = rdf["config"]["denoisplit"]
    assert den["noise_models"] == [nm.to_dict() for nm in run.noise_models]
    assert den["calibration"]["scale"] == pytest.approx(run.calibration_scale)
    assert set(den["calibration"]["channels"]) == {"blobs", "lines"}
    assert den["normalization"] == run.norm.to_dict()
    assert den["n_samples"] == K and den["seed"] == SEED and den["noise"] == "counter-hash"
    assert den["architecture"]["n_samples"] == K and den["halo"] == rdf["outputs"][0]["axes"][2]["halo"]
    assert den["training"]["preset"] == "tiny" and den["training"]["steps"] == run.config.train.max_steps
    # the same numbers are buffers of the exported weights
    state = torch.load(io.BytesIO(_member(pkg, "weights.pt")), weights_only=True)
    assert state["calibration_scale"].tolist() == pytest.approx(run.calibration_scale)
    assert torch.equal(state["nm_weight"][0], run.noise_models[0].weight)
    assert state["input_mean"].item() == pytest.approx(run.norm.input_mean)


# --------------------------------------------------------------------------------------------- reading it back
def test_package_sampler_equals_run_sampler(pkg):
    run = load_run(pkg["run"])
    sampler, names, norm, meta = reader.load_package_sampler(pkg["zip"])
    assert names == ["blobs", "lines"] and norm == run.norm and meta["n_samples"] == K and meta["seed"] == SEED
    x = _input((1, 1, 136, 144))
    with one_thread(), torch.no_grad():
        assert torch.equal(sampler(x), run.sampler(K, SEED)(x))
        other, *_ = reader.load_package_sampler(pkg["zip"], n_samples=6, seed=3)
        assert torch.equal(other(x), run.sampler(6, 3)(x))


def _rewrite_zip(src: Path, dst: Path, replace: dict) -> Path:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for name in zi.namelist():
            zo.writestr(name, replace.pop(name, zi.read(name)))
        for name, data in replace.items():
            zo.writestr(name, data)
    return dst


def test_load_package_sampler_refuses_unsafe_or_tampered_zips(pkg, tmp_path):
    evil = _rewrite_zip(pkg["zip"], tmp_path / "evil.zip", {"../evil.py": b"print('x')"})
    with pytest.raises(UserError, match="unsafe member"):
        reader.load_package_sampler(evil)
    state = torch.load(io.BytesIO(_member(pkg, "weights.pt")), weights_only=True)
    state["calibration_scale"] *= 10
    buf = io.BytesIO()
    torch.save(state, buf)
    tampered = _rewrite_zip(pkg["zip"], tmp_path / "tampered.zip", {"weights.pt": buf.getvalue()})
    with pytest.raises(UserError, match="sha256"):
        reader.load_package_sampler(tampered)
    with pytest.raises(UserError, match="missing file"):
        reader.load_package_sampler(tmp_path / "nope.zip")


def test_bioimageio_predict_cli_writes_four_channels(pkg, rdf, tmp_path):
    import tifffile
    size = next(a for a in rdf["inputs"][0]["axes"] if a.get("id") == "y")["size"]
    assert size["step"] == 1
    shape = (size["min"] + 3, size["min"] + 22)  # any size from the minimum up (the graph pads to its grid)
    raw = np.random.default_rng(1).uniform(20, 200, shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "x.tif", raw)
    proc = subprocess.run([sys.executable, "-m", "bioimageio.core", "predict", str(pkg["zip"]), "--inputs", "x.tif"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache"),
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = [p for p in tmp_path.rglob("*.tif") if p.name == "x.tif" and p.parent != tmp_path]
    assert len(outs) == 1
    y = tifffile.imread(outs[0])
    assert y.shape == (1, 4, *shape) and np.isfinite(y).all() and (y[:, 2:] >= 0).all()


def test_denoisplit_predict_on_zip_equals_run_folder(pkg, tmp_path):
    import tifffile

    from denoisplit_zoo.cli import main

    raw = np.random.default_rng(2).uniform(20, 200, (70, 90)).astype(np.float32)
    tifffile.imwrite(tmp_path / "img.tif", raw)
    with one_thread():
        assert main(["predict", str(pkg["zip"]), str(tmp_path / "img.tif"), "--out", str(tmp_path / "a")]) == 0
        assert main(["predict", str(pkg["run"]), str(tmp_path / "img.tif"), "--out", str(tmp_path / "b"),
                     "--samples", str(K), "--seed", str(SEED)]) == 0
    run_names = load_run(pkg["run"]).channel_names  # the zip uses the recipe's names (blobs, lines) instead

    def arrays(d, rename=lambda s: s):
        return {rename(str(p.relative_to(d))): p for p in d.rglob("*") if p.suffix in (".tif", ".tiff", ".npy")}

    a = arrays(tmp_path / "a", lambda s: s.replace("blobs", run_names[0]).replace("lines", run_names[1]))
    b = arrays(tmp_path / "b")
    assert a and sorted(a) == sorted(b)
    for name in a:
        load = np.load if a[name].suffix == ".npy" else tifffile.imread
        np.testing.assert_array_equal(load(a[name]), load(b[name]))


# ------------------------------------------------------------------------------------------ cheap extra exports
def test_reader_accepts_the_architecture_keys_of_earlier_versions(pkg, tmp_path):
    """Packages written before `noise` was renamed `sample_latents` still load (package/layout.LEGACY_ARCH_KEYS)."""
    rdf = yaml.safe_load(_member(pkg, "rdf.yaml"))
    arch = rdf["config"]["denoisplit"]["architecture"]
    arch["noise"] = arch.pop("sample_latents")
    old = _rewrite_zip(pkg["zip"], tmp_path / "old.zip", {"rdf.yaml": yaml.safe_dump(rdf, sort_keys=False).encode()})
    sampler, *_, meta = reader.load_package_sampler(old)
    assert sampler.sample_latents is True and meta["architecture"]["sample_latents"] is True
    assert "noise" not in meta["architecture"]


def test_reader_ignores_source_and_sha256_inside_config(pkg, tmp_path):
    """A fine-tuned run's provenance ({source: <bundled model name>, sha256: <its checkpoint>}) sits in
    config.denoisplit.training; it is not a file of the package. Every quickstart package had one, and the reader
    refused them all ("package lacks w2s_mito_actin_small, which rdf.yaml lists")."""
    rdf = yaml.safe_load(_member(pkg, "rdf.yaml"))
    rdf["config"]["denoisplit"].setdefault("training", {})["init_from"] = {
        "source": "w2s_mito_actin_small", "kind": "bundled", "sha256": "0" * 64}
    tuned = _rewrite_zip(pkg["zip"], tmp_path / "tuned.zip", {"rdf.yaml": yaml.safe_dump(rdf, sort_keys=False).encode()})
    sampler, *_ = reader.load_package_sampler(tuned)
    assert sampler.n_samples == K
    rdf["attachments"] = [{"source": "missing.md", "sha256": "0" * 64}]  # files outside config: still checked
    bad = _rewrite_zip(pkg["zip"], tmp_path / "bad.zip", {"rdf.yaml": yaml.safe_dump(rdf, sort_keys=False).encode()})
    with pytest.raises(UserError, match="lacks missing.md"):
        reader.load_package_sampler(bad)


def test_blockwise_equals_whole_image_for_noise_off_export(pkg, tmp_path):
    """The declared halo is enough: tiled prediction by bioimageio.core equals whole-image prediction when the
    sampling noise is off (with noise, each tile draws its own noise), for blocks on the network's 2**n_levels grid:
    block and image sizes multiples of it (core steps blocks by block - 2 * halo, and the halo is a multiple too). A
    block off the grid computes on a shifted grid (docs/package_sizes.md measures by how much)."""
    import xarray as xr
    from bioimageio.core import load_model_description, predict

    with one_thread():
        res = ex.export_package(pkg["run"], tmp_path / "off.zip", n_samples=1, sample_latents=False, self_test=False)
        descr = load_model_description(str(res.path))
        g = 2 ** load_run(pkg["run"]).config.model.n_levels
        assert res.halo % g == 0 and res.step == 1
        block = 2 * res.halo + 2 * g
        size = (2 * res.halo + 4 * g, 2 * res.halo + 6 * g)
        img = np.random.default_rng(3).uniform(20, 200, (1, 1, *size)).astype(np.float32)
        x = xr.DataArray(img, dims=("batch", "channel", "y", "x"))
        whole = predict(model=descr, inputs={"input": x}).members["prediction"].data.values
        tiled = predict(model=descr, inputs={"input": x},
                        blocksize_parameter=block - res.min_size).members["prediction"].data.values
    assert whole.shape == tiled.shape == (1, 4, *size)
    assert np.abs(whole - tiled).max() <= 1e-4 * np.abs(whole).max()


def test_failing_self_test_leaves_no_zip(pkg, tmp_path, monkeypatch):
    real = ex.predict_raw
    monkeypatch.setattr(ex, "predict_raw", lambda *a: real(*a) + 5.0)  # test outputs no weights reproduce
    out = tmp_path / "bad" / "model.zip"
    with one_thread(), pytest.raises(UserError, match="Reproduce test outputs"):
        ex.export_package(pkg["run"], out, n_samples=1, sample_latents=False)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no temp files either


# ----------------------------------------------------------------------------------------------------- recipes
def test_example_recipe_is_valid_and_typos_are_errors(tmp_path):
    example = Path(__file__).resolve().parents[1] / "packaging" / "example.yaml"
    rec = recipe.load_recipe(example)
    assert rec.authors and rec.license and Path(rec.run).is_absolute()
    assert not (example.parent / "__init__.py").exists()  # would shadow the `packaging` library
    (tmp_path / "typo.yaml").write_text("name: denoiSplit typo\nautors: [{name: X}]\n")
    with pytest.raises(UserError, match="autors"):
        recipe.load_recipe(tmp_path / "typo.yaml")
    (tmp_path / "gh.yaml").write_text("authors: [{name: X, github_user: x}]\n")
    with pytest.raises(UserError, match="github_user"):
        recipe.load_recipe(tmp_path / "gh.yaml")
    (tmp_path / "ca.yaml").write_text("tags: [CAREamics]\n")
    with pytest.raises(UserError, match="careamics"):
        recipe.load_recipe(tmp_path / "ca.yaml")


def test_export_refuses_bad_requests(tmp_path):
    with pytest.raises(UserError, match=r"\.zip"):
        ex.export_package(tmp_path, tmp_path / "model.tar")
    with pytest.raises(UserError, match="run folder"):
        ex.export_package(tmp_path / "missing", tmp_path / "model.zip")


def test_export_refuses_a_channel_calibrated_to_the_clip_floor(tiny_run, tmp_path):
    """A std scale at the clip floor means a ~0 uncertainty channel: refused (one line) unless overridden."""
    import json
    import shutil

    from denoisplit_zoo.calibration import MIN_SCALE

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    names = load_run(run).channel_names
    (run / "calibration.json").write_text(json.dumps(
        {"mode": "noisy", "channels": {names[0]: {"scale": MIN_SCALE}, names[1]: {"scale": 2.0}}}))
    out = tmp_path / "model.zip"
    with pytest.raises(UserError, match=f"calibration scale of {names[0]} is at its clip floor") as e:
        ex.export_package(run, out, n_samples=1, sample_latents=False, self_test=False)
    assert "\n" not in str(e.value) and "--allow-collapsed-calibration" in str(e.value)
    assert not out.exists()
    with one_thread():
        ex.export_package(run, out, n_samples=1, sample_latents=False, self_test=False, allow_collapsed=True)
    assert out.is_file()
