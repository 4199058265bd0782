"""`avr.machine`: what the run's machine is, and the allocator's freed memory handed back."""

import platform

import pytest
import torch

from avr.machine import release_freed_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_in_the_middle_of_the_heap_goes_back_to_the_system():
    big = torch.ones(4_000_000)
    del big  # a large block freed: glibc raises its mmap threshold, later blocks use the heap
    blocks = [torch.ones(1_000_000) for _ in range(200)]  # 800 MB
    kept = blocks[1::2]  # every other block freed: holes the heap does not give back by itself
    del blocks
    held = _resident_mb()
    assert release_freed_memory()
    assert _resident_mb() < held - 200, "the 400 MB of holes stayed resident"
    del kept
