"""Typed configs: inf / nan and unknown keys are one-line errors; a retired key in an old run folder still loads."""

from __future__ import annotations

import math

import pytest

from denoisplit_zoo.config import build_run_config, load_run_config
from denoisplit_zoo.errors import UserError


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_inf_and_nan_are_refused(value):
    with pytest.raises(UserError, match="train.lr"):
        build_run_config("tiny", {"data": {"path": "x.npz"}, "train": {"lr": value}})
    with pytest.raises(UserError, match="data.noise.gaussian"):
        build_run_config("tiny", {"data": {"path": "x.npz", "noise": {"gaussian": value}}})


def test_retired_key_loads_from_an_old_run_but_not_from_a_users_config(tmp_path):
    import yaml

    cfg = build_run_config("tiny", {"data": {"path": "x.npz"}})
    raw = cfg.model_dump(mode="json")
    raw["train"]["num_workers"] = 0  # what run folders written before its removal hold
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(UserError, match="train.num_workers: unknown key"):
        build_run_config("tiny", {"data": {"path": "x.npz"}, "train": {"num_workers": 0}})


def test_yaml_aliases_are_fine_until_they_explode():
    """A shared node (what yaml.safe_dump writes for a repeated object) loads; nested aliases that expand to
    billions of nodes are refused in milliseconds instead of being walked for hours."""
    import time

    import yaml

    from denoisplit_zoo.fileio import load_yaml

    assert load_yaml("a: &x {b: 1}\nc: *x\n") == {"a": {"b": 1}, "c": {"b": 1}}
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9))
    t0 = time.monotonic()
    with pytest.raises(yaml.YAMLError, match="nested aliases"):
        load_yaml(laughs)
    assert time.monotonic() - t0 < 5
