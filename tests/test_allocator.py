"""allocator.heap_allocations: applied on glibc, nested blocks share the outermost, settings restored afterwards."""

from __future__ import annotations

import platform

import pytest
import torch

from denoisplit_zoo import allocator
from denoisplit_zoo.allocator import heap_allocations


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings exist only in glibc")
def test_heap_allocations_nest_and_restore():
    with heap_allocations() as outer:
        assert outer and allocator._depth == 1
        with heap_allocations() as inner, heap_allocations(False) as off_inside:
            assert inner and off_inside  # nested: still the outer block's settings
            x = torch.ones(64, 1024, 1024)  # 256 MB: would be a fresh mmap without the block
            assert float(x.sum()) == 64 * 1024 * 1024
        assert allocator._depth == 1
    assert allocator._depth == 0 and not allocator._active
    with heap_allocations(False) as off:
        assert not off
    with pytest.raises(RuntimeError):  # an error inside the block still restores the defaults
        with heap_allocations():
            raise RuntimeError("boom")
    assert allocator._depth == 0 and not allocator._active
