"""`evaluate` and `predict` through the CLI on the tiny run."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import tifffile

from denoisplit_zoo.cli import main

DESIGN_KEYS = {"ri_psnr", "ri_psnr_mean", "ms_ssim", "ms_ssim_mean", "calibration", "n_samples", "n_images"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def test_evaluate_test_split_writes_report(tiny_run, tmp_path):
    rep = tmp_path / "report"
    rc, out = _run(["evaluate", str(tiny_run), "--samples", "3", "--out", str(rep), "--no-progress"])
    assert rc == 0 and "RI-PSNR" in out
    m = json.loads((rep / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(m) and "micro_ssim" in m
    names = m["channel_names"]
    assert set(m["ri_psnr"]) == set(m["ms_ssim"]) == set(m["micro_ssim"]) == set(m["calibration"]) == set(names)
    for n in names:
        assert set(m["calibration"][n]) >= {"scale", "slope", "offset", "r2"}
        assert m["calibration"][n]["scale"] == 1.0  # the fixture run is not calibrated
        assert np.isfinite(m["ri_psnr"][n])
    assert m["n_samples"] == 3 and m["n_images"] == 1 and m["reference"] == "clean" and m["split"] == "test"
    assert m["ri_psnr_mean"] == pytest.approx(np.mean([m["ri_psnr"][n] for n in names]))
    report = (rep / "report.md").read_text()
    assert "RI-PSNR" in report and "examples.png" in report and "calibration.png" in report
    # the floors beside the model, the gain over the better one, and the verdict in words (docs/contracts.md)
    fl = m["floors"]
    assert set(fl) == {"naive", "no_split"} and set(fl["naive"]) == set(fl["no_split"]) == {*names, "mean"}
    for n in names:
        assert m["split_gain"][n] == pytest.approx(m["ri_psnr"][n] - max(fl["naive"][n], fl["no_split"][n]))
        split = m["split_gain"][n] > 0 and not m["resembles_other"][n] and not m["lacks_detail"][n]
        assert m["split_status"][n] == ("split" if split else "not split")
        assert m["split_status"][n] in report
        assert any(ln.strip().startswith(f"{n}:") and ln.endswith(f": {m['split_status'][n]}")
                   for ln in out.splitlines())
    assert "no split: clean sum / 2" in report and set(m["correlation"]) >= {"pred", "clean", "pred_vs_clean"}
    for fig in ("examples.png", "calibration.png"):
        assert (rep / fig).stat().st_size > 1000


def test_evaluate_noisy_only_data_says_so(tiny_run, tmp_path):
    """Data without clean images: metrics against the noisy targets, calibration with the noise models."""
    rng = np.random.default_rng(0)
    noisy = rng.uniform(20, 250, size=(2, 2, 40, 40)).astype(np.float32)
    np.savez(tmp_path / "noisy.npz", noisy=noisy)
    rep = tmp_path / "rep"
    rc, _ = _run(["evaluate", str(tiny_run), "--data", str(tmp_path / "noisy.npz"), "--samples", "2",
                  "--max-images", "1", "--out", str(rep), "--no-progress"])
    assert rc == 0
    m = json.loads((rep / "metrics.json").read_text())
    assert m["reference"] == "noisy" and m["calibration_mode"] == "noisy" and m["n_images"] == 1
    report = (rep / "report.md").read_text()
    assert "NOISY targets" in report
    assert m["floors"]["no_split"] is None and set(m["split_status"].values()) == {"unknown"}
    assert "cannot be judged without clean references" in report


def test_predict_run_folder_writes_tiffs_with_metadata(tiny_run, tmp_path):
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "img.tif", rng.uniform(20, 300, (37, 51)).astype(np.float32))
    np.save(tmp_path / "stack.npy", rng.uniform(20, 300, (2, 12, 9)).astype(np.float32))
    args = [str(tmp_path / "img.tif"), str(tmp_path / "stack.npy"), "--samples", "3", "--seed", "5", "--no-progress"]
    rc, _ = _run(["predict", str(tiny_run), *args, "--out", str(tmp_path / "a")])
    assert rc == 0
    names = json.loads((tiny_run / "data_split.json").read_text())["channel_names"]
    a = tmp_path / "a"
    assert sorted(p.name for p in a.iterdir()) == sorted(
        [f"img_{names[0]}.tif", f"img_{names[1]}.tif", "img_uncertainty.tif",
         f"stack_{names[0]}.tif", f"stack_{names[1]}.tif", "stack_uncertainty.tif"])
    assert tifffile.imread(a / f"img_{names[0]}.tif").shape == (37, 51)
    assert tifffile.imread(a / "img_uncertainty.tif").shape == (2, 37, 51)
    assert tifffile.imread(a / "stack_uncertainty.tif").shape == (2, 2, 12, 9)
    unc = tifffile.imread(a / "img_uncertainty.tif")
    assert np.isfinite(unc).all() and (unc >= 0).all() and unc.max() > 0
    with tifffile.TiffFile(a / f"img_{names[1]}.tif") as tf:
        meta = tf.shaped_metadata[0]
    assert meta["n_samples"] == 3 and meta["seed"] == 5 and meta["units"] == "raw" and meta["channel"] == names[1]
    assert str(tiny_run.resolve()) == meta["model"]
    # same K and seed: identical numbers (counter-based latent noise); another seed: other samples
    _run(["predict", str(tiny_run), *args, "--out", str(tmp_path / "b")])
    _run(["predict", str(tiny_run), *args[:-3], "--seed", "6", "--no-progress", "--out", str(tmp_path / "c")])
    for f in a.iterdir():
        np.testing.assert_array_equal(tifffile.imread(f), tifffile.imread(tmp_path / "b" / f.name))
    assert not np.array_equal(tifffile.imread(a / "img_uncertainty.tif"),
                              tifffile.imread(tmp_path / "c" / "img_uncertainty.tif"))


def test_predict_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys):
    (tmp_path / "bad.tif").write_text("not a tiff")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 3, 3), np.float32))
    np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan, np.float32))
    cases = [([str(tiny_run), str(tmp_path / "missing.tif")], "missing"),
             ([str(tiny_run), str(tmp_path / "bad.tif")], "bad.tif"),
             ([str(tiny_run), str(tmp_path / "cube.npy")], "shape"),
             ([str(tiny_run), str(tmp_path / "nan.npy")], "NaN"),
             ([str(tmp_path / "nothing"), str(tmp_path / "cube.npy")], "shape"),
             ([str(tmp_path), str(tmp_path / "bad.tif")], "bad.tif")]
    for argv, word in cases:
        assert main(["predict", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err
    np.save(tmp_path / "ok.npy", np.ones((8, 8), np.float32))
    assert main(["predict", str(tmp_path / "nothing"), str(tmp_path / "ok.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "missing model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_never_overwrites_an_input_or_an_existing_file(tiny_run, tmp_path, capsys):
    """Outputs are <stem>_<channel>.tif: an input of that name in OUT_DIR, or an earlier output, is refused before
    any work (one line, files untouched); --overwrite replaces earlier outputs but never an input."""
    names = json.loads((tiny_run / "data_split.json").read_text())["channel_names"]
    rng = np.random.default_rng(3)
    img = rng.uniform(20, 300, (24, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "x.tif", img)
    victim = tmp_path / f"x_{names[0]}.tif"  # the user's file that the first output would replace
    tifffile.imwrite(victim, img * 2)
    before = victim.read_bytes()
    for extra in ([], ["--overwrite"]):
        rc = main(["predict", str(tiny_run), str(tmp_path / "x.tif"), str(victim), "--out", str(tmp_path),
                   "--samples", "2", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "would overwrite the input" in err and len(err.splitlines()) == 1
        assert victim.read_bytes() == before
    out = tmp_path / "o"
    args = ["predict", str(tiny_run), str(tmp_path / "x.tif"), "--out", str(out), "--samples", "2", "--no-progress"]
    assert main(args) == 0
    first = (out / "x_uncertainty.tif").stat().st_mtime_ns
    assert main(args) == 2 and "exists; refusing to overwrite" in capsys.readouterr().err
    assert (out / "x_uncertainty.tif").stat().st_mtime_ns == first
    assert main([*args, "--overwrite"]) == 0
