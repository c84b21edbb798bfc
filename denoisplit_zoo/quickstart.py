"""`denoisplit-zoo quickstart`: the whole pipeline on the bundled BPAE sample, within a time budget.

Actin and mitochondria (sample_data/, camera counts, CC-BY 4.0; by default at equal brightness) are summed into
one image, the paper's synthetic noise is added, and the `small` preset learns to split the sum again: noise
models -> training -> calibration without clean data -> evaluation on the held-out region against the clean
images -> bioimage.io package (self-tested) -> prediction of the held-out region through bioimageio.core from the
zip -> figure and report.

OUT/
  bpae_sample/             actin.tif, mito.tif: the clean sample the run reads (sample_data/, float32 counts, the
                           mitochondria rescaled for --brightness balanced, columns rolled: see held_out_shift)
  run/                     the run folder (config.yaml, noise_models/, checkpoints/, calibration.json, ...)
  report/                  `denoisplit-zoo evaluate` output (metrics.json, report.md, figures)
  recipe.yaml              the packaging recipe (names, training data, attribution); `export --recipe` re-uses it
  denoisplit_bpae_actin_mito.zip   the bioimage.io package (written only after bioimageio.core's test passed)
  prediction/              held-out input and the package's 4-channel prediction (TIFF, raw counts)
  quickstart.png           noisy input | predicted / clean actin and mito | uncertainties, held-out region
  quickstart.md            what was done, metrics, files, seconds per stage
  quickstart.json          the same numbers for scripts

Time: `minutes` is the budget of the WHOLE command. Before training, a timing probe of the untrained network
estimates what the later stages (mostly posterior sampling) will cost; they get at most RESERVE_FRACTION of the
budget and training gets the rest, so a GPU or an idle machine trains longer. After training, the number of posterior
samples per stage is chosen to fit the time that is left.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .calibration import FALLBACK_SCALE
from .config import DataConfig
from .data import split_regions
from .errors import UserError
from .fileio import OutputSet, atomic_path, json_safe, write_json, write_text, write_yaml
from .metrics import DETAIL_MIN_R, describe_denoising, describe_split
from .package.layout import INPUT_NAME, INPUT_STEP, OUTPUT_NAME, min_input_size
from .pretrained import bundled_models
from .runtime import pick_device
from .sample_data import BRIGHTNESS, DEMO_BRIGHTNESS, DEMO_GAUSSIAN, DEMO_POISSON

ZIP_NAME = "denoisplit_bpae_actin_mito.zip"
CHANNELS = ("actin", "mito")  # structure A, structure B (file names in OUT/bpae_sample/ -> the run's channel names)

# The weights a `small` quickstart fine-tunes by default (`init_from="auto"`; weights/, pretrained.py), per
# brightness (sample_data.BRIGHTNESS). No LadderVAE splits after a few hundred steps from random weights; adapting a
# pretrained one to one's own microscope is the realistic workflow. Both were trained on W2S actin / mitochondria
# recast as camera counts at the demo's noise level (benchmarks/make_w2s_bpae_like.py): at equal brightness
# (`--mito-p99 16000`) for "balanced", at the sample's ~8:1 ratio for "raw". Fine-tuned on the other mixing, each
# does worse (README, docs/quality.md). Other presets, or a checkout without the bundled model, train from scratch;
# `--from-scratch` asks for that explicitly.
PRETRAINED = {"balanced": "w2s_balanced_small", "raw": "w2s_bpae_like_small"}

# The sample is ONE field, and prepare_data holds out its last stripes along the longer axis (x): validation
# x 880-990, test x 990-1100, here nearly empty background right of the cell. The columns are therefore rolled
# before the split, by the shift held_out_shift() finds: the one after which the validation and the test stripe each
# hold as nearly as possible their area's share (10 %) of each structure's signal, so that the held-out stripes
# sample the cell as the training stripe does (on this field: 578 px, test = original x 412-522, validation x
# 302-412). Why a rule: the cell holds one nucleus, and a test stripe over it (the former fixed roll of 440 px: test
# x 550-660, 29 % of the field's mitochondrial signal, the perinuclear haze seen nowhere else) is not split by a
# model fine-tuned on the rest of the field, which splits its own training stripe by +4.0 / +3.2 dB
# (benchmarks/quickstart_held_out.py, docs/quality.md).
# The roll joins the image's left and right borders, both background, inside the training stripe.
SPLIT_FRACTIONS = DataConfig.model_fields["split"].default  # the run's split (train, val, test): the config's default

# Noise models: 600 iterations x 20k pairs instead of the small preset's 1000 x 50k. Measured on this sample
# (2-core CPU): the predicted noise std stays within 1-2 % of the larger fit at the 5th-95th signal percentiles
# and costs ~40 % of its time.
NOISE_MODEL = {"n_iterations": 600, "batch_size": 20_000}

# Posterior samples K per stage: the most (a GPU, an idle machine) and the fewest (a busy 2-core CPU) the budget
# may choose. Calibration needs >= 10 (fewer bias the fitted std scale upwards, see calibration.py); the package's
# K is what every zoo consumer then samples per prediction (export's default 16 at best).
SAMPLES_MAX = {"calibrate": 20, "evaluate": 20, "export": 16}
SAMPLES_MIN = {"calibrate": 10, "evaluate": 10, "export": 4}
TILE = 1024  # px: each held-out stripe in one tile (one halo border instead of several)
PACKAGE_WEIGHTS = "onnx"  # weights the zip's prediction uses: what deepImageJ runs; fastest of the three on a CPU

# Time budget. The stages after training cost posterior samples x pixels, most of it in bioimageio.core's self-test
# (3 weight formats x 7 inferences at the package's minimum size 2 * halo + 1 px, on the CPU). They may take at most
# RESERVE_FRACTION of the budget; training gets the rest (at least MIN_TRAIN_SECONDS), then K is chosen to fit.
RESERVE_FRACTION = 0.45
MIN_TRAIN_SECONDS = 60.0
HALO_GUESS = 160  # px, before training: measured 112 untrained, 176 after 1,746 steps (small preset)
# Overheads beyond sampling (imports, halo measurements, ONNX/TorchScript conversion, test harness, metrics,
# figures), seconds, measured on the development machine (2 shared CPU cores)
_FIXED_SECONDS = {"calibrate": 25.0, "evaluate": 20.0, "export": 70.0, "predict": 20.0, "report": 5.0}
# The package graph runs its K samples one top-down pass at a time (model.SAMPLES_PER_PASS), unrolled in the ONNX
# file: each sample adds conversion and session-set-up time to the export beyond its sampling cost. Measured on the
# quickstart's run, K = 16, one core: export + self-test 184 s with one sample per pass, 122 s with four.
_EXPORT_SECONDS_PER_SAMPLE = 4.0

STAGES = ("data", "noise models", "training", "calibration (no clean data)", "evaluation (clean data)",
          "export + bioimageio self-test", "bioimageio.core prediction from the zip", "figure and report")


# ------------------------------------------------------------------------------------------------------- recipe
def mixing_text(brightness: str, gain: float) -> str:
    """How the two stains were mixed, in words (stage line, report, model card)."""
    if brightness == "balanced":
        return f"mitochondria scaled x{gain:.2f} about their minimum to the actin's brightness"
    return "raw counts as recorded, actin ~8x brighter than the mitochondria"


def quickstart_recipe(data: dict) -> dict:
    """The packaging recipe (package.recipe.Recipe keys; paths relative to OUT/) for the data described by `data`
    (shape, poisson, gaussian, brightness, mito_gain): names, licence and the images' attribution, so the package's
    model card credits them (CC-BY 4.0 requires it)."""
    source = "Robert Haase, BioImageAnalysisNotebooks, data/BPAE_actin.tif and data/BPAE_mito.tif, CC-BY 4.0"
    h, w = data["shape"]
    return {
        "run": "run",
        "evaluation": "report",
        "name": "denoiSplit BPAE actin and mitochondria (quickstart)",
        "description": (
            "Splits one noisy widefield image of F-actin + mitochondria imaged together into the two structures, "
            "denoised, with a per-pixel uncertainty for each. Demo model of `denoisplit-zoo quickstart`, trained for "
            f"minutes on one field of BPAE cells with synthetic noise (images: {source})."),
        "license": "CC-BY-4.0",
        "channel_names": list(CHANNELS),
        "tags": ["widefield", "bpae", "actin", "mitochondria"],
        "training_data": {
            "description": (
                f"One {h} x {w} px widefield field of BPAE cells (0.108 um/px, camera counts): F-actin and "
                f"mitochondria ({mixing_text(data['brightness'], data['mito_gain'])}) summed, with synthetic "
                f"Poisson (factor {data['poisson']:g}) + Gaussian "
                f"({data['gaussian']:g} x std) noise as in the denoiSplit paper; cut into train / validation / test "
                "stripes."),
            "source": f"{source} (bundled with denoisplit-zoo as denoisplit_zoo/sample_data)",
        },
    }


# ------------------------------------------------------------------------------------------------------- stages
@dataclass
class _Clock:
    """Numbered stage headers on stdout and seconds per stage."""

    log: Callable[[str], None]
    t0: float = field(default_factory=time.monotonic)
    seconds: dict = field(default_factory=dict)
    _current: Optional[str] = None
    _start: float = 0.0

    def stage(self, name: str, detail: str = "") -> None:
        self.end()
        i = STAGES.index(name) + 1
        self.log(f"[{i}/{len(STAGES)}] {name}{' ... ' + detail if detail else ' ...'}")
        self._current, self._start = name, time.monotonic()

    def end(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = round(time.monotonic() - self._start, 1)
            self.log(f"      {self._current}: {self.seconds[self._current]:.0f} s")
            self._current = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _check_out(out: Path) -> None:
    """OUT must be missing or empty: a quickstart never mixes its files with anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new --out folder (or delete it)")


