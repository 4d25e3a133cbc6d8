"""qvla's own 2/4-bit weight kernel for x86 CPUs (csrc/lowbit.cpp, AVX2 + FMA), built on first use.

torch's CPU int4 kernel computes in bf16, which CPUs without bf16 instructions emulate: at one token it
is compute-bound at a third of the memory bandwidth, and it holds 2-bit rows as 4 bits. This kernel keeps
2-bit rows at 2 bits, expands 32 codes at a time in registers and multiplies them in fp32, so a single
token streams the packed weights at memory speed. For many tokens the packed rows are expanded to fp32
once per call and multiplied by the float GEMM (the expansion is then a small part of the work).

`available()` is False where the CPU lacks AVX2/FMA, no C++ compiler is found, or QVLA_LOWBIT=0; the
kernels then fall back to torch's int4 kernel (kernels.py), and `qvla bench` records which one ran.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "lowbit.cpp"
BLOCK = 32  # codes per block of the kernel's layout


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.cache
def extension():
    """The compiled module, or None (the reason is logged once)."""
    if os.environ.get("QVLA_LOWBIT", "1") == "0":
        return None
    if not _cpu_has_avx2_fma():
        log.info("lowbit kernel: this CPU has no AVX2/FMA; using torch's int4 kernel")
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="qvla_lowbit", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma"],
                    verbose=False)
    except Exception as e:  # no compiler, no ninja, ...: fall back, loudly
        log.warning("lowbit kernel could not be built (%s: %s); using torch's int4 kernel", type(e).__name__, e)
        return None


def available() -> bool:
    return extension() is not None


def block_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes in [0, 2**bits), K a multiple of 32 -> (N, K*bits/8) uint8 in the kernel's block layout:
    4 bits: byte j of a block = code j | code j+16 << 4; 2 bits: byte j = codes j, j+8, j+16, j+24."""
    n, k = codes.shape
    if k % BLOCK:
        raise ValueError(f"block_pack: K must be a multiple of {BLOCK}, got {k}")
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(n, k // BLOCK, per, BLOCK // per)
    out = torch.zeros(n, k // BLOCK, BLOCK // per, dtype=torch.uint8)
    for i in range(per):
        out |= c[:, :, i, :] << (bits * i)
    return out.reshape(n, k * bits // 8).contiguous()


def block_unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of block_pack -> (N, k) uint8 codes."""
    n, per = packed.shape[0], 8 // bits
    b = packed.reshape(n, k // BLOCK, 1, BLOCK // per)
    shifts = torch.arange(per, dtype=torch.uint8).view(1, 1, per, 1) * bits
    return ((b >> shifts) & (2**bits - 1)).reshape(n, k)
