"""Image-quality metrics of the paper's evaluation (the denoiSplit paper, section 5.3): range-invariant PSNR, MS-SSIM, MicroSSIM.

All functions take one channel: a frame (Y, X) or a stack of frames (N, Y, X), ground truth first, in any units
(raw or normalised: RI-PSNR and MicroSSIM are range invariant; MS-SSIM uses the ground truth's range).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

# MS-SSIM's standard five scales (Wang et al. 2003; pytorch-msssim's defaults)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_WIN = 11
_MSE_IDENTICAL = 1e-24  # float64 round-off of an exact affine match is ~1e-31


def _frames(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a frame (Y, X) or frames (N, Y, X), got shape {a.shape}")
    return a


def _check_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = _frames(gt), _frames(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    return gt, pred


def ri_psnr_frame(gt, pred) -> float:
    """Range-invariant PSNR (dB) of one frame, exactly the reference's `core/psnr.py`:

        r  = (max(gt) - min(gt)) / std(gt)              std: unbiased (n - 1), over the flattened frame
        g  = (gt - mean(gt)) / std(gt),  g <- g - mean(g)
        p0 = pred - mean(pred)
        a  = sum(g * p0) / sum(p0**2)                   least-squares scale of the prediction onto g
        PSNR = 20 * log10( r / sqrt(mean((g - a * p0)**2)) )

    The prediction's offset and scale do not matter (hence "range invariant"). Frames equal up to float64 round-off
    (mse <= 1e-24 in these standardised units, i.e. above ~240 dB) give +inf; a constant prediction is scaled by
    a = 0; a constant ground truth gives NaN (no range to compare against).
    """
    g = np.asarray(gt, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    if g.size < 2:
        return float("nan")
    sd = g.std(ddof=1)
    if not sd > 0:
        return float("nan")
    r = (g.max() - g.min()) / sd
    g = (g - g.mean()) / sd
    g = g - g.mean()
    p0 = p - p.mean()
    denom = float(np.sum(p0 * p0))
    a = float(np.sum(g * p0)) / denom if denom > 0 else 0.0
    mse = float(np.mean((g - a * p0) ** 2))
    if mse <= _MSE_IDENTICAL:
        return float("inf")
    return 20.0 * math.log10(r / math.sqrt(mse))


def ri_psnr(gt, pred) -> float:
    """Range-invariant PSNR (dB) per frame (`ri_psnr_frame`), averaged over the frames of (N, Y, X) / (Y, X)."""
    gt, pred = _check_pair(gt, pred)
    return float(np.mean([ri_psnr_frame(g, p) for g, p in zip(gt, pred)]))


def ms_ssim_levels(height: int, width: int, win_size: int = MS_SSIM_WIN) -> int:
    """How many MS-SSIM scales a frame supports: pytorch-msssim needs the smaller side > (win - 1) * 2**4 (= 160 px)
    for all five; a smaller frame gets the largest L with side > (win - 1) * 2**(L - 1); 0 if below one window."""
    side = min(height, width)
    for levels in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if side > (win_size - 1) * 2 ** (levels - 1):
            return levels
    return 0


def _ms_ssim_few_levels(x: torch.Tensor, y: torch.Tensor, data_range: float, levels: int) -> torch.Tensor:
    """MS-SSIM over the first `levels` scales (weights rescaled to the five weights' total), same algorithm as
    pytorch-msssim's ms_ssim (which refuses frames <= 160 px); levels = 1 is plain SSIM."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    w = torch.tensor(MS_SSIM_WEIGHTS[:levels], dtype=x.dtype)
    w = w * (sum(MS_SSIM_WEIGHTS) / w.sum())  # same total as the five standard weights (which sum to 1.0001)
    win = _fspecial_gauss_1d(MS_SSIM_WIN, 1.5).to(x.dtype).repeat([x.shape[1], 1, 1, 1])
    mcs = []
    for i in range(levels):
        ssim_pc, cs = _ssim(x, y, win=win, data_range=data_range, size_average=False, K=(0.01, 0.03))
        if i < levels - 1:
            mcs.append(torch.relu(cs))
            pad = [s % 2 for s in x.shape[2:]]
            x = torch.nn.functional.avg_pool2d(x, kernel_size=2, padding=pad)
            y = torch.nn.functional.avg_pool2d(y, kernel_size=2, padding=pad)
    stack = torch.stack(mcs + [torch.relu(ssim_pc)], dim=0)
    return torch.prod(stack ** w.view(-1, 1, 1), dim=0).mean(1)  # (N,)


def ms_ssim(gt, pred, data_range: float | None = None) -> float:
    """Multi-scale SSIM (pytorch-msssim, 11-px Gaussian window, sigma 1.5, K = (0.01, 0.03)), mean over frames.

    data_range defaults to max(gt) - min(gt) over the whole stack (the reference's torchmetrics call). Frames with a
    smaller side <= 160 px cannot hold five scales: they use as many as fit (weights renormalised; see
    `ms_ssim_levels`), with a warning; below one 11-px window the result is NaN.
    """
    from pytorch_msssim import ms_ssim as _ms_ssim

    gt, pred = _check_pair(gt, pred)
    if data_range is None:
        data_range = float(gt.max() - gt.min())
    if not data_range > 0:
        return float("nan")
    levels = ms_ssim_levels(*gt.shape[-2:])
    if levels == 0:
        return float("nan")
    x = torch.from_numpy(gt)[:, None]
    y = torch.from_numpy(pred)[:, None]
    if levels == len(MS_SSIM_WEIGHTS):
        val = _ms_ssim(x, y, data_range=data_range, size_average=False)
    else:
        warnings.warn(f"MS-SSIM: frames of {gt.shape[-2]}x{gt.shape[-1]} px hold only {levels} of 5 scales",
                      stacklevel=2)
        val = _ms_ssim_few_levels(x, y, data_range, levels)
    return float(val.mean())


def micro_ssim(gt, pred) -> float:
    """MicroSSIM (package `microssim`): background offsets and the range-invariant factor fitted over all frames of
    the channel (as microSplit's paper metrics do), then the score averaged over frames."""
    from microssim import MicroSSIM

    gt, pred = _check_pair(gt, pred)
    if not gt.max() > gt.min():
        return float("nan")
    with warnings.catch_warnings(), _quiet_microssim():
        warnings.simplefilter("ignore")  # microssim warns about float64 / ranges on normal use
        m = MicroSSIM().fit(gt, pred)
        return float(np.mean([m.score(g, p) for g, p in zip(gt, pred)]))


@contextlib.contextmanager
def _quiet_microssim():
    """microssim 0.0.5 draws an unconditional tqdm bar per fit; our callers show their own progress."""
    try:
        from microssim.ri_factor import ri_factor as mod
    except ImportError:  # another microssim layout: leave it alone
        yield
        return
    old = getattr(mod, "tqdm", None)
    mod.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        mod.tqdm = old


def channel_metrics(gt: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """All metrics for (N, 2, Y, X) ground truth and prediction (same units): {metric: {name: value},
    metric_mean: mean over the two channels} for ri_psnr, ms_ssim, micro_ssim; plus ms_ssim_levels."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 4 or gt.shape[1] != len(names):
        raise ValueError(f"expected matching (N, {len(names)}, Y, X) arrays, got {gt.shape} and {pred.shape}")
    out: dict = {}
    for key, fn in (("ri_psnr", ri_psnr), ("ms_ssim", ms_ssim), ("micro_ssim", micro_ssim)):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="MS-SSIM: frames")  # reported as ms_ssim_levels instead
            vals = {n: fn(gt[:, c], pred[:, c]) for c, n in enumerate(names)}
        out[key] = vals
        out[f"{key}_mean"] = float(np.mean(list(vals.values())))
    out["ms_ssim_levels"] = ms_ssim_levels(*gt.shape[-2:])
    return out


# ----------------------------------------------------------------------------------------------------- floors
# A split model is only worth its numbers beside two things that need no model at all, computed on the same images
# against the same clean references:
#   naive     input / 2 for both channels (RI-PSNR is scale invariant, so this is the noisy sum itself);
#   no_split  the perfect denoiser that does not split: the clean sum (A + B) / 2 for both channels.
# A channel whose RI-PSNR does not exceed both has not been split (it may still be denoised).


def pearson_r(a, b) -> float:
    """Pearson correlation of two equally shaped arrays (flattened, float64); NaN if either is constant."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / den if den > 0 else float("nan")


def _frame_mean_r(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over frames of the per-frame Pearson r of (N, Y, X) stacks (frames are independent fields)."""
    vals = [pearson_r(a, b) for a, b in zip(x, y)]
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def split_floors(reference: np.ndarray, inputs: np.ndarray, names: list[str], clean: bool) -> dict:
    """The two floors on (N, 2, Y, X) references and (N, Y, X) inputs (the noisy sum), raw units:
    {naive: {name: dB, "mean": dB}, no_split: {...} or None}. `no_split` needs clean references (clean=True): the
    clean sum is the reference's own A + B."""
    reference, inputs = np.asarray(reference), np.asarray(inputs)
    if reference.ndim != 4 or reference.shape[1] != 2 or inputs.shape != reference.shape[:1] + reference.shape[2:]:
        raise ValueError(f"expected (N, 2, Y, X) references and (N, Y, X) inputs, got {reference.shape}, "
                         f"{inputs.shape}")

    def floor(pred: np.ndarray) -> dict:
        vals = {n: ri_psnr(reference[:, c], pred) for c, n in enumerate(names)}
        return {**vals, "mean": float(np.mean(list(vals.values())))}

    clean_sum = reference[:, 0].astype(np.float64) + reference[:, 1]
    return {"naive": floor(inputs / 2.0), "no_split": floor(clean_sum / 2.0) if clean else None}


def split_gain(ri: dict, floors: dict) -> dict:
    """{name: model RI-PSNR - max(floors) (dB)} per channel; None for every channel when the no-split floor is
    missing (no clean references: whether the model split cannot be judged)."""
    if floors.get("no_split") is None:
        return {n: None for n in ri}
    return {n: float(v - max(floors["naive"][n], floors["no_split"][n])) for n, v in ri.items()}


def split_status(gain: dict, resembles_other: dict | None = None, lacks_detail: dict | None = None) -> dict:
    """{name: "split" | "not split" | "unknown"}: a channel is split only if it beats both floors (gain > 0), does
    not resemble the other structure more than its own (resembles_other[name] True) and shows its own structure's
    detail (lacks_detail[name] False; see DETAIL_MIN_R). The second test catches the dim channel of an unequal pair:
    where one structure dominates the sum, the no-split floor of the dim one is low, and a faint ghost of the bright
    structure can beat it (measured: BPAE mito, +0.15 dB, r = 0.92 with the clean actin vs 0.55 with the clean
    mito). The third catches a prediction that has the structure's diffuse glow in the right place but not the
    structure itself."""
    other, flat = resembles_other or {}, lacks_detail or {}
    return {n: "unknown" if g is None or not np.isfinite(g) else
            "split" if g > 0 and not other.get(n, False) and not flat.get(n, False) else "not split"
            for n, g in gain.items()}


# RI-PSNR and Pearson r are dominated by the low spatial frequencies (where a structure's intensity lies, its
# diffuse background), so a prediction that is a glow where the mitochondria are, without their rings and
# tubules, can beat both floors. The detail check correlates the prediction with its clean structure after a
# difference-of-Gaussians band-pass (DETAIL_SIGMAS px: the scale of filaments and mitochondria at ~0.1 um/px) and
# calls a channel below DETAIL_MIN_R not split. Measured on the quickstart's test stripe (2026-12-04): the
# balanced run, whose figure shows the rings, 0.88 actin / 0.83 mito; `--brightness raw`, whose mito is a glow
# with +3.19 dB split gain, 0.99 / 0.31 (docs/quality.md has more).
DETAIL_SIGMAS = (1.0, 4.0)
DETAIL_MIN_R = 0.5


def band_pass(frames: np.ndarray, sigmas: tuple[float, float] = DETAIL_SIGMAS) -> np.ndarray:
    """Difference of two Gaussian filters of each (Y, X) frame of an (N, Y, X) stack (float64)."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(frames, np.float64)
    return np.stack([gaussian_filter(f, sigmas[0]) - gaussian_filter(f, sigmas[1]) for f in x])


def lacks_detail(detail: dict) -> dict:
    """{name: True where the band-pass r (detail_correlation) is below DETAIL_MIN_R or NaN (a constant channel)}."""
    return {n: not r >= DETAIL_MIN_R for n, r in detail.items()}


def detail_correlation(pred: np.ndarray, clean: np.ndarray, names: list[str]) -> dict:
    """{name: Pearson r (mean over frames) of the band-passed prediction with its band-passed clean structure},
    for (N, 2, Y, X) predictions and clean references."""
    return {n: _frame_mean_r(band_pass(pred[:, c]), band_pass(clean[:, c])) for c, n in enumerate(names)}


def resembles_other(pred_vs_clean: dict, names: list[str]) -> dict:
    """{name: True where the predicted channel correlates more with the OTHER clean structure than with its own},
    from channel_correlations' `pred_vs_clean` ({"p~q": r})."""
    a, b = names
    return {a: pred_vs_clean[f"{a}~{b}"] > pred_vs_clean[f"{a}~{a}"],
            b: pred_vs_clean[f"{b}~{a}"] > pred_vs_clean[f"{b}~{b}"]}


def channel_correlations(pred: np.ndarray, clean: np.ndarray | None, names: list[str]) -> dict:
    """Pearson r (mean over frames) of the two predicted channels with each other, and, with clean references,
    of the two clean channels with each other and of each predicted channel with each clean one.
    A split has r(pred A, pred B) near r(clean A, clean B); a model that only denoises has it near 1."""
    a, b = names
    out = {"pred": {f"{a}~{b}": _frame_mean_r(pred[:, 0], pred[:, 1])}}
    if clean is not None:
        out["clean"] = {f"{a}~{b}": _frame_mean_r(clean[:, 0], clean[:, 1])}
        out["pred_vs_clean"] = {f"{p}~{q}": _frame_mean_r(pred[:, i], clean[:, j])
                                for i, p in enumerate(names) for j, q in enumerate(names)}
    return out


# Widths (px) of the Gaussian filters the denoising check tries on the input; the best one on the evaluated images
# themselves is reported (a blur chosen in hindsight: the most favourable blur, so a model that loses to it is
# certainly a weak denoiser).
BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def denoising_check(reference: np.ndarray, pred: np.ndarray, inputs: np.ndarray) -> dict:
    """Does the model denoise the SUM at least as well as a blur? Splitting cannot be judged apart from denoising:
    a model whose two outputs, added, are further from the clean sum than a Gaussian filter of the input is an
    undertrained denoiser, and its "not split" verdict says more about its training than about the method.

    (N, 2, Y, X) clean references and predictions, (N, Y, X) noisy inputs (the sum), raw units -> dict(
        model: RI-PSNR (dB) of pred A + pred B against clean A + B, noisy: of the input, blur: of the best
        Gaussian filter of the input (BLUR_SIGMAS, chosen on these images), blur_sigma: its width (px),
        margin: model - blur (dB; < 0: the model denoises less well than a blur))."""
    from scipy.ndimage import gaussian_filter

    inputs = np.asarray(inputs, dtype=np.float64)
    clean_sum = np.asarray(reference, dtype=np.float64).sum(1)
    blurs = {s: ri_psnr(clean_sum, np.stack([gaussian_filter(x, s) for x in inputs])) for s in BLUR_SIGMAS}
    sigma = max(blurs, key=blurs.get)
    model = ri_psnr(clean_sum, np.asarray(pred, dtype=np.float64).sum(1))
    return {"model": model, "noisy": ri_psnr(clean_sum, inputs), "blur": blurs[sigma], "blur_sigma": float(sigma),
            "margin": model - blurs[sigma]}


def describe_denoising(d: dict) -> str:
    """One sentence on `denoising_check`'s result, for reports."""
    text = (f"Denoising check (the two outputs added, against the clean sum A + B): model {d['model']:.2f} dB; the "
            f"noisy input {d['noisy']:.2f} dB; the best Gaussian filter of the input (sigma {d['blur_sigma']:g} px, "
            f"chosen on these images) {d['blur']:.2f} dB")
    if d["margin"] < 0:
        return text + (f". The model denoises the sum {-d['margin']:.2f} dB less well than a blur: it is "
                       "undertrained, so its split verdict judges the training more than the method (train longer).")
    return text + f": the model is {d['margin']:.2f} dB ahead of the blur."


def split_quality(reference: np.ndarray, pred: np.ndarray, inputs: np.ndarray, names: list[str], ri: dict,
                  clean: bool) -> dict:
    """Everything a reader needs to judge whether the two channels were split: floors, split_gain, split_status
    (per channel), correlations and, with clean references, the denoising check; for (N, 2, Y, X) references /
    predictions and (N, Y, X) inputs, raw units."""
    floors = split_floors(reference, inputs, names, clean)
    gain = split_gain(ri, floors)
    corr = channel_correlations(pred, reference if clean else None, names)
    other = None
    if clean:
        other = resembles_other(corr["pred_vs_clean"], names)
        # How much of the input's noise the prediction carries: r(pred_c - clean_c, input - (clean A + clean B)).
        # ~0 for a denoiser; a model trained on noisy targets that also sit in its input (input = noisy A + noisy B)
        # can lower its loss by predicting their noise from the input, and then it is > 0 (uSplit's failure mode).
        noise = inputs.astype(np.float64) - reference[:, 0] - reference[:, 1]
        corr["error_vs_input_noise"] = {n: _frame_mean_r(pred[:, c] - reference[:, c].astype(np.float64), noise)
                                        for c, n in enumerate(names)}
        corr["detail"] = detail_correlation(pred, reference, names)
        flat = lacks_detail(corr["detail"])
    else:
        flat = None
    return {"floors": floors, "split_gain": gain, "split_status": split_status(gain, other, flat),
            "resembles_other": other, "lacks_detail": flat, "correlation": corr,
            "denoising": denoising_check(reference, pred, inputs) if clean else None}


def describe_split(status: dict, gain: dict, resembles_other: dict | None = None,
                   detail: dict | None = None) -> str:
    """One sentence for reports: which channels beat both floors, which were not split, and why. `detail`:
    correlation["detail"] (band-pass r per channel), to name a channel that lacks its structure's detail."""
    if all(s == "unknown" for s in status.values()):
        return ("Whether the channels were split cannot be judged without clean references (the no-split floor "
                "needs them).")
    parts = []
    for n, s in status.items():
        g = gain[n]
        text = f"{n}: {s} ({g:+.2f} dB over the better floor" if g is not None else f"{n}: {s}"
        if (resembles_other or {}).get(n):
            text += "; it resembles the other structure more than its own"
        r = (detail or {}).get(n)
        if r is not None and not r >= DETAIL_MIN_R:
            text += f"; its fine structure is missing (band-pass r {r:.2f} with its clean image, < {DETAIL_MIN_R:g})"
        parts.append(text + (")" if g is not None else ""))
    verdict = "; ".join(parts)
    if any(s == "not split" for s in status.values()):
        verdict += (". A channel is split only if it beats both floors (the noisy sum and the clean sum of both "
                    "structures), correlates more with its own clean structure than with the other, and shows its "
                    "structure's fine detail")
    return verdict + "."
