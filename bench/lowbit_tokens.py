"""One 4096x4096 (and 11008x4096) layer at the token counts a VLA control step runs: qvla's low-bit kernel
(4-bit rows with A16 activations in two int8 passes and with A8 in one, 2-bit rows, 8-bit rows with A8; and,
for comparison, 4-bit rows expanded to fp32 for the float GEMM, and on a CPU with AVX-512 VNNI the kernel's
AVX2 path too), torch's int4 kernel, fbgemm's int8 kernel,
fp32 and bf16. The "micro" section times the micro-VLAs' layer shapes, where a call's fixed cost decides:
it is what kernels.SMALL_INT8_WEIGHTS (which 8-bit buckets run on qvla's kernel) rests on.

A 4096x4096 layer at 4 bits is 8 MB, which a large last-level cache holds between two calls while the
bf16 layer (32 MB) it is compared with may not be: the single-layer rows can flatter the low-bit kernel.
The "streamed" section therefore also times a sweep over STREAM_LAYERS distinct 4096x4096 layers (96 MB at
4 bits, 384 MB in bf16), so every format's weights come from memory, as in a real decoder pass.

    python bench/lowbit_tokens.py --out results/scale/lowbit-tokens-cpu.json      # ~3 min on 2 cores
    python bench/lowbit_tokens.py --sections micro --out results/scale/int8-micro-cpu.json   # seconds
    python bench/lowbit_tokens.py --sections buckets --out results/scale/int8-buckets-cpu.json  # ~1 min
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qvla import allocator
from qvla.bench import device_info
from qvla.quant import lowbit
from qvla.quant.kernels import Int4Kernel, Int8Kernel, LowBitKernel

sys.path.insert(0, str(Path(__file__).parent))
from scale import median_ms, write_result  # noqa: E402  (the same timing as the scale benchmark)

TOKENS = (1, 2, 4, 8, 16, 32, 64, 276)
STREAM_LAYERS = 12
MICRO_SHAPES = ((128, 128), (384, 128), (128, 384), (512, 128))  # the micro-VLAs' Linear layers (N, K)
MICRO_TOKENS = (1, 16, 48, 276)  # decode step, a text prompt, one camera's prefix, a long prefill


def micro(runs: int, g: torch.Generator) -> dict:
    """ms per call of 8-bit rows (A8) on fbgemm's and on qvla's kernel, and fp32, at micro-VLA shapes."""
    out = {}
    for n, k in MICRO_SHAPES:
        codes, scale = torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) * 0.01
        w = codes.float() * scale[:, None]
        i8, lb8 = Int8Kernel(codes, scale, passes=1), LowBitKernel(codes, scale, torch.zeros(n), 8, a_bits=8)
        avx2 = {} if lowbit.isa() == "avx2" else {
            "lowbit8_a8_avx2": LowBitKernel(codes, scale, torch.zeros(n), 8, a_bits=8, isa="avx2")}
        rows = {}
        for m in MICRO_TOKENS:
            x = torch.randn(m, k, generator=g)
            r = {"fp32": median_ms(lambda: F.linear(x, w), runs), "int8_a8": median_ms(lambda: i8(x), runs),
                 "lowbit8_a8": median_ms(lambda: lb8(x), runs),
                 **{key: median_ms(lambda: kern(x), runs) for key, kern in avx2.items()}}
            r["lowbit8_vs_int8"] = r["int8_a8"] / r["lowbit8_a8"]
            rows[m] = r
            print("micro", n, k, m, {key: round(v, 4) for key, v in r.items()}, file=sys.stderr, flush=True)
        out[f"{n}x{k}"] = rows
    return out


BUCKET_SHAPES = ((64, 4096), (256, 4096), (256, 11008), (1024, 1024), (384, 512))  # 8-bit buckets (N, K)
BUCKET_TOKENS = (1, 8, 16, 64, 276)


def buckets(runs: int, g: torch.Generator) -> dict:
    """ms per call of one 8-bit bucket (A8) of up to kernels.SMALL_INT8_WEIGHTS weights (8-bit buckets of a
    mixed plan's 7B-sized layers): qvla's kernel (on a VNNI CPU its VNNI tiles from 8 tokens and its AVX2
    rows) and the int8 GEMM that large buckets run on."""
    out = {}
    for n, k in BUCKET_SHAPES:
        codes, scale = torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) * 0.01
        kerns = {"lowbit8_a8": LowBitKernel(codes, scale, torch.zeros(n), 8, a_bits=8),
                 "int8_a8": Int8Kernel(codes, scale, passes=1, a_bits=8)}
        if lowbit.isa() != "avx2":
            kerns["lowbit8_a8_avx2"] = LowBitKernel(codes, scale, torch.zeros(n), 8, a_bits=8, isa="avx2")
        rows = {}
        for m in BUCKET_TOKENS:
            x = torch.randn(m, k, generator=g)
            rows[m] = {key: median_ms(lambda: kern(x), runs) for key, kern in kerns.items()}
            print("bucket", n, k, m, {key: round(v, 4) for key, v in rows[m].items()}, file=sys.stderr, flush=True)
        out[f"{n}x{k}"] = rows
    return out


def streamed(runs: int, g: torch.Generator) -> dict:
    """ms per layer over a sweep of STREAM_LAYERS distinct 4096x4096 layers, and the bytes/s it streams."""
    n = k = 4096
    lb4 = [LowBitKernel(torch.randint(0, 16, (n, k), generator=g), torch.rand(n, generator=g) * 0.01,
                        torch.full((n,), 8.0), 4) for _ in range(STREAM_LAYERS)]
    wb = [(torch.randn(n, k, generator=g) / k**0.5).bfloat16() for _ in range(STREAM_LAYERS)]
    codes8 = [torch.randint(-127, 128, (n, k), generator=g) for _ in range(STREAM_LAYERS)]
    i8 = [Int8Kernel(c, torch.rand(n, generator=g) * 0.01, passes=1) for c in codes8]
    lb8 = [LowBitKernel(c, torch.rand(n, generator=g) * 0.01, torch.zeros(n), 8, a_bits=8) for c in codes8]
    out = {"layers": STREAM_LAYERS, "shape": f"{n}x{k}"}
    for m in (1, 4):
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        sweep = {"bf16": lambda: [F.linear(xb, w) for w in wb], "int8_a8": lambda: [q(x) for q in i8],
                 "lowbit8_a8": lambda: [q(x) for q in lb8], "lowbit4_kernel": lambda: [q(x) for q in lb4]}
        r = {key: median_ms(f, runs) / STREAM_LAYERS for key, f in sweep.items()}
        nbytes = {"bf16": 2 * n * k, "int8_a8": n * k, "lowbit8_a8": n * k, "lowbit4_kernel": n * k // 2}
        r.update({f"{key}_GBps": nbytes[key] / r[key] / 1e6 for key in sweep})
        for key in ("lowbit4_kernel", "int8_a8", "lowbit8_a8"):
            r[f"{key}_vs_bf16"] = r["bf16"] / r[key]
        out[m] = r
        print("streamed", m, {key: round(v, 2) for key, v in r.items()}, file=sys.stderr, flush=True)
    return out


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sections", default="layers,streamed,micro,buckets",
                    help="which parts to time: layers (one 7B-sized layer), streamed, micro (seconds only), "
                         "buckets (8-bit buckets of 7B-sized layers)")
    a = ap.parse_args(argv)
    sections = set(a.sections.split(","))
    if not sections <= {"layers", "streamed", "micro", "buckets"}:
        ap.error(f"--sections takes layers, streamed, micro and buckets, got {a.sections!r}")
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()  # freed activations are reused, for every form timed here (qvla.allocator)
    if not lowbit.available():
        print("the low-bit kernel is not available on this machine", file=sys.stderr)
        return 1
    ext = lowbit.extension()
    g = torch.Generator().manual_seed(0)
    result = {"device": device_info(a.threads), "runs": a.runs, "shapes": {}}
    for n, k in ((4096, 4096), (11008, 4096)) if "layers" in sections else ():
        w = torch.randn(n, k, generator=g) / k**0.5
        codes4 = torch.randint(0, 16, (n, k), generator=g)
        scale, zero = torch.rand(n, generator=g) * 0.01, torch.full((n,), 8.0)
        lb4 = LowBitKernel(codes4, scale, zero, 4)
        lb4a8 = LowBitKernel(codes4, scale, zero, 4, a_bits=8)
        # on a VNNI CPU also the AVX2 path, the one every CPU with AVX2 runs (same bits, other instructions)
        avx2 = {} if lowbit.isa() == "avx2" else {
            "lowbit4_kernel_avx2": LowBitKernel(codes4, scale, zero, 4, isa="avx2"),
            "lowbit4_a8_avx2": LowBitKernel(codes4, scale, zero, 4, a_bits=8, isa="avx2")}
        lb2 = LowBitKernel(codes4 % 4, scale, torch.full((n,), 2.0), 2)
        i4 = Int4Kernel(codes4, scale, zero)
        codes8 = torch.randint(-127, 128, (n, k), generator=g)
        i8 = Int8Kernel(codes8, scale, passes=1)
        lb8 = LowBitKernel(codes8, scale, torch.zeros(n), 8, a_bits=8)
        wb = w.bfloat16()
        rows = {}
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            r = {
                "fp32": median_ms(lambda: F.linear(x, w), a.runs),
                "bf16": median_ms(lambda: F.linear(xb, wb), a.runs),
                "int8_a8": median_ms(lambda: i8(x), a.runs),
                "lowbit8_a8": median_ms(lambda: lb8(x), a.runs),
                "torch_int4": median_ms(lambda: i4(x), a.runs),
                "lowbit4_kernel": median_ms(lambda: lb4(x), a.runs),
                "lowbit4_a8": median_ms(lambda: lb4a8(x), a.runs),
                "lowbit4_expand": median_ms(
                    lambda: F.linear(x, ext.dequant(lb4.packed, lb4.scale, lb4.zero, 4, k)), a.runs),
                "lowbit2_kernel": median_ms(lambda: lb2(x), a.runs),
            }
            r.update({key: median_ms(lambda: kern(x), a.runs) for key, kern in avx2.items()})
            for key in ("lowbit4_kernel", "lowbit4_a8", "lowbit2_kernel", "int8_a8", "lowbit8_a8", *avx2):
                r[f"{key}_vs_bf16"] = r["bf16"] / r[key]
            rows[m] = r
            print(n, k, m, {key: round(v, 2) for key, v in r.items()}, file=sys.stderr, flush=True)
        result["shapes"][f"{n}x{k}"] = rows
    if "streamed" in sections:
        result["streamed"] = streamed(a.runs, g)
    if "micro" in sections:
        result["micro"] = micro(max(a.runs, 200), g)
    if "buckets" in sections:
        result["buckets"] = buckets(a.runs, g)
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
