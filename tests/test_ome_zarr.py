"""`predict` on zarr / OME-Zarr inputs (issue 18): block by block, the same numbers as the in-memory TIFF path,
OME-Zarr 0.4 outputs, reads bounded by the tile, one-line refusals, nothing left behind on failure."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from denoisplit_zoo import cli_predict
from denoisplit_zoo.cli import main
from denoisplit_zoo.errors import UserError
from denoisplit_zoo.ome_zarr import open_input
from denoisplit_zoo.run_folder import load_run
from denoisplit_zoo.sampling import predict_blocks

ARGS = ["--samples", "3", "--tile", "64", "--no-progress", "--threads", "1"]


@pytest.fixture
def stack() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((2, 96, 80)) * 150).astype(np.float32)


def _ome(path, data: np.ndarray, axes: list[str]) -> None:
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    g.create_array("0", data=data, chunks=(1,) * (data.ndim - 2) + (32, 32))
    kind = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": kind[a]} for a in axes],
                               "datasets": [{"path": "0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [1.0] * len(axes)}]}]}]


def test_zarr_input_gives_the_tiff_paths_numbers_in_ome_zarr(tiny_run, tmp_path, stack, one_thread):
    tifffile.imwrite(tmp_path / "img.tif", stack)
    z = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=stack.shape, chunks=(1, 40, 40), dtype="f4")
    z[:] = stack
    assert main(["predict", str(tiny_run), str(tmp_path / "img.tif"), "--out", str(tmp_path / "t"), *ARGS]) == 0
    assert main(["predict", str(tiny_run), str(tmp_path / "img.zarr"), "--out", str(tmp_path / "z"), *ARGS]) == 0
    for name in ("ch0", "ch1", "uncertainty"):
        g = zarr.open_group(str(tmp_path / "z" / f"img_{name}.ome.zarr"), mode="r")
        assert np.array_equal(g["0"][:], tifffile.imread(tmp_path / "t" / f"img_{name}.tif"))
        ms = g.attrs["multiscales"][0]
        assert ms["version"] == "0.4" and ms["datasets"][0]["path"] == "0"
        assert [a["name"] for a in ms["axes"]] == (["t", "c", "y", "x"] if name == "uncertainty" else ["t", "y", "x"])
        assert g.attrs["denoisplit"]["units"] == "raw"
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == [f"img_{n}.ome.zarr" for n in
                                                                   ("ch0", "ch1", "uncertainty")]
    # a TIFF larger than memory: --blockwise reads it through tifffile's zarr view, the same numbers again
    tifffile.imwrite(tmp_path / "tiled.tif", stack, tile=(32, 32))
    assert main(["predict", str(tiny_run), str(tmp_path / "tiled.tif"), "--out", str(tmp_path / "b"), "--blockwise",
                 *ARGS]) == 0
    for name in ("ch0", "ch1", "uncertainty"):
        got = zarr.open_group(str(tmp_path / "b" / f"tiled_{name}.ome.zarr"), mode="r")["0"][:]
        assert np.array_equal(got, tifffile.imread(tmp_path / "t" / f"img_{name}.tif"))


def test_ome_zarr_group_with_singleton_channel_axis(tiny_run, tmp_path, stack, one_thread):
    _ome(tmp_path / "field.ome.zarr", stack[:, None], ["t", "c", "y", "x"])  # (T=2, C=1, Y, X)
    assert main(["predict", str(tiny_run), str(tmp_path / "field.ome.zarr"), "--out", str(tmp_path / "o"), *ARGS]) == 0
    unc = zarr.open_group(str(tmp_path / "o" / "field_uncertainty.ome.zarr"), mode="r")["0"]
    assert unc.shape == (2, 2, 96, 80) and np.isfinite(unc[:]).all() and (unc[:] >= 0).all()


def test_tiles_are_all_that_is_read(tiny_run, one_thread):
    """Memory bounded by the tile: no read larger than one tile plus its halo, however large the image."""
    run = load_run(tiny_run)
    sampler = run.sampler(2, 42)

    class Recorder:
        shape = (300, 280)

        def __init__(self):
            self.largest = 0
            self.data = np.random.default_rng(0).random(self.shape).astype(np.float32) * 100

        def __getitem__(self, key):
            block = self.data[key]
            self.largest = max(self.largest, block.size)
            return block

    src = Recorder()
    got = []
    res = predict_blocks(sampler, src, run.norm, lambda where, mu, sd, s: got.append(mu), tile=64, halo=run.halo)
    m = sampler.vae.multiple
    halo = -(-run.halo // m) * m
    assert src.largest <= (64 + 2 * halo) ** 2 < 300 * 280
    assert sum(mu.shape[1] * mu.shape[2] for mu in got) == 300 * 280  # every pixel once
    assert res["tiles"] == len(got)


@pytest.mark.parametrize("make, words", [
    (lambda p, s: _ome(p, np.stack([s[0], s[1]])[None], ["t", "c", "y", "x"]), "holds 2 channels"),
    (lambda p, s: zarr.open_group(str(p), mode="w").create_array("0", data=s), "multiscales"),
    (lambda p, s: p.mkdir(), "not a readable zarr store"),
    (lambda p, s: zarr.open_array(str(p), mode="w", shape=(2, 3, 4, 5), dtype="f4"), "expected (Y, X)"),
    (lambda p, s: zarr.open_array(str(p), mode="w", shape=(4, 5), dtype="bool"), "not a real number type"),
])
def test_bad_zarr_inputs_are_one_line_errors(tmp_path, stack, make, words):
    make(tmp_path / "bad.zarr", stack)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        open_input(str(tmp_path / "bad.zarr"))


def test_nan_in_a_zarr_input_is_refused_before_any_output(tiny_run, tmp_path, stack, capsys, one_thread):
    stack[1, 50, 50] = np.nan
    z = zarr.open_array(str(tmp_path / "nan.zarr"), mode="w", shape=stack.shape, chunks=(1, 32, 32), dtype="f4")
    z[:] = stack
    assert main(["predict", str(tiny_run), str(tmp_path / "nan.zarr"), "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "NaN" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_then_overwritten_and_failure_leaves_nothing(tiny_run, tmp_path, stack, capsys,
                                                                            monkeypatch, one_thread):
    z = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=stack.shape, chunks=(1, 32, 32), dtype="f4")
    z[:] = stack
    out = tmp_path / "o"
    cmd = ["predict", str(tiny_run), str(tmp_path / "img.zarr"), "--out", str(out), *ARGS]
    assert main(cmd) == 0
    first = zarr.open_group(str(out / "img_ch0.ome.zarr"), mode="r")["0"][:]
    capsys.readouterr()
    assert main(cmd) == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert main([*cmd, "--overwrite", "--seed", "7"]) == 0
    again = zarr.open_group(str(out / "img_ch0.ome.zarr"), mode="r")["0"][:]
    assert not np.array_equal(first, again)  # replaced (another seed: other samples)

    calls = []
    real = cli_predict._predict_zarr

    def fail_in_the_middle(*a, **k):  # the first plane written, then a Ctrl-C
        import denoisplit_zoo.sampling as S

        orig = S.predict_blocks

        def once(*aa, **kk):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return orig(*aa, **kk)

        monkeypatch.setattr(S, "predict_blocks", once)
        return real(*a, **k)

    monkeypatch.setattr(cli_predict, "_predict_zarr", fail_in_the_middle)
    fresh = tmp_path / "fresh"
    assert main(["predict", str(tiny_run), str(tmp_path / "img.zarr"), "--out", str(fresh), *ARGS]) == 130
    assert not fresh.exists()  # no output, no temp store, no folder


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    """--overwrite of a zarr output: the old store is moved aside, the new one renamed in; if that rename fails
    (a full disk, a signal) the old one is put back and no temporary folder stays."""
    import os

    from denoisplit_zoo.fileio import atomic_dir

    target = tmp_path / "x.zarr"
    target.mkdir()
    (target / "old").write_text("1")
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(1)
        if len(calls) == 2:  # the new store onto the target
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert (target / "old").read_text() == "1" and not (target / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.zarr"]


def test_out_of_memory_is_one_line_that_says_what_to_do(tiny_run, tmp_path, stack, capsys, monkeypatch, one_thread):
    """An image too large to predict in memory: one line pointing to the block-by-block paths, nothing written."""
    import denoisplit_zoo.sampling as S

    tifffile.imwrite(tmp_path / "img.tif", stack)

    for error in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                              "can't allocate memory: you tried to allocate 11829248 bytes.")):
        def no_memory(*a, error=error, **k):
            raise error

        monkeypatch.setattr(S, "predict_stack", no_memory)
        assert main(["predict", str(tiny_run), str(tmp_path / "img.tif"), "--out", str(tmp_path / "o"), *ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "out of memory" in err and "--blockwise" in err
        assert not (tmp_path / "o").exists()
