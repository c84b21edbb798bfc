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