def column_shares(images: dict) -> dict:
    """{name: (X,) float64 share of each column in the (Y, X) image's signal above its minimum (sums to 1)}."""
    cols = {n: (a - a.min()).sum(axis=0, dtype=np.float64) for n, a in images.items()}
    if min(c.sum() for c in cols.values()) <= 0:
        raise ValueError("column_shares needs every image to hold some signal above its minimum")
    return {n: c / c.sum() for n, c in cols.items()}


def held_out_shift(images: dict, fractions=SPLIT_FRACTIONS) -> int:
    """Columns to roll the (Y, X) images `images` ({name: array}, X the longer axis; raw counts or any per-structure
    scaling, the shares are scale-free) by so that the validation and the test stripe of split_regions each hold
    as nearly as possible their fraction of every structure's signal above its minimum: the shift with the smallest
    largest |share - fraction| (ties: the smallest shift)."""
    shapes = {a.shape for a in images.values()}
    h, w = shapes.pop()
    if shapes or w < h:
        raise ValueError("held_out_shift needs images of one shape, wider than tall")
    regions = split_regions((h, w), fractions)
    held = [(regions[k][1], f) for k, f in zip(("val", "test"), fractions[1:])]
    cols = column_shares(images).values()
    worst = [max(abs(np.roll(c, s)[x].sum() - f) for c in cols for x, f in held) for s in range(w)]
    return int(np.argmin(worst))


