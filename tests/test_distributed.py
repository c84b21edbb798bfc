"""Data-parallel training on 2 gloo processes (issue 18, docs/distributed.md): identical weights on every rank after
every step, a validation loss that falls, a SIGTERM + --resume that continues exactly, a resume with another world
size refused, and world size 1 = the single-process path bit for bit. Tiny preset, one thread per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .synthetic import write_npz

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
CLI = [sys.executable, "-m", "denoisplit_zoo"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    write_npz(root / "data.npz", n=6, size=64)
    (root / "over.yaml").write_text("noise_model: {n_iterations: 50, batch_size: 20000}\ntrain: {val_every: 10}\n")
    return {"root": root, "args": ["--data", str(root / "data.npz"), "--preset", "tiny", "--config",
                                   str(root / "over.yaml"), "--gaussian", "1", "--poisson", "1"]}


def _train(data: dict, out: Path, *extra: str, launcher=None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*(launcher or CLI), "train", *data["args"], "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _log(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


def test_ranks_hold_identical_weights_after_every_step(tmp_path):
    p = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "-m", "tests.ddp_steps", str(tmp_path)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert not r0["before_ddp"]  # the ranks started from different random weights: the check can fail
    assert all(r0["same"]) and all(r1["same"]) and len(r0["same"]) == 7
    assert r0["losses"] != r1["losses"]  # each rank trained on its own batches
    assert r0["skipped_together"] and r1["skipped_together"]  # a NaN on rank 1 alone skipped the step everywhere
    assert r0["step"] == r1["step"] == 7


@pytest.fixture(scope="module")
def two_process_run(data) -> Path:
    """`train --nproc 2` for 60 steps, uninterrupted."""
    out = data["root"] / "full"
    p = _train(data, out, "--nproc", "2", "--max-steps", "60")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("trained 60 steps") == 1  # rank 0 reports, once
    return out


def test_two_processes_learn(two_process_run):
    log = _log(two_process_run)
    assert [e["step"] for e in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    ck = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_cpu_ranks"]) == 2


def test_sigterm_then_resume_continues_exactly(data, two_process_run):
    out = data["root"] / "killed"
    cmd = [*CLI, "train", *data["args"], "--out", str(out), "--nproc", "2", "--max-steps", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    steps = [e["step"] for e in _log(out)]
    assert steps and steps[-1] < 60, "the kill came after the end of training: nothing was interrupted"
    p = _train(data, out, "--nproc", "2", "--max-steps", "60", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [e["step"] for e in _log(out)] == [10, 20, 30, 40, 50, 60]
    a, b = _weights(two_process_run), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if it had never stopped


def test_resume_with_another_number_of_processes_is_refused(data, two_process_run):
    p = _train(data, two_process_run, "--resume", "--max-steps", "70")  # one process this time
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "training of 2 processes" in lines[0] and "--nproc 2" in lines[0]
    assert [e["step"] for e in _log(two_process_run)][-1] == 60  # nothing trained, nothing overwritten


def test_world_size_1_is_the_single_process_path(data):
    plain, one = data["root"] / "plain", data["root"] / "one"
    assert _train(data, plain, "--max-steps", "20").returncode == 0
    p = _train(data, one, "--max-steps", "20", launcher=[*TORCHRUN, "--nproc-per-node", "1", "-m", "denoisplit_zoo"])
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = _weights(plain), _weights(one)
    assert all(torch.equal(a[k], b[k]) for k in a)
