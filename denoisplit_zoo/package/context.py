"""What the rdf description and the model card both derive from a run: the `PackageContext` that export.py fills,
the structure names as the package spells them, the training summary, the calibration under those names, and the
rdf_templates/ text both are filled from."""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..fileio import read_json
from .recipe import Recipe


def template_text(name: str) -> str:
    return importlib.resources.files("denoisplit_zoo.rdf_templates").joinpath(name).read_text(encoding="utf-8")


def _fill(obj: Any, values: dict) -> Any:
    """Substitute ${key} in every string of a parsed YAML tree (after parsing, so values never become YAML)."""
    if isinstance(obj, str):
        return string.Template(obj).safe_substitute(values)
    if isinstance(obj, list):
        return [_fill(v, values) for v in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    return obj


def rdf_defaults(values: dict) -> dict:
    import yaml

    return _fill(yaml.safe_load(template_text("rdf.yaml")), values)


def channel_id(name: str) -> str:
    """A structure name usable in channel names and markdown: letters, digits, _ and -."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return out or "channel"


@dataclass
class PackageContext:
    """Everything the description needs; export.py fills it. Arrays in raw units, (1, 1, S, S) and (1, 4, S, S)."""

    run: Any  # run_folder.Run
    recipe: Recipe
    workdir: Path  # the package's files are written here (weights, test tensors, model.py already present)
    kwargs: dict  # SplitSampler(**kwargs)
    halo: int
    min_size: int
    step: int
    test_input: np.ndarray
    test_output: np.ndarray
    test_input_source: str
    report_dir: Optional[str] = None
    onnx: dict = field(default_factory=dict)
    tensor_bytes_per_px: Optional[float] = None  # peak tensor memory of the module per input pixel (writer.py)

    @property
    def channel_names(self) -> list[str]:
        names = self.recipe.channel_names or tuple(self.run.channel_names)
        return [channel_id(n) for n in names]


def template_values(ctx: PackageContext) -> dict:
    a, b = ctx.channel_names
    cfg = ctx.run.config
    return {"a": a, "b": b, "preset": cfg.preset, "data": Path(cfg.data.path).name, "k": ctx.kwargs["n_samples"],
            "std_kind": "calibrated" if ctx.run.calibration else "uncalibrated"}


def latent_noise(ctx: PackageContext) -> str:
    """How the packaged sampler draws its latents, in the words config.denoisplit.noise and the card use."""
    return "counter-hash" if ctx.kwargs["sample_latents"] else "off (posterior means)"


def _log_entries(run) -> list[dict]:
    if not run.paths.log.is_file():
        return []
    out = []
    for line in run.paths.log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return [e for e in out if isinstance(e, dict)]


def training_summary(run) -> dict:
    """How and on what the model was trained (plain JSON: goes into config.denoisplit.training and the card)."""
    cfg = run.config
    log = _log_entries(run)
    vals = [e for e in log if isinstance(e.get("val_loss"), (int, float))]
    kept = [e for e in vals if e.get("best")]  # logs since the KL warm-up mark the kept checkpoint
    best = kept[-1] if kept else min(vals, key=lambda e: e["val_loss"]) if vals else {}
    split = run.data_split or {}
    prov = read_json(run.paths.provenance) if run.paths.provenance.is_file() else {}
    return {
        "init_from": prov.get("init_from"),  # fine-tuned: the source's name, file and sha256; None = from scratch
        "preset": cfg.preset, "loss": cfg.train.loss, "steps": log[-1].get("step") if log else None,
        "epochs": log[-1].get("epoch") if log else None, "seconds": log[-1].get("seconds") if log else None,
        "best_val_loss": best.get("val_loss"), "best_val_step": best.get("step"),
        "patch_size": cfg.train.patch_size, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "kl_weight": cfg.train.kl_weight, "free_bits": cfg.train.free_bits,
        "kl_warmup_steps": cfg.train.kl_warmup_steps, "kl_formulation": cfg.train.kl_formulation or cfg.train.loss,
        "data_source": split.get("source", cfg.data.path), "channels": list(cfg.data.channels),
        "split": {k: len(split[k]) for k in ("train", "val", "test") if isinstance(split.get(k), list)},
        "split_mode": split.get("mode"), "noise_protocol": split.get("noise"),
        "noise_model": {"n_gaussians": cfg.noise_model.n_gaussians, "n_coeffs": cfg.noise_model.n_coeffs,
                        "n_iterations": cfg.noise_model.n_iterations},
    }


def renamed_calibration(ctx: PackageContext) -> Optional[dict]:
    """The run's calibration.json (None before `calibrate`) with the channels renamed to the package's names:
    {"channels": {name: {scale, slope, offset, r2, rmv, rmse, ...}}, "mode", "n_samples", ...}."""
    cal = ctx.run.calibration
    if not cal:
        return None
    chans = cal.get("channels") or {}
    renamed = {new: chans.get(old, {}) for old, new in zip(ctx.run.channel_names, ctx.channel_names)}
    return {**cal, "channels": renamed}
