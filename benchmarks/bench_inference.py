"""Inference benchmark: the reference procedure vs ours, same trained architecture, same K, same images.

(a) `ref`: the denoiSplit reference inference (the tiled inference of the paper's public code,
    github.com/juglab/denoiSplit): 128 x 128 tiles centred on a 64-px grid (32 px margin per side), reflect
    padding at the frame border, only the central 64 x 64 of each tile kept, K FULL network passes (bottom-up +
    top-down, torch.randn latents) per batch of tiles, eager PyTorch, as the public code runs it (contiguous
    NCHW, the default allocator).
    `ref-tuned`: the same procedure with our two CPU run-time settings (NHWC, heap-reused activations:
    sampling.cpu_channels_last, allocator.heap_allocations), to show what those alone give the reference.
(b) ours, `sampling.predict_image`: bottom-up once per tile, the K top-down passes batched (auto chunk), large
    tiles (`--tile`, default 512) + the measured halo, counter-based latent noise. Run as
      `eager`       the product code path,
      `torchscript` the same tiling with torch.jit.script(SplitSampler) (predict_image accepts the scripted module),
      `onnx`        the same tiling and chunking with ONNX Runtime on two exported graphs (bottom-up; top-down with
                    the latent noise as inputs), legacy exporter, opset 17, dynamic batch/y/x,
      `onnx-pkg`    ONNX Runtime on the graph the exported zip ships (export.save_onnx of the SplitSampler: all K
                    top-down passes in one batch inside the graph); tiles shrunk to fit `--mem-budget-gb` (the graph
                    holds K samples at once), skipped where even the smallest tile does not fit.

Per (variant, image size, K): Mpx/s (output pixels / s), ratio to (a), executed GFLOP/s (FLOPs counted with
torch.utils.flop_counter on a meta-device copy at the exact tile size: convolutions / matmuls only, elementwise ops
not counted) against the measured fp32 matmul rate, and peak memory (CPU: peak RSS (VmHWM) of a fresh worker process per
configuration, and its growth over the model-loaded baseline; CUDA: torch.cuda.max_memory_allocated).
Runs that would exceed `--time-limit` seconds stop after the last finished tile batch (reference) / tile (ours) and
are extrapolated (column `done` < 1).

Equal quality: on the first (smallest) image size, the MMSE of every variant is compared with the clean image
(W2S test data with `--run` and its data) and with each other: RI-PSNR(a vs b) and the max |b variant - eager|
(the (b) variants use the same counter-based noise, so they agree to float round-off). Also a deterministic check
with the posterior means (eps = 0): (a) vs (b) then differ only by the reference's 32-px tile margin.

Without `--run`, a random-weight model of `--preset` (default small) is used: the quality comparison is then only
numeric agreement, not image quality.

    python benchmarks/bench_inference.py --quick --threads 1 --json /tmp/inf.json
    python benchmarks/bench_inference.py --run runs/gpu/w2s_paper_denoisplit \
        --data ../shared/data/w2s_train_fov001-080.npz --channels 0 2 --threads 16 \
        --json benchmarks/results/inference_cpu.json
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# preset -> (n_levels, z_dim, n_filters, dropout, patch_size); mirrors config.PRESETS (checked when importable)
PRESET_ARCH = {"tiny": (3, 4, 8, 0.0, 32), "small": (4, 32, 32, 0.1, 64), "paper": (4, 128, 64, 0.1, 128)}
REF_PATCH, REF_GRID = 128, 64
VARIANTS = ("ref", "ref-tuned", "eager", "torchscript", "onnx", "onnx-pkg")


# ------------------------------------------------------------------------------------------------------ model / data

class SimpleNorm:
    """data.Normalization stand-in for random weights (no pydantic needed)."""

    def __init__(self, input_mean, input_std, target_mean=(0.0, 0.0), target_std=(1.0, 1.0)):
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        self.target_mean, self.target_std = list(target_mean), list(target_std)

    def normalize_input(self, x):
        return (x - self.input_mean) / self.input_std


def random_arch(preset: str) -> dict:
    n_levels, z_dim, n_filters, dropout, patch = PRESET_ARCH[preset]
    try:
        from denoisplit_zoo.config import PRESETS

        m = PRESETS[preset]["model"]
        assert (m["n_levels"], m["z_dim"], m["n_filters"]) == (n_levels, z_dim, n_filters), "PRESET_ARCH is stale"
    except ImportError:  # no pydantic on this machine: the table above
        pass
    return dict(n_levels=n_levels, z_dim=z_dim, n_filters=n_filters, dropout=dropout, out_channels=2,
                patch_size=patch)


def build_sampler(spec: dict, k: int, noise: bool = True):
    """(SplitSampler in eval mode on the device, norm) for a worker spec."""
    from denoisplit_zoo.model import SplitSampler

    if spec.get("run"):
        from denoisplit_zoo.run_folder import load_run

        run = load_run(spec["run"])
        s, norm = run.sampler(k, spec["seed"], noise), run.norm
    else:
        torch.manual_seed(0)
        s = SplitSampler(**spec["arch"], n_samples=k, seed=spec["seed"], sample_latents=noise)
        norm = SimpleNorm(*spec["norm"])
    s.calibration_scale.fill_(1.0)
    return s.eval().to(torch.device(spec["device"])), norm


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Deterministic (size, size) raw image: smooth structures (blobs + filaments) + shot-like noise, ~8-bit range."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    k = np.exp(-((f[:, None] ** 2 + f[None] ** 2) * (2 * np.pi * 3) ** 2) / 2)
    smooth = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * k))
    smooth = np.maximum(smooth / smooth.std(), 0)
    img = 20 + 60 * smooth + rng.normal(size=(size, size)) * 8
    return img.astype(np.float32)


def load_images(args, sizes: list[int]) -> tuple[dict, dict, str]:
    """{size: raw input (size, size)}, {size: clean (2, size, size) or None}, description. With a run: its test
    images (`--data` + `--channels` when the run's data path is not readable here), 2048 = a mosaic of test
    images; else synthetic."""
    imgs, cleans = {}, {}
    if args.run:
        try:
            from denoisplit_zoo.evaluation import load_eval_data
            from denoisplit_zoo.run_folder import load_run

            run = load_run(args.run)
            if args.data:
                ev = load_eval_data(run, args.data, tuple(args.channels) if args.channels else None)
                test = (run.data_split or {}).get("test")
                idx = test if test and max(test) < len(ev.inputs) else list(range(len(ev.inputs)))
                inputs, clean = ev.inputs[idx], None if ev.clean is None else ev.clean[idx]
                where = f"{args.data} test fields {idx[:4]}..."
            else:
                ev = load_eval_data(run)
                inputs, clean, where = ev.inputs, ev.clean, f"{ev.source} test split"
            h = inputs.shape[-1]
            for s in sizes:
                reps = -(-s // h)
                mos = np.block([[inputs[(i * reps + j) % len(inputs)] for j in range(reps)] for i in range(reps)])
                imgs[s] = np.ascontiguousarray(mos[:s, :s], np.float32)
                if clean is not None:
                    cm = np.concatenate([np.concatenate([clean[(i * reps + j) % len(clean)] for j in range(reps)], -1)
                                         for i in range(reps)], -2)
                    cleans[s] = np.ascontiguousarray(cm[:, :s, :s], np.float32)
                else:
                    cleans[s] = None
            return imgs, cleans, f"run test images ({where}); sizes above {h} px are mosaics of test fields"
        except Exception as e:  # noqa: BLE001  (data not readable here: synthetic images, same timings)
            print(f"[bench_inference] run data not usable ({type(e).__name__}: {e}); synthetic images", flush=True)
    for s in sizes:
        imgs[s], cleans[s] = synthetic_image(s), None
    return imgs, cleans, "synthetic (smoothed noise structures + noise), no clean reference"


# ----------------------------------------------------------------------------------------------------- FLOP counts

def count_flops(arch: dict, h: int, w: int) -> tuple[float, float]:
    """(bottom-up FLOPs, top-down FLOPs of ONE sample) for one (1, 1, h, w) tile, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from denoisplit_zoo.model import LadderVAE

    with torch.device("meta"):
        vae = LadderVAE(arch["n_levels"], arch["z_dim"], arch["n_filters"], 0.0, arch["out_channels"],
                        arch["patch_size"]).eval()
        x = torch.empty(1, 1, h, w)
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                bu = vae.bottom_up(x)
            fb = fc.get_total_flops()
            eps = [torch.empty(1, arch["z_dim"], v.shape[2], v.shape[3]) for v in bu]
            with FlopCounterMode(display=False) as fc:
                vae.top_down(bu, eps, False)
            ft = fc.get_total_flops()
    return float(fb), float(ft)


# ----------------------------------------------------------------------------------------------- (a) the reference

@torch.no_grad()
def reference_predict(vae, x_norm: np.ndarray, k: int, batch: int, noise: bool, device, deadline):
    """Reference procedure on a normalised (H, W) image -> (mean (2, H', W') normalised, NaN where not done; tiles
    done; total tiles). H' = floor(H / 64) * 64 (the reference's grid coverage)."""
    g, p = REF_GRID, REF_PATCH
    m = (p - g) // 2
    h, w = x_norm.shape
    ny, nx = h // g, w // g
    pad = np.pad(x_norm, m, mode="reflect")
    mean = np.full((2, ny * g, nx * g), np.nan, np.float32)
    coords = [(i, j) for i in range(ny) for j in range(nx)]
    z = vae.z_dim
    done = 0
    for b0 in range(0, len(coords), batch):
        cs = coords[b0:b0 + batch]
        t = torch.from_numpy(np.stack([pad[i * g:i * g + p, j * g:j * g + p] for i, j in cs]))[:, None].to(device)
        s1 = s2 = None
        for _ in range(k):  # one FULL pass per sample, as the reference does
            bu = vae.bottom_up(t)
            eps = None if noise else [torch.zeros(len(cs), z, v.shape[2], v.shape[3], device=device) for v in bu]
            out = vae.top_down(bu, eps, False)[0][:, :2]
            s1 = out if s1 is None else s1 + out
            s2 = out * out if s2 is None else s2 + out * out
        mu = (s1 / k).cpu().numpy()
        if k > 1:  # the reference also computes the sample std (kept out of the comparison)
            _ = ((s2 - s1 * s1 / k) / (k - 1)).clamp(min=0).sqrt().cpu()
        for (i, j), mm in zip(cs, mu):
            mean[:, i * g:(i + 1) * g, j * g:(j + 1) * g] = mm[:, m:m + g, m:m + g]
        done += len(cs)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return mean, done, len(coords)


# ------------------------------------------------------------------------------------------------------- (b) ours

def ours_predict(predict_fn, img: np.ndarray, core: int, deadline):
    """Run `predict_fn(image) -> (mean (2, h, w) raw, tiles)` on the whole image, or, with a deadline, tile by tile
    (blocks of `core` x `core` px: the same tiles and compute; only each block's halo is reflected instead of read
    from the neighbours) until the deadline passes. -> (mean with NaN where not done, tiles done, total tiles)."""
    h, w = img.shape
    if deadline is None or (h <= core and w <= core):
        mean, tiles = predict_fn(img)
        return mean, tiles, tiles
    mean = np.full((2, h, w), np.nan, np.float32)
    blocks = [(y0, x0) for y0 in range(0, h, core) for x0 in range(0, w, core)]
    done = 0
    for y0, x0 in blocks:
        mu, tiles = predict_fn(img[y0:y0 + core, x0:x0 + core])
        mean[:, y0:y0 + core, x0:x0 + core] = mu
        done += tiles
        if time.perf_counter() > deadline:
            break
    return mean, done, len(blocks)


def generic_predict(tile_fn, img: np.ndarray, norm, tile: int, halo: int, m: int) -> tuple[np.ndarray, int]:
    """predict_image's tiling (same layout, same reflect gathering, centre kept) around `tile_fn(x (1, 1, T, T)
    float32 normalised) -> mean (2, T, T) normalised`; raw mean out."""
    from denoisplit_zoo.sampling import _tile_layout, reflect_index

    h, w = img.shape
    cy, ny = _tile_layout(h, tile, m)
    cx, nx = _tile_layout(w, tile, m)
    x_norm = norm.normalize_input(img).astype(np.float32)
    tm = np.asarray(norm.target_mean, np.float32).reshape(2, 1, 1)
    ts = np.asarray(norm.target_std, np.float32).reshape(2, 1, 1)
    mean = np.empty((2, h, w), np.float32)
    for i in range(ny):
        for j in range(nx):
            y0, x0 = i * cy, j * cx
            rows = reflect_index(np.arange(y0 - halo, y0 + cy + halo), h)
            cols = reflect_index(np.arange(x0 - halo, x0 + cx + halo), w)
            t = np.ascontiguousarray(x_norm[np.ix_(rows, cols)])[None, None]
            mu = tile_fn(t)
            ey, ex = min(cy, h - y0), min(cx, w - x0)
            mean[:, y0:y0 + ey, x0:x0 + ex] = mu[:, halo:halo + ey, halo:halo + ex] * ts + tm
    return mean, ny * nx


def ort_session(path: str, threads: int, device: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    prov = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, so, providers=prov)


def ort_split_tile_fn(bu_sess, td_sess, k: int, chunk: int, seed: int, z_dim: int, n_levels: int, noise: bool):
    """sample_tile with ONNX Runtime: bottom-up once, top-down in chunks, the same counter-based noise slices."""
    def noise(shape, stream, start):  # sample_tile's slice of the counter-based stream (same numbers)
        try:
            from denoisplit_zoo.model import counter_normal

            return counter_normal(shape, seed, stream, torch.device("cpu"), start=start)
        except TypeError:  # older API: sampling.counter_normal_slice
            from denoisplit_zoo.sampling import counter_normal_slice

            n = 1
            for v in shape:
                n *= v
            return counter_normal_slice([k, *shape[1:]], seed, stream, start, n, torch.device("cpu"))

    def fn(x: np.ndarray) -> np.ndarray:
        bu = bu_sess.run(None, {"x": x})
        s1 = None
        for k0 in range(0, k, chunk):
            n = min(chunk, k - k0)
            feeds = {f"bu{i}": np.repeat(v, n, 0) for i, v in enumerate(bu)}
            for i, v in enumerate(bu):
                inner = z_dim * v.shape[2] * v.shape[3]
                if noise:
                    e = noise([n, z_dim, v.shape[2], v.shape[3]], i, k0 * inner).numpy()
                else:
                    e = np.zeros((n, z_dim, v.shape[2], v.shape[3]), np.float32)
                feeds[f"eps{i}"] = e
            out = td_sess.run(None, feeds)[0].astype(np.float64)
            s1 = out.sum(0) if s1 is None else s1 + out.sum(0)
        return (s1 / k).astype(np.float32)

    return fn


def export_split_onnx(sampler, path_bu: str, path_td: str) -> None:
    """Bottom-up and top-down of the sampler's LadderVAE as two ONNX graphs (legacy exporter, opset 17)."""
    vae = sampler.vae
    n = vae.n_levels

    class BU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return tuple(self.vae.bottom_up(x))

    class TD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, *args):
            out, _ = self.vae.top_down(list(args[:n]), list(args[n:]), False)
            return out[:, :2]

    m = vae.multiple
    x = torch.zeros(1, 1, 4 * m, 4 * m)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose (opset 17)
        bu = vae.bottom_up(x)
        torch.onnx.export(BU().eval(), (x,), path_bu, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=[f"bu{i}" for i in range(n)],
                          dynamic_axes={"x": {0: "b", 2: "y", 3: "x"},
                                        **{f"bu{i}": {0: "b", 2: f"y{i}", 3: f"x{i}"} for i in range(n)}})
        eps = [torch.zeros(1, vae.z_dim, v.shape[2], v.shape[3]) for v in bu]
        names = [f"bu{i}" for i in range(n)] + [f"eps{i}" for i in range(n)]
        torch.onnx.export(TD().eval(), (*bu, *eps), path_td, dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"],
                          dynamic_axes={**{nm: {0: "n", 2: f"y{nm[-1]}", 3: f"x{nm[-1]}"} for nm in names},
                                        "out": {0: "n", 2: "y", 3: "x"}})


