"""argparse value types shared by the CLI modules: a bad number is one line naming the option, before any work."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# The in-graph latent noise is a counter-based hash of (seed, stream, index) in int64 arithmetic (model.py): a seed
# outside [0, 2**31) would alias another seed's noise (or overflow), so the CLI refuses it before any work.
MAX_SEED = 2**31 - 1


def latent_seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"the seed must be in 0 .. {MAX_SEED}, got {v}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (inf and nan refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def thread_count(text: str) -> int | str:
    """--threads: 'auto' or a positive integer."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}") from None


def add_threads(p: argparse.ArgumentParser) -> None:
    """The --threads option of every heavy command (cli._main applies it through runtime.use_threads)."""
    p.add_argument("--threads", type=thread_count, default="auto", metavar="N|auto",
                   help="CPU threads (default auto: the cores of this process's affinity mask that other processes "
                        "leave idle, at least 1; see docs/threads.md)")
