"""The package's human side: the cover image (input | A, B means over their stds) and the model card (README.md from
rdf_templates/model_card.md: validation with its floors and the split verdict, calibration and whether it can be
trusted, training, how to use it)."""

from __future__ import annotations

import io
import string
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from ..fileio import read_json
from ..metrics import describe_denoising, describe_split
from ..model import SAMPLES_PER_PASS
from . import layout as L
from .context import (PackageContext, latent_noise, renamed_calibration, template_text, template_values,
                      training_summary)


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


def report_inputs(ctx: PackageContext) -> tuple[Optional[dict], Optional[Path]]:
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
        detail = (metrics.get("correlation") or {}).get("detail") or {}
        verdict = describe_split({renamed[k]: v for k, v in status.items()},
                                 {renamed[k]: v for k, v in gain.items()}, {renamed[k]: v for k, v in other.items()},
                                 {renamed[k]: v for k, v in detail.items()})
        floors_text = ("\n\nBeside the model, two floors that need no model, on the same images: *naive* (the noisy "
                       "input / 2 for both channels) and *no split* (the clean sum / 2 for both channels: a perfect "
                       "denoiser that does not split). A structure is split only if it beats both (split gain > "
                       "0), resembles its own clean structure more than the other and shows its fine detail "
                       f"(band-pass correlation with its clean image). {verdict}")
        if metrics.get("denoising"):
            floors_text += " " + describe_denoising(metrics["denoising"])
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
        cal = (renamed_calibration(ctx) or {}).get("channels")
    how = ctx.run.calibration or {}
    parts = ["## Uncertainty calibration", ""]
    if not how:
        parts.append("This run was not calibrated (`denoisplit-zoo calibrate`): the std channels are the raw "
                     "posterior spread (scale 1.0).")
    else:
        parts.append("The std channels are the posterior spread multiplied by a per-channel scale fitted on held-out "
                     f"data ({how.get('split', 'validation')} images, {how.get('mode', '?')} reference, "
                     f"K={how.get('n_samples', '?')}).")
        fitted = (renamed_calibration(ctx) or {}).get("channels") or {}
        if any("reliable" in (c or {}) for c in fitted.values()):
            rows = [[name, c.get("scale"), " .. ".join(_num(v) for v in c.get("interval") or []),
                     c.get("method"), "yes" if c.get("reliable") else "**no**"] for name, c in fitted.items()]
            parts.append("\n" + _md_table(["structure", "shipped scale", "95 % interval of the estimate", "method",
                                           "reliable"], rows))
            for name, c in fitted.items():
                if not c.get("reliable"):
                    why = "; ".join(c.get("unreliable_because") or []) or (
                        f"noise-to-error ratio {_num(c.get('noise_to_error'))}")
                    parts.append(f"\n**{name}: calibration unreliable.** The data could not pin its scale down "
                                 f"(estimate {_num(c.get('optimal_scale'))}: {why}), so its std channel ships as "
                                 f"{c.get('method')}: a relative uncertainty map, not a calibrated error bar.")
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


def _memory_text(ctx: PackageContext, block: int) -> str:
    """The model card's memory sentence from export's measurement (tensor bytes per input pixel); `block`: the side
    of the recommended blocks, pixels."""
    b = ctx.tensor_bytes_per_px
    if not b:
        return "Its tensor memory was not measured at export."
    return (f"Measured at export (torch.profiler, eager PyTorch): at most {b / 1024:.2f} KB of tensors per input "
            f"pixel whatever K, i.e. {b * 1e6 / 2**20:.0f} MB per megapixel and {b * block * block / 2**20:.0f} MB "
            "per block below. The runtime's libraries and allocator add to that: for the quickstart's `small` "
            "package the peak memory of eager PyTorch was 1.8x the tensor figure plus 0.25 GB, and onnxruntime "
            "needed about half of PyTorch's.")


def render_model_card(ctx: PackageContext, meta: dict, figure: Optional[str], metrics: Optional[dict]) -> str:
    """README.md from rdf_templates/model_card.md (string.Template: missing keys are an error, not blank text)."""

    gain, offset = L.postprocessing_gain_offset(ctx.run.norm)
    block = ctx.min_size + L.BLOCKWISE_N
    values = {**template_values(ctx), "name": meta["name"], "description": meta["description"],
              "seed": ctx.kwargs["seed"],
              "noise": latent_noise(ctx),
              "input_mean": f"{ctx.run.norm.input_mean:.6g}", "input_std": f"{ctx.run.norm.input_std:.6g}",
              "gain": [round(g, 6) for g in gain], "offset": [round(o, 6) for o in offset],
              "min_size": ctx.min_size, "halo": ctx.halo, "grid": 2 ** int(ctx.kwargs["n_levels"]),
              "per_pass": min(SAMPLES_PER_PASS, int(ctx.kwargs["n_samples"])),
              "blockwise_n": L.BLOCKWISE_N, "block": block, "block_inner": L.BLOCK_CORE,
              "memory": _memory_text(ctx, block),
              "onnx_opset": ctx.onnx.get("opset", "?"), "onnx_ir": ctx.onnx.get("ir_version", "?"),
              "metrics_section": _metrics_section(ctx, metrics),
              "calibration_section": _calibration_section(ctx, metrics, figure),
              "training_table": _training_table(ctx), "test_input_source": ctx.test_input_source,
              "references": _references(meta["cite"])}
    return string.Template(template_text("model_card.md")).substitute(values)
