"""bioimage.io packaging: release recipes, the model description (bioimageio.spec 0.5.12 builders), cover, model card,
saving, the offline self-test (bioimageio.core 0.11 `test_model`) and upload (bioimageio.spec's own `upload`).

Contract (docs/contracts.md, package/layout.py): one input `input` (b, c=1, y, x; ParameterizedSize(min,
step=2**n_levels)), one output `prediction` (b, c=4: <A>_mean, <B>_mean, <A>_std, <B>_std; SpaceOutputAxisWithHalo). Single input AND single output
so ilastik accepts it; processing only with ops deepImageJ implements (fixed_zero_mean_unit_variance, scale_linear).
No remote URLs and no `github_user` in the rdf: validation would go online and the self-test must run offline.

bioimageio.spec/core are the optional `bmz` extra: imported inside functions, a missing install is a UserError.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import re
import shutil
import string
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .fileio import atomic_path, read_json, read_yaml
from .metrics import describe_split
from .package import layout as L

# ops deepImageJ (JDLL) maps to Java classes; anything else ("custom", softmax, ...) fails there
DEEPIMAGEJ_OPS = {"binarize", "clip", "ensure_dtype", "fixed_zero_mean_unit_variance", "scale_linear", "scale_range",
                  "sigmoid", "zero_mean_unit_variance"}
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")  # self-test order: the parent first
_NAME_CHARS = set(string.ascii_letters + string.digits + "_+- ()")  # what spec 0.5 allows in `name`


def _require_bioimageio() -> None:
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise UserError("packaging needs bioimageio.core: pip install 'denoisplit-zoo[bmz]'") from None


# ------------------------------------------------------------------------------------------------------ recipes
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeAuthor(_Strict):
    """No github_user on purpose: spec validation would query the GitHub API (offline tests crash)."""

    name: str
    affiliation: Optional[str] = None
    email: Optional[str] = None
    orcid: Optional[str] = None


class RecipeCitation(_Strict):
    text: str
    doi: Optional[str] = None
    url: Optional[str] = None  # note: validation HEAD-requests URLs (online); prefer a DOI

    @model_validator(mode="after")
    def _one_link(self):
        if not (self.doi or self.url):
            raise ValueError("a citation needs a doi or a url")
        return self


class RecipeTrainingData(_Strict):
    description: str  # what the images are (organism, structures, microscope, noise)
    source: Optional[str] = None  # where to get them (free text, shown in the model card)
    zoo_id: Optional[str] = None  # a bioimage.io dataset id, if the data is in the zoo


class Recipe(_Strict):
    """A release recipe (packaging/NAME.yaml). Every field is optional: rdf_templates/rdf.yaml gives defaults.
    Relative paths (`run`, `evaluation`) are relative to the recipe file."""

    run: Optional[str] = None  # run folder
    name: Optional[str] = None
    description: Optional[str] = None
    authors: list[RecipeAuthor] = []
    license: Optional[str] = None  # SPDX id; default CC-BY-4.0
    citations: list[RecipeCitation] = []  # added after the denoiSplit paper
    training_data: Optional[RecipeTrainingData] = None
    tags: list[str] = []  # added to the default tags
    version: Optional[str] = None
    channel_names: Optional[tuple[str, str]] = None  # rename the two structures (default: the run's names)
    n_samples: Optional[int] = Field(None, ge=1)  # K posterior samples per prediction (default 16)
    seed: Optional[int] = Field(None, ge=0, lt=2**31)
    evaluation: Optional[str] = None  # REPORT_DIR of `denoisplit-zoo evaluate` (metrics.json, figures)
    git_repo: Optional[str] = None

    @model_validator(mode="after")
    def _zoo_rules(self):
        if self.name is not None and (not 5 <= len(self.name) <= 128 or set(self.name) - _NAME_CHARS):
            raise ValueError("name: 5..128 characters, only letters, digits, spaces and _+-()")
        if "careamics" in {t.lower() for t in self.tags}:  # the zoo would test it with CAREamics, which fails
            raise ValueError("tags: `careamics` makes the zoo run its CAREamics check, which cannot load this model")
        return self


def load_recipe(path) -> Recipe:
    """Read and validate packaging/NAME.yaml; unknown keys are errors (a typo must not be silently ignored)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping")
    try:
        rec = Recipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"{path}: {where}: {err['msg']}") from None
    base = path.resolve().parent
    upd = {k: str(base / v) for k in ("run", "evaluation") if (v := getattr(rec, k)) and not Path(v).is_absolute()}
    return rec.model_copy(update=upd)


