"""Robustness (issue 7): crash-safe training (a real SIGKILL, then --resume), atomic writes on a full disk, one-line
errors for every bad input (tests/bad_inputs.py, also the source of docs/bad_inputs.md), finite package outputs for
extreme inputs in all three weight formats. One torch thread throughout (shared 2-core machines)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from denoisplit_zoo import fileio
from denoisplit_zoo.cli import main
from denoisplit_zoo.fileio import torch_load

from . import bad_inputs as bi
from .synthetic import write_npz

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _log_steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp*"))


# ------------------------------------------------------------------------------------------ crash-safe training
def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A real `denoisplit-zoo train` process is SIGKILLed once it has validated twice; last.pt loads with
    weights_only, --resume finishes at step N with a log without duplicated steps, and the result equals an
    uninterrupted run bit for bit (weights, optimizer, scheduler, RNG, early-stopping state). A copy of the run
    stripped of its checkpoints (= killed before the first one) restarts from step 0 on --resume, identically."""
    data = write_npz(tmp_path / "data.npz", n=6, size=64)
    (tmp_path / "fast.yaml").write_text(bi.FAST_CONFIG)
    args = ["train", "--data", str(data), "--preset", "tiny", "--gaussian", "1", "--poisson", "1",
            "--config", str(tmp_path / "fast.yaml")]
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    with open(tmp_path / "train.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "denoisplit_zoo.cli", *args, "--max-steps", "1000",
                                 "--out", str(run)], stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 240
            while not (last.is_file() and (run / "log.jsonl").is_file() and len(_log_steps(run)) >= 2):
                assert proc.poll() is None, (tmp_path / "train.out").read_text()[-2000:]
                assert time.monotonic() < deadline, "training never reached its second validation"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ck = torch_load(last)  # weights_only=True: complete, never half written
    k = ck["state"]["step"]
    assert k >= 5 and k % 5 == 0 and set(ck) >= {"model", "optimizer", "scheduler", "state", "rng_cpu"}
    steps = _log_steps(run)
    assert steps == sorted(set(steps)) and k in steps and max(steps) <= k + 5  # one line may be ahead of last.pt
    stale = [p.name for p in _temps(run)]  # only possible if the kill hit a write; --resume clears them
    assert all(n.startswith((".last.pt.", ".best.pt.")) for n in stale), stale

    restart = tmp_path / "restart"  # the same run as if killed before its first checkpoint
    shutil.copytree(run, restart)
    shutil.rmtree(restart / "checkpoints")
    (restart / "log.jsonl").unlink()

    n = k + 10
    rc, out, err = _cli("train", "--resume", "--max-steps", n, "--out", run)  # a new start: all state from disk
    assert rc == 0, err
    assert f"trained {n} steps" in out
    assert _log_steps(run) == list(range(5, n + 1, 5))  # no duplicated, no missing step
    assert _temps(run) == []

    straight = tmp_path / "straight"
    rc, _, err = _cli(*args, "--max-steps", n, "--out", straight)
    assert rc == 0, err
    a, b = torch_load(straight / "checkpoints" / "last.pt"), torch_load(last)
    assert a["state"]["step"] == b["state"]["step"] == n
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in group_a:
            assert torch.equal(torch.as_tensor(group_a[key]), torch.as_tensor(group_b[key])), key
    assert a["scheduler"] == b["scheduler"] and torch.equal(a["rng_cpu"], b["rng_cpu"])
    assert {k_: v for k_, v in a["state"].items() if k_ != "seconds"} == \
        {k_: v for k_, v in b["state"].items() if k_ != "seconds"}
    logs = [[{k_: v for k_, v in json.loads(ln).items() if k_ != "seconds"}
             for ln in (r / "log.jsonl").read_text().splitlines()] for r in (straight, run)]
    assert logs[0] == logs[1]  # every validation of the killed + resumed run equals the uninterrupted one

    # the early-stopping state is part of the schedule: a run that had stopped early stays stopped on --resume
    ck = torch_load(last)
    ck["state"]["bad_validations"] = 20  # the tiny preset's early_stop_patience
    fileio.torch_save(last, ck)
    rc, out, err = _cli("train", "--resume", "--max-steps", n + 20, "--out", run)
    assert rc == 0 and f"trained {n} steps" in out and "early_stopping" in out, (out, err)

    rc, _, err = _cli("train", "--resume", "--max-steps", 5, "--out", restart)
    assert rc == 0, err
    assert _log_steps(restart) == [5]
    assert json.loads((restart / "log.jsonl").read_text())["val_loss"] == logs[0][0]["val_loss"]


