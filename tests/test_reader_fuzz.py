"""Fuzz of the package reader (issue 16): any rdf.yaml document and any zip member table ends in a valid load or a
one-line UserError, within a time bound per example and without building a network its weights file cannot hold.

The examples are mutations of a real minimal package (tests/bad_inputs.make_package of the tiny run): a value
anywhere in rdf.yaml replaced or deleted, the whole document replaced by arbitrary YAML / text / bytes / nested
aliases, and zip member tables with arbitrary names (unsafe, duplicate, missing, renamed) and contents."""

from __future__ import annotations

import resource
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from denoisplit_zoo.errors import UserError
from denoisplit_zoo.model import SplitSampler
from denoisplit_zoo.package import layout as L
from denoisplit_zoo.package.reader import load_package_sampler

from .bad_inputs import make_package

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
SECONDS_PER_LOAD = 10.0     # a load of the ~0.1 MB package takes ~0.05 s; a walk of 10^9 alias nodes takes hours
RSS_GROWTH_MB = 512         # above the session's peak so far: a reader building a huge network would exceed it


@pytest.fixture(scope="module")
def members(tiny_run, tmp_path_factory) -> dict[str, bytes]:
    good = make_package(tiny_run, tmp_path_factory.mktemp("fuzz") / "good.zip")
    with zipfile.ZipFile(good) as z:
        return {n: z.read(n) for n in z.namelist()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(table: list[tuple[str, bytes]]):
    """Write the member table as a zip and read it: a SplitSampler or a one-line UserError, in bounded time and
    memory. Returns the sampler or the error message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.zip"
        with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some examples have
            for name, data in table:
                z.writestr(name, data)
        rss0, t0 = _peak_rss_mb(), time.perf_counter()
        try:
            sampler, names, norm, meta = load_package_sampler(path)
            out = sampler
            assert isinstance(sampler, SplitSampler) and len(names) == 2
        except UserError as e:
            out = str(e)
            assert out and "\n" not in out
        assert time.perf_counter() - t0 < SECONDS_PER_LOAD
        assert _peak_rss_mb() - rss0 < RSS_GROWTH_MB
        return out


def _with_rdf(members: dict, rdf: bytes) -> list[tuple[str, bytes]]:
    return [(n, rdf if n == "rdf.yaml" else d) for n, d in members.items()]


def test_the_unmutated_package_loads(members):
    assert isinstance(_load(list(members.items())), SplitSampler)


# --------------------------------------------------------------------------------------------- rdf.yaml documents
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from([0, 1, -1, 10**7, 2**31, 1e308, "", "weights.pt",
                                                            "../x", "/etc/passwd", "model.py"]))
_VALUES = st.recursive(_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                       max_leaves=12)


def _paths(node, prefix=()):
    """Every key path into a nested dict / list document."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data(), delete=st.booleans())
def test_any_value_anywhere_in_rdf_yaml(members, data, delete):
    rdf = yaml.safe_load(members["rdf.yaml"])
    paths = [p for p in _paths(rdf) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = rdf
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_VALUES, label="value")
    _load(_with_rdf(members, yaml.safe_dump(rdf, sort_keys=False).encode()))


@FUZZ
@given(doc=st.one_of(_VALUES.map(lambda v: yaml.safe_dump(v).encode()), st.text(max_size=200).map(str.encode),
                     st.binary(max_size=200)))
def test_any_rdf_yaml_document(members, doc):
    assert isinstance(_load(_with_rdf(members, doc)), str)  # nothing of ours in it: never a load


@FUZZ
@given(depth=st.integers(1, 12), width=st.integers(1, 12), keep_rest=st.booleans())
def test_nested_aliases_are_refused_or_cheap(members, depth, width, keep_rest):
    bomb = b"".join(b"l%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * width) if i else b"lol")
                    for i in range(depth))
    out = _load(_with_rdf(members, bomb + (members["rdf.yaml"] if keep_rest else b"")))
    if width ** depth > 10**7:
        assert isinstance(out, str) and "nodes through nested aliases" in out


# --------------------------------------------------------------------------------------------- zip member tables
_NAMES = st.one_of(st.sampled_from(["rdf.yaml", L.STATE_DICT_FILE, L.ARCHITECTURE_FILE, "../../evil.py", "/abs.pt",
                                    "a\\b.pt", "C:weights.pt", "dir/../weights.pt", "./rdf.yaml",
                                    "RDF.YAML", "weights.pt/", "nested/rdf.yaml"]),
                   st.text(min_size=1, max_size=16))


@FUZZ
@given(data=st.data())
def test_any_member_table(members, data):
    table = list(members.items())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["drop", "rename", "add", "replace", "duplicate"]), label="kind")
        i = data.draw(st.integers(0, max(len(table) - 1, 0)), label="member")
        if kind == "add" or not table:
            table.append((data.draw(_NAMES, label="name"), data.draw(st.binary(max_size=64), label="bytes")))
        elif kind == "drop":
            table.pop(i)
        elif kind == "rename":
            table[i] = (data.draw(_NAMES, label="new name"), table[i][1])
        elif kind == "replace":
            blob = table[i][1]
            cut = data.draw(st.integers(0, len(blob)), label="cut")
            table[i] = (table[i][0], blob[:cut] + data.draw(st.binary(max_size=32), label="tail"))
        else:
            table.append((table[i][0], data.draw(st.binary(max_size=64), label="dup bytes")))
    _load(table)


@FUZZ
@given(n_filters=st.integers(1, 1024), n_levels=st.integers(1, 8), z_dim=st.integers(1, 1024))
def test_a_declared_architecture_the_weights_cannot_hold_is_never_built(members, n_filters, n_levels, z_dim):
    """Within ARCH_LIMITS a package may declare a network of ~10^9 parameters; with the tiny run's weights.pt
    (~0.1 MB) the reader must refuse it from the file's size, before building it."""
    rdf = yaml.safe_load(members["rdf.yaml"])
    rdf["config"]["denoisplit"]["architecture"].update(n_filters=n_filters, n_levels=n_levels, z_dim=z_dim)
    _load(_with_rdf(members, yaml.safe_dump(rdf, sort_keys=False).encode()))


def test_the_fuzz_helpers_see_a_load_and_a_refusal(members):
    """The check above can fail: a valid package loads, and a weights file swapped for garbage is refused."""
    assert isinstance(_load(list(members.items())), SplitSampler)
    table = [(n, b"garbage" if n == L.STATE_DICT_FILE else d) for n, d in members.items()]
    assert "does not match its sha256" in _load(table)
