"""Where a trained run's latents carry information: the KL per hierarchy level (nats per image pixel, the unit
the denoiSplit loss uses) and per latent channel, on the run's validation tiles (docs/quality.md, "collapsed").

A latent channel whose KL is ~0 has a posterior equal to its prior: it transmits nothing about the input, so the
decoder cannot use it. A LadderVAE that keeps one or two active channels per level cannot represent the fine
detail of two structures, whatever the loss says; this is the check to run before training such a model longer.

    python benchmarks/latent_usage.py RUN_DIR [--data PATH] [--checkpoint best|last] [--tiles 64] [--repeats 4] \
        [--threads N] [--json PATH] [--quick]

The KL is the training loss's own one-sample Monte-Carlo estimate (model._mc_kl), averaged over `--repeats`
draws; the per-channel split is recorded by wrapping model._mc_kl for the duration of the call (the model has no
per-channel output because training never needs one).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import denoisplit_zoo.model as model_module  # noqa: E402
from denoisplit_zoo.data import validation_tiles  # noqa: E402
from denoisplit_zoo.run_folder import load_run, prepare_run_split  # noqa: E402

ACTIVE_NATS = 0.05  # nats per latent position: above this a channel counts as transmitting information


@contextlib.contextmanager
def per_channel_kl(record: list):
    """Within the block, every KL the model computes also appends its (channels,) mean per latent position."""
    original = model_module._mc_kl

    def recording(z, eps, std_q, p_params):
        element = model_module.mc_kl_elements(z, eps, std_q, p_params)
        record.append((element.mean(dim=(0, 2, 3)), element.shape[2] * element.shape[3]))
        return original(z, eps, std_q, p_params)

    model_module._mc_kl = recording
    try:
        yield
    finally:
        model_module._mc_kl = original


def latent_usage(run_dir: str, data: str | None = None, checkpoint: str = "best", tiles: int = 64,
                 repeats: int = 4, seed: int = 0) -> dict:
    """Per-level KL (nats per image pixel; level 0 = finest) and per-channel KL (nats per latent position) of the
    run's weights on up to `tiles` validation tiles."""
    torch.manual_seed(seed)
    run = load_run(run_dir, checkpoint)
    val, _ = prepare_run_split(run, "val", data)
    x, _ = validation_tiles(val, run.norm, run.config.train.patch_size, max_tiles=tiles)
    n_levels = run.model.n_levels
    per_level = torch.zeros(n_levels)
    per_channel = None
    with torch.no_grad():
        for _ in range(repeats):
            record: list = []
            with per_channel_kl(record):
                _, kls = run.model(x, compute_kl=True)
            pixels = x.shape[-2] * x.shape[-1]
            level = torch.stack([k.mean() for k in kls]) / pixels
            # the top-down pass visits the top level first; kls is ordered finest first
            record = record[::-1]
            channels = torch.stack([c for c, _ in record])
            # the recorded channels must add up to the loss's own KL, or the wrapper caught the wrong calls
            again = torch.stack([c.sum() * n for c, n in record]) / pixels
            assert torch.allclose(again, level, rtol=1e-3, atol=1e-6), (again, level)
            per_level += level
            per_channel = channels if per_channel is None else per_channel + channels
    per_level /= repeats
    per_channel /= repeats
    levels = []
    for i in range(n_levels):
        ch = sorted(per_channel[i].tolist(), reverse=True)
        levels.append({"level": i, "kl_nats_per_pixel": float(per_level[i]),
                       "active_channels": sum(v > ACTIVE_NATS for v in ch), "channels": len(ch),
                       "top_channels_nats_per_position": [round(v, 3) for v in ch[:5]]})
    return {"run": str(run_dir), "checkpoint": str(run.checkpoint), "tiles": int(x.shape[0]),
            "kl_nats_per_pixel": float(per_level.sum()), "active_threshold_nats": ACTIVE_NATS, "levels": levels}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data", default=None, help="the run's training data, where config.yaml's path is not valid here")
    ap.add_argument("--checkpoint", choices=["best", "last"], default="best")
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="16 tiles, one draw")
    a = ap.parse_args()
    C.set_threads(a.threads)
    tiles, repeats = (16, 1) if a.quick else (a.tiles, a.repeats)
    res = latent_usage(a.run, a.data, a.checkpoint, tiles, repeats)
    C.write_json(a.json, res)
    print(f"{res['run']} ({res['tiles']} validation tiles): KL {res['kl_nats_per_pixel']:.3f} nats/px in all")
    for lv in res["levels"]:
        print(f"  level {lv['level']} (0 = finest): {lv['kl_nats_per_pixel']:.4f} nats/px, "
              f"{lv['active_channels']}/{lv['channels']} channels active (> {ACTIVE_NATS} nats/position), "
              f"top {lv['top_channels_nats_per_position']}")


if __name__ == "__main__":
    main()
