"""The zoo side of a package: saving the zip (bioimageio.spec), format validation, bioimageio.core's offline
self-test of all three weight formats, and upload (bioimageio.spec's own `upload`).

bioimageio.spec/core are the optional `bmz` extra and heavy: imported inside the functions, and a missing install is
one UserError line (`require_bioimageio`). The self-test runs the package's model.py (bioimageio.core imports the
pytorch_state_dict architecture): only ever call it on a zip this tool wrote, or whose model.py is this tool's own
(`upload_package` checks that first).
"""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from . import layout as L

WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")  # self-test order: the parent first


def require_bioimageio() -> None:
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise UserError("packaging needs bioimageio.core: pip install 'denoisplit-zoo[bmz]'") from None


# The rdf format the zip is written in: the oldest that both the zoo's remote test runtime (bioimageio.core 0.10.4
# / spec 0.5.10.x) and today's (core 0.11 / spec 0.5.12) accept. Spec 0.5.11 turned `covers` and `documentation`
# into {source, sha256} objects, which spec 0.5.10 refuses ("Input should be a valid string") before testing any
# weights; written as plain file names in format 0.5.10, both read them (docs/zoo_runtimes.md has the measurement).
COMPAT_FORMAT_VERSION = "0.5.10"


def save_package(descr, path: Path) -> None:
    """Zip the description and its files (hashes filled in) at `path`, with rdf.yaml in COMPAT_FORMAT_VERSION;
    refuses an invalid description."""
    from bioimageio.spec import save_bioimageio_package

    status = descr.validation_summary.status
    if status == "failed":
        raise UserError(f"invalid package description: {first_failure(descr.validation_summary)}")
    save_bioimageio_package(descr, output_path=Path(path))
    _write_compatible_rdf(Path(path))


def compatible_rdf(rdf: dict) -> dict:
    """rdf.yaml as COMPAT_FORMAT_VERSION: `covers` a list of file names, `documentation` a file name (the files and
    their place in the zip are unchanged; their hashes stay in the weights / tensors entries that list them)."""
    out = dict(rdf, format_version=COMPAT_FORMAT_VERSION)
    out["covers"] = [c["source"] if isinstance(c, dict) else c for c in rdf.get("covers", [])]
    if isinstance(rdf.get("documentation"), dict):
        out["documentation"] = rdf["documentation"]["source"]
    return out


