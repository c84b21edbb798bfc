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
    # no KL warm-up here, so every validation competes for the best checkpoint (the warm-up's rule has its own test)
    res = train(_cfg(data, max_steps=100, val_every=25, lr=3e-3, kl_warmup_steps=0), tmp_path / "run",
                progress=False)
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


def test_kl_warmup_ramps_beta_and_keeps_a_best_trained_on_the_full_objective(data, tmp_path):
    """The KL weight rises linearly over kl_warmup_steps; the LR schedule and early stopping ignore the warm-up,
    and the first validation on the full objective replaces a best checkpoint from the warm-up."""
    from denoisplit_zoo.training import kl_beta

    cfg = _cfg(data, max_steps=40, val_every=10, kl_warmup_steps=20, kl_weight=2.0)
    assert [kl_beta(cfg.train, s) for s in (0, 9, 19, 20, 39)] == pytest.approx([2 / 21, 20 / 21, 40 / 21, 2, 2])
    train(cfg, tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    assert [e["kl_beta"] < 2.0 for e in log] == [True, True, False, False]
    best = torch_load(tmp_path / "run" / "checkpoints" / "best.pt")["state"]
    assert best["best_step"] >= 20 and log[1]["best"]
    after = [e for e in log if e["step"] >= 20]
    assert best["best_val"] == min(e["val_loss"] for e in after)
    # a run that stops inside its warm-up still keeps its best validation so far
    short = train(_cfg(data, max_steps=20, val_every=10, kl_warmup_steps=100), tmp_path / "short", progress=False)
    assert short.best_val_loss == min(e["val_loss"] for e in _log(tmp_path / "short"))


def test_high_noise_learns_with_the_presets_kl_warmup_and_collapses_without(tmp_path):
    """Gaussian x4 + Poisson: with beta = 1 from the first step (the paper's schedule) the posterior collapses onto
    the prior (KL at the free-bits floor, validation NLL flat); the preset's KL warm-up keeps it learning."""
    data = write_npz(tmp_path / "d.npz", n=8, size=96)
    falls = {}
    for name, over in (("preset", {}), ("no_warmup", {"kl_warmup_steps": 0})):
        cfg = build_run_config("tiny", {"data": {"path": str(data), "noise": {"gaussian": 4.0, "poisson": 1.0}},
                                        "noise_model": {"n_iterations": 100, "batch_size": 20_000},
                                        "train": {"max_steps": 200, "val_every": 20, "early_stop_patience": 1000,
                                                  **over}})
        train(cfg, tmp_path / name, progress=False)
        log = _log(tmp_path / name)
        falls[name] = log[0]["val_loss"] - min(e["val_loss"] for e in log)
    from denoisplit_zoo.config import PRESETS

    assert cfg.train.kl_warmup_steps == 0 and PRESETS["tiny"]["train"]["kl_warmup_steps"] == 100
    assert falls["preset"] > 0.01, falls  # measured: 0.021 nats (no warm-up: 0.001)
    assert falls["preset"] > 5 * falls["no_warmup"], falls


def test_a_budget_spent_before_the_first_step_is_an_error_and_leaves_nothing(data, tmp_path, capsys):
    rc = main(["train", "--data", str(data), "--preset", "tiny", "--gaussian", "1", "--max-minutes", "0.000001",
               "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the noise-model fit's progress bar
    assert rc == 2 and last.startswith("denoisplit-zoo: error: ") and "before its first step" in last
    assert not (tmp_path / "run").exists()
