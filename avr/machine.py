"""The machine a run is on: its CPU's name, feature flags and bf16 support (which `avr.fit` reads to
choose the training precision, and `avr.bench` prints). A leaf: imports nothing from `avr`."""

from __future__ import annotations

import functools
import os
import platform

#: CPU flags that make bf16 matmuls fast (AVX512-BF16, Intel AMX).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo(key: str) -> str | None:
    """The first `key : value` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (`/proc/cpuinfo`; empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_bf16() -> set[str]:
    """Which of `BF16_FLAGS` the CPU has (empty: float32 only)."""
    return BF16_FLAGS & cpu_flags()


def describe() -> str:
    """One line naming the machine: CPU model, cores available, Python."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{cpu}, {len(os.sched_getaffinity(0))} core(s), Python {platform.python_version()}"


def release_freed_memory() -> bool:
    """Hand the memory glibc's allocator keeps after frees back to the system (`malloc_trim`).
    Large tensors freed in one step otherwise stay in the process's heap (glibc raises its mmap
    threshold after each large free), so the resident set grows toward the sum of every step's
    high-water marks. Returns whether anything was called (False off glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc():
    """glibc, loaded once (None on another C library or system)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