# ---------------------------------------------------------------------------------------------------- templates
def _template_text(name: str) -> str:
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

    return _fill(yaml.safe_load(_template_text("rdf.yaml")), values)


def _safe_name(name: str) -> str:
    """Replace characters spec 0.5 refuses in `name` with spaces."""
    return re.sub(r" +", " ", "".join(c if c in _NAME_CHARS else " " for c in name)).strip()


def _channel_id(name: str) -> str:
    """A structure name usable in channel names and markdown: letters, digits, _ and -."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return out or "channel"


# ----------------------------------------------------------------------------------------------- package context
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

    @property
    def channel_names(self) -> list[str]:
        names = self.recipe.channel_names or tuple(self.run.channel_names)
        return [_channel_id(n) for n in names]


def _values(ctx: PackageContext) -> dict:
    a, b = ctx.channel_names
    cfg = ctx.run.config
    return {"a": a, "b": b, "preset": cfg.preset, "data": Path(cfg.data.path).name, "k": ctx.kwargs["n_samples"],
            "std_kind": "calibrated" if ctx.run.calibration else "uncalibrated"}


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


def _calibration(ctx: PackageContext) -> Optional[dict]:
    """The run's calibration.json (None before `calibrate`) with the channels renamed to the package's names:
    {"channels": {name: {scale, slope, offset, r2, rmv, rmse, ...}}, "mode", "n_samples", ...}."""
    cal = ctx.run.calibration
    if not cal:
        return None
    chans = cal.get("channels") or {}
    renamed = {new: chans.get(old, {}) for old, new in zip(ctx.run.channel_names, ctx.channel_names)}
    return {**cal, "channels": renamed}


def denoisplit_config(ctx: PackageContext) -> dict:
    """config.denoisplit: everything load_package_sampler and a reader need, in plain JSON types."""
    run = ctx.run
    return {
        "architecture": dict(ctx.kwargs),
        "architecture_callable": "SplitSampler",
        "n_samples": ctx.kwargs["n_samples"],
        "seed": ctx.kwargs["seed"],
        "noise": "counter-hash" if ctx.kwargs["noise"] else "off (posterior means)",
        "normalization": run.norm.to_dict(),
        "channel_names": ctx.channel_names,
        "output_channels": [f"{c}_{k}" for k in ("mean", "std") for c in ctx.channel_names],
        "units": "model input/output normalised; package input/output raw intensity (pre/post-processing)",
        "calibration": {"scale": [float(v) for v in run.calibration_scale], **(_calibration(ctx) or {})},
        "noise_models": [nm.to_dict() for nm in run.noise_models],
        "training": training_summary(run),
        "halo": ctx.halo,
        "min_size": ctx.min_size,
        "step": ctx.step,
        "test_input": ctx.test_input_source,
    }


# ------------------------------------------------------------------------------------------------------- cover
def _stretch(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def make_cover(raw_in: np.ndarray, raw_out: np.ndarray, names: list[str], path: Path) -> None:
    """2:1 PNG (800 x 400, smaller if needed): the input on the left half; the right half 2 x 2: A and B means
    (top), their stds (bottom). Each panel is contrast-stretched to its 0.5-99.5 percentiles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 4, left=0, right=1, bottom=0, top=1, wspace=0.0, hspace=0.0)
    panels = [(gs[:, :2], raw_in[0, 0], "gray", "input"), (gs[0, 2], raw_out[0, 0], "magma", f"{names[0]} (mean)"),
              (gs[0, 3], raw_out[0, 1], "viridis", f"{names[1]} (mean)"),
              (gs[1, 2], raw_out[0, 2], "inferno", f"{names[0]} std"), (gs[1, 3], raw_out[0, 3], "inferno",
                                                                        f"{names[1]} std")]
    for spec, img, cmap, label in panels:
        ax = fig.add_subplot(spec)
        lo, hi = _stretch(img)
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.text(0.03, 0.97, label, transform=ax.transAxes, va="top", ha="left", color="white", fontsize=9,
                bbox=dict(facecolor="black", alpha=0.5, pad=2, edgecolor="none"))
    # bioimage.io wants covers < 500 kB; noisy images compress badly, so shrink the raster if needed
    for dpi in (100, 75, 50):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        if buf.tell() < 450_000:
            break
    Path(path).write_bytes(buf.getvalue())


