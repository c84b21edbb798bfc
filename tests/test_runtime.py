"""runtime.cpu_threads: how many threads a heavy command takes, from the affinity mask and the other processes'
load (docs/threads.md); the --threads option of the CLI."""

from __future__ import annotations

import pytest
import torch

from denoisplit_zoo import runtime
from denoisplit_zoo.cli import main


def _fake_stat(monkeypatch, cpus: set[int], busy_fraction: dict[int, float]):
    """/proc/stat as two readings LOAD_SAMPLE_S apart in which CPU c was busy busy_fraction[c] of the time."""
    calls = []

    def ticks(_cpus):
        calls.append(1)
        if len(calls) == 1:
            return {c: (0, 0) for c in cpus}
        return {c: (round(100 * (1 - busy_fraction.get(c, 0.0))), 100) for c in cpus}

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "allowed_cpus", lambda: set(cpus))
    monkeypatch.setattr(runtime, "_cpu_ticks", ticks)
    monkeypatch.setattr(runtime, "LOAD_SAMPLE_S", 0.0)


@pytest.mark.parametrize("busy, expected", [
    ({}, 4),                        # an idle machine: one thread per allowed core
    ({0: 1.0}, 3),                  # one other process: one core fewer
    ({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, 1),  # fully busy: still one thread
    ({0: 0.3, 1: 0.3}, 3),          # 0.6 of a core busy in all: counted as one
    ({0: 0.2}, 4),                  # a fifth of a core: not worth a thread
])
def test_auto_threads_leave_the_busy_cores_to_their_processes(monkeypatch, busy, expected):
    _fake_stat(monkeypatch, {0, 1, 2, 3}, busy)
    assert runtime.cpu_threads("auto") == expected


def test_auto_threads_without_proc_stat_use_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "allowed_cpus", lambda: {0, 1, 2})
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda cpus: None)
    assert runtime.cpu_threads("auto") == 3
    assert runtime.cpu_threads(5) == 5  # an explicit number is the user's, even above the core count


def test_auto_threads_on_this_machine_are_within_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= runtime.cpu_threads("auto") <= len(runtime.allowed_cpus())


def test_auto_threads_take_a_launchers_omp_num_threads(monkeypatch):
    """torchrun, SLURM scripts and users set OMP_NUM_THREADS for a reason: `auto` takes it, a number overrides it."""
    _fake_stat(monkeypatch, {0, 1, 2, 3}, {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads("auto") == 3
    assert runtime.cpu_threads(2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored
    assert runtime.cpu_threads("auto") == 4


def test_threads_option_sets_torch_threads_and_refuses_bad_values(capsys, tmp_path):
    old = torch.get_num_threads()
    try:
        # `models` is light and has no --threads; `predict` with a missing model fails after the option is applied
        assert main(["predict", str(tmp_path / "missing.zip"), str(tmp_path / "x.tif"), "--out", str(tmp_path / "o"),
                     "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    capsys.readouterr()
    for bad in ("0", "-2", "many", "1.5"):
        assert main(["train", "--out", str(tmp_path / "r"), "--threads", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--threads" in err and "'auto' or a positive integer" in err
