"""Training-step throughput per preset: the plain fp32 loop vs bf16 autocast, channels_last, heap-reused memory.

Variants: `fp32` the plain loop (contiguous, default allocator); `bf16` autocast; `channels_last` NHWC weights and
batches; `heap` large CPU blocks from glibc's reused heap instead of a fresh mmap each (allocator.heap_allocations,
what training.train does on the CPU); combinations joined by '+'. `channels_last+heap` is the product's CPU loop.

One step = training.Trainer.step, exactly what training.train runs per batch: LadderVAE forward with KL
(torch.randn latents), the real `losses.loss_terms` (denoiSplit: GMM noise-model likelihood in fp32 + image-size KL
with free bits), backward, gradient-norm clip, the non-finite skip, Adamax step. The noise models have random PPN2V-init weights over an 8-bit signal range (this is
a throughput benchmark; their values do not change the cost). Batches are pre-generated synthetic patches on the
device, so data loading is NOT in the numbers (the product's loop adds its PatchDataset cost on top).

Per (preset, variant): samples/s over `--steps` steps after `--warmup` steps, ratio to plain fp32, peak memory (CPU:
peak RSS (VmHWM) of a fresh worker process per configuration, and its growth over the model-built baseline; CUDA:
torch.cuda.max_memory_allocated). Quality guard (item 4 of the issue: a fast path only becomes a default if it
keeps quality): every variant starts from the same weights and sees the same batches and the same latent noise, so
the loss trajectories are comparable step by step: `loss0 rel` = relative difference of the very first loss (same
weights, but under channels_last torch.randn_like fills in memory order, i.e. other latent draws), `max rel` = the
largest relative difference over all steps, `fixed-eps rel` = the first loss with FIXED latent noise in eval mode
(pure arithmetic difference of the variant), `finite` = no NaN/inf.

    python benchmarks/bench_training.py --quick --threads 1 --json /tmp/train.json
    python benchmarks/bench_training.py --presets tiny small paper --threads 16 \
        --json benchmarks/results/training_cpu.json
    python benchmarks/bench_training.py --presets small paper --device cuda --json $OUT/training_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# preset -> model (n_levels, z_dim, n_filters, dropout), train (patch_size, batch_size); mirrors config.PRESETS
PRESETS = {"tiny": ((3, 4, 8, 0.0), (32, 4)), "small": ((4, 32, 32, 0.1), (64, 16)),
           "paper": ((4, 128, 64, 0.1), (128, 32))}
VARIANTS = ("fp32", "bf16", "channels_last", "bf16+channels_last", "heap", "channels_last+heap")


def preset_dims(name: str) -> tuple[tuple, tuple]:
    dims = PRESETS[name]
    try:  # keep the table honest where pydantic is importable
        from denoisplit_zoo.config import PRESETS as P

        m, t = P[name]["model"], P[name]["train"]
        assert (m["n_levels"], m["z_dim"], m["n_filters"], t["patch_size"], t["batch_size"]) == \
            (*dims[0][:3], *dims[1]), "PRESETS table is stale"
    except ImportError:
        pass
    return dims


def synthetic_batches(n: int, batch: int, patch: int, device, seed: int = 0):
    """n batches of (normalised input (B, 1, P, P), raw noisy targets (B, 2, P, P)) in an 8-bit-like range."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        clean = torch.nn.functional.avg_pool2d(torch.rand(batch, 2, patch, patch, generator=g), 5, 1, 2) * 200
        noisy = clean + torch.randn(clean.shape, generator=g) * 10
        x = noisy.sum(1, keepdim=True)
        x = (x - 200.0) / 40.0
        out.append((x.to(device), noisy.to(device)))
    return out


