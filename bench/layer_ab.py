"""One mixed-precision 7B decoder layer (a QVLA plan from random sensitivities) with a kernel option on and off,
interleaved in one process on the same layer: every round times each once at the prefill (256 image + 20
prompt tokens) and at a one-token decode step. The options (TOGGLES):

  bucket-writes  qvla's kernel writes each bucket's channels into the layer's output from its epilogue
                 (PackedLinear's default) / a scatter of each bucket's output (index_copy_, as before)
  half-gemv      the 16-bit rows' fp16 GEMV at up to 4 tokens (HalfKernel's default) / the rows upcast to
                 fp32 per call for the float GEMM

    python bench/layer_ab.py --toggle bucket-writes --out results/scale/bucket-writes-ab-zen5.json
    python bench/layer_ab.py --toggle half-gemv --form qvla-8 --out results/scale/half-gemv-ab-zen5.json

bucket-writes gives the same floats both ways, and is checked for it first; half-gemv sums in another order,
and the largest relative difference of the layer's outputs is recorded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import FORMS, PREFILL, SHAPES, KVCache, build, random_plan, timed, write_result  # noqa: E402

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402
from qvla.quant.kernels import HalfKernel, LowBitKernel  # noqa: E402

# name -> (class, attribute, value "on", value "off", whether both give the same floats)
TOGGLES = {
    "bucket-writes": (LowBitKernel, "writes_into", True, False, True),
    "half-gemv": (HalfKernel, "GEMV_MAX_TOKENS", HalfKernel.GEMV_MAX_TOKENS, 0, False),
}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toggle", required=True, choices=sorted(TOGGLES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--form", default="qvla-4", choices=[f for f in FORMS if f.startswith("qvla-")])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()
    torch.set_flush_denormal(True)
    cls, attr, on, off, exact = TOGGLES[a.toggle]
    plan_key = FORMS[a.form][0]
    block, _ = build("decoder", a.form, {plan_key: random_plan(*plan_key)})
    d = SHAPES["decoder"]["q"][1]
    x, one = torch.randn(1, PREFILL, d), torch.randn(1, 1, d)
    cache = KVCache()
    block(x, cache)
    modes = {"on": on, "off": off}
    outs = {}
    for mode, value in modes.items():
        setattr(cls, attr, value)
        outs[mode] = torch.cat([block(x, KVCache()).flatten(), block(one, cache.fork()).flatten()])
    if exact and not torch.equal(outs["on"], outs["off"]):
        raise SystemExit(f"{a.toggle}: the two settings give different outputs")
    rel = ((outs["on"] - outs["off"]).abs().max() / outs["off"].abs().max()).item()
    times = {mode: {"prefill": [], "decode": []} for mode in modes}
    for _ in range(a.rounds):
        for mode, value in modes.items():
            setattr(cls, attr, value)
            times[mode]["prefill"].append(timed(lambda: block(x, KVCache())))
            times[mode]["decode"].append(statistics.median(timed(lambda: block(one, cache.fork())) for _ in range(3)))
    setattr(cls, attr, on)
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    result = {"device": device_info(a.threads), "toggle": a.toggle, "form": a.form, "layer": "decoder",
              "rounds": a.rounds, "max_relative_difference": rel, "median_ms": med,
              "off_vs_on": {k: med["off"][k] / med["on"][k] for k in ("prefill", "decode")}, "rounds_ms": times}
    write_result(a.out, result, ("median_ms", "off_vs_on", "max_relative_difference"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
