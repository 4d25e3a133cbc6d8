"""qvla's own 2/4/8-bit weight kernel for x86 CPUs (csrc/lowbit.cpp, AVX2; AVX-512 VNNI where the CPU has
it), built on first use.

torch's CPU int4 kernel computes in bf16, which CPUs without bf16 instructions emulate: at one token it
is compute-bound at a third of the memory bandwidth, and it holds 2-bit rows as 4 bits. This kernel keeps
2-bit rows at 2 bits and multiplies them with the activations in integers, 32 codes per instruction (8-bit
rows too: kernels.py runs small 8-bit buckets on it, where fbgemm's fixed cost per call dominates). The
activations are rounded per token on the plan's grid: once at A8 (int8) and A4 (the 4-bit grid), in two
int8 passes at A16 (the second carrying the first one's residual: ~14-bit). A block of rows stays in cache
while every token passes over it, so one token streams the packed weights at memory speed and a prefill
reads them from memory once.

On CPUs with AVX-512 VNNI the products run 64 codes per instruction (vpdpbusd) on tiles of 4 rows x 4
tokens; the integer sums are the AVX2 path's, so both give the same bits. `isa()` says which one runs;
QVLA_LOWBIT_ISA=avx2 keeps the AVX2 path on a VNNI CPU (to compare the two).

The same module holds qvla's int8 GEMM (csrc/int8_gemm.cpp, AVX-512 VNNI: kernels.Int8Kernel's default there):
uint8 activations (each token on the plan's symmetric 8-bit grid, code + 128: round_sym8; at A4 the grid's codes
+ 64) times int8 rows laid out in panels of 64, with Int8Kernel's epilogue in the same pass.

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
INT8_SOURCE = SOURCE.with_name("int8_gemm.cpp")  # the int8 GEMM, built into the same module
CFLAGS, LDFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp"]  # how extension() builds it


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_has_avx2_fma() -> bool:
    flags = _cpu_flags()  # F16C too: half_mm widens fp16 rows with it (every AVX2 CPU has it)
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def cpu_has_vnni() -> bool:
    """The CPU has AVX-512 VNNI (read from /proc/cpuinfo, so without building the extension)."""
    return " avx512_vnni" in _cpu_flags()


@functools.cache
def extension():
    """The compiled module, or None (the reason is logged once)."""
    if os.environ.get("QVLA_LOWBIT", "1") == "0":
        return None
    if not _cpu_has_avx2_fma():
        log.info("lowbit kernel: this CPU has no AVX2/FMA/F16C; using torch's int4 kernel")
        return None
    try:
        # at::parallel_for is inlined into the extension and runs its loop on one thread unless the extension
        # itself is built with OpenMP (torch's CPU wheels use the OpenMP backend; the loader reuses the
        # libgomp torch has already loaded, so there is one thread pool)
        return build("qvla_lowbit")
    except Exception as e:  # no compiler, no ninja, ...: fall back, loudly
        log.warning("lowbit kernel could not be built (%s: %s); using torch's int4 kernel", type(e).__name__, e)
        return None


def build(name: str, source: Path = SOURCE, defines: tuple[str, ...] = ()):
    """The extension compiled from `source` as module `name`, with CFLAGS/LDFLAGS and -D`defines` (the
    benchmarks build variants of it beside the default one)."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(source), str(INT8_SOURCE)], extra_cflags=[*CFLAGS, *(f"-D{d}" for d in defines)],
                extra_ldflags=LDFLAGS, verbose=False)


def available() -> bool:
    return extension() is not None


ISA_CODES = {"avx2": 2, "avx512-vnni": 512}  # the extension's `isa` argument


def isa() -> str:
    """The instruction set the kernel's products run on: "avx512-vnni" where the CPU has it, else "avx2";
    QVLA_LOWBIT_ISA (avx2 or avx512-vnni) chooses, and asking for one the CPU lacks fails loudly."""
    ext = extension()
    if ext is None:
        raise RuntimeError("the low-bit kernel is not available on this machine")
    best = "avx512-vnni" if ext.best_isa() == 512 else "avx2"
    asked = os.environ.get("QVLA_LOWBIT_ISA", "")
    if not asked:
        return best
    if asked not in ISA_CODES:
        raise ValueError(f"QVLA_LOWBIT_ISA must be one of {sorted(ISA_CODES)}, got {asked!r}")
    if asked == "avx512-vnni" and best != asked:
        raise RuntimeError("QVLA_LOWBIT_ISA=avx512-vnni, but this CPU has no AVX-512 VNNI")
    return asked


def block_codes(bits: int) -> int:
    """Codes per 32-byte block of the kernel's layout: 32 at 8 bits, 64 at 4, 128 at 2 (K is padded to it)."""
    return 256 // bits


def block_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes in [0, 2**bits), K a multiple of block_codes(bits) -> (N, K*bits/8) uint8 in the kernel's
    layout: in each 32-byte block, byte j holds codes j, j+32, j+64, ... in its bit fields 0, 1, ..."""
    n, k = codes.shape
    per_block = block_codes(bits)
    if k % per_block:
        raise ValueError(f"block_pack: K must be a multiple of {per_block} at {bits} bits, got {k}")
    fields = 8 // bits
    c = codes.to(torch.uint8).reshape(n, k // per_block, fields, 32)
    out = torch.zeros(n, k // per_block, 32, dtype=torch.uint8)
    for i in range(fields):
        out |= c[:, :, i, :] << (bits * i)
    return out.reshape(n, k * bits // 8).contiguous()


def block_unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of block_pack -> (N, k) uint8 codes."""
    n, fields = packed.shape[0], 8 // bits
    b = packed.reshape(n, k // block_codes(bits), 1, 32)
    shifts = (torch.arange(fields, dtype=torch.uint8) * bits).view(1, 1, fields, 1)
    return ((b >> shifts) & (2**bits - 1)).reshape(n, k)
