"""One 4096x4096 (and 11008x4096) layer at the token counts a VLA control step runs: qvla's low-bit kernel
(4-bit rows with A16 activations in two int8 passes and with A8 in one, 2-bit rows; and, for comparison,
4-bit rows expanded to fp32 for the float GEMM), torch's int4 kernel, the int8 kernel, fp32 and bf16.

A 4096x4096 layer at 4 bits is 8 MB, which a large last-level cache holds between two calls while the
bf16 layer (32 MB) it is compared with may not be: the single-layer rows can flatter the low-bit kernel.
The "streamed" section therefore also times a sweep over STREAM_LAYERS distinct 4096x4096 layers (96 MB at
4 bits, 384 MB in bf16), so every format's weights come from memory, as in a real decoder pass.

    python bench/lowbit_tokens.py --out results/scale/lowbit-tokens-cpu.json      # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qvla.bench import device_info
from qvla.quant import lowbit
from qvla.quant.kernels import Int4Kernel, Int8Kernel, LowBitKernel

sys.path.insert(0, str(Path(__file__).parent))
from scale import median_ms  # noqa: E402  (the same timing as the scale benchmark)

TOKENS = (1, 2, 4, 8, 16, 32, 64, 276)
STREAM_LAYERS = 12


def streamed(runs: int, g: torch.Generator) -> dict:
    """ms per layer over a sweep of STREAM_LAYERS distinct 4096x4096 layers, and the bytes/s it streams."""
    n = k = 4096
    lb4 = [LowBitKernel(torch.randint(0, 16, (n, k), generator=g), torch.rand(n, generator=g) * 0.01,
                        torch.full((n,), 8.0), 4) for _ in range(STREAM_LAYERS)]
    wb = [(torch.randn(n, k, generator=g) / k**0.5).bfloat16() for _ in range(STREAM_LAYERS)]
    i8 = [Int8Kernel(torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) * 0.01, passes=1)
          for _ in range(STREAM_LAYERS)]
    out = {"layers": STREAM_LAYERS, "shape": f"{n}x{k}"}
    for m in (1, 4):
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        sweep = {"bf16": lambda: [F.linear(xb, w) for w in wb], "int8_a8": lambda: [q(x) for q in i8],
                 "lowbit4_kernel": lambda: [q(x) for q in lb4]}
        r = {key: median_ms(f, runs) / STREAM_LAYERS for key, f in sweep.items()}
        nbytes = {"bf16": 2 * n * k, "int8_a8": n * k, "lowbit4_kernel": n * k // 2}
        r.update({f"{key}_GBps": nbytes[key] / r[key] / 1e6 for key in sweep})
        r["lowbit4_kernel_vs_bf16"] = r["bf16"] / r["lowbit4_kernel"]
        r["int8_a8_vs_bf16"] = r["bf16"] / r["int8_a8"]
        out[m] = r
        print("streamed", m, {key: round(v, 2) for key, v in r.items()}, file=sys.stderr, flush=True)
    return out


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not lowbit.available():
        print("the low-bit kernel is not available on this machine", file=sys.stderr)
        return 1
    ext = lowbit.extension()
    g = torch.Generator().manual_seed(0)
    result = {"device": device_info(a.threads), "runs": a.runs, "shapes": {}}
    for n, k in ((4096, 4096), (11008, 4096)):
        w = torch.randn(n, k, generator=g) / k**0.5
        codes4 = torch.randint(0, 16, (n, k), generator=g)
        scale, zero = torch.rand(n, generator=g) * 0.01, torch.full((n,), 8.0)
        lb4 = LowBitKernel(codes4, scale, zero, 4)
        lb4a8 = LowBitKernel(codes4, scale, zero, 4, a_bits=8)
        lb2 = LowBitKernel(codes4 % 4, scale, torch.full((n,), 2.0), 2)
        i4 = Int4Kernel(codes4, scale, zero)
        i8 = Int8Kernel(torch.randint(-127, 128, (n, k), generator=g), scale, passes=1)
        wb = w.bfloat16()
        rows = {}
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            r = {
                "fp32": median_ms(lambda: F.linear(x, w), a.runs),
                "bf16": median_ms(lambda: F.linear(xb, wb), a.runs),
                "int8_a8": median_ms(lambda: i8(x), a.runs),
                "torch_int4": median_ms(lambda: i4(x), a.runs),
                "lowbit4_kernel": median_ms(lambda: lb4(x), a.runs),
                "lowbit4_a8": median_ms(lambda: lb4a8(x), a.runs),
                "lowbit4_expand": median_ms(
                    lambda: F.linear(x, ext.dequant(lb4.packed, lb4.scale, lb4.zero, 4, k)), a.runs),
                "lowbit2_kernel": median_ms(lambda: lb2(x), a.runs),
            }
            for key in ("lowbit4_kernel", "lowbit4_a8", "lowbit2_kernel"):
                r[f"{key}_vs_bf16"] = r["bf16"] / r[key]
            rows[m] = r
            print(n, k, m, {key: round(v, 2) for key, v in r.items()}, file=sys.stderr, flush=True)
        result["shapes"][f"{n}x{k}"] = rows
    result["streamed"] = streamed(a.runs, g)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
