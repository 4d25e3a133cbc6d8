"""The low-bit kernel's AVX2 rows with and without their software prefetch, interleaved in one process: the
extension is built once per prefetch distance (-DQVLA_PREFETCH=D; 0 builds it without), and every round times
each build once on a sweep of distinct 4096x4096 layers streamed from memory (4-bit rows at A16, 8-bit rows at
A8), so drift of the machine hits all of them alike. Median ms per layer.

    python bench/prefetch_ab.py --out results/scale/prefetch-ab-avx2.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import write_result  # noqa: E402

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402
from qvla.quant import lowbit  # noqa: E402

CASES = ((4, 127, 2), (8, 127, 1))  # bits, activation qmax, passes: W4A16 and W8A8


def build(distance: int):
    return lowbit.build(f"qvla_lowbit_prefetch{distance}", defines=(f"QVLA_PREFETCH={distance}",))


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--distances", default="0,1024,2048")  # 2048: the default build
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", default="1,4,64")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()  # freed activations are reused, for every form timed here (qvla.allocator)
    exts = {int(d): build(int(d)) for d in a.distances.split(",")}
    g = torch.Generator().manual_seed(0)
    n = k = 4096
    scale, zero = torch.rand(n, generator=g) * 0.01, torch.zeros(n)
    rows = []
    for bits, qmax, passes in CASES:
        codes = (torch.randint(0, 16, (a.layers, n, k), generator=g).to(torch.uint8) if bits == 4 else
                 torch.randint(-127, 128, (a.layers, n, k), generator=g).to(torch.int8).view(torch.uint8))
        packs = [lowbit.block_pack(c, bits) for c in codes]
        del codes
        for m in map(int, a.tokens.split(",")):
            x = torch.randn(m, k, generator=g)
            ts = {d: [] for d in exts}
            for _ in range(a.rounds):
                for d, ext in exts.items():
                    t = time.perf_counter()
                    for p in packs:
                        ext.mm(x, p, scale, zero, bits, qmax, passes, False, 2)  # the AVX2 rows
                    ts[d].append((time.perf_counter() - t) / len(packs) * 1e3)
            row = {"bits": bits, "passes": passes, "tokens": m, "median_ms": {d: statistics.median(v) for d, v in ts.items()}}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    result = {"device": device_info(a.threads), "layers": a.layers, "shape": f"{n}x{k}", "rounds": a.rounds, "rows": rows}
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
