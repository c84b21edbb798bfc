"""`denoisplit-zoo evaluate`: whole-image posterior prediction on evaluation images, metrics against the clean
references (or the noisy targets when there are none), calibration check, and a report folder.

REPORT_DIR/
  metrics.json     ri_psnr {channel: dB}, ri_psnr_mean, ms_ssim {...}, ms_ssim_mean, micro_ssim {...},
                   micro_ssim_mean, calibration {channel: {scale, slope, offset, r2, ...}}, n_samples, n_images, ...
  report.md        the numbers, what they were measured against, the figures
  examples.png     crops: input | A | B | target A | target B | uncertainty A | uncertainty B
  calibration.png  RMSE vs RMV of the calibrated std on the evaluated images

Units: predictions, targets and stds are RAW; the metrics are computed in raw units (RI-PSNR and MicroSSIM do not
depend on units; MS-SSIM uses the reference's range).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .calibration import (DEFAULT_BINS, FALLBACK_SCALE, calibrate_arrays, clean_on_target_scale, noise_variance,
                          plot_calibration)
from .config import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_TILE
from .errors import UserError
from .fileio import OutputSet, atomic_path, json_safe, write_json, write_text
from .metrics import DETAIL_MIN_R, DETAIL_SIGMAS, channel_metrics, describe_denoising, describe_split, split_quality
from .run_folder import prepare_run_split
from .runtime import pick_device

CROP = 256  # figure crops (px)
N_FIGURE_IMAGES = 3


@dataclass
class EvalData:
    """Images to evaluate, raw: inputs (N, Y, X) (sum of the two noisy channels), targets (N, 2, Y, X) noisy,
    clean (N, 2, Y, X) on the targets' intensity scale or None."""

    inputs: np.ndarray
    targets: np.ndarray
    clean: Optional[np.ndarray]
    source: str
    split: Optional[str]


def _noisy_from_clean(clean: np.ndarray, noise: dict) -> np.ndarray:
    """Apply the run's synthetic noise protocol (same Poisson factor, same ABSOLUTE Gaussian sigma as in training,
    same seed) to clean (N, 2, Y, X) raw images."""
    from .data import synthetic_noise

    if noise.get("kind") != "synthetic":
        raise UserError("this data has only clean images, and the run was trained on real noisy images: "
                        "give the evaluation data with its noisy images")
    noisy, _ = synthetic_noise(clean, 0.0, float(noise.get("poisson_factor", 0.0)), int(noise.get("seed", 0)))
    sigma = float(noise.get("gaussian_sigma", 0.0))
    if sigma > 0:
        rng = np.random.default_rng([int(noise.get("seed", 0)), 1])
        for i in range(len(noisy)):
            noisy[i] += rng.standard_normal(noisy[i].shape, dtype=np.float32) * np.float32(sigma)
    return noisy


def load_eval_data(run, data: Optional[str] = None, channels: Optional[tuple[int, int]] = None) -> EvalData:
    """The run's test split (default), or all images of `data` (channels `channels`, default the run's). Data with
    noisy images uses them, unless the run was trained with synthetic noise and the data has clean images: then the
    run's synthetic protocol is applied to the clean images (the noise the model was trained for)."""
    from .data import load_channels, make_split_data

    if data is None:
        split, kind = prepare_run_split(run, "test")
        clean = None if split.clean is None else clean_on_target_scale(split.clean, split.targets, kind)
        return EvalData(split.inputs, split.targets, clean, str(run.config.data.path), "test")
    ch = tuple(channels) if channels else tuple(run.config.data.channels)
    raw = load_channels(data, ch)
    noise = (run.data_split or {}).get("noise", {"kind": "synthetic" if run.config.data.noise.gaussian
                                                 or run.config.data.noise.poisson else "real"})
    if raw.clean is not None and (raw.noisy is None or noise.get("kind") == "synthetic"):
        noisy, kind = _noisy_from_clean(raw.clean, noise), "synthetic"
    else:
        noisy, kind = raw.noisy, "real"
    split = make_split_data(noisy, raw.clean)
    clean = None if split.clean is None else clean_on_target_scale(split.clean, split.targets, kind)
    return EvalData(split.inputs, split.targets, clean, raw.source, None)