# -------------------------------------------------------------------------------------------------- model card
def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _report(ctx: PackageContext) -> tuple[Optional[dict], Optional[Path]]:
    """(metrics.json of the evaluation report or None, calibration figure: the report's, else the run's
    calibration.png written by `calibrate`, else None)."""
    run_fig = ctx.run.paths.root / "calibration.png"
    fallback = run_fig if run_fig.is_file() and ctx.run.calibration else None
    if not ctx.report_dir:
        return None, fallback
    d = Path(ctx.report_dir)
    if not (d / "metrics.json").is_file():
        raise UserError(f"evaluation report {d} has no metrics.json (run `denoisplit-zoo evaluate` first)")
    figs = sorted(d.glob("*calib*.png"))
    return read_json(d / "metrics.json"), (figs[0] if figs else fallback)


def _metrics_section(ctx: PackageContext, metrics: Optional[dict]) -> str:
    if metrics is None:
        t = training_summary(ctx.run)
        return ("No evaluation report was packaged (add `evaluation: REPORT_DIR` from `denoisplit-zoo evaluate` "
                "to the packaging recipe). Training-time validation: best validation loss "
                f"{_num(t['best_val_loss'])} (negative log-likelihood per pixel under the noise model) at step "
                f"{t['best_val_step']}.")
    floors, gain = metrics.get("floors"), metrics.get("split_gain") or {}
    status = metrics.get("split_status") or {}
    rows = []
    for old, new in zip(ctx.run.channel_names, ctx.channel_names):
        row = [new, (metrics.get("ri_psnr") or {}).get(old, "-"), (metrics.get("ms_ssim") or {}).get(old, "-")]
        if floors:
            no_split = floors["no_split"][old] if floors.get("no_split") else "-"
            row += [floors["naive"].get(old, "-"), no_split, gain.get(old, "-"), status.get(old, "-")]
        rows.append(row)
    header = ["structure", "range-invariant PSNR (dB)", "MS-SSIM"]
    if floors:
        header += ["naive: input / 2 (dB)", "no split: clean sum / 2 (dB)", "split gain (dB)", "verdict"]
        rows.append(["mean", metrics.get("ri_psnr_mean", "-"), metrics.get("ms_ssim_mean", "-"),
                     floors["naive"].get("mean", "-"), floors["no_split"]["mean"] if floors.get("no_split") else "-",
                     "", ""])
        renamed = dict(zip(ctx.run.channel_names, ctx.channel_names))
        other = metrics.get("resembles_other") or {}
        verdict = describe_split({renamed[k]: v for k, v in status.items()},
                                 {renamed[k]: v for k, v in gain.items()}, {renamed[k]: v for k, v in other.items()})
        floors_text = ("\n\nBeside the model, two floors that need no model, on the same images: *naive* (the noisy "
                       "input / 2 for both channels) and *no split* (the clean sum / 2 for both channels: a perfect "
                       "denoiser that does not split). A structure is split only if it beats both (split gain > "
                       f"0). {verdict}")
    else:
        rows.append(["mean", metrics.get("ri_psnr_mean", "-"), metrics.get("ms_ssim_mean", "-")])
        floors_text = ("\n\nThis evaluation report has no floors (made before they were reported), so whether the "
                       "structures were split cannot be judged from it; re-run `denoisplit-zoo evaluate`.")
    return (f"Evaluated on {metrics.get('n_images', '?')} held-out test images with {metrics.get('n_samples', '?')} "
            f"posterior samples per image (MMSE estimate against the {metrics.get('reference', 'clean')} images):\n\n"
            + _md_table(header, rows) + floors_text)


