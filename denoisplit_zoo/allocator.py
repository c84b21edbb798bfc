"""Keep large CPU tensors on glibc's heap while training or sampling, instead of a fresh mmap for each one.

Why: glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit) with a new mmap and
returns it to the kernel on free. Activation maps of a 704-px tile (32 filters x K samples) or of a paper-preset
batch are hundreds of MB, so every elementwise op then page-faults (and the kernel zeroes) its whole output again.
With mmap off and trimming deferred, freed blocks are reused. On this project's 2-core CPU
(benchmarks/bench_cpu_paths.py, 448/512-px tiles, K = 4): sampling of the trained small / paper W2S models 1.75x /
1.77x faster in NCHW, 1.53x / 1.34x on top of NHWC; training steps: benchmarks/README.md (bench_training.py, `heap`
rows). The same effect as preloading jemalloc/tcmalloc (what PyTorch's CPU launcher does), without touching the
user's environment.

The settings are process-wide, so they are applied only for the duration of the `with` block (outermost block wins
when nested) and the glibc defaults are restored afterwards, with `malloc_trim(0)` giving the peak back to the
system. Elsewhere than glibc (macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt parameters (malloc.h) and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536

_libc: Optional[ctypes.CDLL] = None
_depth = 0  # nesting level of enabled blocks
_active = False  # the outermost block's mallopt calls succeeded


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version  # only glibc has both this and the mallopt parameters above
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False  # type: ignore[assignment]
    return _libc or None


@contextmanager
def heap_allocations(enabled: bool = True) -> Iterator[bool]:
    """Within the block, large allocations come from the reused heap (glibc); yields whether that is in effect."""
    global _depth, _active
    lib = _glibc() if enabled else None
    if lib is None:
        yield _active  # nested inside an enabled block it is still in effect
        return
    outer = _depth == 0
    if outer:
        _active = lib.mallopt(_M_MMAP_MAX, 0) == 1 and lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _depth += 1
    try:
        yield _active
    finally:
        _depth -= 1
        if outer:
            # setting these once turns off glibc's dynamic mmap threshold; its fixed defaults are close enough
            lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            lib.malloc_trim(0)
            _active = False


__all__ = ["heap_allocations"]