def _write_compatible_rdf(zip_path: Path) -> None:
    import yaml

    with zipfile.ZipFile(zip_path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    tmp = zip_path.with_name(zip_path.name + ".compat")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zo:
        for info, data in members:
            if info.filename == "rdf.yaml":
                data = yaml.safe_dump(compatible_rdf(yaml.safe_load(data)), sort_keys=False,
                                      allow_unicode=True).encode()
            zo.writestr(info, data)
    tmp.replace(zip_path)


def detail_message(d) -> str:
    """'check name: location: first error' of one failed ValidationDetail, one line."""
    err = d.errors[0] if d.errors else None
    loc = ".".join(str(p) for p in err.loc) if err is not None and err.loc else ""
    msg = (err.msg if err is not None else "").strip()
    return f"{d.name}: {loc + ': ' if loc else ''}{msg.splitlines()[0] if msg else 'failed'}"


def first_failure(summary) -> str:
    failed = [d for d in summary.details if d.status == "failed"]
    return detail_message(failed[0]) if failed else "unknown failure"


@contextlib.contextmanager
def offline_cache() -> Iterator[Path]:
    """Point bioimageio's cache at a fresh temp dir for the duration (BIOIMAGEIO_CACHE_PATH for the already
    created settings objects of spec and core): a test never reads or pollutes the user's cache."""
    from bioimageio.core._settings import settings as core_settings
    from bioimageio.spec import settings as spec_settings

    with tempfile.TemporaryDirectory(prefix="bioimageio-cache-") as tmp:
        old = [(s, s.cache_path) for s in (spec_settings, core_settings)]
        try:
            for s, _ in old:
                s.cache_path = Path(tmp)
            yield Path(tmp)
        finally:
            for s, p in old:
                s.cache_path = p


def _core_version() -> str:
    import bioimageio.core

    return bioimageio.core.__version__


def summary_lines(summaries) -> str:
    """One line per check, 'passed|failed  name' (a compact form of bioimageio's summaries, repeats dropped)."""
    status = "passed" if all(s.status == "passed" for s in summaries) else "failed"
    lines = [f"bioimageio.core {_core_version()} test_model ({', '.join(WEIGHT_FORMATS)}): {status}"]
    seen = set()
    for summary in summaries:
        for d in summary.details:
            if d.name in seen:
                continue
            seen.add(d.name)
            extra = f"  ({detail_message(d)})" if d.status == "failed" else ""
            lines.append(f"  {d.status:6s} {d.name}{extra}")
    return "\n".join(lines)


def self_test(zip_path: Path) -> str:
    """bioimageio.core's test_model on the zip for each weight format (CPU, fresh cache), stopping at the first
    failing format. Returns the summary lines; raises UserError with the first failing check otherwise.

    One call per format instead of stop_early=True: bioimageio.core 0.11.0 inverts the reproduce test's result for
    stop_early (`_test_recreate_test_outputs` returns bool(error_entries)), so it stops after the first PASSING
    format and silently skips the others."""
    require_bioimageio()
    from bioimageio.core import test_model

    summaries = []
    with offline_cache():
        for fmt in WEIGHT_FORMATS:
            summaries.append(test_model(str(zip_path), weight_format=fmt, devices=["cpu"]))
            if summaries[-1].status != "passed":
                raise UserError(f"package failed bioimageio.core's test: {first_failure(summaries[-1])}")
    return summary_lines(summaries)


def validate_package(zip_path) -> None:
    """Format validation (no inference); UserError on failure."""
    require_bioimageio()
    from bioimageio.spec import load_description

    p = Path(zip_path)
    if not p.is_file():  # an unknown local path would be looked up as a zoo id online
        raise UserError(f"missing file: {p}")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p} is not a zip file (expected a model zip from `denoisplit-zoo export`)")
    with offline_cache():
        descr = load_description(str(p), perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status == "failed":
        raise UserError(f"{p}: invalid package: {first_failure(summary)}")


def require_own_architecture(zip_path) -> None:
    """Refuse to run a zip's python file unless it is byte for byte this installation's model.py: bioimageio.core's
    self-test imports the pytorch_state_dict architecture, and a package from elsewhere (or an edited one) could
    hold anything. A zip exported by another version of denoisplit-zoo is refused too: re-export it."""
    with zipfile.ZipFile(zip_path) as zf:
        try:
            info = zf.getinfo(L.ARCHITECTURE_FILE)
        except KeyError:
            raise UserError(f"{zip_path}: no {L.ARCHITECTURE_FILE}: not a package written by denoisplit-zoo") from None
        shipped = zf.read(info) if info.file_size <= 2**22 else b""  # ours is ~20 kB
    if shipped != L.MODEL_SOURCE.read_bytes():
        raise UserError(f"{zip_path}: its {L.ARCHITECTURE_FILE} is not this denoisplit-zoo's own, so it is not run "
                        "(the self-test would import it); re-export the run with `denoisplit-zoo export`")


def upload_package(zip_path) -> str:
    """Validate, check that its python file is ours, self-test, then publish with bioimageio.spec's own `upload`
    (endpoint setting BIOIMAGEIO_HYPHA_UPLOAD, token BIOIMAGEIO_HYPHA_UPLOAD_TOKEN, read by bioimageio.spec's
    settings).
    Returns the URL bioimageio.spec reports for the staged resource."""
    require_bioimageio()
    import httpx
    from bioimageio.spec import settings, upload

    if not settings.hypha_upload_token:
        raise UserError("no upload token: set BIOIMAGEIO_HYPHA_UPLOAD_TOKEN (create one at "
                        "https://bioimage.io/#/api?tab=hypha-rpc; setting it accepts the zoo's terms of service)")
    validate_package(zip_path)
    require_own_architecture(zip_path)  # before the self-test, which imports the zip's model.py
    self_test(Path(zip_path))
    try:
        url = upload(Path(zip_path))
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        raise UserError(f"upload to {settings.hypha_upload} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return str(url)