def _calibration_section(ctx: PackageContext, metrics: Optional[dict], figure: Optional[str]) -> str:
    mcal = (metrics or {}).get("calibration")
    if mcal:  # the evaluation's own measurement of the calibration, keyed by the run's channel names
        cal = {new: mcal.get(old, {}) for old, new in zip(ctx.run.channel_names, ctx.channel_names)}
    else:
        cal = (_calibration(ctx) or {}).get("channels")
    how = ctx.run.calibration or {}
    parts = ["## Uncertainty calibration", ""]
    if not how:
        parts.append("This run was not calibrated (`denoisplit-zoo calibrate`): the std channels are the raw "
                     "posterior spread (scale 1.0).")
    else:
        parts.append("The std channels are the posterior spread multiplied by a per-channel scale fitted on held-out "
                     f"data ({how.get('split', 'validation')} images, {how.get('mode', '?')} reference, "
                     f"K={how.get('n_samples', '?')}).")
        fitted = (_calibration(ctx) or {}).get("channels") or {}
        if any("reliable" in (c or {}) for c in fitted.values()):
            rows = [[name, c.get("scale"), " .. ".join(_num(v) for v in c.get("interval") or []),
                     c.get("method"), "yes" if c.get("reliable") else "**no**"] for name, c in fitted.items()]
            parts.append("\n" + _md_table(["structure", "shipped scale", "95 % interval of the estimate", "method",
                                           "reliable"], rows))
            for name, c in fitted.items():
                if not c.get("reliable"):
                    parts.append(f"\n**{name}: calibration unreliable.** The data could not pin its scale down "
                                 f"(estimate {_num(c.get('optimal_scale'))}; noise-to-error ratio "
                                 f"{_num(c.get('noise_to_error'))}), so its std channel ships as {c.get('method')}: "
                                 "a relative uncertainty map, not a calibrated error bar.")
    if cal:
        keys = [k for k in ("scale", "slope", "offset", "r2") if any(k in (v or {}) for v in cal.values())]
        rows = [[name] + [(cal.get(name) or {}).get(k, "-") for k in keys] for name in cal]
        source = "the evaluation report" if mcal else "the calibration"
        parts.append(f"\nReliability measured by {source}: slope / offset / r2 of the linear fit of the observed RMSE "
                     "against the predicted RMV over equal-count bins (ideal 1 / 0 / 1):\n\n"
                     + _md_table(["structure", *keys], rows))
    if figure:
        parts.append(f"\n![calibration: observed RMSE against predicted std (RMV)]({figure})")
    return "\n".join(parts)


def _training_table(ctx: PackageContext) -> str:
    t = training_summary(ctx.run)
    noise = t["noise_protocol"] or {}
    init = t["init_from"]
    rows = [["preset / loss", f"{t['preset']} / {t['loss']}"],
            ["initial weights", "random (trained from scratch)" if not init else
             f"fine-tuned from {init['kind']} model `{init['source']}` (sha256 {init['sha256'][:12]}…, trained on "
             f"{(init.get('trained_on') or {}).get('data')}, channels "
             f"{(init.get('trained_on') or {}).get('channels')})"],
            ["steps (epochs)", f"{t['steps']} ({t['epochs']})"],
            ["training time", f"{t['seconds']} s" if t["seconds"] is not None else "-"],
            ["best validation loss (step)", f"{_num(t['best_val_loss'])} ({t['best_val_step']})"],
            ["patch size / batch size", f"{t['patch_size']} / {t['batch_size']}"],
            ["data", f"{t['data_source']}, channels {t['channels']}"],
            ["split (train/val/test)", ", ".join(f"{k} {v}" for k, v in t["split"].items()) or "-"],
            ["noise", ", ".join(f"{k}={_num(v)}" for k, v in noise.items()) or "-"],
            ["noise models", f"GMM, {t['noise_model']['n_gaussians']} Gaussians, polynomial degree "
                             f"{t['noise_model']['n_coeffs'] - 1}, one per channel (parameters in rdf config)"]]
    td = ctx.recipe.training_data
    if td:
        rows.append(["training data", td.description + (f" ({td.source})" if td.source else "")])
    return _md_table(["", ""], rows)


