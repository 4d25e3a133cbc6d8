"""The int8 GEMMs Int8Kernel can run here (qvla's, oneDNN's, fbgemm's) against bf16 on one 7B-shaped decoder layer,
measured interleaved in one process: every round times each form once at the prefill (256 image + 20
prompt tokens) and at a one-token decode step, in another order each round, so drift of the machine hits all
of them alike; then `--pairs` back-to-back decode steps of every form (decode_pairs: per-pass ratios, which a
drifting memory speed hardly moves); then each GEMM alone per token count, interleaved the same way.

    python bench/int8_gemm.py --rounds 15 --out results/scale/int8-gemm-avx512.json   # AVX-512 VNNI CPU
    python bench/int8_gemm.py --rounds 15 --pairs 150 --out results/scale/int8-gemm-zen5-qvla-run4.json  # Zen 5
    python bench/int8_gemm.py --rounds 9 --out results/scale/int8-gemm-avx2.json      # AVX2 CPU
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import PREFILL, SHAPES, KVCache, build, spread, timed, turned, write_result  # noqa: E402

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402
from qvla.quant.kernels import int8_gemms_here  # noqa: E402


def faulted(fn, into: list) -> float:
    """timed(fn), appending the minor page faults the call took to `into` (freed memory given back to the
    OS is faulted in again: see qvla.allocator)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = timed(fn)
    into.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return ms


TOKENS = (1, 2, 8, 32, PREFILL)


@torch.no_grad()
def gemm_table(rounds: int) -> list[dict]:
    """Each GEMM alone (Int8Kernel at A8, one pass) on the decoder's three layer shapes, three distinct layers
    per call so the weights stream from memory as in the stack, interleaved per round: median ms per layer."""
    from qvla.quant.kernels import Int8Kernel

    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k in sorted(set(SHAPES["decoder"].values())):
        codes = [torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8) for _ in range(3)]
        scale = torch.rand(n, generator=g) * 0.01
        kernels = {gemm: [Int8Kernel(c, scale, gemm=gemm, a_bits=8) for c in codes] for gemm in int8_gemms_here()}
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            ts = {gemm: [] for gemm in kernels}
            for r in range(rounds):
                for gemm in turned(list(kernels), r):
                    ks = kernels[gemm]
                    ts[gemm].append(timed(lambda: [kern(x) for kern in ks]) / len(ks))
            row = {"layer": f"{n}x{k}", "tokens": m, **{gemm: statistics.median(v) for gemm, v in ts.items()}}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def decode_pairs(blocks: dict, caches: dict, one: torch.Tensor, n: int) -> dict:
    """One decode step of each form after another, n times (in another order each time), so neighbouring steps
    share the machine's state: the per-pass ratio of bf16's step to each form's, and of each int8 GEMM's to
    the first one's, is a paired measure a drifting memory speed hardly moves. -> {"ms": {form: [ms]},
    "summary": {"vs_bf16": {form: spread}, "vs_<first GEMM>": {form: spread}}}."""
    names = list(blocks)
    ms = {name: [] for name in names}
    for i in range(n):
        for name in turned(names, i):
            block, dtype = blocks[name]
            xo = one.to(dtype)
            ms[name].append(timed(lambda: block(xo, caches[name].fork())))
    steps = [{name: ms[name][i] for name in names} for i in range(n)]
    first = next(name for name in names if name != "bf16")
    ratio = lambda num, den: spread([{"decode": s[num]} for s in steps], [{"decode": s[den]} for s in steps])["decode"]
    return {"ms": ms, "summary": {"vs_bf16": {name: ratio("bf16", name) for name in names if name != "bf16"},
                                  f"vs_{first}": {name: ratio(name, first) for name in names
                                                  if name not in ("bf16", first)}}}


def by_round(t: dict[str, list[float]]) -> list[dict[str, float]]:
    """{case: [ms per round]} -> [{case: ms} per round]."""
    return [dict(zip(t, ms)) for ms in zip(*t.values())]


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=100, help="back-to-back decode steps per form (decode_pairs)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()  # freed activations are reused, for every form timed here (qvla.allocator)
    torch.set_flush_denormal(True)
    blocks = {"bf16": (build("decoder", "bf16", {})[0], torch.bfloat16)}
    for gemm in int8_gemms_here():  # Int8Kernel reads the choice when it is built
        os.environ["QVLA_INT8_GEMM"] = gemm
        blocks[f"w8a8-{gemm}"] = (build("decoder", "w8a8", {})[0], torch.float32)
    os.environ.pop("QVLA_INT8_GEMM")
    d = SHAPES["decoder"]["q"][1]
    x = torch.randn(1, PREFILL, d)
    one = torch.randn(1, 1, d)
    caches = {}
    for name, (block, dtype) in blocks.items():
        caches[name] = KVCache()
        block(x.to(dtype), caches[name])  # warm-up and the KV cache the decode steps read
    times = {name: {"prefill": [], "decode": []} for name in blocks}
    faults = {name: [] for name in blocks}  # per prefill
    names = list(blocks)
    for r in range(a.rounds):
        for name in turned(names, r):  # another order each round
            block, dtype = blocks[name]
            xp, xo = x.to(dtype), one.to(dtype)
            times[name]["prefill"].append(faulted(lambda: block(xp, KVCache()), faults[name]))
            times[name]["decode"].append(statistics.median(timed(lambda: block(xo, caches[name].fork()))
                                                           for _ in range(3)))
        print(r, {n: {k: round(v[-1], 1) for k, v in t.items()} for n, t in times.items()}, file=sys.stderr,
              flush=True)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    pairs = decode_pairs(blocks, caches, one, a.pairs)
    del blocks, caches
    gemms = gemm_table(a.rounds)
    result = {"device": {**device_info(a.threads), "int8_gemm": "every one here (this benchmark compares them)"},
              "layer": "decoder", "prefill_tokens": PREFILL, "rounds": a.rounds, "median_ms": med,
              "vs_bf16": {n: {k: med["bf16"][k] / v for k, v in m.items()} for n, m in med.items() if n != "bf16"},
              "rounds_vs_bf16": {n: spread(by_round(times["bf16"]), by_round(t)) for n, t in times.items() if n != "bf16"},
              "prefill_page_faults": {n: statistics.median(v) for n, v in faults.items()},
              "decode_pairs": pairs["summary"], "gemm_ms": gemms, "rounds_ms": times, "pairs_ms": pairs["ms"]}
    write_result(a.out, result, ("median_ms", "vs_bf16", "rounds_vs_bf16", "decode_pairs", "prefill_page_faults"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