def write_sample_data(folder: Path, images: dict, shift: int, crop: Optional[tuple[int, int]] = None) -> Path:
    """folder/actin.tif and folder/mito.tif: the clean channels `images` (sample_data.demo_images, float32 camera
    counts) with their columns rolled by `shift` (held_out_shift), then cropped to the top-left (rows, cols)
    if `crop` is given (tests). Returns the folder: the run's data path (a flat folder of two TIFFs = one channel
    per file, sorted: actin, mito)."""
    import tifffile

    for name in CHANNELS:
        img = np.roll(images[name], shift, axis=1)
        if crop is not None:
            img = img[:crop[0], :crop[1]]
        with atomic_path(folder / f"{name}.tif") as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(img))
    return folder


def _build_config(data: Path, preset: str, gaussian: float, poisson: float, seed: int, device: str,
                  init_from: Optional[str] = None):
    """The run's config; with `init_from` (pretrained.load_init_source), the source's architecture and preset (a
    `preset` that disagrees is a one-line error) and fine-tuning's training settings."""
    from .config import build_run_config
    from .pretrained import architecture_mismatch, fine_tune_overrides, load_init_source

    over = {"data": {"path": str(data.resolve()), "noise": {"gaussian": gaussian, "poisson": poisson, "seed": seed}},
            "train": {"seed": seed, "device": device}}
    if preset == "small":  # the preset's own (larger) noise-model fit is kept for `tiny` (tests: already small)
        over["noise_model"] = dict(NOISE_MODEL)
    if init_from is None:
        return build_run_config(preset, over)
    src = load_init_source(init_from)
    ft = fine_tune_overrides(src)
    over["model"] = ft["model"]
    over["train"] = {**ft["train"], **over["train"]}
    cfg = build_run_config(preset, over)
    mismatch = architecture_mismatch(build_run_config(preset, {"data": over["data"]}).model,
                                     cfg.train.patch_size, src)
    if mismatch:
        raise UserError(f"--init-from {init_from}: not a `{preset}` model ({mismatch})")
    return cfg


def fit_noise_models(cfg, prepared, progress: bool) -> list:
    """One GMM per channel from the TRAIN stripe's (clean, noisy) pairs (fitted before training so the time budget
    can be split with the fit's cost known); train() saves them into the run."""
    from .training import fit_run_noise_models

    return fit_run_noise_models(cfg, prepared, progress)


# ------------------------------------------------------------------------------------------------ time budget
def probe_seconds_per_pixel_sample(cfg, device: str = "cpu") -> float:
    """Seconds per (pixel x posterior sample) of the untrained network's sampler on a 256 x 256 tile, best of two
    (the first call pays one-off costs): what prediction after training will cost per pixel and sample."""
    import torch

    from .model import SplitSampler

    m = cfg.model
    dev = pick_device(device)
    sampler = SplitSampler(m.n_levels, m.z_dim, m.n_filters, m.dropout, m.out_channels, cfg.train.patch_size,
                           n_samples=2, seed=0).eval().to(dev)
    x = torch.zeros(1, 1, 256, 256, device=dev)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            t = time.monotonic()
            sampler(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.monotonic() - t)
    return best / (2 * 256 * 256)


def sampling_work(halo: int, val_shape: tuple[int, int], test_shape: tuple[int, int], grid: int = 16) -> dict:
    """Pixels each later stage pushes through the network PER posterior sample: the stripes plus a `halo` px
    border each side (twice for the calibration without clean data: its input-gain probe predicts again); the
    export's test output and bioimageio.core's test (per weight format: the test input, then batch 1 and 2 at the
    minimum size + 0, 1, 2 steps), each padded by the graph to its 2**n_levels `grid`."""
    def padded(shape):
        return (shape[0] + 2 * halo) * (shape[1] + 2 * halo)

    def on_grid(n):
        return -(-n // grid) * grid

    m = min_input_size(halo)
    per_format = on_grid(m) ** 2 + 3 * sum(on_grid(m + n * INPUT_STEP) ** 2 for n in range(3))
    return {"calibrate": 2 * padded(val_shape), "evaluate": padded(test_shape),
            "export": on_grid(m) ** 2 + 3 * per_format, "predict": padded(test_shape)}


def estimate_seconds(samples: dict, work: dict, per_px: float, per_px_cpu: float) -> dict:
    """Seconds per later stage for K = `samples` (calibrate, evaluate, export; predict uses the export's K).
    The export's self-test and the zip's prediction (onnxruntime) run on the CPU wherever training ran."""
    k = {**samples, "predict": samples["export"]}
    speed = {"calibrate": per_px, "evaluate": per_px, "export": per_px_cpu, "predict": per_px_cpu}
    est = {s: _FIXED_SECONDS[s] + work[s] * k[s] * speed[s] for s in work}
    if "export" in est:
        est["export"] += _EXPORT_SECONDS_PER_SAMPLE * k["export"]
    return {**est, "report": _FIXED_SECONDS["report"]}


def choose_samples(seconds: float, work: dict, per_px: float, per_px_cpu: float) -> dict:
    """The largest K per stage (the same fraction of SAMPLES_MAX for all, never below SAMPLES_MIN) whose estimated
    cost fits in `seconds`; SAMPLES_MIN when nothing fits."""
    for f in np.linspace(1.0, 0.0, 21):
        ks = {s: max(SAMPLES_MIN[s], int(round(SAMPLES_MAX[s] * f))) for s in SAMPLES_MAX}
        if sum(estimate_seconds(ks, work, per_px, per_px_cpu).values()) <= seconds:
            return ks
    return dict(SAMPLES_MIN)


# ---------------------------------------------------------------------------------------- bioimageio prediction
def predict_with_package(zip_path: Path, image_raw: np.ndarray, weight_format: str = PACKAGE_WEIGHTS) -> np.ndarray:
    """The held-out image (Y, X) raw counts through bioimageio.core from the zip -> (4, Y, X) raw: actin mean,
    mito mean, actin std, mito std (the package takes any size from 2 * halo + 1 up)."""
    from .package.zoo import offline_cache, require_bioimageio

    require_bioimageio()
    import xarray as xr
    from bioimageio.core import create_prediction_pipeline, load_model_description, predict
    from bioimageio.spec.model.v0_5 import TensorId


    x = xr.DataArray(np.asarray(image_raw, np.float32)[None, None], dims=("batch", "channel", "y", "x"))
    with offline_cache():
        descr = load_model_description(str(zip_path))
        # our own pipeline so the weight format is explicit; never wrap it in `with` (predict() does: #8)
        pipeline = create_prediction_pipeline(descr, weight_format=weight_format)
        sample = predict(model=pipeline, inputs={TensorId(INPUT_NAME): x})
    out = sample.members[TensorId(OUTPUT_NAME)].data
    out = out.transpose("batch", "channel", "y", "x").values[0]
    if out.shape[-2:] != image_raw.shape:
        raise UserError(f"bioimageio.core returned {out.shape[-2:]} for a {image_raw.shape} input")
    return out.astype(np.float32)


def _write_tiff(path: Path, arr: np.ndarray, meta: dict) -> None:
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(arr, np.float32), metadata=meta)