def _references(cite: list[dict]) -> str:
    lines = [f"- {c['text']}" + (f" doi:{c['doi']}" if c.get("doi") else "") + (f" {c['url']}" if c.get("url") else "")
             for c in cite]
    lines.append("- Ashesh, Krull, Di Sante, Pasqualini, Jug. uSplit: image decomposition for fluorescence microscopy. "
                 "ICCV 2023, pp. 21219-21229 (the splitting network denoiSplit builds on).")
    return "\n".join(lines)


def render_model_card(ctx: PackageContext, meta: dict, figure: Optional[str], metrics: Optional[dict]) -> str:
    """README.md from rdf_templates/model_card.md (string.Template: missing keys are an error, not blank text)."""

    gain, offset = L.postprocessing_gain_offset(ctx.run.norm)
    values = {**_values(ctx), "name": meta["name"], "description": meta["description"],
              "seed": ctx.kwargs["seed"], "noise": "counter-hash" if ctx.kwargs["noise"] else "off (posterior means)",
              "input_mean": f"{ctx.run.norm.input_mean:.6g}", "input_std": f"{ctx.run.norm.input_std:.6g}",
              "gain": [round(g, 6) for g in gain], "offset": [round(o, 6) for o in offset],
              "min_size": ctx.min_size, "step": ctx.step, "halo": ctx.halo,
              "onnx_opset": ctx.onnx.get("opset", "?"), "onnx_ir": ctx.onnx.get("ir_version", "?"),
              "metrics_section": _metrics_section(ctx, metrics),
              "calibration_section": _calibration_section(ctx, metrics, figure),
              "training_table": _training_table(ctx), "test_input_source": ctx.test_input_source,
              "references": _references(meta["cite"])}
    return string.Template(_template_text("model_card.md")).substitute(values)


# ------------------------------------------------------------------------------------------------- description
def _metadata(ctx: PackageContext) -> dict:
    """name, description, authors, license, tags, cite: template defaults, then the recipe."""
    d = rdf_defaults(_values(ctx))
    r = ctx.recipe
    meta = {"name": _safe_name(r.name or d["name"]), "description": r.description or d["description"],
            "authors": [a.model_dump(exclude_none=True) for a in r.authors] or d["authors"],
            "license": r.license or d["license"], "tags": list(dict.fromkeys([*d["tags"], *r.tags])),
            "cite": d["cite"] + [c.model_dump(exclude_none=True) for c in r.citations]}
    if len(meta["name"]) < 5:
        raise UserError(f"package name {meta['name']!r} is too short (5..128 letters, digits, _+- ())")
    return meta


