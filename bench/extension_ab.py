"""The low-bit extension as it is now against the same file at an earlier git revision, interleaved in one
process: both builds round the int8 GEMM's input (round7) and run 8-bit rows at A8 (mm) on the same data, and
every round times each once. It first checks that the two give the same bits on every case, so a speed-up
is not bought with other numbers. Median ms per call.

    python bench/extension_ab.py --rev 1193c60 --out results/scale/extension-ab-zen5.json
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import timed, write_result  # noqa: E402

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402
from qvla.quant import lowbit  # noqa: E402

ROUND7_SHAPES = ((1, 4096), (276, 4096), (276, 11008))
ROUND7_MODES = ((1, True, True), (2, True, False), (2, False, False))  # passes, u8 (oneDNN), a8
MM_SHAPES = ((256, 4096), (4096, 4096))  # 8-bit rows (N, K) at A8
MM_TOKENS = (1, 16, 276)


def old_build(rev: str, workdir: Path):
    src = subprocess.run(["git", "show", f"{rev}:src/qvla/quant/csrc/lowbit.cpp"], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parent).stdout
    path = workdir / "lowbit_old.cpp"
    path.write_text(src)
    return lowbit.build(f"qvla_lowbit_{rev}", path)


def same_round7(a, b, x) -> bool:
    return all(all(torch.equal(u, v) for u, v in zip(a.round7(x, *m), b.round7(x, *m))) for m in ROUND7_MODES)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()
    if not lowbit.available():
        print("the low-bit kernel is not available on this machine", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"old": old_build(a.rev, Path(tmp)), "new": lowbit.extension()}
    # the bits first: rows of every kind (odd lengths, constant, tiny, huge), every mode
    for m, k in ((1, 4096), (3, 4097), (5, 11008), (2, 13), (7, 33)):
        for x in (torch.randn(m, k, generator=g), torch.randn(m, k, generator=g) * 1e-12, torch.zeros(m, k),
                  torch.randn(m, k, generator=g) * 1e4, torch.full((m, k), 3.0)):
            if not same_round7(builds["old"], builds["new"], x):
                raise SystemExit(f"round7 differs between the builds on a {m}x{k} input")
    rows = []
    for m, k in ROUND7_SHAPES:
        x = torch.randn(m, k, generator=g)
        for mode in ROUND7_MODES:
            ts = {name: [] for name in builds}
            for _ in range(a.rounds):
                for name, ext in builds.items():
                    ts[name].append(timed(lambda: ext.round7(x, *mode)))
            rows.append({"op": "round7", "shape": f"{m}x{k}", "passes_u8_a8": mode,
                         **{name: statistics.median(v) for name, v in ts.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
    for n, k in MM_SHAPES:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).view(torch.uint8).contiguous()
        scale, zero = torch.rand(n, generator=g) + 0.05, torch.zeros(n)
        for t in MM_TOKENS:
            x = torch.randn(t, k, generator=g)
            outs = [ext.mm(x, codes, scale, zero, 8, 127, 1, False, 0) for ext in builds.values()]
            if not torch.equal(*outs):
                raise SystemExit(f"8-bit mm differs between the builds on {n}x{k} at {t} tokens")
            ts = {name: [] for name in builds}
            for _ in range(a.rounds):
                for name, ext in builds.items():
                    ts[name].append(timed(lambda: ext.mm(x, codes, scale, zero, 8, 127, 1, False, 0)))
            rows.append({"op": "mm 8-bit A8", "shape": f"{n}x{k}", "tokens": t,
                         **{name: statistics.median(v) for name, v in ts.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
    result = {"device": device_info(a.threads), "rev": a.rev, "rounds": a.rounds, "same_bits": True, "rows": rows}
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