# ------------------------------------------------------------------------------------------- figure and report
def plot_quickstart(noisy: np.ndarray, pred: np.ndarray, clean: np.ndarray, path: Path, title: str) -> None:
    """Held-out region side by side: noisy input | actin, mito predicted | actin, mito clean | actin, mito std.
    noisy (Y, X), pred (4, Y, X) = means then stds, clean (2, Y, X), raw counts. A structure's prediction and clean
    image share one grey range (the clean image's 1-99.5 %) so brightness is comparable."""
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is

    a, b = CHANNELS
    panels = [(noisy, "noisy input (sum)", "gray", np.percentile(noisy, [1, 99.5])),
              (pred[0], f"{a} predicted", "gray", np.percentile(clean[0], [1, 99.5])),
              (pred[1], f"{b} predicted", "gray", np.percentile(clean[1], [1, 99.5])),
              (clean[0], f"{a} clean", "gray", np.percentile(clean[0], [1, 99.5])),
              (clean[1], f"{b} clean", "gray", np.percentile(clean[1], [1, 99.5])),
              (pred[2], f"{a} uncertainty (std)", "magma", (0, np.percentile(pred[2], 99.5))),
              (pred[3], f"{b} uncertainty (std)", "magma", (0, np.percentile(pred[3], 99.5)))]
    h, w = noisy.shape
    panel_w = 2.0
    fig = Figure(figsize=(panel_w * len(panels), panel_w * h / w * 0.92 + 0.7))
    axes = fig.subplots(1, len(panels))
    for ax, (img, label, cmap, (lo, hi)) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # keep the title clear of the panel titles
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def metrics_table(summary: dict) -> str:
    """Markdown: per structure RI-PSNR, MS-SSIM, MicroSSIM of the run's evaluation, RI-PSNR of the package's
    prediction, and the calibration (scale fitted without clean data; slope of RMSE on RMV against the clean
    images, ideal 1)."""
    m = summary["metrics"]
    fl = m["floors"]
    rows = ["| structure | RI-PSNR (dB) | naive: input / 2 (dB) | no split: clean sum / 2 (dB) | split gain (dB) | "
            "fine detail r | verdict | MS-SSIM | MicroSSIM | RI-PSNR, package (dB) | std scale | calib. slope |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in CHANNELS:
        rows.append(f"| {n} | {_f(m['ri_psnr'][n])} | {_f(fl['naive'][n])} | {_f(fl['no_split'][n])} | "
                    f"{_f(m['split_gain'][n])} | {_f(m['correlation']['detail'][n], 2)} | {m['split_status'][n]} | "
                    f"{_f(m['ms_ssim'][n], 4)} | "
                    f"{_f(m['micro_ssim'][n], 4)} | {_f(m['package_ri_psnr'][n])} | "
                    f"{_f(m['calibration_scale'][n], 3)} | {_f(m['calibration_slope'][n], 3)} |")
    rows.append(f"| mean | {_f(m['ri_psnr_mean'])} | {_f(fl['naive']['mean'])} | {_f(fl['no_split']['mean'])} | | | | "
                f"{_f(m['ms_ssim_mean'], 4)} | {_f(m['micro_ssim_mean'], 4)} | {_f(m['package_ri_psnr_mean'])} | | |")
    return "\n".join(rows)


def split_warnings(metrics: dict) -> list[str]:
    """One line per structure that was not split: the demonstration must not pretend it split."""
    fl, out = metrics["floors"], []
    for n in CHANNELS:
        if metrics["split_status"][n] != "not split":
            continue
        other = next(o for o in CHANNELS if o != n)
        r = metrics["correlation"]["pred_vs_clean"]
        if metrics["split_gain"][n] > 0 and (metrics.get("resembles_other") or {}).get(n):  # the other's ghost
            why = (f"it resembles the clean {other} (r {_f(r[f'{n}~{other}'], 2)}) more than the clean {n} "
                   f"(r {_f(r[f'{n}~{n}'], 2)}), although it beats both floors (split gain "
                   f"{_f(metrics['split_gain'][n])} dB)")
        elif metrics["split_gain"][n] > 0:  # beats the floors with a glow in the right place, no structure
            why = (f"its fine structure is missing (band-pass r {_f(metrics['correlation']['detail'][n], 2)} with "
                   f"the clean {n}, below {DETAIL_MIN_R:g}: its intensity lies in the right place, as a glow without "
                   "the structures), although it beats both floors (split gain "
                   f"{_f(metrics['split_gain'][n])} dB)")
        else:
            why = (f"RI-PSNR {_f(metrics['ri_psnr'][n])} dB does not beat both floors (naive input / 2 "
                   f"{_f(fl['naive'][n])} dB, no-split clean sum / 2 {_f(fl['no_split'][n])} dB; split gain "
                   f"{_f(metrics['split_gain'][n])} dB)")
        out.append(f"{n}: not split: {why}; train longer (more --minutes) or on a GPU")
    return out


def calibration_warnings(metrics: dict) -> list[str]:
    """One line per structure whose calibration without clean data cannot be trusted: flagged unreliable by
    `calibrate` itself (with its reasons), or, checked here against the clean images the quickstart has, a scale
    near 0 or a reliability slope far from 1."""
    out = []
    for n in CHANNELS:
        scale, slope = metrics["calibration_scale"][n], metrics["calibration_slope"][n]
        if metrics["calibration_reliable"].get(n) is False:
            what = ("the posterior's own spread" if scale == FALLBACK_SCALE
                    else "the maximum-likelihood scale, which the data pin down less well")
            why = "; ".join((metrics.get("calibration_unreliable_because") or {}).get(n) or []) or (
                "its noise variance dwarfs the prediction error")
            out.append(f"{n}: the calibration without clean data is unreliable ({why}): its std channel "
                       f"ships as {what} (scale {_f(scale, 3)}; slope {_f(slope, 3)} against the clean images, "
                       "ideal 1), a relative uncertainty map rather than a calibrated error bar")
        elif scale is not None and scale < 1e-3 or slope is not None and not 0.25 <= slope <= 4:
            out.append(f"{n}: the calibration without clean data passed its own checks but misses against the clean "
                       f"images (scale {_f(scale, 3)}, slope {_f(slope, 3)}; ideal 1): treat its std channel as a "
                       "relative uncertainty map")
    return out


def render_report(summary: dict) -> str:
    t, s, k = summary["training"], summary["seconds"], summary["samples"]
    budget, d = summary["budget"], summary["data"]
    lines = [
        "# denoisplit-zoo quickstart", "",
        "Actin and mitochondria of one BPAE field (bundled sample: Robert Haase, BioImageAnalysisNotebooks, "
        "CC-BY 4.0) were summed into one image and split again:", "",
        f"1. **data**: {d['shape'][0]} x {d['shape'][1]} px, camera counts "
        f"({mixing_text(d['brightness'], d['mito_gain'])}; `--brightness {d['brightness']}`); synthetic noise per "
        "channel: Poisson "
        f"(factor {d['poisson']:g}), then Gaussian with std {d['gaussian']:g} x std(mean of the two channels) = "
        f"{d['gaussian_sigma']:.0f} counts. Columns rolled by {d['column_roll']} px (so that the validation and the "
        "test stripe each hold about their area's share of each structure's signal: they sample the cell as the "
        f"training stripe does), then cut into train / validation / test stripes: {d['regions']}.",
        "2. **noise models**: one GMM per channel, fitted to the training stripe's (clean, noisy) pairs.",
        f"3. **training**: `{t['preset']}` preset "
        f"{'fine-tuned from `' + str(t['init_from']) + '`' if t.get('init_from') else 'from scratch'} on "
        f"{t['device']}, {t['steps']} steps in {t['minutes']:.1f} min "
        f"(stopped by {t['stopped_because']}; {budget['train_minutes']:.1f} min of the budget); best validation "
        f"loss {_f(t['best_val_loss'], 4)}.",
        f"4. **calibration without clean data**: a std scale per structure, fitted on the validation stripe against "
        f"the noisy targets and the noise models (K = {k['calibrate']} posterior samples).",
        f"5. **evaluation** of the held-out test stripe against the clean images (K = {k['evaluate']}): "
        "`report/report.md`.",
        f"6. **export**: `{ZIP_NAME}`, a bioimage.io package with pytorch_state_dict, TorchScript and ONNX weights "
        f"(K = {k['export']} posterior samples inside the model), written only after bioimageio.core's test passed.",
        f"7. **prediction from the zip** by bioimageio.core ({summary['package_weights']} weights) of the held-out "
        "stripe: `prediction/`.", "",
        "## Metrics (held-out test stripe, against the clean images)", "", metrics_table(summary), "",
        "Floors, on the same stripe: *naive* = the noisy input / 2 for both structures; *no split* = the clean "
        "sum / 2 for both (a perfect denoiser that does not split). A structure is split only if it beats both "
        "(split gain > 0), resembles its own structure more than the other and shows its fine detail (band-pass "
        "correlation with its clean image). "
        + describe_split(summary["metrics"]["split_status"], summary["metrics"]["split_gain"],
                         summary["metrics"]["resembles_other"], summary["metrics"]["correlation"].get("detail")),
        "", describe_denoising(summary["metrics"]["denoising"]) if summary["metrics"].get("denoising") else "", "",
        "RI-PSNR: range-invariant PSNR; MS-SSIM and MicroSSIM: structural similarity (1 = identical). 'package': "
        "the zip's own prediction through bioimageio.core (another Monte-Carlo draw, K = "
        f"{k['export']}). Calibration slope: RMSE against the predicted std over equal-count bins (ideal 1).",
        *[f"\n**Note** {w}." for w in summary["warnings"]], "",
        "Minutes of CPU training give a rough split; the `paper` preset trained for hours on a GPU is the real "
        "thing.", "",
        "![held-out test stripe](quickstart.png)", "",
        "## Files", "",
        *[f"- `{rel}`: {what}" for what, rel in summary["files"].items()], "",
        "## Seconds per stage", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {name} | {sec:.0f} |" for name, sec in s.items()],
        f"| **total** | {summary['total_seconds']:.0f} (budget {budget['minutes'] * 60:.0f}) |", "",
        "Posterior samples per stage, chosen to fit the budget: "
        + ", ".join(f"{st} {k[st]} (at most {SAMPLES_MAX[st]})" for st in SAMPLES_MAX)
        + f"; sampling speed probed before training: {budget['probe_us_per_pixel_sample']:.1f} µs per pixel and "
        "sample.", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- the API
def run_quickstart(out, minutes: float = 10.0, *, gaussian: float = DEMO_GAUSSIAN, poisson: float = DEMO_POISSON,
                   seed: int = 0, device: str = "auto", progress: bool = True,
                   log: Optional[Callable[[str], None]] = None, preset: str = "small",
                   crop: Optional[tuple[int, int]] = None, max_steps: Optional[int] = None,
                   samples: Optional[dict] = None, init_from: Optional[str] = "auto",
                   brightness: str = DEMO_BRIGHTNESS) -> dict:
    """Run the whole quickstart into `out` (missing or empty) in about `minutes` of wall time (see the module
    docstring); `gaussian` / `poisson` set the synthetic noise (docs/contracts.md protocol).

    `init_from`: fine-tune from these weights (a bundled model's name, a run folder or an exported zip; see
    pretrained.py); "auto" (default): PRETRAINED[brightness] for the `small` preset when it is bundled, else from
    scratch; None: from random weights.

    `brightness`: "balanced" (default) gives the mitochondria the actin's brightness, "raw" keeps the sample's counts
    (sample_data.BRIGHTNESS).

    For tests: `preset`, `crop` (rows, cols of the sample's top-left corner), `max_steps`, and `samples` (fixed K
    per stage, {calibrate, evaluate, export}, instead of the budget's choice).

    Returns a dict: paths (str), metrics ({ri_psnr, ms_ssim, micro_ssim, package_ri_psnr, calibration_slope,
    calibration_scale}: {structure: value}, plus *_mean), seconds per stage, training, samples, budget, warnings,
    files; the same is written to OUT/quickstart.json."""
    if minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")
    if brightness not in BRIGHTNESS:
        raise UserError(f"--brightness {brightness!r}: choose one of {', '.join(BRIGHTNESS)}")
    if init_from == "auto":
        name = PRETRAINED[brightness]
        init_from = name if preset == "small" and name in bundled_models() else None
    log = log or (lambda line: print(line, flush=True))
    out = Path(out)
    _check_out(out)
    with OutputSet(out):  # all or nothing: a failure or Ctrl-C removes what this call wrote, so OUT can be reused
        return _run(out, minutes, gaussian, poisson, seed, device, progress, log, preset, crop, max_steps, samples,
                    init_from, brightness)


def _run(out: Path, minutes: float, gaussian: float, poisson: float, seed: int, device: str, progress: bool,
         log: Callable[[str], None], preset: str, crop: Optional[tuple[int, int]], max_steps: Optional[int],
         samples: Optional[dict], init_from: Optional[str], brightness: str) -> dict:
    """run_quickstart's stages, inside its OutputSet."""

    clock = _Clock(log)
    paths = {"out": out, "data": out / "bpae_sample", "run": out / "run", "report": out / "report",
             "recipe": out / "recipe.yaml", "zip": out / ZIP_NAME, "prediction": out / "prediction",
             "figure": out / "quickstart.png", "report_md": out / "quickstart.md", "summary": out / "quickstart.json"}
    dev = pick_device(device)

    cfg, prepared, data_info = _stage_data(clock, paths, preset, crop, gaussian, poisson, seed, device, init_from,
                                           brightness)
    val_shape, test_shape = prepared.val.inputs.shape[1:], prepared.test.inputs.shape[1:]
    budget = {"minutes": minutes}
    clock.stage("noise models", f"GMM per channel, {cfg.noise_model.n_iterations} iterations")
    noise_models = fit_noise_models(cfg, prepared, progress)
    per_px_cpu = probe_seconds_per_pixel_sample(cfg, "cpu")
    per_px = per_px_cpu if dev.type == "cpu" else probe_seconds_per_pixel_sample(cfg, device)
    work = sampling_work(HALO_GUESS, val_shape, test_shape, 2**cfg.model.n_levels)
    wanted = sum(estimate_seconds(samples or SAMPLES_MAX, work, per_px, per_px_cpu).values())
    reserve = min(wanted, RESERVE_FRACTION * minutes * 60)
    train_min = max(MIN_TRAIN_SECONDS, minutes * 60 - clock.elapsed - reserve) / 60
    budget.update(train_minutes=train_min, reserve_s=round(reserve), probe_us_per_pixel_sample=per_px * 1e6)
    del prepared  # train() rebuilds the same split (deterministic); free the arrays meanwhile

    start = f"fine-tuning {init_from}" if init_from else "from scratch"
    clock.stage("training", f"`{preset}` preset, {start}, on {dev.type} for {train_min:.1f} min (the later "
                            f"stages get ~{reserve / 60:.1f} min of the {minutes:g})")
    res = _stage_train(cfg, paths["run"], noise_models, train_min, max_steps, progress)
    log(f"      {res.step} steps ({res.stopped_because}), best validation loss {res.best_val_loss:.4f}")

    ks, est = _choose_after_training(paths["run"], minutes * 60 - clock.elapsed, val_shape, test_shape, per_px,
                                     per_px_cpu, samples)
    if ks != SAMPLES_MAX and not samples:
        log(f"      posterior samples reduced to fit the budget: {ks}")
    cal, m = _stage_calibrate_evaluate(clock, paths, ks, est, device, progress)
    exp = _stage_export(clock, paths, ks["export"], est["export"], data_info)
    noisy, clean, pred, pkg = _stage_predict(clock, paths, est["predict"])

    clock.stage("figure and report")
    plot_quickstart(noisy, pred, clean, paths["figure"],
                    f"held-out test stripe ({noisy.shape[0]} x {noisy.shape[1]} px) predicted from {ZIP_NAME} by "
                    f"bioimageio.core (K={ks['export']}) after {res.step} training steps")
    metrics = {**{key: m[key] for key in ("ri_psnr", "ri_psnr_mean", "ms_ssim", "ms_ssim_mean", "micro_ssim",
                                          "micro_ssim_mean")},
               "package_ri_psnr": pkg["ri_psnr"], "package_ri_psnr_mean": pkg["ri_psnr_mean"],
               "calibration_slope": {n: c["slope"] for n, c in m["calibration"].items()},
               "calibration_scale": {n: c["scale"] for n, c in m["calibration"].items()},
               **{key: m[key] for key in ("floors", "split_gain", "split_status", "resembles_other", "lacks_detail", "correlation",
                                          "denoising", "calibration_reliable", "calibration_unreliable_because")}}
    summary = {
        "paths": {key: str(v) for key, v in paths.items()},
        "metrics": metrics,
        "warnings": split_warnings(metrics) + calibration_warnings(metrics),
        "training": {"preset": preset, "init_from": init_from, "device": dev.type, "steps": res.step,
                     "minutes": res.seconds / 60,
                     "stopped_because": res.stopped_because, "best_val_loss": res.best_val_loss},
        "data": data_info, "samples": ks, "budget": budget, "package_weights": PACKAGE_WEIGHTS,
        "package": {"halo": exp.halo, "min_size": exp.min_size, "step": exp.step, "size_bytes": exp.size_bytes},
        "calibration_mode": cal["mode"], "files": _file_list(out, paths),
    }
    clock.end()
    summary["seconds"], summary["total_seconds"] = dict(clock.seconds), round(clock.elapsed, 1)
    write_text(paths["report_md"], render_report(summary))
    write_json(paths["summary"], _json_safe(summary))
    return summary


def _stage_data(clock, paths, preset, crop, gaussian, poisson, seed, device, init_from, brightness):
    """[1] the clean sample -> OUT/bpae_sample/; the split and the noise exactly as training will rebuild them."""
    from .data import prepare_data
    from .sample_data import demo_images

    images, gain = demo_images(brightness)
    clock.stage("data", f"bundled BPAE sample: actin + mitochondria ({mixing_text(brightness, gain)}), "
                        "synthetic noise")
    shift = held_out_shift(images)
    write_sample_data(paths["data"], images, shift, crop)
    cfg = _build_config(paths["data"], preset, gaussian, poisson, seed, device, init_from)
    prepared = prepare_data(cfg.data, cfg.train.patch_size)
    regions = prepared.split["regions"]  # {split: [[y0, y1], [x0, x1]]}
    shape = [max(r[0][1] for r in regions.values()), max(r[1][1] for r in regions.values())]
    info = {"shape": shape, "gaussian": gaussian, "poisson": poisson, "column_roll": shift,
            "brightness": brightness, "mito_gain": gain,
            "gaussian_sigma": prepared.noise_info["gaussian_sigma"], "regions": _describe_regions(regions, shift, images["actin"].shape[1])}
    clock.log(f"      {shape[0]} x {shape[1]} px; noise: Poisson x{poisson:g} + Gaussian std "
              f"{info['gaussian_sigma']:.0f} counts; {info['regions']}")
    return cfg, prepared, info


def _stage_train(cfg, run_dir: Path, noise_models: list, minutes: float, max_steps: Optional[int],
                 progress: bool):
    """[3] train() with the pre-fitted noise models and the clock as the stopping rule."""
    from .training import train

    limits = {"max_minutes": minutes, "max_steps": max_steps}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=limits)})
    return train(cfg, run_dir, noise_models=noise_models, progress=progress)