def worker(spec: dict) -> dict:
    from denoisplit_zoo.config import build_run_config
    from denoisplit_zoo.losses import loss_terms
    from denoisplit_zoo.noise_model import GMMNoiseModel
    from denoisplit_zoo.normalization import Normalization
    from denoisplit_zoo.training import Trainer

    C.set_threads(spec["threads"])
    device = torch.device(spec["device"])
    (n_levels, z_dim, n_filters, dropout), (patch, batch) = preset_dims(spec["preset"])
    batch = spec.get("batch_size") or batch
    variant = spec["variant"]
    bf16 = "bf16" in variant
    cl = "channels_last" in variant
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # the preset's network and optimizer; full KL weight from step 0 and no device-default autocast: the variants
    # below choose the memory format and the autocast themselves
    cfg = build_run_config(spec["preset"], {"data": {"path": "synthetic.npz"},
                                            "train": {"batch_size": batch, "kl_warmup_steps": 0, "amp": False}})
    nms = [GMMNoiseModel.init_for_range(0.0, 255.0, seed=c).to(device) for c in range(2)]
    norm = Normalization(200.0, 40.0, [100.0, 100.0], [50.0, 50.0])  # the synthetic batches' scale
    torch.manual_seed(0)
    trainer = Trainer(cfg, norm, nms, device, memory_format=torch.channels_last if cl else torch.contiguous_format,
                      amp_dtype=torch.bfloat16 if bf16 else None).to_device()
    model = trainer.model
    shapes = trainer.latent_shapes
    n_total = spec["warmup"] + spec["steps"]
    batches = synthetic_batches(min(n_total, 8), batch, patch, device)
    if cl:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    info = {}
    if device.type == "cpu":
        info["base_rss_mb"] = C.peak_rss_mb()

    # numeric guard: the first loss with FIXED latent noise in eval mode (no dropout), same weights and batch in
    # every variant, so its difference to fp32 is purely the variant's arithmetic (randn_like draws differ under
    # channels_last: it fills in memory order, so the training losses below also differ by the latent draw)
    g = torch.Generator().manual_seed(2)
    x0, y0 = batches[0]
    eps = [torch.randn(batch, z_dim, h, w, generator=g).to(device) for _, h, w in shapes]
    model.eval()
    with torch.no_grad(), amp:
        pred0, kls0 = model.top_down(model.bottom_up(x0), eps, True)
    det = loss_terms("denoisplit", pred0.float(), [k.float() for k in kls0], y0, latent_shapes=shapes,
                     noise_models=nms, target_mean=trainer.t_mean, target_std=trainer.t_std, kl_weight=1.0,
                     free_bits=1.0)
    info["loss_fixed_eps"] = float(det.total)
    losses = []

    def step(i):
        terms = trainer.step(*batches[i % len(batches)])
        losses.append(float(terms.total.detach()))

    model.train()
    torch.manual_seed(1)  # same dropout / latent draws in every variant
    from denoisplit_zoo.allocator import heap_allocations

    with heap_allocations("heap" in variant and device.type == "cpu"):
        for i in range(spec["warmup"]):
            step(i)
        C.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(spec["warmup"], n_total):
            step(i)
        C.sync(device)
        secs = time.perf_counter() - t0
    info.update(seconds=secs, samples_s=spec["steps"] * batch / secs, step_ms=1000 * secs / spec["steps"],
                batch_size=batch, patch_size=patch, losses=losses, finite=bool(np.isfinite(losses).all()))
    if device.type == "cuda":
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        info["peak_rss_mb"] = C.peak_rss_mb()
        info["peak_mem_mb"] = info["peak_rss_mb"] - info["base_rss_mb"]
    return info