def pkg_tile_core(tile: int, halo: int, m: int, k: int, arch: dict, budget_gb: float) -> int | None:
    """Largest kept centre (multiple of m, <= tile) whose K-sample batch fits the budget (auto_chunk's deliberately
    high estimate: ~12 feature maps + a latent map per sample at the tile's resolution), or None."""
    per_px = 4.0 * k * (12 * arch["n_filters"] + arch["z_dim"])
    core = (tile // m) * m
    while core >= m:
        if (core + 2 * halo) ** 2 * per_px <= budget_gb * 1e9:
            return core
        core -= m
    return None


# ------------------------------------------------------------------------------------------------------ the worker

def worker(spec: dict) -> dict:
    """One (variant, size, K) measurement in this process. Returns timings, tiles, memory; saves the mean if asked."""
    C.set_threads(spec["threads"])
    device = torch.device(spec["device"])
    variant, k, noise = spec["variant"], int(spec["k"]), bool(spec.get("noise", True))
    img = np.load(spec["image"])
    if device.type == "cuda":  # in-process: hand back the previous configuration's cached blocks (auto_chunk
        torch.cuda.empty_cache()  # sizes its chunks from the free memory)
    sampler, norm = build_sampler(spec, k, noise)
    vae = sampler.vae
    m, halo, tile = vae.multiple, int(spec["halo"]), int(spec["tile"])
    from denoisplit_zoo.sampling import _tile_layout, auto_chunk, predict_image

    core = _tile_layout(img.shape[0], tile, m)[0]
    chunk = int(spec.get("chunk") or auto_chunk(sampler, core + 2 * halo, core + 2 * halo))
    info = {"tile_core": core, "tile_px": core + 2 * halo, "chunk": chunk}
    if device.type == "cpu":
        info["base_rss_mb"] = C.peak_rss_mb()

    if variant in ("ref", "ref-tuned"):
        x_norm = norm.normalize_input(img).astype(np.float32)
        tm = np.asarray(norm.target_mean, np.float32).reshape(2, 1, 1)
        ts = np.asarray(norm.target_std, np.float32).reshape(2, 1, 1)
        info.update(tile_core=REF_GRID, tile_px=REF_PATCH, chunk=None, ref_batch=spec["ref_batch"])

        def run(deadline, warm=False):
            x = x_norm[:REF_GRID * 2, :REF_GRID * 2] if warm else x_norm
            mu, done, total = reference_predict(vae, x, 1 if warm else k, spec["ref_batch"], noise, device, deadline)
            return mu * ts + tm, done, total
    else:
        if variant in ("eager", "torchscript"):
            s = torch.jit.script(sampler) if variant == "torchscript" else sampler

            def predict_fn(im):
                r = predict_image(s, im, norm, tile=tile, halo=halo, chunk=chunk)
                return r["mean"], r["tiles"]

            def set_k(n):
                s.n_samples = n
        else:
            if variant == "onnx":
                bu_sess = ort_session(spec["onnx_bu"], spec["threads"], spec["device"])
                td_sess = ort_session(spec["onnx_td"], spec["threads"], spec["device"])
                state = {"k": k}

                def predict_fn(im):
                    fn = ort_split_tile_fn(bu_sess, td_sess, state["k"], chunk, spec["seed"], vae.z_dim, vae.n_levels,
                                           noise)
                    return generic_predict(fn, im, norm, tile, halo, m)

                def set_k(n):
                    state["k"] = n
            else:  # onnx-pkg: the shipped graph, K fixed inside
                core = spec["pkg_core"]
                info.update(tile_core=core, tile_px=core + 2 * halo, chunk=k)
                sess = ort_session(spec["onnx_pkg"], spec["threads"], spec["device"])

                def predict_fn(im):
                    return generic_predict(lambda x: sess.run(None, {"input": x})[0][0, :2], im, norm, core, halo, m)

                def set_k(n):
                    pass

        def run(deadline, warm=False):
            if warm:  # one tile with one chunk of samples: same shapes as the timed run
                set_k(min(k, chunk))
                try:
                    mu, t = predict_fn(img[:core, :core])
                finally:
                    set_k(k)
                return mu, t, t
            return ours_predict(predict_fn, img, core, deadline)

    from denoisplit_zoo.allocator import heap_allocations
    from denoisplit_zoo.sampling import cpu_channels_last

    tuned = variant == "ref-tuned" and device.type == "cpu"  # (ours sets both inside predict_image)
    with torch.no_grad(), cpu_channels_last(vae) if tuned else contextlib.nullcontext(), heap_allocations(tuned):
        for _ in range(2 if variant == "torchscript" else 1):  # TorchScript's profiling executor optimises on run 2
            run(None, warm=True)
        C.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        deadline = t0 + spec["time_limit"] if spec.get("time_limit") else None
        mean, done, total = run(deadline)
        C.sync(device)
        secs = time.perf_counter() - t0
    info.update(seconds=secs, tiles_done=done, tiles_total=total, fraction=done / total,
                seconds_full=secs * total / done)
    if device.type == "cuda":
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        info["peak_rss_mb"] = C.peak_rss_mb()
        info["peak_mem_mb"] = info["peak_rss_mb"] - info["base_rss_mb"]
    if spec.get("save_mean"):
        np.save(spec["save_mean"], mean)
    return info


def run_config(args, spec: dict) -> dict:
    if args.isolate:
        return C.run_worker(__file__, spec, timeout=None)
    try:
        return worker(spec)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------------------- quality

def quality(means: dict, clean, k: int) -> dict:
    """means {variant: (2, H, W) raw MMSE, NaN where not done}; RI-PSNR vs clean and vs each other on the rows
    that eager and the reference finished; a variant that did not finish those rows is left out with a note."""
    from denoisplit_zoo.metrics import ri_psnr

    if "eager" not in means:
        return {}
    h = min(v.shape[1] for v in means.values())
    w = min(v.shape[2] for v in means.values())

    def done_rows(v):
        return np.isfinite(v[:, :h, :w]).all(0).all(1)

    ok = np.ones(h, bool)
    for n in ("eager", "ref", "ref-tuned"):
        if n in means:
            ok &= done_rows(means[n])
    rows = np.where(ok)[0]
    if rows.size == 0:
        return {"note": "no rows finished by both eager and the reference"}
    left_out = {n: "did not finish the rows eager and the reference finished" for n, v in means.items()
                if not done_rows(v)[rows].all()}
    means = {n: v for n, v in means.items() if n not in left_out}
    r0, r1 = rows[0], rows[-1] + 1
    cut = {n: v[:, r0:r1, :w] for n, v in means.items()}
    out = {"k": k, "region": [int(r0), int(r1), 0, int(w)], **{n: {"note": why} for n, why in left_out.items()}}
    e = cut["eager"]
    for n, v in cut.items():
        row = {}
        if clean is not None:
            row["ri_psnr_vs_clean"] = float(np.mean([ri_psnr(clean[c, r0:r1, :w], v[c]) for c in range(2)]))
        if n != "eager":
            row["ri_psnr_vs_eager"] = float(np.mean([ri_psnr(e[c], v[c]) for c in range(2)]))
            row["max_abs_diff_vs_eager_rel"] = float(np.abs(v - e).max() / (np.abs(e).max() + 1e-12))
        out[n] = row
    return out


# ---------------------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="trained run folder (default: random weights of --preset)")
    ap.add_argument("--data", help="data file for the run's test images when the run's own data path is unreadable")
    ap.add_argument("--channels", nargs=2, type=int, help="channels of --data (default: the run's)")
    ap.add_argument("--preset", default="small", choices=list(PRESET_ARCH))
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--samples", nargs="+", type=int, default=[1, 16, 50])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tile", type=int, default=512, help="our kept tile centre (px); the product's default is 512")
    ap.add_argument("--halo", type=int, help="our halo (default: sampling.measure_halo)")
    ap.add_argument("--chunk", type=int, help="our top-down batch (default: sampling.auto_chunk)")
    ap.add_argument("--ref-batch", type=int, default=32, help="tiles per reference forward pass")
    ap.add_argument("--threads", type=int, help="intra-op threads (torch and ONNX Runtime); default: torch's")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="CUDA TF32 for convs and matmuls (the matmul rate is measured both ways)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="per-configuration seconds after which a run stops and is extrapolated (0: never)")
    ap.add_argument("--mem-budget-gb", type=float, default=4.0, help="memory the onnx-pkg K-batch may use")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="one worker process per configuration (CPU peak memory); auto = yes on CPU")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes / K, tiny preset, seconds")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec)), flush=True)
        return

    if args.quick:
        if not args.run:
            args.preset = "tiny"
        args.sizes, args.samples = [128, 256], [1, 4]
        args.tile, args.time_limit = 128, 20.0
    args.isolate = (args.device == "cpu") if args.isolate == "auto" else args.isolate == "yes"
    threads = C.set_threads(args.threads)
    args.threads = threads
    device = torch.device(args.device)
    if device.type == "cuda" and args.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    sizes = sorted(args.sizes)
    variants = list(args.variants)
    skipped = {}
    if any(v.startswith("onnx") for v in variants):
        try:
            import onnxruntime as ort

            if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ImportError("onnxruntime has no CUDAExecutionProvider here")
        except ImportError as e:
            for v in [v for v in variants if v.startswith("onnx")]:
                variants.remove(v)
                skipped[v] = f"onnxruntime unavailable ({e})"

    # the model (architecture, weights only to measure the halo and export ONNX here; workers rebuild it)
    spec0 = {"seed": args.seed, "device": args.device, "threads": threads, "run": args.run}
    imgs, cleans, img_desc = load_images(args, sizes)
    if args.run:
        from denoisplit_zoo.export import architecture_kwargs
        from denoisplit_zoo.run_folder import load_run

        run = load_run(args.run)
        arch = {k: v for k, v in architecture_kwargs(run, 1, args.seed).items()
                if k in ("n_levels", "z_dim", "n_filters", "dropout", "out_channels", "patch_size")}
        model_desc = f"run {args.run} (preset {run.config.preset})"
    else:
        arch = random_arch(args.preset)
        spec0["norm"] = [float(imgs[sizes[0]].mean()), float(imgs[sizes[0]].std())]
        model_desc = f"random weights, preset {args.preset}"
    spec0["arch"] = arch
    s_cpu, _ = build_sampler({**spec0, "device": "cpu"}, 1)
    from denoisplit_zoo.model import count_parameters
    from denoisplit_zoo.sampling import measure_halo

    m = s_cpu.vae.multiple
    t = time.perf_counter()
    halo = int(args.halo) if args.halo else measure_halo(s_cpu.vae)
    halo_s = time.perf_counter() - t
    print(f"model: {model_desc}, {count_parameters(s_cpu.vae):,} parameters; halo {halo} px ({halo_s:.1f} s); "
          f"images: {img_desc}; threads {threads}; device {args.device}", flush=True)

    # measured matmul rate with the same threads / TF32 setting
    mm_n = 1024 if args.quick else 2048
    mm = {"n": mm_n, "fp32_gflops": C.matmul_gflops(device, mm_n, 3 if args.quick else 5)}
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        for tf in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf
            mm[f"tf32_{'on' if tf else 'off'}_gflops"] = C.matmul_gflops(device, 4096, 10)
        torch.backends.cuda.matmul.allow_tf32 = old
        mm["fp32_gflops"] = mm["tf32_on_gflops" if old else "tf32_off_gflops"]
    print(f"measured fp32 matmul: {mm['fp32_gflops']:.1f} GFLOP/s ({mm_n}^3)", flush=True)

    # FLOPs per tile (meta device): reference 128 x 128, ours at the tile each size uses
    flops_cache: dict = {}

    def tile_flops(px: int) -> tuple[float, float]:
        if px not in flops_cache:
            flops_cache[px] = count_flops(arch, px, px)
        return flops_cache[px]

    fb_ref, ft_ref = tile_flops(REF_PATCH)
    flops_info = {"bottom_up_per_px": fb_ref / REF_PATCH**2, "top_down_per_px_per_sample": ft_ref / REF_PATCH**2,
                  "counted": "torch.utils.flop_counter (convolutions, transposed convolutions, matmuls)"}

    tmp = tempfile.mkdtemp(prefix="bench_inf_")
    atexit.register(shutil.rmtree, tmp, True)  # images, graphs and means of this run only
    img_paths = {}
    for s in sizes:
        img_paths[s] = os.path.join(tmp, f"img{s}.npy")
        np.save(img_paths[s], imgs[s])
    spec0.update(halo=halo, tile=args.tile, chunk=args.chunk, ref_batch=args.ref_batch,
                 time_limit=args.time_limit or None)
    if "onnx" in variants:
        spec0["onnx_bu"], spec0["onnx_td"] = os.path.join(tmp, "bu.onnx"), os.path.join(tmp, "td.onnx")
        export_split_onnx(s_cpu, spec0["onnx_bu"], spec0["onnx_td"])

    results, qual = [], {}

    def dump(complete: bool) -> dict:
        """The JSON document; written after every configuration (a killed run keeps what it measured)."""
        doc = {"benchmark": "inference", "complete": complete, "machine": C.machine_info(device), "matmul": mm,
               "model": model_desc, "arch": arch, "halo": halo, "images": img_desc, "flops": flops_info,
               "tile": args.tile, "ref_batch": args.ref_batch, "time_limit": args.time_limit, "quick": args.quick,
               "skipped": skipped, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "results": results, "quality": qual}
        C.write_json(args.json, doc)
        return doc

    for k in sorted(args.samples):
        pkg_path = None
        for size in sizes:
            means = {}
            for variant in variants:
                spec = {**spec0, "variant": variant, "k": k, "image": img_paths[size]}
                if variant == "onnx-pkg":
                    core = pkg_tile_core(args.tile, halo, m, k, arch, args.mem_budget_gb)
                    if core is None:
                        results.append({"variant": variant, "size": size, "k": k,
                                        "skipped": f"K={k} does not fit {args.mem_budget_gb} GB at any tile"})
                        continue
                    if pkg_path is None:
                        from denoisplit_zoo.export import save_onnx

                        pkg_path = os.path.join(tmp, f"pkg_k{k}.onnx")
                        sk, _ = build_sampler({**spec0, "device": "cpu"}, k)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", DeprecationWarning)
                            save_onnx(sk, Path(pkg_path), torch.zeros(1, 1, 2 * halo + m, 2 * halo + m))
                    spec.update(onnx_pkg=pkg_path, pkg_core=core)
                if size == sizes[0] and not args.no_quality:
                    spec["save_mean"] = os.path.join(tmp, f"mean_{variant}_{size}_{k}.npy")
                r = run_config(args, spec)
                row = {"variant": variant, "size": size, "k": k, **r}
                if "error" not in r:
                    mpx = size * size / 1e6 if not variant.startswith("ref") else (size // REF_GRID * REF_GRID) ** 2 / 1e6
                    row["mpx_s"] = mpx / r["seconds_full"]
                    fb, ft = tile_flops(r["tile_px"])
                    if variant in ("ref", "ref-tuned"):
                        ex = r["tiles_done"] * k * (fb + ft)
                    else:
                        ex = r["tiles_done"] * (fb + k * ft)
                    row["gflop"] = ex / 1e9
                    row["gflops"] = ex / r["seconds"] / 1e9
                    row["pct_matmul"] = 100 * row["gflops"] / mm["fp32_gflops"]
                    row["flop_per_out_px"] = ex / (mpx * 1e6 * r["fraction"])
                    if spec.get("save_mean") and os.path.exists(spec["save_mean"]):
                        means[variant] = np.load(spec["save_mean"])
                results.append(row)
                dump(complete=False)
                print(f"  {variant:12s} {size:5d}px K={k:3d}: "
                      + (r["error"] if "error" in r else
                         f"{row['mpx_s']:.4f} Mpx/s, {row['gflops']:.1f} GFLOP/s ({row['pct_matmul']:.0f}% matmul), "
                         f"peak {r['peak_mem_mb']:.0f} MB, done {r['fraction']:.2f}"), flush=True)
            if means:
                qual[f"K={k}"] = quality(means, cleans[size], k)
        for row in results:  # ratio to the reference at the same size and K
            if row.get("k") == k and "mpx_s" in row:
                ref = next((r for r in results if r["variant"] == "ref" and r["size"] == row["size"]
                            and r["k"] == k and "mpx_s" in r), None)
                row["ratio_to_ref"] = row["mpx_s"] / ref["mpx_s"] if ref else None

    # deterministic agreement (posterior means, eps = 0): only the reference's 32-px margin differs
    if not args.no_quality and "ref" in variants and "eager" in variants:
        means = {}
        for variant in ("ref", "eager"):
            spec = {**spec0, "variant": variant, "k": 1, "noise": False, "image": img_paths[sizes[0]],
                    "time_limit": None, "save_mean": os.path.join(tmp, f"det_{variant}.npy")}
            r = run_config(args, spec)
            if "error" not in r:
                means[variant] = np.load(spec["save_mean"])
        qual["posterior_mean_eps0"] = quality(means, cleans[sizes[0]], 1)

    out = dump(complete=True)
    cols = [("variant", "variant", 0), ("size", "size", 0), ("K", "k", 0), ("Mpx/s", "mpx_s", 4),
            ("× ref", "ratio_to_ref", 2), ("GFLOP/s", "gflops", 1), ("% matmul", "pct_matmul", 1),
            ("MFLOP/out px", "_mflop_px", 2), ("peak MB", "peak_mem_mb", 0), ("RSS MB", "peak_rss_mb", 0),
            ("tile", "tile_px", 0),
            ("chunk", "chunk", 0), ("done", "fraction", 2)]
    for r in results:
        if "flop_per_out_px" in r:
            r["_mflop_px"] = r["flop_per_out_px"] / 1e6
    table = [r for r in results if "mpx_s" in r]
    print()
    print(f"Inference, {model_desc}, halo {halo}, {threads} threads, {args.device}; fp32 matmul "
          f"{mm['fp32_gflops']:.1f} GFLOP/s")
    print(C.markdown_table(table, cols))
    bad = [r for r in results if "mpx_s" not in r]
    for r in bad:
        print(f"- {r['variant']} {r['size']} K={r['k']}: {r.get('skipped') or r.get('error')}")
    for v, why in skipped.items():
        print(f"- {v}: skipped, {why}")
    if qual:
        print("\nQuality (first size; RI-PSNR in dB; 'vs eager' = agreement with the product path):")
        qrows = []
        for key, q in qual.items():
            for v, row in q.items():
                if isinstance(row, dict):
                    qrows.append({"setting": key, "variant": v, **row})
        print(C.markdown_table(qrows, [("setting", "setting", 0), ("variant", "variant", 0),
                                       ("RI-PSNR vs clean", "ri_psnr_vs_clean", 2),
                                       ("RI-PSNR vs eager", "ri_psnr_vs_eager", 2),
                                       ("max|Δ|/max vs eager", "max_abs_diff_vs_eager_rel", 6)]))
    for r in results:
        r.pop("_mflop_px", None)
    C.write_json(args.json, out)


if __name__ == "__main__":
    main()