def _choose_after_training(run_dir: Path, seconds_left: float, val_shape, test_shape, per_px: float,
                           per_px_cpu: float, samples: Optional[dict]) -> tuple[dict, dict]:
    """(K per stage, estimated seconds per stage): `samples` if given, else the most that fit the time left. Uses
    the trained network's real halo (it grows with training)."""
    from .package.writer import package_halo
    from .run_folder import load_run

    run = load_run(run_dir)
    work = sampling_work(package_halo(run), val_shape, test_shape, run.model.multiple)
    ks = samples or choose_samples(seconds_left, work, per_px, per_px_cpu)
    return ks, estimate_seconds(ks, work, per_px, per_px_cpu)


def _stage_calibrate_evaluate(clock, paths, ks: dict, est: dict, device: str, progress: bool) -> tuple[dict, dict]:
    """[4] calibration from the noisy validation targets + noise models only, as a user without clean data would;
    [5] evaluation of the test stripe against the clean images."""
    from .calibration import calibrate_run
    from .evaluation import evaluate_run

    clock.stage("calibration (no clean data)",
                f"K={ks['calibrate']} on the validation stripe (~{est['calibrate']:.0f} s)")
    cal = calibrate_run(paths["run"], without_clean=True, n_samples=ks["calibrate"], tile=TILE, progress=progress,
                        device=device)
    clock.log("      std scale " + ", ".join(f"{n} {c['scale']:.3g}" for n, c in cal["channels"].items()))
    clock.stage("evaluation (clean data)", f"K={ks['evaluate']} on the held-out test stripe (~{est['evaluate']:.0f} s)")
    m = evaluate_run(paths["run"], paths["report"], n_samples=ks["evaluate"], tile=TILE, progress=progress,
                     device=device)
    clock.log(f"      RI-PSNR {', '.join(f'{n} {v:.2f} dB' for n, v in m['ri_psnr'].items())}")
    return cal, m