def build_model_descr(ctx: PackageContext):
    """Write README.md, cover.png (+ attachments) into ctx.workdir and return the validated v0_5 ModelDescr."""
    _require_bioimageio()
    import torch
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, BioimageioConfig, ChannelAxis, CiteEntry, Config,
        FileDescr, FixedZeroMeanUnitVarianceDescr, FixedZeroMeanUnitVarianceKwargs, InputTensorDescr,
        IntervalOrRatioDataDescr, LinkedDataset, ModelDescr, OnnxWeightsDescr, OutputTensorDescr,
        ParameterizedSize, PytorchStateDictWeightsDescr, ScaleLinearAlongAxisKwargs, ScaleLinearDescr,
        SizeReference, SpaceInputAxis, SpaceOutputAxisWithHalo, TensorId, TorchscriptWeightsDescr, Version,
        WeightsDescr)


    w = ctx.workdir
    meta = _metadata(ctx)
    if len(set(ctx.channel_names)) != 2:
        raise UserError(f"the two structures need different names, got {ctx.channel_names}")
    metrics, fig_src = _report(ctx)
    attachments = []
    figure = None
    if fig_src is not None:
        figure = "calibration.png"
        shutil.copyfile(fig_src, w / figure)
        attachments.append(FileDescr(source=w / figure))
    (w / "training_config.yaml").write_text(ctx.run.paths.config.read_text())
    attachments.append(FileDescr(source=w / "training_config.yaml"))
    a, b = ctx.channel_names
    make_cover(ctx.test_input, ctx.test_output, [a, b], w / L.COVER_FILE)
    # sample tensors (FAIR: an imageio-readable example for humans) = the test tensors as TIFF, batch dropped
    import tifffile

    tifffile.imwrite(w / L.SAMPLE_INPUT_FILE, ctx.test_input[0, 0])
    tifffile.imwrite(w / "sample_output.tif", ctx.test_output[0])
    (w / "README.md").write_text(render_model_card(ctx, meta, figure, metrics), encoding="utf-8")

    norm = ctx.run.norm
    gain, offset = L.postprocessing_gain_offset(norm)
    torch_version = Version(torch.__version__.split("+")[0])
    yx = [AxisId("y"), AxisId("x")]
    inp = InputTensorDescr(
        id=TensorId(L.INPUT_NAME),
        description=f"one noisy image of {a} + {b} imaged together, raw intensity",
        axes=[BatchAxis(), ChannelAxis(channel_names=["mixed"]),
              *[SpaceInputAxis(id=ax, size=ParameterizedSize(min=ctx.min_size, step=ctx.step)) for ax in yx]],
        test_tensor=FileDescr(source=w / L.TEST_INPUT_FILE), sample_tensor=FileDescr(source=w / L.SAMPLE_INPUT_FILE),
        data=IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[FixedZeroMeanUnitVarianceDescr(kwargs=FixedZeroMeanUnitVarianceKwargs(
            mean=float(norm.input_mean), std=float(norm.input_std)))])
    out = OutputTensorDescr(
        id=TensorId(L.OUTPUT_NAME),
        description=f"MMSE estimates of {a} and {b} and their {_values(ctx)['std_kind']} posterior std "
                    f"({ctx.kwargs['n_samples']} samples), raw intensity",
        axes=[BatchAxis(), ChannelAxis(channel_names=[f"{a}_mean", f"{b}_mean", f"{a}_std", f"{b}_std"]),
              *[SpaceOutputAxisWithHalo(id=ax, halo=ctx.halo,
                                        size=SizeReference(tensor_id=TensorId(L.INPUT_NAME), axis_id=ax))
                for ax in yx]],
        test_tensor=FileDescr(source=w / L.TEST_OUTPUT_FILE),
        sample_tensor=FileDescr(source=w / "sample_output.tif"),
        data=IntervalOrRatioDataDescr(type="float32"),
        postprocessing=[ScaleLinearDescr(kwargs=ScaleLinearAlongAxisKwargs(
            axis=AxisId("channel"), gain=gain, offset=offset))])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=w / L.STATE_DICT_FILE, pytorch_version=torch_version,
            architecture=ArchitectureFromFileDescr(source=w / L.ARCHITECTURE_FILE, callable="SplitSampler",
                                                   kwargs=dict(ctx.kwargs))),
        torchscript=TorchscriptWeightsDescr(source=w / L.TORCHSCRIPT_FILE, parent="pytorch_state_dict",
                                            pytorch_version=torch_version),
        onnx=OnnxWeightsDescr(source=w / L.ONNX_FILE, opset_version=L.ONNX_OPSET, parent="pytorch_state_dict"))
    extra: dict = {}
    td = ctx.recipe.training_data
    if td and td.zoo_id:
        extra["training_data"] = LinkedDataset(id=td.zoo_id)
    if ctx.recipe.version:
        extra["version"] = ctx.recipe.version
    if ctx.recipe.git_repo:
        extra["git_repo"] = ctx.recipe.git_repo
    try:
        descr = ModelDescr(
            name=meta["name"], description=meta["description"],
            authors=[Author(**a) for a in meta["authors"]],
            cite=[CiteEntry(**c) for c in meta["cite"]], license=meta["license"], tags=meta["tags"],
            documentation=FileDescr(source=w / "README.md"), covers=[FileDescr(source=w / L.COVER_FILE)],
            attachments=attachments, inputs=[inp], outputs=[out], weights=weights,
            config=Config(bioimageio=BioimageioConfig(architecture_type="LadderVAE (hierarchical VAE)"),
                          denoisplit=denoisplit_config(ctx)),
            **extra)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"invalid package description: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return descr


