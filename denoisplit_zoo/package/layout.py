"""What a denoisplit-zoo package zip holds and how its tensors are named: the contract between the writer, the rdf
description, the reader and every consumer (bioimageio.core, deepImageJ, ilastik). Nothing here imports torch or
bioimageio (only config's constants), so any side can import it."""

from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_SEED

# File names inside the package (flat: bioimage.io packages are one folder).
STATE_DICT_FILE = "weights.pt"
TORCHSCRIPT_FILE = "weights_torchscript.pt"
ONNX_FILE = "weights.onnx"
ARCHITECTURE_FILE = "model.py"
TEST_INPUT_FILE = "test_input.npy"
TEST_OUTPUT_FILE = "test_output.npy"
SAMPLE_INPUT_FILE = "sample_input.tif"
COVER_FILE = "cover.png"

# The architecture a package's pytorch_state_dict entry names: this installation's model.py, shipped verbatim (it
# imports only torch). Compared byte for byte before a self-test runs a zip's copy (package/zoo.py).
MODEL_SOURCE = Path(__file__).resolve().parent.parent / "model.py"

ONNX_OPSET = 17  # legacy exporter: opset 17 -> IR 8, the newest onnxruntime-java 1.12/1.13 (deepImageJ) loads
MAX_ONNX_IR = 8

# The `pytorch_version` the weights entries declare: the oldest torch the package's TorchScript and state-dict weights
# are verified on (`python benchmarks/zoo_runtimes.py ZIP`, runtime torch-2.0.1: bioimageio.core's test passes;
# docs/zoo_runtimes.md), not the exporting one: a runner that builds its environment from the rdf would otherwise
# pin today's torch. 2.0.1 is also the newest TorchScript engine of JDLL (deepImageJ). Re-verify when model.py changes.
VERIFIED_TORCH = "2.0.1"

# The exported module's posterior samples and seed when the recipe / CLI do not say (K = 16: the CPU cost of a
# zoo-side prediction stays in seconds; evaluation uses the paper's 50, config.DEFAULT_SAMPLES).
PACKAGE_SAMPLES = 16
PACKAGE_SEED = DEFAULT_SEED

# Tensor ids: one input (B, 1, Y, X) raw intensities; one output (B, 4, Y, X) = MMSE A, MMSE B, std A, std B (raw).
INPUT_NAME = "input"
OUTPUT_NAME = "prediction"

# SplitSampler's constructor arguments: the only keys a package's config.denoisplit.architecture may hold.
ARCH_KEYS = ("n_levels", "z_dim", "n_filters", "dropout", "out_channels", "patch_size", "n_samples", "seed",
             "sample_latents", "n_gaussians", "n_coeffs")
# What a package may declare for each of them (type, min, max): generous for any real model, small enough that a
# hostile rdf.yaml cannot make a reader build a network of 10^12 parameters (package/reader.architecture).
ARCH_LIMITS = {"n_levels": (int, 1, 8), "z_dim": (int, 1, 1024), "n_filters": (int, 1, 1024),
               "dropout": (float, 0.0, 0.99), "out_channels": (int, 1, 8), "patch_size": (int, 8, 4096),
               "n_samples": (int, 1, 10_000), "seed": (int, 0, 2**31 - 1), "sample_latents": (bool, 0, 1),
               "n_gaussians": (int, 1, 64), "n_coeffs": (int, 1, 16)}
# Keys packages written by earlier versions use, and their present names (the reader renames them).
LEGACY_ARCH_KEYS = {"noise": "sample_latents"}


def postprocessing_gain_offset(norm) -> tuple[list[float], list[float]]:
    """Per-channel scale_linear that turns the module output (normalised target units) into raw units, for a
    data.Normalization `norm`: means x * sigma + mu, stds x * sigma."""
    sa, sb = (float(v) for v in norm.target_std)
    ma, mb = (float(v) for v in norm.target_mean)
    return [sa, sb, sa, sb], [ma, mb, 0.0, 0.0]


# Valid input sizes along y and x: every size from the minimum up (step 1). The graph pads to its 2**n_levels grid
# itself; a block that bioimageio.core places off that grid (the last block along a side that is not a multiple of
# 2**n_levels) computes on a shifted grid, which changes the posterior mean by less than re-sampling does (measured
# in docs/package_sizes.md), so no size is refused for it.
INPUT_STEP = 1


# The block the model card recommends for `bioimageio predict --blockwise N`: 2 * halo + BLOCK_CORE pixels, i.e.
# N = BLOCK_CORE - 1 (block = min + N). BLOCK_CORE is a multiple of every grid (2**n_levels <= 256), so each block
# starts on the network's grid; 512 keeps the overlap cost of an 80-px halo at (672 / 512)**2 = 1.7x.
BLOCK_CORE = 512
BLOCKWISE_N = BLOCK_CORE - 1  # min_input_size(halo) + BLOCKWISE_N = 2 * halo + BLOCK_CORE


def min_input_size(halo: int) -> int:
    """Smallest valid y/x size (pixels): bioimage.io requires min - 2*halo >= 1 (one pixel of output outside the
    halo); smaller images run in the graph too (it pads them), but the spec's halo rule forbids declaring them."""
    return 2 * halo + 1