# ------------------------------------------------------------------------------------------------------ figures

def _crop_box(h: int, w: int, size: int = CROP) -> tuple[slice, slice]:
    ch, cw = min(h, size), min(w, size)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return slice(y0, y0 + ch), slice(x0, x0 + cw)


def plot_examples(inputs, mean, std, reference, names: list[str], path, reference_kind: str) -> None:
    """Rows = up to 3 images; columns = input | A | B | target A | target B | uncertainty A | uncertainty B (central
    crops of at most 256 px). Prediction and target of a channel share one colour range (the target's 1-99.5 %)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is

    n = min(N_FIGURE_IMAGES, len(inputs))
    cols = ["input", f"{names[0]} (MMSE)", f"{names[1]} (MMSE)", f"{names[0]} ({reference_kind})",
            f"{names[1]} ({reference_kind})", f"{names[0]} std", f"{names[1]} std"]
    fig = Figure(figsize=(2.1 * len(cols), 2.2 * n))
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r in range(n):
        box = _crop_box(*inputs[r].shape)
        panels = [inputs[r][box], mean[r, 0][box], mean[r, 1][box], reference[r, 0][box], reference[r, 1][box],
                  std[r, 0][box], std[r, 1][box]]
        ranges = [np.percentile(panels[0], [1, 99.5])]
        for c in range(2):
            ranges.append(np.percentile(reference[r, c][box], [1, 99.5]))
        lims = [ranges[0], ranges[1], ranges[2], ranges[1], ranges[2], None, None]
        for k, (ax, img) in enumerate(zip(axes[r], panels)):
            vmin, vmax = (lims[k] if lims[k] is not None else (0, np.percentile(img, 99.5) or 1))
            ax.imshow(img, cmap="magma" if k >= 5 else "gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[k], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# ------------------------------------------------------------------------------------------------------- report

def _unreliable_std(scale) -> str:
    """What an unreliable calibration shipped, in words (calibration.shipped_scale)."""
    if scale == FALLBACK_SCALE:
        return f"the posterior's own spread (s = {FALLBACK_SCALE:g})"
    return f"scaled by an estimate the data do not pin down (s = {_fmt(scale, 3)})"


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def floors_table(m: dict) -> str:
    """Markdown: per channel the model's RI-PSNR, both floors, the split gain and the verdict."""
    fl, names = m["floors"], list(m["ri_psnr"])
    rows = ["| channel | model RI-PSNR (dB) | naive: input / 2 (dB) | no split: clean sum / 2 (dB) | split gain (dB) "
            "| verdict |", "|---|---|---|---|---|---|"]
    for n in names:
        ns = fl["no_split"][n] if fl["no_split"] else None
        rows.append(f"| {n} | {_fmt(m['ri_psnr'][n])} | {_fmt(fl['naive'][n])} | {_fmt(ns)} | "
                    f"{_fmt(m['split_gain'][n])} | {m['split_status'][n]} |")
    return "\n".join(rows)


def correlation_line(m: dict) -> str:
    """One sentence: r of the predicted channels with each other (and of the clean ones, where known)."""
    c = m["correlation"]
    (pair, r_pred), = c["pred"].items()
    text = f"Pearson r of the predicted channels ({pair}): {_fmt(r_pred, 3)}"
    if "clean" in c:
        text += (f"; of the clean channels: {_fmt(c['clean'][pair], 3)} (a split keeps them apart; a model that only "
                 "denoises gives near 1); predicted vs clean: "
                 + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in c["pred_vs_clean"].items()))
    if "detail" in c:
        text += "; band-passed (fine detail) vs its own clean structure: " + ", ".join(
            f"{k} {_fmt(v, 3)}" for k, v in c["detail"].items())
    return text + "."