# ------------------------------------------------------------------------------------------ save / test / upload
def save_package(descr, path: Path) -> None:
    """Zip the description and its files (hashes filled in) at `path`; refuses an invalid description."""
    from bioimageio.spec import save_bioimageio_package

    status = descr.validation_summary.status
    if status == "failed":
        raise UserError(f"invalid package description: {_first_failure(descr.validation_summary)}")
    save_bioimageio_package(descr, output_path=Path(path))


def _detail_message(d) -> str:
    """'check name: location: first error' of one failed ValidationDetail, one line."""
    err = d.errors[0] if d.errors else None
    loc = ".".join(str(p) for p in err.loc) if err is not None and err.loc else ""
    msg = (err.msg if err is not None else "").strip()
    return f"{d.name}: {loc + ': ' if loc else ''}{msg.splitlines()[0] if msg else 'failed'}"


def _first_failure(summary) -> str:
    failed = [d for d in summary.details if d.status == "failed"]
    return _detail_message(failed[0]) if failed else "unknown failure"


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
            extra = f"  ({_detail_message(d)})" if d.status == "failed" else ""
            lines.append(f"  {d.status:6s} {d.name}{extra}")
    return "\n".join(lines)


def self_test(zip_path: Path) -> str:
    """bioimageio.core's test_model on the zip for each weight format (CPU, fresh cache), stopping at the first
    failing format. Returns the summary lines; raises UserError with the first failing check otherwise.

    One call per format instead of stop_early=True: bioimageio.core 0.11.0 inverts the reproduce test's result for
    stop_early (`_test_recreate_test_outputs` returns bool(error_entries)), so it stops after the first PASSING
    format and silently skips the others."""
    _require_bioimageio()
    from bioimageio.core import test_model

    summaries = []
    with offline_cache():
        for fmt in WEIGHT_FORMATS:
            summaries.append(test_model(str(zip_path), weight_format=fmt, devices=["cpu"]))
            if summaries[-1].status != "passed":
                raise UserError(f"package failed bioimageio.core's test: {_first_failure(summaries[-1])}")
    return summary_lines(summaries)


def move_into_place(staged: Path, out: Path) -> None:
    """Copy the tested zip to `out` atomically (temp file beside `out`, then rename)."""
    with atomic_path(out) as tmp:
        shutil.copyfile(staged, tmp)


def validate_package(zip_path) -> None:
    """Format validation (no inference); UserError on failure."""
    _require_bioimageio()
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
        raise UserError(f"{p}: invalid package: {_first_failure(summary)}")


def upload_package(zip_path) -> str:
    """Validate, self-test, then publish with bioimageio.spec's own `upload` (endpoint setting
    BIOIMAGEIO_HYPHA_UPLOAD, token BIOIMAGEIO_HYPHA_UPLOAD_TOKEN, read by bioimageio.spec's settings).
    Returns the URL bioimageio.spec reports for the staged resource."""
    _require_bioimageio()
    import httpx
    from bioimageio.spec import settings, upload

    if not settings.hypha_upload_token:
        raise UserError("no upload token: set BIOIMAGEIO_HYPHA_UPLOAD_TOKEN (create one at "
                        "https://bioimage.io/#/api?tab=hypha-rpc; setting it accepts the zoo's terms of service)")
    validate_package(zip_path)
    self_test(Path(zip_path))
    try:
        url = upload(Path(zip_path))
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        raise UserError(f"upload to {settings.hypha_upload} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return str(url)
