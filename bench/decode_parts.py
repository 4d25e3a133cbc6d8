"""Where one decode step of the 7B-shaped decoder layer spends its time, per form: each linear, the attention over
the KV cache (276 positions + the new one, cold: the layer's weights stream through the caches between steps) and
the rest (residual adds, the SiLU gate, reshapes, the cache write and Python), timed interleaved round by round
with a memory read probe, as bench/scale.py times the whole layer. The step is timed without timers; the parts in
separate calls with them, and the rest is the step less the parts.

    python bench/decode_parts.py --rounds 15 --out results/scale/decode-parts-zen4.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import (FORMS, PREFILL, SHAPES, build, cases, random_plan, read_probe, spread, timed, turned,  # noqa: E402
                   write_result)

from qvla import allocator  # noqa: E402
from qvla.bench import device_info  # noqa: E402

CALLS = 3  # decode steps per round and form (their median), as bench/scale.py
SPREAD = ("step", "linears", "attention")  # the parts whose per-round ratio to bf16 is kept


@contextmanager
def part_timers(block, into: dict[str, list[float]]):
    """Appends the ms of every call of each linear, and of the attention, to into[part]."""
    start: dict[str, float] = {}
    hooks = [h for name, m in block.lin.items() for h in (
        m.register_forward_pre_hook(lambda *_, n=name: start.__setitem__(n, time.perf_counter())),
        m.register_forward_hook(lambda *_, n=name: into[n].append((time.perf_counter() - start[n]) * 1e3)))]
    attend = block.attend

    def timed_attend(*args, **kwargs):
        t = time.perf_counter()
        out = attend(*args, **kwargs)
        into["attention"].append((time.perf_counter() - t) * 1e3)
        return out
    block.attend = timed_attend
    try:
        yield
    finally:
        block.attend = attend
        for h in hooks:
            h.remove()


def one_round(fn, block) -> dict[str, float]:
    """{step, each linear, linears (their sum), attention, rest}: medians of CALLS steps (ms)."""
    step = statistics.median(timed(fn) for _ in range(CALLS))
    parts: dict[str, list[float]] = {p: [] for p in (*block.lin, "attention")}
    with part_timers(block, parts):
        for _ in range(CALLS):
            fn()
    out = {"step": step, **{p: statistics.median(v) for p, v in parts.items()}}
    out["linears"] = sum(out[n] for n in block.lin)
    out["rest"] = step - out["linears"] - out["attention"]
    return out


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forms", default="bf16,w8a8,w4a16")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()
    torch.set_flush_denormal(True)
    forms = a.forms.split(",")
    plans = {FORMS[f][0]: random_plan(*FORMS[f][0]) for f in forms if isinstance(FORMS[f][0], tuple)}
    blocks, fns, nbytes = {}, {}, {}
    for form in forms:
        blocks[form], nbytes[form] = build("decoder", form, plans)
        fns[form] = cases("decoder", blocks[form], FORMS[form][2])["decode"][0]
        for _ in range(3):
            fns[form]()  # warm-up
    probe, reads = read_probe(), []
    rounds: dict[str, list[dict[str, float]]] = {form: [] for form in forms}
    for r in range(a.rounds):
        for form in turned(forms, r):
            rounds[form].append(one_round(fns[form], blocks[form]))
        reads.append(probe())
    read = statistics.median(reads)
    result = {"device": device_info(a.threads), "layer": SHAPES["decoder"], "kv_positions": PREFILL + 1,
              "rounds": a.rounds, "calls_per_round": CALLS,
              "read_probe_gbs": {"median": read, "min": min(reads), "max": max(reads)}, "forms": {}}
    for form in forms:
        ms = {p: statistics.median(rd[p] for rd in rounds[form]) for p in rounds[form][0]}
        linears, read_gbs = ms["linears"], nbytes[form] / 1e9 / (ms["linears"] / 1e3)
        kv_bytes = 2 * (PREFILL + 1) * SHAPES["decoder"]["k"][0] * FORMS[form][2].itemsize
        result["forms"][form] = {
            "ms": ms, "weight_bytes": nbytes[form],
            "linears_read_gbs": read_gbs, "linears_read_vs_probe": read_gbs / read,
            "kv_bytes": kv_bytes, "attention_read_gbs": kv_bytes / 1e9 / (ms["attention"] / 1e3),
            "rounds_ms": rounds[form]}
        print(form, {p: round(v, 3) for p, v in ms.items()}, f"linears {linears:.2f} ms", file=sys.stderr)
    if "bf16" in forms:
        ref = rounds["bf16"]
        for form in forms:
            r = result["forms"][form]
            # bf16's ms / this form's, per round
            r["rounds_vs_bf16"] = spread([{k: rd[k] for k in SPREAD} for rd in ref],
                                         [{k: rd[k] for k in SPREAD} for rd in rounds[form]])
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
