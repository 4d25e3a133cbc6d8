"""Keeping freed activation memory in the process, for latency measurements on Linux (glibc).

glibc's malloc gives large freed blocks back to the OS: blocks above its mmap threshold are unmapped on
free, and the top of the heap is trimmed once more than the trim threshold is free. A fp32 prefill of a
7B decoder layer allocates and frees a dozen 4-12 MB activations, so every prefill faulted its pages in
again: 8,781 page faults per W8A8 prefill on a 2-core AMD EPYC (Zen 5) VM, 96 against 83 ms with them
kept, and none in bf16's (bench/int8_gemm.py, prefill_page_faults). `keep_freed_memory()` raises both
thresholds (mallopt), as a deployment would by preloading jemalloc or tcmalloc (the advice of PyTorch's
CPU performance guides): freed blocks are reused, and the process keeps its peak heap. It is the
process's setting, so every form a benchmark times in that process runs with it. The benchmarks call it
and record what they set; QVLA_KEEP_FREED=0 leaves glibc's defaults (to measure the difference).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (on 64-bit): blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: never trim below 2 GiB free

_state: dict = {"malloc": "default"}


def keep_freed_memory() -> dict:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls only report) -> what
    was set, also given by `state()`. Where the C library is not glibc, or QVLA_KEEP_FREED=0, nothing
    changes and the state says why."""
    if _state["malloc"] != "default":
        return dict(_state)
    if os.environ.get("QVLA_KEEP_FREED", "1") == "0":
        _state.update(malloc="default (QVLA_KEEP_FREED=0)")
        return dict(_state)
    if platform.libc_ver()[0] != "glibc":  # e.g. musl, whose mallopt accepts nothing
        _state.update(malloc="default (not glibc)")
        return dict(_state)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        _state.update(malloc="default (no glibc mallopt)")
        return dict(_state)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    set_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    set_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not (set_mmap and set_trim):  # recorded, not raised: the timings are still valid, only without it
        _state.update(malloc=f"default (mallopt refused: mmap threshold {'set' if set_mmap else 'refused'}, "
                             f"trim threshold {'set' if set_trim else 'refused'})")
        return dict(_state)
    _state.update(malloc="glibc, freed memory kept", mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
    return dict(_state)


def state() -> dict:
    """What keep_freed_memory() set in this process ({"malloc": "default"} before it runs)."""
    return dict(_state)