def per_preset(ap, flag: str, values: list[str]) -> dict:
    """['20', 'paper=8'] -> {None: 20, 'paper': 8} (None: every preset not named)."""
    out: dict = {}
    for v in values:
        key, _, num = v.rpartition("=")
        if (key and key not in PRESETS) or not num.isdigit() or int(num) < 1:
            ap.error(f"{flag}: expected N or PRESET=N with PRESET in {list(PRESETS)}, got {v!r}")
        out[key or None] = int(num)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"], choices=list(PRESETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--steps", nargs="+", default=["20"], metavar="[PRESET=]N",
                    help="timed steps: N for every preset and/or PRESET=N for one (e.g. 20 paper=8)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", nargs="+", default=[], metavar="[PRESET=]N",
                    help="override the presets' batch size: N for every preset and/or PRESET=N for one")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="one worker process per configuration (CPU peak memory); auto = yes on CPU")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny + small, few steps")
    ap.add_argument("--json")
    C.add_worker_option(ap)
    args = ap.parse_args()
    if C.serve_worker(args, worker):
        return
    if args.quick:
        args.presets, args.steps, args.warmup = ["tiny", "small"], ["4"], 1
    steps, batch = per_preset(ap, "--steps", args.steps), per_preset(ap, "--batch-size", args.batch_size)
    threads = C.set_threads(args.threads)
    device = torch.device(args.device)
    isolate = (args.device == "cpu") if args.isolate == "auto" else args.isolate == "yes"
    mm = C.matmul_gflops(device, 1024 if args.quick else 2048, 3 if args.quick else 5)
    print(f"threads {threads}, device {args.device}, fp32 matmul {mm:.1f} GFLOP/s", flush=True)
    rows = []
    for preset in args.presets:
        base = None
        for variant in args.variants:
            spec = {"preset": preset, "variant": variant, "device": args.device, "threads": threads,
                    "steps": steps.get(preset, steps.get(None)), "warmup": args.warmup,
                    "batch_size": batch.get(preset, batch.get(None))}
            if isolate:
                r = C.run_worker(__file__, spec)
            else:
                try:
                    r = worker(spec)
                except Exception as e:  # noqa: BLE001
                    r = {"error": f"{type(e).__name__}: {e}"}
            row = {"preset": preset, "variant": variant, "steps": spec["steps"], **r}
            if "error" not in r:
                if variant == "fp32":
                    base = row
                if base is not None:
                    row["ratio_to_fp32"] = row["samples_s"] / base["samples_s"]
                    a, b = np.asarray(base["losses"]), np.asarray(row["losses"])
                    n = min(len(a), len(b))
                    rel = np.abs(a[:n] - b[:n]) / np.maximum(np.abs(a[:n]), 1e-12)
                    row["loss0_rel_diff"] = float(rel[0])
                    row["fixed_eps_rel_diff"] = abs(row["loss_fixed_eps"] - base["loss_fixed_eps"]) / max(
                        abs(base["loss_fixed_eps"]), 1e-12)
                    row["loss_max_rel_diff"] = float(rel.max())
                row["final_loss"] = r["losses"][-1]
            rows.append(row)
            C.write_json(args.json, {"benchmark": "training", "complete": False, "results": rows})
            print(f"  {preset:6s} {variant:20s} " + (r["error"] if "error" in r else
                  f"{r['samples_s']:.1f} samples/s, peak {r['peak_mem_mb']:.0f} MB, finite {r['finite']}"),
                  flush=True)
    out = {"benchmark": "training", "complete": True, "machine": C.machine_info(device), "matmul_fp32_gflops": mm,
           "steps": {k or "all": v for k, v in steps.items()}, "warmup": args.warmup, "quick": args.quick,
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": rows}
    print()
    print(f"Training step throughput, {threads} threads, {args.device} (data loading excluded)")
    print(C.markdown_table([r for r in rows if "samples_s" in r], [
        ("preset", "preset", 0), ("variant", "variant", 0), ("batch", "batch_size", 0), ("patch", "patch_size", 0),
        ("steps", "steps", 0), ("samples/s", "samples_s", 2), ("ms/step", "step_ms", 1), ("× fp32", "ratio_to_fp32", 2),
        ("peak MB", "peak_mem_mb", 0), ("fixed-eps rel", "fixed_eps_rel_diff", 6), ("loss0 rel", "loss0_rel_diff", 5),
        ("max rel", "loss_max_rel_diff", 5),
        ("final loss", "final_loss", 4), ("finite", "finite", 0)]))
    for r in rows:
        if "error" in r:
            print(f"- {r['preset']} {r['variant']}: {r['error']}")
    C.write_json(args.json, out)


if __name__ == "__main__":
    main()