def _stage_export(clock, paths, k: int, seconds: float, data_info: dict):
    """[6] the recipe (names, the data's attribution) -> the zip, written only after bioimageio.core's test."""
    from .export import export_package

    clock.stage("export + bioimageio self-test", f"K={k}; state_dict + TorchScript + ONNX, then bioimageio.core's test "
                                                 f"of each format (no progress bar; ~{seconds:.0f} s)")
    write_yaml(paths["recipe"], quickstart_recipe(data_info))
    exp = export_package(None, paths["zip"], recipe=str(paths["recipe"]), n_samples=k)
    clock.log("      " + exp.test_summary.splitlines()[0])
    return exp


def _stage_predict(clock, paths, seconds: float):
    """[7] the held-out stripe through bioimageio.core from the zip, as any zoo consumer would run it; TIFFs of
    the input and the 4-channel output; RI-PSNR etc. of the package's prediction against the clean stripe."""
    from .evaluation import load_eval_data
    from .metrics import channel_metrics
    from .run_folder import load_run

    clock.stage("bioimageio.core prediction from the zip",
                f"{PACKAGE_WEIGHTS} weights, held-out test stripe (~{seconds:.0f} s)")
    ev = load_eval_data(load_run(paths["run"]))  # the run's test stripe, rebuilt with the run's noise
    noisy, clean = ev.inputs[0], ev.clean[0]
    pred = predict_with_package(paths["zip"], noisy, PACKAGE_WEIGHTS)
    _write_tiff(paths["prediction"] / "test_region_input.tif", noisy,
                {"quantity": "noisy actin + mito (sum), held-out test stripe", "units": "camera counts", "axes": "YX"})
    _write_tiff(paths["prediction"] / "test_region_prediction.tif", pred,
                {"channels": [f"{n}_{q}" for q in ("mean", "std") for n in CHANNELS], "units": "camera counts",
                 "model": ZIP_NAME, "weights": PACKAGE_WEIGHTS, "axes": "CYX"})
    return noisy, clean, pred, channel_metrics(clean[None], pred[None, :2], list(CHANNELS))


