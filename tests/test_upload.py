"""`denoisplit-zoo upload` (issue 4.5): validates and self-tests first, then publishes through bioimageio.spec's own
`upload`. The zoo is not reachable: bioimageio.spec's endpoint setting (BIOIMAGEIO_HYPHA_UPLOAD) points at a
loopback HTTP server that mimics the hypha artifact manager (create -> put_file -> PUT -> edit) and records every
request. Loopback only; bounded request count and time."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from .export_helpers import exported, one_thread

import bioimageio.core  # noqa: E402,F401  (the [bmz] extra: the README test command installs it)

from denoisplit_zoo.cli import main  # noqa: E402

MAX_REQUESTS = 200  # a runaway client gets 503s, not an endless conversation


class _Recorder(BaseHTTPRequestHandler):
    """create -> {"id"}, put_file -> JSON string URL (on this server), PUT -> 200, edit -> {}."""

    requests: list  # set per server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        entry = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                 "body": self.rfile.read(n) if n else b"", "client": self.client_address[0]}
        self.server.recorded.append(entry)
        return entry

    def do_POST(self):
        if len(self.server.recorded) >= MAX_REQUESTS:
            return self._reply(503, {"detail": "too many requests"})
        entry = self._record()
        if self.path.endswith("/create"):
            return self._reply(200, {"id": "test-workspace/tiny-test-model"})
        if self.path.endswith("/put_file"):
            file_path = json.loads(entry["body"])["file_path"]
            host, port = self.server.server_address
            return self._reply(200, f"http://{host}:{port}/bucket/{file_path}")
        if self.path.endswith("/edit"):
            return self._reply(200, {"status": "ok"})
        return self._reply(404, {"detail": "unknown endpoint"})

    def do_PUT(self):
        if len(self.server.recorded) >= MAX_REQUESTS:
            return self._reply(503, {"detail": "too many requests"})
        self._record()
        return self._reply(200, {})


@pytest.fixture()
def zoo(monkeypatch):
    """A recording fake of the zoo's upload service on 127.0.0.1, wired into bioimageio.spec's settings the way a
    user would: environment variables, read by bioimageio.spec's own Settings class."""
    from bioimageio.spec import settings
    from bioimageio.spec._internal._settings import Settings

    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    server.recorded = []
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address
    monkeypatch.setenv("BIOIMAGEIO_HYPHA_UPLOAD", f"http://{host}:{port}/public/services/artifact-manager/create")
    monkeypatch.setenv("BIOIMAGEIO_HYPHA_UPLOAD_TOKEN", "test-token")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # never route loopback through a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    fresh = Settings()  # the env -> settings path bioimageio.spec itself uses
    monkeypatch.setattr(settings, "hypha_upload", fresh.hypha_upload)
    monkeypatch.setattr(settings, "hypha_upload_token", fresh.hypha_upload_token)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory, tiny_run):
    return exported(tmp_path_factory, tiny_run)


def test_upload_sends_rdf_and_every_file(pkg, zoo, capsys):
    with one_thread():
        assert main(["upload", str(pkg["zip"])]) == 0
    assert "uploaded" in capsys.readouterr().out
    reqs = zoo.recorded
    assert reqs and all(r["client"] == "127.0.0.1" for r in reqs) and len(reqs) < MAX_REQUESTS
    create, edit = reqs[0], reqs[-1]
    assert create["path"].endswith("/create") and edit["path"].endswith("/edit")
    with zipfile.ZipFile(pkg["zip"]) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    rdf = yaml.safe_load(members["rdf.yaml"])
    manifest = json.loads(create["body"])["manifest"]
    assert manifest["name"] == rdf["name"]
    assert manifest["config"]["denoisplit"]["seed"] == rdf["config"]["denoisplit"]["seed"]
    assert json.loads(edit["body"])["manifest"]["status"] == "request-review"
    for r in reqs:
        if r["method"] == "POST":
            assert r["headers"].get("Authorization") == "Bearer test-token"
    asked = [json.loads(r["body"])["file_path"] for r in reqs if r["path"].endswith("/put_file")]
    assert sorted(asked) == sorted(members)  # rdf.yaml and every file of the package
    puts = {r["path"].rsplit("/bucket/", 1)[1]: r["body"] for r in reqs if r["method"] == "PUT"}
    assert sorted(puts) == sorted(members)
    for name, data in members.items():
        if name != "rdf.yaml":  # rdf.yaml is re-serialised by bioimageio.spec from the validated description
            assert data in puts[name], name
    assert rdf["name"].encode() in puts["rdf.yaml"]


def test_upload_without_token_is_refused_before_any_request(pkg, zoo, monkeypatch, capsys):
    from bioimageio.spec import settings

    monkeypatch.setattr(settings, "hypha_upload_token", None)
    assert main(["upload", str(pkg["zip"])]) == 2
    assert "BIOIMAGEIO_HYPHA_UPLOAD_TOKEN" in capsys.readouterr().err
    assert zoo.recorded == []


def _edited_package(src, dst, member: str, data: bytes, sha_at: tuple) -> Path:
    """A copy of the zip `src` at `dst` with `member` replaced by `data` and its sha256 in rdf.yaml (at the key path
    `sha_at`) updated, so format validation and hash checks pass and only the content is wrong."""
    import hashlib

    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[member] = data
    rdf = yaml.safe_load(members["rdf.yaml"])
    node = rdf
    for key in sha_at:
        node = node[key]
    node["sha256"] = hashlib.sha256(data).hexdigest()
    members["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return dst


def test_upload_refuses_a_failing_package(pkg, zoo, tmp_path, capsys):
    """Valid format and hashes, but the weights no longer reproduce the test output: the self-test refuses it."""
    with zipfile.ZipFile(pkg["zip"]) as zf:
        expected = np.load(io.BytesIO(zf.read("test_output.npy")))
    buf = io.BytesIO()
    np.save(buf, expected + 50.0)
    bad = _edited_package(pkg["zip"], tmp_path / "bad.zip", "test_output.npy", buf.getvalue(),
                          ("outputs", 0, "test_tensor"))
    with one_thread():
        assert main(["upload", str(bad)]) == 2
    assert "Reproduce test outputs" in capsys.readouterr().err
    assert zoo.recorded == []


def test_upload_never_runs_a_foreign_model_py(pkg, zoo, tmp_path, capsys):
    """The self-test imports the package's model.py. A zip whose model.py is not this installation's own (edited,
    hashes updated so the format check passes) is refused before anything imports it: its code would write a file."""
    with zipfile.ZipFile(pkg["zip"]) as zf:
        code = zf.read("model.py")
    marker = tmp_path / "model_py_was_run"
    code += f"\nopen({str(marker)!r}, 'w').write('ran')\n".encode()
    foreign = _edited_package(pkg["zip"], tmp_path / "foreign.zip", "model.py", code,
                              ("weights", "pytorch_state_dict", "architecture"))
    with one_thread():
        assert main(["upload", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "model.py is not this denoisplit-zoo's own" in err and err.count("\n") == 1
    assert not marker.exists() and zoo.recorded == []


def test_upload_refuses_a_corrupt_zip(zoo, tmp_path, capsys):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"not a zip")
    assert main(["upload", str(bad)]) == 2
    assert zoo.recorded == []
