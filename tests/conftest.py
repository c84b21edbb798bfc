"""Shared pytest fixtures (keep small; add yours as clearly named functions)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (synthetic.py) for the fixtures below
from synthetic import write_npz  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test: these tests run small models whose speed two threads on a shared 2-core
    machine only hurt."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real, UNcalibrated run folder: `denoisplit-zoo train --preset tiny` for 20 steps on 6 synthetic 64x64
    images (noise models fitted with 50 iterations), one torch thread (~10 s on a shared 2-core machine).
    Session-scoped and shared: tests that write into a run (calibrate) must work on a copy
    (shutil.copytree(tiny_run, tmp_path / "run"))."""
    from denoisplit_zoo.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_npz(root / "data.npz", n=6, size=64)
    over = root / "over.yaml"
    over.write_text("noise_model: {n_iterations: 50, batch_size: 20000}\n")
    run = root / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine are several times slower
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["train", "--data", str(data), "--preset", "tiny", "--gaussian", "1", "--poisson", "1",
                       "--max-steps", "20", "--config", str(over), "--out", str(run)])
    finally:
        torch.set_num_threads(old)
    assert rc == 0 and (run / "checkpoints" / "best.pt").is_file()
    return run