def _describe_regions(regions: dict, shift: int, width: int) -> str:
    """'train y 0-680 x 0-880, val y 0-680 x 880-990 (original x 302-412), ...': the stripes run along the image's
    longer axis; the held-out ones also in the unrolled sample's columns (`width` px wide, rolled by `shift`)."""
    def original(k, x):
        return "" if k == "train" else f" (original x {(x[0] - shift) % width}-{(x[1] - 1 - shift) % width + 1})"
    return ", ".join(f"{k} y {v[0][0]}-{v[0][1]} x {v[1][0]}-{v[1][1]}{original(k, v[1])}" for k, v in regions.items())


def _file_list(out: Path, paths: dict) -> dict:
    """{what: path relative to OUT} of everything the user gets."""
    def rel(p) -> str:
        return str(Path(p).relative_to(out)) + ("/" if Path(p).suffix == "" else "")

    return {"the bioimage.io package (validated)": rel(paths["zip"]),
            "figure of the held-out test stripe": rel(paths["figure"]),
            "this report": rel(paths["report_md"]),
            "the numbers, for scripts": rel(paths["summary"]),
            "evaluation report (metrics.json, report.md, figures)": rel(paths["report"]),
            "the package's prediction: actin, mito means, then their stds": rel(paths["prediction"] /
                                                                                "test_region_prediction.tif"),
            "held-out noisy input": rel(paths["prediction"] / "test_region_input.tif"),
            "run folder (config, checkpoints, noise models, calibration)": rel(paths["run"]),
            "packaging recipe (`denoisplit-zoo export --recipe`)": rel(paths["recipe"]),
            "clean data the run reads (the bundled sample, mixed by --brightness, columns rolled)": rel(paths["data"])}