def render_report(m: dict, run_dir: str) -> str:
    names = list(m["ri_psnr"])
    ref = m["reference"]
    lines = [
        "# denoiSplit evaluation", "",
        f"- run: `{run_dir}`",
        f"- data: `{m['data']}`" + (f" ({m['split']} split)" if m.get("split") else ""),
        f"- images: {m['n_images']} of {m['image_size'][0]}x{m['image_size'][1]} px; posterior samples K = "
        f"{m['n_samples']}, seed {m['seed']}; tiles of {m['tile']} px with a {m['halo']} px halo",
        f"- reference: **{ref}** images" + ("" if ref == "clean" else
                                              " (no clean images in this data: metrics are against the NOISY targets, "
                                              "so they understate the quality; calibration uses the noise models to "
                                              "remove the observation noise)"),
        f"- calibration applied: {'yes (calibration.json)' if m['calibrated'] else 'no (run not calibrated: scale 1)'}"
        + "".join(f"; **{n}: calibration unreliable**, its std is {_unreliable_std(m['calibration'][n]['scale'])}, "
                  "not a calibrated error bar" for n, ok in (m.get("calibration_reliable") or {}).items()
                  if ok is False),
        "", "| channel | RI-PSNR (dB) | MS-SSIM | MicroSSIM | std scale | calib. slope | calib. offset | calib. R² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        c = m["calibration"][n]
        lines.append(f"| {n} | {_fmt(m['ri_psnr'][n])} | {_fmt(m['ms_ssim'][n], 4)} | {_fmt(m['micro_ssim'][n], 4)} | "
                     f"{_fmt(c['scale'], 3)} | {_fmt(c['slope'], 3)} | {_fmt(c['offset'], 3)} | {_fmt(c['r2'], 3)} |")
    lines.append(f"| mean | {_fmt(m['ri_psnr_mean'])} | {_fmt(m['ms_ssim_mean'], 4)} | {_fmt(m['micro_ssim_mean'], 4)} "
                 "| | | | |")
    lines += ["", "## Split or not: the model beside the two floors", "", floors_table(m), "",
              describe_split(m["split_status"], m["split_gain"], m.get("resembles_other"),
                             (m.get("correlation") or {}).get("detail")), "",
              "naive: the noisy input / 2 for both channels; no split: the clean sum (A + B) / 2 for both channels, "
              "a perfect denoiser that does not split. Split gain: RI-PSNR minus the better floor; a channel is split "
              "only if its gain is > 0, it correlates more with its own clean structure than with the other, and its "
              f"band-passed prediction (difference of Gaussians, sigma {DETAIL_SIGMAS[0]:g}-{DETAIL_SIGMAS[1]:g} px) "
              f"correlates with its band-passed clean structure at r >= {DETAIL_MIN_R:g} (its fine detail is there).",
              "", correlation_line(m)]
    if m.get("denoising"):
        lines += ["", describe_denoising(m["denoising"])]
    lines += ["", "RI-PSNR: range-invariant PSNR per frame (the paper's formula), averaged over frames. MS-SSIM: "
              f"pytorch-msssim, data range of the reference stack, {m['ms_ssim_levels']} of 5 scales. MicroSSIM: "
              "`microssim`, fitted per channel over all frames.",
              "Calibration: RMSE vs RMV over equal-count bins of the calibrated std (ideal slope 1, offset 0); "
              "`optimal_scale` in metrics.json is the scale these images alone would give.",
              "", "## Examples", "", "![examples](examples.png)", ""]
    if m["n_samples"] > 1:
        lines += ["## Calibration", "", "![calibration](calibration.png)", ""]
    else:
        lines += ["One posterior sample: no spread, so no uncertainty or calibration to report.", ""]
    return "\n".join(lines)


def evaluate_run(run_dir, out, data: Optional[str] = None, channels: Optional[tuple[int, int]] = None,
                 n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, max_images: Optional[int] = None,
                 tile: int = DEFAULT_TILE,
                 bins: int = DEFAULT_BINS, chunk: Optional[int] = None, progress: bool = True,
                 device: str = "auto") -> dict:
    """Evaluate a run folder; write REPORT_DIR (metrics.json, report.md, examples.png, calibration.png).
    Returns the metrics dict (what metrics.json holds)."""
    from .run_folder import load_run
    from .sampling import predict_stack

    if n_samples < 1:
        raise UserError("--samples must be >= 1")
    run = load_run(run_dir)
    ev = load_eval_data(run, data, channels)
    n = len(ev.inputs) if max_images is None else max(1, min(int(max_images), len(ev.inputs)))
    scales = run.calibration_scale
    sampler = run.sampler(n_samples, seed).to(pick_device(device))
    sampler.calibration_scale.fill_(1.0)  # raw sample std here; the run's scales are applied below
    halo = run.halo
    pred = predict_stack(sampler, ev.inputs[:n], run.norm, tile, halo, chunk, progress, desc="evaluate")
    mean, std_raw = pred["mean"], pred["std"]
    std = std_raw * np.asarray(scales, np.float32).reshape(1, 2, 1, 1)
    targets = ev.targets[:n]
    names = run.channel_names
    if ev.clean is not None:
        reference, kind, nv = ev.clean[:n], "clean", None
    else:
        reference, kind = targets, "noisy"
        nv = noise_variance(run.noise_models, mean) if n_samples > 1 else None
    metrics = channel_metrics(reference, mean, names)
    split = split_quality(reference, mean, ev.inputs[:n], names, metrics["ri_psnr"], clean=kind == "clean")
    if n_samples > 1:
        calib = calibrate_arrays(mean, std_raw, reference, names, nv, bins, scales=scales)
    else:  # one sample has no spread: nothing to calibrate
        calib = {nm: {"scale": scales[c], "slope": None, "offset": None, "r2": None} for c, nm in enumerate(names)}
    out = Path(out)
    result = {
        **{k: metrics[k] for k in ("ri_psnr", "ri_psnr_mean", "ms_ssim", "ms_ssim_mean", "micro_ssim",
                                   "micro_ssim_mean", "ms_ssim_levels")},
        **split,
        "calibration": {nm: {k: v for k, v in c.items() if k not in ("rmv", "rmse", "count")}
                        for nm, c in calib.items()},
        "n_samples": int(n_samples), "n_images": int(n), "seed": int(seed), "reference": kind,
        "calibration_mode": "clean" if kind == "clean" else "noisy", "calibrated": run.calibration is not None,
        "calibration_reliable": {nm: ((run.calibration or {}).get("channels", {}).get(nm) or {}).get("reliable")
                                 for nm in names},
        "calibration_unreliable_because": {
            nm: ((run.calibration or {}).get("channels", {}).get(nm) or {}).get("unreliable_because") or []
            for nm in names},
        "image_size": [int(s) for s in ev.inputs.shape[-2:]], "data": ev.source, "split": ev.split,
        "halo": int(halo), "tile": int(tile), "run": str(run_dir), "channel_names": names,
    }
    with OutputSet(out):  # all or nothing: a failure (full disk, ...) removes what this call wrote
        plot_examples(ev.inputs[:n], mean, std, reference, names, out / "examples.png", kind)
        if n_samples > 1:
            plot_calibration(calib, out / "calibration.png",
                             title=f"calibrated std on the evaluated images ({kind} reference, K={n_samples})")
        write_text(out / "report.md", render_report(result, str(run_dir)))
        write_json(out / "metrics.json", json_safe(result))
    return result

