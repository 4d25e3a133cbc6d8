"""A mixed-precision 7B decoder layer with its low-bit buckets writing their channels in place (the kernel's
epilogue, PackedLinear's default) against a scatter of each bucket's output (index_copy_, as before),
interleaved in one process on the same layer: every round times each once at the prefill (256 image + 20
prompt tokens) and at a one-token decode step. Both give the same floats (checked first).

    python bench/bucket_writes_ab.py --out results/scale/bucket-writes-ab-zen5.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import FORMS, PREFILL, SHAPES, KVCache, build, random_plan, timed  # noqa: E402

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402
from qvla.quant.kernels import LowBitKernel  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--form", default="qvla-4", choices=[f for f in FORMS if f.startswith("qvla-")])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()
    torch.set_flush_denormal(True)
    plan_key = FORMS[a.form][0]
    block, _ = build("decoder", a.form, {plan_key: random_plan(*plan_key)})
    d = SHAPES["decoder"]["q"][1]
    x, one = torch.randn(1, PREFILL, d), torch.randn(1, 1, d)
    cache = KVCache()
    block(x, cache)
    modes = {"in_place": True, "scatter": False}
    outs = {}
    for mode, flag in modes.items():
        LowBitKernel.writes_into = flag
        outs[mode] = block(x, KVCache())
    if not torch.equal(outs["in_place"], outs["scatter"]):
        raise SystemExit("the two ways of writing the buckets give different outputs")
    times = {mode: {"prefill": [], "decode": []} for mode in modes}
    for _ in range(a.rounds):
        for mode, flag in modes.items():
            LowBitKernel.writes_into = flag
            times[mode]["prefill"].append(timed(lambda: block(x, KVCache())))
            times[mode]["decode"].append(statistics.median(timed(lambda: block(one, cache.fork())) for _ in range(3)))
    LowBitKernel.writes_into = True
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    result = {"device": device_info(a.threads), "form": a.form, "layer": "decoder", "rounds": a.rounds,
              "same_output": True, "median_ms": med,
              "scatter_vs_in_place": {k: med["scatter"][k] / med["in_place"][k] for k in ("prefill", "decode")},
              "rounds_ms": times}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_ms", "scatter_vs_in_place")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
