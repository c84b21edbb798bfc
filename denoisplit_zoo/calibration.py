"""Calibration of the posterior sample std: one scale per channel (the denoiSplit paper, section 4.4).

The sample std sigma of the K posterior samples is only proportional to the error of the MMSE estimate; `calibrate`
finds, per channel, the scale s such that s * sigma best explains that error under a Gaussian likelihood, on the
run's VALIDATION images, and stores it in RUN_DIR/calibration.json (the sampler multiplies its std by it).

Two references for the error:
- clean images (where they exist): err = MMSE - clean, and the Gaussian NLL sum [err^2 / (s^2 sigma^2) +
  log(s^2 sigma^2)] is minimised in closed form by s^2 = mean(err^2 / sigma^2) (the reference fits the same NLL by
  Adam; the optimum is identical);
- noisy targets only (`--without-clean`, the realistic case for an unsupervised method): a noisy target is
  clean + observation noise, so E[(MMSE - noisy)^2] = E[(MMSE - clean)^2] + var_NM(clean), v = the noise model's
  variance at the predicted signal (raw units). s^2 = mean((err^2 - v) / sigma^2) is then an unbiased estimate of the
  SAME quantity the clean closed form computes, pixel for pixel. This matched estimating equation matters: the
  maximum-likelihood fit of err ~ N(0, s^2 sigma^2 + v) weights pixels by ~sigma^2 / v^2 instead of 1 / sigma^2,
  and since real errors do not grow exactly in proportion to sigma (reliability slopes of 1.3-2 on W2S), it lands on
  a different s (measured: 4.57 vs 2.88-3.48 clean for W2S mitochondria; see docs/calibration.md).
  Individual pixels may have err^2 - v < 0; they are kept (clipping them would bias s upwards); only the fitted s^2
  is clipped at a small positive value. The price of the noisy reference is variance, not bias: on one 512 x 512
  W2S field the standard error of s^2 was 3-29 % (docs/calibration.md), so calibrate on several fields.
  One more term matters in practice: the INPUT contains the target's own noise (input = noisy A + noisy B), so the
  MMSE leans towards it and E[(MMSE - noisy)^2] = E[(MMSE - clean)^2] + v - 2 v d, with d = dMMSE_c(x) / dinput(x)
  the network's local gain (Stein's identity, as in SURE). Without it the noise is over-subtracted and s collapses
  (measured on W2S: s -> 0 for uSplit models). `calibrate --without-clean` estimates d by finite-difference
  probes with random +-1 perturbations of the input (Hutchinson; GAIN_PROBES of them), locally averaged, and uses
  v (1 - 2 d).

Reliability: pixels sorted by calibrated std, cut into `bins` (30) EQUAL-COUNT bins; per bin RMV = sqrt(mean std^2)
and RMSE = sqrt(mean err^2) (noisy reference: sqrt(max(mean(err^2 - v), 0)), the error against the unseen clean
image). slope, offset, r2 = linear regression of RMSE on RMV over the bins (ideal: 1, 0, 1).

Units: everything here is RAW (the scale itself is unit-free).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .config import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_TILE, GAIN_PROBES, GAIN_SAMPLES
from .errors import UserError
from .fileio import atomic_path, json_safe, write_json
from .run_folder import RunLock, load_run, prepare_run_split
from .runtime import pick_device

DEFAULT_BINS = 30
_MIN_SCALE2 = 1e-12
MIN_SCALE = _MIN_SCALE2**0.5  # the clip floor of a fitted scale: a channel there has no usable uncertainty

# Reliability of a fitted scale (docs/calibration.md). The 95 % interval comes from a bootstrap over BLOCK x BLOCK
# pixel blocks of every image (blocks, not pixels: errors are spatially correlated, so pixels are not independent).
# A noisy-reference scale is `reliable` only if that interval excludes 0, is narrower than MAX_REL_WIDTH x s, and
# a 2 % error in the noise models' variance moves s by less than MAX_SENSITIVITY x s (the GMM fits are only good
# to a few %), and it agrees with the maximum-likelihood scale within a factor MAX_ESTIMATOR_RATIO. The two
# estimate the same scale from the same pixels with different weights; where the noise models or the input gain do
# not describe the data, they part. Measured (docs/calibration.md): matched / MLE 1.08-1.20 on every synthetic-noise
# channel where both exist; 1.85 on the W2S real-noise mitochondria, which passed every other check and was 1.84x
# the clean-reference scale (the MLE: 1.00x). The threshold sits between those.
# An unreliable channel ships the maximum-likelihood scale instead (`fit_scale_mle`: it cannot go
# negative, and it was the closer of the two where the matched estimate failed; `shipped_scale`), flagged; only when
# that collapses too (<= MLE_FLOOR) does the calibration fall back to FALLBACK_SCALE, the posterior's own std.
BLOCK = 64
BOOTSTRAP_REPS = 400
MAX_REL_WIDTH = 0.5
MAX_SENSITIVITY = 0.25
NOISE_ERROR_PCT = 2.0
MAX_ESTIMATOR_RATIO = 1.4
FALLBACK_SCALE = 1.0
MLE_FLOOR = 1e-3  # a maximum-likelihood scale at or below this has collapsed onto the bound: not shipped


# --------------------------------------------------------------------------------------------------- pure numerics

def fit_scale(err2: np.ndarray, var: np.ndarray, noise_var: Optional[np.ndarray] = None) -> float:
    """Per-channel std scale s (unit-free) from flat arrays of squared errors err2 (raw^2), sample variances var
    (raw^2, uncalibrated) and, for a noisy reference, the observation-noise variances noise_var (raw^2).

    s^2 = mean((err2 - noise_var) / var): with clean references (noise_var = 0) the closed-form Gaussian-NLL
    optimum, with noisy ones its unbiased estimate (module docstring). Pixels with var <= 0 carry no information
    about s and are ignored; NaN when none is left."""
    err2, var = np.asarray(err2, np.float64).ravel(), np.asarray(var, np.float64).ravel()
    ok = var > 0
    if not ok.any():
        return float("nan")
    excess = err2[ok] if noise_var is None else err2[ok] - np.asarray(noise_var, np.float64).ravel()[ok]
    return float(np.sqrt(max(np.mean(excess / var[ok]), _MIN_SCALE2)))


def fit_scale_mle(err2: np.ndarray, var: np.ndarray, noise_var: np.ndarray) -> float:
    """The estimator that cannot go negative, beside `fit_scale` on noisy targets (raw^2 arrays as there): maximum
    likelihood of e ~ N(0, s^2 var + noise_var) over s >= 0, a 1-D problem solved by a bounded Brent search on
    log s. Where errors do not grow exactly like the sample std it answers a slightly different question (it
    weights pixels by ~var / noise_var^2, docs/calibration.md), so the matched `fit_scale` is preferred where that
    is reliable, and this one shipped where it is not (`shipped_scale`). NaN when no pixel has var > 0."""
    from scipy.optimize import minimize_scalar

    err2, var = np.asarray(err2, np.float64).ravel(), np.asarray(var, np.float64).ravel()
    nv = np.clip(np.asarray(noise_var, np.float64).ravel(), 0.0, None)  # v (1 - 2d) can dip below 0 locally
    ok = var > 0
    if not ok.any():
        return float("nan")
    err2, var, nv = err2[ok], var[ok], nv[ok]

    def nll(log_s: float) -> float:
        total = np.exp(2 * log_s) * var + nv
        return float(np.mean(err2 / total + np.log(total)))

    # bounds: from the clip floor to 1e3 x the posterior std (a scale beyond that means the model is meaningless)
    res = minimize_scalar(nll, bounds=(np.log(MIN_SCALE), np.log(1e3)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def estimator_ratio(matched: float, mle: float) -> float:
    """matched / maximum-likelihood scale (inf when the likelihood collapsed to 0 or is undefined)."""
    return float(matched / mle) if np.isfinite(mle) and mle > 0 else float("inf")


def estimators_agree(matched: float, mle: float) -> bool:
    """The two noisy-target estimates of one scale agree within MAX_ESTIMATOR_RATIO (module comment above)."""
    return 1 / MAX_ESTIMATOR_RATIO <= estimator_ratio(matched, mle) <= MAX_ESTIMATOR_RATIO


def _block_sums(x: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of x[ok] and counts of ok over BLOCK x BLOCK blocks of (N, Y, X) arrays -> two flat (n_blocks,) arrays."""
    n, h, w = x.shape
    by, bx = -(-h // BLOCK), -(-w // BLOCK)
    pad = ((0, 0), (0, by * BLOCK - h), (0, bx * BLOCK - w))
    xs = np.pad(np.where(ok, x, 0.0), pad).reshape(n, by, BLOCK, bx, BLOCK).sum((2, 4))
    cs = np.pad(ok.astype(np.float64), pad).reshape(n, by, BLOCK, bx, BLOCK).sum((2, 4))
    keep = cs.ravel() > 0
    return xs.ravel()[keep], cs.ravel()[keep]


def scale_check(err2: np.ndarray, var: np.ndarray, noise_var: Optional[np.ndarray] = None, seed: int = 0) -> dict:
    """How well the data determine s, for (N, Y, X) arrays as in `fit_scale` (raw^2; noise_var None = clean
    reference): the estimate (unclipped s^2 and s), its 95 % block-bootstrap interval for s, and, with noise_var,
    the noise-to-error ratio mean(v) / mean(err2 - v) (noise subtracted per unit of prediction error; the larger,
    the more s is a small difference of two large numbers), the relative change of s for a +-2 % error in v, and
    the maximum-likelihood scale (`fit_scale_mle`) with the ratio of the two estimates. `reliable` applies the
    thresholds above; `unreliable_because` names each one that failed, in words. Unit-free except where stated."""
    err2, var = np.asarray(err2, np.float64), np.asarray(var, np.float64)
    ok = var > 0
    q = (err2 if noise_var is None else err2 - np.asarray(noise_var, np.float64)) / np.where(ok, var, 1.0)
    sums, counts = _block_sums(q, ok)
    if counts.sum() == 0:
        return {"scale2": float("nan"), "interval": [float("nan"), float("nan")], "reliable": False,
                "noise_to_error": None, "sensitivity_2pct": None, "n_blocks": 0,
                "unreliable_because": ["no pixel has a posterior spread"]}
    s2 = float(sums.sum() / counts.sum())
    idx = np.random.default_rng(seed).integers(0, sums.size, size=(BOOTSTRAP_REPS, sums.size))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo2, hi2 = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    scale = float(np.sqrt(max(s2, _MIN_SCALE2)))
    interval = [float(np.sqrt(max(lo2, 0.0))), float(np.sqrt(max(hi2, 0.0)))]
    out = {"scale2": s2, "interval": interval, "n_blocks": int(sums.size), "noise_to_error": None,
           "sensitivity_2pct": None}
    why = []
    if lo2 <= 0:
        why.append("its 95 % interval reaches 0")
    if interval[1] - interval[0] > MAX_REL_WIDTH * scale:
        why.append(f"its 95 % interval is wider than {MAX_REL_WIDTH:.0%} of the estimate")
    if noise_var is not None:
        nv = np.asarray(noise_var, np.float64)
        excess = float(np.mean((err2 - nv)[ok]))
        out["noise_to_error"] = float(np.mean(nv[ok]) / excess) if excess > 0 else float("inf")
        # s^2 is linear in v: a relative error f of v moves it by -+ f * mean(v / var)
        f = NOISE_ERROR_PCT / 100
        nv_over_var = float(np.mean((nv / np.where(ok, var, 1.0))[ok]))
        shifted = [np.sqrt(max(s2 + k * f * nv_over_var, 0.0)) for k in (1, -1)]
        out["sensitivity_2pct"] = float(max(abs(v - scale) for v in shifted) / scale)
        if s2 <= 0:
            why.append("the observation noise exceeds the whole error (the estimate is negative)")
        if out["sensitivity_2pct"] > MAX_SENSITIVITY:
            why.append(f"the noise variance dwarfs the error: a {NOISE_ERROR_PCT:g} % noise-model error moves it "
                       f"by {100 * out['sensitivity_2pct']:.0f} %")
        mle = fit_scale_mle(err2, var, nv)
        out["mle_scale"] = mle
        out["estimator_ratio"] = estimator_ratio(scale, mle)
        if s2 > 0 and not estimators_agree(scale, mle):
            why.append(f"it and the maximum-likelihood scale ({mle:.3g}) differ by a factor "
                       f"{max(out['estimator_ratio'], 1 / out['estimator_ratio']):.2f}, so the noise models (or the "
                       "input-gain correction) do not describe this data's noise")
    out["reliable"] = not why
    out["unreliable_because"] = why
    return out


def shipped_scale(estimate: float, check: dict, noisy: bool) -> tuple[float, str]:
    """(the scale a calibration ships, how it was chosen) for the matched estimate and its `scale_check` (with
    `mle_scale` for a noisy reference): a clean-reference or reliable noisy-target estimate as is; for an unreliable
    one, the maximum-likelihood scale (it cannot go negative; flagged), unless that collapsed too; else
    FALLBACK_SCALE. Measured (docs/calibration.md): on W2S x4 and the BPAE quickstart the maximum-likelihood scale
    of an unreliable channel was 0.79-1.26x the clean-reference scale, s = 1 was 0.25-0.75x."""
    if not noisy:
        return estimate, "clean references"
    if check["reliable"]:
        return estimate, "noisy targets + noise models"
    mle = check.get("mle_scale")
    if mle is not None and np.isfinite(mle) and mle > MLE_FLOOR:
        return float(mle), "unreliable: maximum likelihood (noisy targets + noise models)"
    return FALLBACK_SCALE, "fallback: posterior std (s = 1)"


def reliability(std: np.ndarray, err2: np.ndarray, noise_var: Optional[np.ndarray] = None,
                bins: int = DEFAULT_BINS) -> dict:
    """Equal-count bins of `std` (flat, raw): dict(rmv, rmse, count) lists, one entry per bin, plus
    slope / offset / r2 of the linear regression RMSE = slope * RMV + offset. With noise_var, RMSE is the estimated
    error against the clean image, sqrt(max(mean(err2 - noise_var), 0))."""
    std = np.asarray(std, np.float64).ravel()
    err2 = np.asarray(err2, np.float64).ravel()
    if noise_var is not None:
        err2 = err2 - np.asarray(noise_var, np.float64).ravel()
    n = std.size
    bins = int(max(1, min(bins, n)))
    order = np.argsort(std, kind="stable")
    rmv, rmse, count = [], [], []
    for part in np.array_split(order, bins):
        if part.size == 0:
            continue
        rmv.append(float(np.sqrt(np.mean(std[part] ** 2))))
        rmse.append(float(np.sqrt(max(np.mean(err2[part]), 0.0))))
        count.append(int(part.size))
    slope, offset, r2 = _linear_fit(np.array(rmv), np.array(rmse))
    return {"rmv": rmv, "rmse": rmse, "count": count, "slope": slope, "offset": offset, "r2": r2}


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, offset, r^2) of y on x; NaN where x has no spread (a single bin, or all stds equal)."""
    if x.size < 2 or not np.ptp(x) > 0:
        return float("nan"), float("nan"), float("nan")
    from scipy.stats import linregress

    res = linregress(x, y)
    return float(res.slope), float(res.intercept), float(res.rvalue**2)


def calibrate_arrays(mean: np.ndarray, std: np.ndarray, target: np.ndarray, names: list[str],
                     noise_var: Optional[np.ndarray] = None, bins: int = DEFAULT_BINS,
                     scales: Optional[list[float]] = None) -> dict:
    """Per-channel calibration of (N, 2, Y, X) raw arrays: MMSE `mean`, UNCALIBRATED sample `std`, `target`
    (clean, or noisy with `noise_var` (N, 2, Y, X) raw^2). With `scales` given, they are applied instead of
    fitted (evaluation of an existing calibration; the fitted value is still reported as `optimal_scale`).

    Returns {name: {scale, optimal_scale, slope, offset, r2, n_pixels, rmv, rmse, count}} (reliability of
    scale * std). A fit (scales None) adds `method`, `reliable`, `interval`, `noise_to_error`, `sensitivity_2pct`
    (`scale_check`), for a noisy reference `mle_scale`, `estimator_ratio` and `unreliable_because`, and ships `shipped_scale`'s choice: for
    an unreliable noisy-reference estimate (kept as `optimal_scale`) the maximum-likelihood scale or FALLBACK_SCALE,
    flagged: never a silently collapsed channel."""
    out = {}
    for c, name in enumerate(names):
        err2 = (np.asarray(mean[:, c], np.float64) - target[:, c]) ** 2
        var = np.asarray(std[:, c], np.float64) ** 2
        nv = None if noise_var is None else noise_var[:, c]
        best = fit_scale(err2, var, nv)
        extra: dict = {}
        if scales is not None:
            scale = float(scales[c])
        else:
            check = scale_check(err2, var, nv)
            scale, method = shipped_scale(best, check, noisy=nv is not None)
            extra = {"method": method, "reliable": check["reliable"], "interval": check["interval"],
                     "noise_to_error": check["noise_to_error"], "sensitivity_2pct": check["sensitivity_2pct"]}
            if nv is not None:
                extra.update(mle_scale=check["mle_scale"], estimator_ratio=check["estimator_ratio"],
                             unreliable_because=check["unreliable_because"])
        rel = reliability(scale * np.sqrt(var), err2, nv, bins)
        out[name] = {"scale": scale, "optimal_scale": best, **extra, "slope": rel.pop("slope"),
                     "offset": rel.pop("offset"), "r2": rel.pop("r2"), "n_pixels": int(err2.size), **rel}
    return out


# ------------------------------------------------------------------------------------------- references and noise

def noise_variance(noise_models: list, signal: np.ndarray, batch: int = 1 << 18) -> np.ndarray:
    """Observation-noise variance (raw^2) of each channel's GMM noise model at `signal` (N, 2, Y, X) raw, the signal
    clipped to the model's fitted range (its polynomials are meaningless outside). Evaluated in batches of pixels
    (the mixture makes n_gaussians temporaries per pixel)."""
    if len(noise_models) != 2:
        raise UserError("calibrating against noisy targets needs the run's two noise models (noise_models/ch0.npz, "
                        "ch1.npz)")
    out = np.empty(signal.shape, np.float32)
    with torch.no_grad():
        for c, nm in enumerate(noise_models):
            flat = np.asarray(signal[:, c], np.float32).ravel()
            res = np.empty_like(flat)
            lo, hi = float(nm.min_signal), float(nm.max_signal)
            for i in range(0, flat.size, batch):
                s = torch.from_numpy(np.clip(flat[i:i + batch], lo, hi))
                res[i:i + batch] = nm.moments(s)[1].clamp(min=0).numpy()
            out[:, c] = res.reshape(signal.shape[0], *signal.shape[2:])
    return out


def clean_on_target_scale(clean: np.ndarray, noisy: np.ndarray, noise_kind: str) -> np.ndarray:
    """Clean references in the units of the noisy targets (N, 2, Y, X). Synthetic noise: they already are. Real
    noise: clean and noisy may sit on different intensity scales (W2S stretches every 8-bit image on its own), so each
    clean image is mapped onto its noisy image by a least-squares affine fit (as the noise-model fit in training)."""
    if noise_kind != "real":
        return clean
    out = np.empty_like(clean)
    for i in range(clean.shape[0]):
        for c in range(clean.shape[1]):
            a, b = np.polyfit(clean[i, c].ravel().astype(np.float64), noisy[i, c].ravel().astype(np.float64), 1)
            out[i, c] = a * clean[i, c] + b
    return out


# -------------------------------------------------------------------------------------------------------- the plot

def plot_calibration(channels: dict, path, title: str = "calibration") -> None:
    """RMSE vs RMV per channel (equal-count bins, calibrated std) with the y = x line; PNG written atomically."""
    from matplotlib.figure import Figure  # no pyplot: a notebook user's backend stays as it is

    names = list(channels)
    fig = Figure(figsize=(4.2 * len(names), 4))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        ch = channels[name]
        rmv, rmse = np.array(ch["rmv"]), np.array(ch["rmse"])
        hi = float(max(rmv.max(initial=0), rmse.max(initial=0))) * 1.05 or 1.0
        ax.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
        ax.plot(rmv, rmse, "o-", ms=3, label=f"{name}")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("RMV (calibrated std, raw units)")
        ax.set_ylabel("RMSE (raw units)")
        ax.set_title(f"{name}: scale {ch['scale']:.3g}, slope {ch['slope']:.3g}, "
                     f"offset {ch['offset']:.3g}, R² {ch['r2']:.3f}", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ------------------------------------------------------------------------------------------------------- with a run

def input_gain(sampler, inputs: np.ndarray, norm, tile: int, halo: int, chunk: Optional[int], progress: bool,
               seed: int, probes: int = GAIN_PROBES, rel_step: float = 0.01, smooth: int = 9) -> np.ndarray:
    """d[n, c, y, x] ~ dMMSE_c(y, x) / dinput(y, x) (raw / raw, unit-free): the share of a pixel's input noise that
    the MMSE of channel c keeps. Hutchinson probes: input + h * eps with eps = +-1 per pixel and h = rel_step x the
    input std; the latent noise is the same counter-hash draw in every pass, so the MMSE of `sampler` is a
    deterministic function of the input and eps * (MMSE(input + h eps) - MMSE(input)) / h is unbiased for the
    diagonal. `probes` independent eps are averaged (the variance of the off-diagonal terms falls as 1 / probes),
    then a smooth x smooth box average removes most of what is left. `sampler` may draw fewer samples than the
    calibration itself: d is the mean of the per-sample gains, and the probes buy more than the samples do."""
    from scipy.ndimage import uniform_filter

    from .sampling import predict_stack

    if probes < 1:
        raise UserError("--probes must be >= 1")
    h = rel_step * float(norm.input_std)
    base = predict_stack(sampler, inputs, norm, tile, halo, chunk, progress, desc="calibrate (gain)")["mean"]
    rng = np.random.default_rng(seed)
    d = np.zeros(base.shape, np.float64)
    for _ in range(probes):
        eps = np.where(rng.random(inputs.shape) < 0.5, -1.0, 1.0).astype(np.float32)
        probe = predict_stack(sampler, inputs + h * eps, norm, tile, halo, chunk, progress, desc="calibrate (gain)")
        d += eps[:, None] * (probe["mean"] - base) / h
    return uniform_filter((d / probes).astype(np.float32), size=(1, 1, smooth, smooth), mode="reflect")


def fit_calibration(run, without_clean: bool = False, n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                    bins: int = DEFAULT_BINS, data: Optional[str] = None, tile: int = DEFAULT_TILE,
                    max_images: Optional[int] = None, chunk: Optional[int] = None, progress: bool = True,
                    device: str = "auto", probes: int = GAIN_PROBES) -> tuple[dict, dict]:
    """Fit the per-channel scales of a loaded run (run_folder.load_run) on its validation images; writes nothing.
    Returns (what calibration.json holds, the fitted channels' reliability data for `plot_calibration`)."""
    from .sampling import predict_stack

    if n_samples < 2:
        raise UserError("calibration needs at least 2 posterior samples (--samples)")
    val, noise_kind = prepare_run_split(run, "val", data)
    n = len(val.inputs) if max_images is None else max(1, min(int(max_images), len(val.inputs)))
    mode = "clean"
    note = ""
    if without_clean or val.clean is None:
        mode = "noisy"
        if not without_clean:
            note = "no clean validation images: calibrated against the noisy targets with the noise models"
    dev = pick_device(device)
    sampler = run.sampler(n_samples, seed).to(dev)
    sampler.calibration_scale.fill_(1.0)  # fit on the raw sample std
    halo = run.halo
    pred = predict_stack(sampler, val.inputs[:n], run.norm, tile, halo, chunk, progress, desc="calibrate")
    targets = val.targets[:n]
    if mode == "clean":
        ref, nv = clean_on_target_scale(val.clean[:n], targets, noise_kind), None
    else:
        gain_sampler = run.sampler(min(n_samples, GAIN_SAMPLES), seed).to(dev)
        gain = input_gain(gain_sampler, val.inputs[:n], run.norm, tile, halo, chunk, progress, seed, probes)
        ref, nv = targets, noise_variance(run.noise_models, pred["mean"]) * (1.0 - 2.0 * gain)
    channels = calibrate_arrays(pred["mean"], pred["std"], ref, run.channel_names, nv, bins)
    result = {"channels": channels, "mode": mode, "n_samples": int(n_samples), "seed": int(seed), "bins": int(bins),
              "split": "val", "n_images": int(n), "halo": int(halo), "tile": int(tile)}
    if mode == "noisy":
        result["gain"] = {"probes": int(probes), "samples": int(min(n_samples, GAIN_SAMPLES))}
        if val.clean is not None:
            # --without-clean on data that has clean images (a benchmark, a method check): what the clean
            # reference gives from the same samples, so the calibrations can be compared. Not used by the sampler.
            clean = clean_on_target_scale(val.clean[:n], targets, noise_kind)
            check = calibrate_arrays(pred["mean"], pred["std"], clean, run.channel_names, None, bins)
            result["clean_check"] = {}
            for k, (name, c) in enumerate(check.items()):
                fit = channels[name]
                err2 = (np.asarray(pred["mean"][:, k], np.float64) - clean[:, k]) ** 2
                shipped = reliability(fit["scale"] * np.asarray(pred["std"][:, k], np.float64), err2, None, bins)
                result["clean_check"][name] = {
                    "scale": c["scale"], "slope": c["slope"], "offset": c["offset"], "r2": c["r2"],
                    "noisy_over_clean": fit["scale"] / c["scale"],
                    "estimate_over_clean": fit["optimal_scale"] / c["scale"],
                    "mle_over_clean": fit["mle_scale"] / c["scale"],
                    "shipped_slope_vs_clean": shipped["slope"]}  # the shipped scale against clean (1 = right)
    if n_samples < 10:  # E[1 / sample variance] grows fast for few samples (infinite for K = 2): s is biased up
        note = (note + "; " if note else "") + (f"only {n_samples} posterior samples: the sample std is noisy and "
                                                "the fitted scale is biased upwards (use >= 20)")
    if note:
        result["note"] = note
    return json_safe(result), channels


def calibrate_run(run_dir, without_clean: bool = False, n_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                  bins: int = DEFAULT_BINS, data: Optional[str] = None, tile: int = DEFAULT_TILE,
                  max_images: Optional[int] = None, chunk: Optional[int] = None, progress: bool = True,
                  device: str = "auto", probes: int = GAIN_PROBES) -> dict:
    """`denoisplit-zoo calibrate`: fit the per-channel scales on the run's validation images (`fit_calibration`)
    and write RUN_DIR/calibration.json and RUN_DIR/calibration.png. Returns what calibration.json holds."""
    run = load_run(run_dir)
    with RunLock(run.paths.root, "calibrate"):
        result, channels = fit_calibration(run, without_clean, n_samples, seed, bins, data, tile, max_images, chunk,
                                           progress, device, probes)
        write_json(run.paths.calibration, result)
        plot_calibration(channels, run.paths.root / "calibration.png",
                         title=f"calibration on validation images ({result['mode']} reference, K={n_samples})")
    return result