def test_a_kill_in_the_middle_of_a_write_never_leaves_a_half_written_file(tmp_path):
    """SIGKILL while the new content is half written: the target still holds the complete old file; only the temp
    file is left, and it is exactly what `remove_stale_temps` (run by --resume) clears."""
    target = tmp_path / "checkpoints" / "last.pt"
    old = io.BytesIO()
    torch.save({"step": 5}, old)
    script = textwrap.dedent(f"""
        import os, signal
        from denoisplit_zoo.fileio import atomic_open, write_bytes
        write_bytes({str(target)!r}, {old.getvalue()!r})
        with atomic_open({str(target)!r}) as f:
            f.write(b"PK half of a new checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", script], env=ENV, timeout=120)
    assert res.returncode == -signal.SIGKILL
    assert torch_load(target) == {"step": 5}
    stale = _temps(tmp_path)
    assert len(stale) == 1 and stale[0].name.startswith(".last.pt.")
    assert fileio.remove_stale_temps(target.parent) == stale and _temps(tmp_path) == []


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_resumes(tmp_path):
    """The disk fills up after the first checkpoint: one-line error, exit 2, last.pt is the previous complete
    checkpoint, no temp file, and the run resumes once there is space again."""
    data = write_npz(tmp_path / "data.npz", n=6, size=64)
    (tmp_path / "fast.yaml").write_text(bi.FAST_CONFIG)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    full_after_first_checkpoint = bi.full_disk(lambda p: p.name.endswith(".tmp.pt") and last.is_file())
    with full_after_first_checkpoint:
        rc, _, err = _cli("train", "--data", data, "--preset", "tiny", "--gaussian", "1", "--config",
                          tmp_path / "fast.yaml", "--max-steps", 10, "--out", run)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("denoisplit-zoo: error: No space left on device: ")
    assert torch_load(last)["state"]["step"] == 5 and _temps(tmp_path) == []
    rc, _, err = _cli("train", "--resume", "--max-steps", 10, "--out", run)
    assert rc == 0, err
    assert _log_steps(run) == [5, 10] and torch_load(last)["state"]["step"] == 10


@pytest.mark.parametrize("writer", ["write_json", "write_npz", "torch_save", "tiff"])
def test_every_writer_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, writer):
    from denoisplit_zoo.cli_predict import _write_tiff

    target = tmp_path / f"out.{writer}"
    write = {"write_json": lambda: fileio.write_json(target, {"a": list(range(5000))}),
             "write_npz": lambda: fileio.write_npz(target, a=np.zeros(5000)),
             "torch_save": lambda: fileio.torch_save(target, {"a": torch.zeros(5000)}),
             "tiff": lambda: _write_tiff(target, np.zeros((64, 64)), {"x": 1})}[writer]
    target.write_bytes(b"old")
    with bi.full_disk(), pytest.raises(OSError) as e:
        write()
    assert e.value.errno == 28 and e.value.filename == str(target)  # ENOSPC, naming the file
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []
    write()  # and with space again it works
    assert target.read_bytes() != b"old"


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_run):
    root = bi.write_inputs(tmp_path_factory.mktemp("bad_inputs"))
    bi.prepare_run_copies(root, tiny_run)
    bi.write_packages(root, tiny_run)
    return root


ERRORS = [c for c in bi.CASES if c.expect == "error"]
VALID = [c for c in bi.CASES if c.expect == "ok"]


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, inputs, tiny_run):
    res = bi.run_case(case, inputs, run=str(tiny_run), pkg=str(inputs / "pkg"))
    lines = res.stderr.strip().splitlines()
    assert res.rc == 2, (res.rc, res.stderr[-3000:])
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert lines[0].startswith("denoisplit-zoo: error: ") and case.needle in lines[0], lines[0]
    assert bi.leftovers(case, inputs) == []


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_extreme_but_valid_input_works_with_finite_outputs(case, inputs, tiny_run):
    res = bi.run_case(case, inputs, run=str(tiny_run), pkg=str(inputs / "pkg"))
    assert res.rc == 0 and res.outcome, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert case.needle in res.stderr  # a warning the case must print ("" for none)


def test_bad_input_in_a_real_process_prints_one_line_without_traceback(inputs, tiny_run):
    """The same contract at the process level (stderr of `python -m denoisplit_zoo.cli`, exit status)."""
    case = next(c for c in bi.CASES if c.id == "tiff-truncated")  # tifffile also logs to stderr: silenced
    p = subprocess.run([sys.executable, "-m", "denoisplit_zoo.cli", *bi.command(case, str(tiny_run), "pkg")],
                       cwd=inputs, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("denoisplit-zoo: error: ") and not (inputs / "out_run").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions; the unwritable case is covered by --out below a file")
def test_read_only_output_folder(inputs):
    ro = inputs / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    try:
        case = bi.Case("ro", "read-only parent", bi._train("good.npz", out="read_only/run"), "read_only/run",
                       "Permission denied")
        res = bi.run_case(case, inputs)
        assert res.rc == 2 and len(res.stderr.strip().splitlines()) == 1 and case.needle in res.stderr
        assert not (ro / "run").exists()
    finally:
        ro.chmod(0o700)


def test_an_unexpected_exception_is_one_line_too(monkeypatch):
    """Bugs are not bad input (exit 1, not 2) but still one line, unless DENOISPLIT_ZOO_TRACEBACK asks for more."""
    import denoisplit_zoo.cli as cli

    def boom(a):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_noise_model_fit", boom)
    rc, _, err = _cli("noise-model", "fit", "--noisy", "x.tif", "--out", "nm.npz")
    assert rc == 1 and err.count("\n") == 1 and "internal error: RuntimeError: something broke" in err
    monkeypatch.setenv("DENOISPLIT_ZOO_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["noise-model", "fit", "--noisy", "x.tif", "--out", "nm.npz"])


def test_partial_or_foreign_log_lines_are_dropped_on_resume(tmp_path):
    from denoisplit_zoo.training import _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 5, "val_loss": 1}\n{"step": 10, "val_loss": 2}\n{"step": 15, "val_lo')
    _truncate_log(log, 10)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [5, 10]


# ------------------------------------------------------------------------------------- packages, extreme inputs
@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_run):
    """A minimal package of the tiny run with all three weight formats (tests/bad_inputs.py:make_package)."""
    return bi.make_package(tiny_run, tmp_path_factory.mktemp("pkg") / "model.zip",
                           formats=("pytorch_state_dict", "torchscript", "onnx"))


@pytest.fixture(scope="module")
def packages(package, tmp_path_factory, tiny_run):
    """The minimal package and the real exported one (export_helpers.exported: built once per session, whichever
    test module asks first), so this module covers both whatever order the tests run in."""
    from . import export_helpers

    real = export_helpers.exported(tmp_path_factory, tiny_run)
    assert real["rc"] == 0, real["stdout"][-2000:]
    return [package, real["zip"]]


def test_package_outputs_stay_finite_for_extreme_inputs_in_all_three_formats(packages):
    import onnxruntime as ort

    from denoisplit_zoo.package import layout as L
    from denoisplit_zoo.package.reader import load_package_sampler
    from denoisplit_zoo.package.writer import predict_raw

    for zip_path in packages:
        sampler, _, norm, meta = load_package_sampler(zip_path)
        with zipfile.ZipFile(zip_path) as z:
            scripted = torch.jit.load(io.BytesIO(z.read(L.TORCHSCRIPT_FILE)), map_location="cpu")
            onnx = ort.InferenceSession(z.read(L.ONNX_FILE), providers=["CPUExecutionProvider"])
        min_size = L.min_input_size(int(meta["halo"] or 0))
        one = np.full((1, 1, 1, 1), 300.0, np.float32)
        extremes = {"zeros": np.zeros((1, 1, 48, 40), np.float32),
                    "saturated uint16": np.full((1, 1, 48, 40), 65535.0, np.float32),
                    "half saturated": np.where(np.arange(40) % 2, 65535.0, 0.0).astype(np.float32)
                    * np.ones((1, 1, 48, 1), np.float32),
                    "1x1": one,
                    "1x1 padded to the minimum size": np.pad(one, ((0, 0), (0, 0), (0, min_size - 1),
                                                                   (0, min_size - 1)), mode="edge")}
        for name, raw in extremes.items():
            x = torch.from_numpy((raw - np.float32(norm.input_mean)) / np.float32(norm.input_std + 1e-6))
            with torch.no_grad():
                eager, script = sampler(x).numpy(), scripted(x).numpy()
            onnx_out = onnx.run(None, {L.INPUT_NAME: x.numpy()})[0]
            for fmt, y in (("eager", eager), ("torchscript", script), ("onnx", onnx_out)):
                assert y.shape == (1, 4, *raw.shape[-2:]) and np.isfinite(y).all(), (zip_path.name, name, fmt)
                assert (y[:, 2:] >= 0).all(), (name, fmt)  # stds
            np.testing.assert_array_equal(eager, script, err_msg=name)
            np.testing.assert_allclose(onnx_out, eager, rtol=1e-4, atol=1e-4 * (1 + np.abs(eager).max()),
                                       err_msg=name)
            assert np.isfinite(predict_raw(sampler, raw, norm)).all(), name  # with the package's pre/post


def test_sigterm_is_handled_like_sigint_and_leaves_no_half_run(tmp_path):
    """SIGTERM (what `timeout`, schedulers and `docker stop` send) during a fresh training, before its first
    checkpoint: exit 143 with one line, and the half-made run folder is gone, so the same --out works again."""
    data = write_npz(tmp_path / "data.npz", n=6, size=64)
    (tmp_path / "slow_nm.yaml").write_text("noise_model: {n_iterations: 100000, batch_size: 10000}\n")
    run = tmp_path / "run"
    with open(tmp_path / "train.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "denoisplit_zoo.cli", "train", "--data", str(data),
                                 "--preset", "tiny", "--gaussian", "1", "--config", str(tmp_path / "slow_nm.yaml"),
                                 "--max-steps", "5", "--out", str(run)],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        try:
            deadline = time.monotonic() + 120
            while not (run / "config.yaml").is_file():  # the run folder exists: now in the noise-model fit
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = (tmp_path / "train.err").read_text().strip().splitlines()
    assert proc.returncode == 143 and lines[-1] == "denoisplit-zoo: terminated (SIGTERM)", lines[-3:]
    assert not run.exists()


def test_a_second_writer_of_a_run_folder_gets_one_line_naming_the_holder(tiny_run, tmp_path, capsys):
    """Two commands writing one run folder (two `train --resume`, or `calibrate` during a training) would interleave
    log.jsonl and checkpoints: the second is refused with one line naming the first, and leaves the run as it was.
    The holder here is this process's own RunLock, as `train` takes it (flock: a second open file conflicts)."""
    from denoisplit_zoo.cli import main
    from denoisplit_zoo.run_folder import RunLock

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with RunLock(run, "train --resume"):
        assert (run / RunLock.HOLDER).is_file()
        for argv in (["train", "--resume", "--out", str(run), "--max-steps", "10000"],
                     ["calibrate", str(run), "--samples", "2", "--no-progress"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "is in use by another denoisplit-zoo `train --resume`" in err[0], err
            assert f"pid {os.getpid()}" in err[0]
    assert not (run / RunLock.HOLDER).exists()  # released, and its note gone
    after = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before
    with RunLock(run, "calibrate"):  # free again
        pass


def test_resume_refuses_other_data_and_a_restart_that_would_erase_history(tiny_run, tmp_path, monkeypatch):
    """A resumed run trains on the data its folder describes, or not at all: config.yaml's noise edited since the
    run started, or --data naming other data, is one line naming what differs; a missing last.pt with best.pt and
    a log kept would restart at step 0 over the history: refused. The data path is stored absolute, so --resume
    (without --data) works from any folder."""
    import yaml

    edited = tmp_path / "edited"
    shutil.copytree(tiny_run, edited)
    cfg = yaml.safe_load((edited / "config.yaml").read_text())
    assert Path(cfg["data"]["path"]).is_absolute()
    cfg["data"]["noise"]["gaussian"] = 3.0
    (edited / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = (edited / "log.jsonl").read_text()
    rc, _, err = _cli("train", "--resume", "--max-steps", 40, "--out", edited)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "differs from the run's data_split.json" in err, err
    assert (edited / "log.jsonl").read_text() == before

    other = write_npz(tmp_path / "other.npz", n=6, size=64, seed=9)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    rc, _, err = _cli("train", "--resume", "--max-steps", 40, "--data", other, "--out", moved)
    assert rc == 2 and ("data_split.json" in err or "normalization.json" in err), err

    lost = tmp_path / "lost_last"
    shutil.copytree(tiny_run, lost)
    (lost / "checkpoints" / "last.pt").unlink()
    rc, _, err = _cli("train", "--resume", "--max-steps", 40, "--out", lost)
    assert rc == 2 and "restart from step 0" in err and (lost / "checkpoints" / "best.pt").is_file(), err

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working folder: the stored absolute path still finds the data
    ok = tmp_path / "ok"
    shutil.copytree(tiny_run, ok)
    rc, out, err = _cli("train", "--resume", "--max-steps", 25, "--out", ok)
    assert rc == 0 and "trained 25 steps" in out, err


def test_ctrl_c_right_after_the_first_rename_leaves_no_half_run(tmp_path, monkeypatch):
    """The unluckiest moment of a fresh `train`: Ctrl-C just after config.yaml was renamed into place (the folder
    now looks like a run) and before anything else. The file was registered with the run's cleanup before the
    rename, so the half-made folder is removed and the same --out works again."""
    data = write_npz(tmp_path / "data.npz", n=6, size=64)
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        if Path(dst).name == "config.yaml":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    rc, _, err = _cli("train", "--data", data, "--preset", "tiny", "--max-steps", 2, "--out", tmp_path / "run")
    monkeypatch.setattr(os, "replace", real)
    assert rc == 130 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