def _json_safe(obj):
    return json_safe(json.loads(json.dumps(obj, default=str)))


def print_summary(summary: dict, log: Callable[[str], None] = print) -> None:
    """The command's last lines: files written, metrics, the validated package."""
    m, p, t = summary["metrics"], summary["paths"], summary["training"]
    log("")
    ks = ", ".join(f"{stage} {k}" for stage, k in summary["samples"].items())
    log(f"quickstart finished in {summary['total_seconds'] / 60:.1f} min (budget {summary['budget']['minutes']:g} "
        f"min; {t['steps']} training steps on {t['device']}"
        f"{', fine-tuned from ' + str(t['init_from']) if t.get('init_from') else ', from scratch'}; posterior "
        f"samples: {ks})")
    d = summary["data"]
    log(f"data: actin + mitochondria ({mixing_text(d['brightness'], d['mito_gain'])}; --brightness "
        f"{d['brightness']}), Poisson x{d['poisson']:g} + Gaussian std {d['gaussian_sigma']:.0f} counts")
    log(f"files written in {p['out']}/:")
    for what, rel in summary["files"].items():
        log(f"  {rel:40s} {what}")
    log("metrics on the held-out test stripe (against the clean images):")
    fl = m["floors"]
    for n in CHANNELS:
        log(f"  {n:6s} RI-PSNR {_f(m['ri_psnr'][n])} dB   MS-SSIM {_f(m['ms_ssim'][n], 4)}   calibration slope "
            f"{_f(m['calibration_slope'][n], 3)} (std scale {_f(m['calibration_scale'][n], 3)})")
        log(f"         floors: naive {_f(fl['naive'][n])} dB, no split {_f(fl['no_split'][n])} dB -> split gain "
            f"{_f(m['split_gain'][n])} dB, fine detail r {_f(m['correlation']['detail'][n], 2)}: "
            f"{m['split_status'][n].upper()}")
    log(f"  mean   RI-PSNR {_f(m['ri_psnr_mean'])} dB   MS-SSIM {_f(m['ms_ssim_mean'], 4)}")
    d = m.get("denoising")
    if d:
        log(f"  sum    RI-PSNR {_f(d['model'])} dB against the clean sum; a Gaussian filter of the input "
            f"(sigma {d['blur_sigma']:g} px) {_f(d['blur'])} dB -> "
            + ("denoises LESS WELL THAN A BLUR: undertrained" if d["margin"] < 0 else
               f"{_f(d['margin'])} dB better than the blur"))
    for w in summary["warnings"]:
        log(f"note: {w}")
    log(f"validated package: {p['zip']}")
