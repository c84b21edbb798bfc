"""Training with the tiny preset: the validation loss falls, resume continues exactly, bad input is one line."""

import json

import pytest
import torch

from denoisplit_zoo.cli import main
from denoisplit_zoo.config import build_run_config
from denoisplit_zoo.errors import UserError
from denoisplit_zoo.fileio import torch_load
from denoisplit_zoo.training import train

from .synthetic import write_npz

FAST_NM = {"n_iterations": 60, "batch_size": 10_000}


def _cfg(data, model=None, **train):
    return build_run_config("tiny", {"data": {"path": str(data), "noise": {"gaussian": 1.0, "poisson": 1.0}},
                                     "noise_model": FAST_NM, "train": train, "model": model or {}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("data") / "synth.npz", n=6, size=96)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tiny_training_validation_loss_falls(data, tmp_path):
    res = train(_cfg(data, max_steps=100, val_every=25, lr=3e-3), tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == [25, 50, 75, 100]
    assert min(e["val_loss"] for e in log[1:]) < log[0]["val_loss"]
    assert res.best_val_loss == min(e["val_loss"] for e in log)
    for name in ("config.yaml", "normalization.json", "data_split.json", "noise_models/ch0.npz",
                 "noise_models/ch1.npz", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert {"step", "epoch", "train_loss", "val_loss", "seconds"} <= set(log[0])


# n_filters 32 trains channels_last on the CPU (training.py), the tiny width contiguous
@pytest.mark.parametrize("n_filters", [8, 32])
def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(data, tmp_path, n_filters):
    model = {"n_filters": n_filters}
    straight = tmp_path / "straight"
    train(_cfg(data, model, max_steps=30, val_every=10), straight, progress=False)
    part = tmp_path / "part"
    train(_cfg(data, model, max_steps=20, val_every=10), part, progress=False)
    assert torch_load(part / "checkpoints/last.pt")["state"]["step"] == 20
    train(_cfg(data, model, max_steps=30, val_every=10), part, resume=True, progress=False)
    assert [e["step"] for e in _log(part)] == [10, 20, 30]
    a = torch_load(straight / "checkpoints/last.pt")["model"]
    b = torch_load(part / "checkpoints/last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_output_folder_that_is_not_a_run_is_refused(data, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a run folder"):
        train(_cfg(data, max_steps=1), tmp_path / "stuff", progress=False)
    assert sorted(p.name for p in (tmp_path / "stuff").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("args,needle", [
    (["--data", "missing.npz"], "missing"),
    (["--config", "CFG"], "lossx"),
    (["--channels", "0", "0"], "channels"),
])
def test_cli_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, args, needle):
    (tmp_path / "bad.yaml").write_text("train: {lossx: 1}\n")
    args = [a.replace("CFG", str(tmp_path / "bad.yaml")) for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    code = main(["train", "--preset", "tiny", "--max-steps", "1", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
