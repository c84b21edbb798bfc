"""Shared, cached fixtures for the export and upload tests: a calibrated copy of conftest's `tiny_run` and ONE
exported package per test session (a full export with bioimageio.core's self-test is the expensive part; every assertion
about the package reuses it).

The cache is a module global because test_export.py and test_upload.py are separate modules and this file is
imported once per session.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import time
from pathlib import Path

import torch
import yaml

K = 4  # posterior samples in the test package (small: the self-test runs 21 inferences per weight format)
SEED = 7
_CACHE: dict = {}


@contextlib.contextmanager
def one_thread():
    """torch on one thread: on a shared 2-core machine two threads each are ~10x slower (oversubscription)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def network_guard():
    """Record (and refuse) every attempt to resolve or reach a non-loopback host: the export's self-test must run
    offline. Yields the list of attempts."""
    attempts: list = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def local(host) -> bool:
        return str(host) in ("localhost", "127.0.0.1", "::1", "") or str(host).startswith("/")

    def getaddrinfo(host, *a, **k):
        if not local(host):
            attempts.append(("resolve", host))
            raise OSError(f"network disabled in tests: {host}")
        return real_getaddrinfo(host, *a, **k)

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if not local(host):
            attempts.append(("connect", host))
            raise OSError(f"network disabled in tests: {host}")
        return real_connect(sock, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    try:
        yield attempts
    finally:
        socket.getaddrinfo, socket.socket.connect = real_getaddrinfo, real_connect


def calibrated_copy(tiny_run: Path, root: Path) -> Path:
    """A calibrated copy of conftest's shared `tiny_run` (calibrate writes into the run, so never the original)."""
    from denoisplit_zoo.calibration import calibrate_run

    run = root / "run"
    shutil.copytree(tiny_run, run)
    with one_thread():
        calibrate_run(run, n_samples=4, max_images=1, progress=False)
    return run


def write_recipe(path: Path, run: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "run": str(run), "name": "denoiSplit test package", "description": "A tiny test export.",
        "authors": [{"name": "Test Author", "affiliation": "Test Lab"}], "license": "MIT",
        "channel_names": ["blobs", "lines"], "n_samples": 16, "seed": SEED, "tags": ["test"],
        "citations": [{"text": "Someone. A related paper. 2020", "doi": "10.1234/example.5678"}],
        "training_data": {"description": "synthetic blobs and lines", "source": "tests/synthetic.py"}}))
    return path


def exported(tmp_path_factory, tiny_run: Path) -> dict:
    """{run, zip, recipe, stdout, rc, seconds, network}: `denoisplit-zoo export RUN --out model.zip --recipe R
    --samples K` through the CLI, once per session, with the network guarded (`network` = attempts made)."""
    if not _CACHE:
        from denoisplit_zoo.cli import main

        root = tmp_path_factory.mktemp("export")
        run = calibrated_copy(tiny_run, root)
        recipe = write_recipe(root / "recipe.yaml", run)
        out = root / "pkg" / "model.zip"
        buf = io.StringIO()
        t0 = time.monotonic()
        with one_thread(), contextlib.redirect_stdout(buf), network_guard() as attempts:
            rc = main(["export", str(run), "--out", str(out), "--recipe", str(recipe), "--samples", str(K)])
        _CACHE.update(run=run, zip=out, recipe=recipe, stdout=buf.getvalue(), rc=rc, seconds=time.monotonic() - t0,
                      network=attempts)
    return _CACHE
