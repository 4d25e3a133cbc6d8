"""Scale benchmark on a GPU: bench/scale.py's OpenVLA-7B-shaped stack (the same shapes, layer counts, plans and
control step) on torch's own CUDA quantized kernels, the ones torchao's configs dispatch to.

| rows of a bucket | kernel                                                             | held               |
|------------------|--------------------------------------------------------------------|--------------------|
| 16 bits          | cuBLAS bf16 GEMM                                                   | bf16               |
| 8 bits, A16      | up to 4 tokens torch._weight_int8pack_mm (a GEMV); more: the rows widened to bf16 per call, then cuBLAS (torchao's eager int8 weight-only path) | int8 + scale |
| 8 bits, A8       | torch._int_mm (cuBLASLt int8 x int8 -> int32), per-token int8 input | int8 + scale       |
| 4 and 2 bits     | tinygemm, torch._weight_int4pack_mm (bf16 input; 2-bit rows held as 4-bit codes) | 4 bits + bf16 scale/zero per 256 (or 128) |

No int4 x int4 or 2-bit tensor-core kernel exists on Hopper, so the budget-4 plan runs at A16 (`qvla-4-held`: the
plan allocated with 2-bit rows counted as the 4 bits they hold, scale.py's held plan). Every form is first checked
against its dequantized weights in float32 on random inputs (relative error in the output; the run stops where one
is off), then each case is captured in a CUDA graph (launch overhead gone, as a deployment would run it) and
replayed: median of --runs replays timed by CUDA events, bf16 and the quantized forms interleaved per round.

    python bench/gpu_scale.py --out results/scale/gpu-h200.json                  # the card is recorded
    python bench/gpu_scale.py --device cpu --kinds action_head --runs 2 --out /tmp/check.json   # a check run
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from scale import (FOLDS, LAYERS, PREFILL, SHAPES, Block, cases, control_step, layer_bits,  # noqa: E402
                   make_linears, model_bytes, random_plan, turned, uniform, write_result)

from qvla.quant.apply import QuantLinear  # noqa: E402
from qvla.quant.kernels import round_up  # noqa: E402
from qvla.quant.packed import BUCKET_ORDER, bucket_order  # noqa: E402
from qvla.quant.storage import bucket_codes, dequantize_storage, permute_inputs  # noqa: E402

# tinygemm's group: 256 where the input width allows, else 128 (K is padded to a multiple of 128). Its bf16 scale
# and zero per group cost 32 bits: 0.125 bits a weight at 256, 0.25 at 128 (which alone would put the budget-4
# stack above 0.28x bf16's weights)
GROUPS = (256, 128)
TOLERANCE = 0.03  # relative output error against the dequantized float32 weights (bf16 inputs: ~3e-3, A8 ~9e-3)
# a folded pair (two layers and the GELU between them; at A8 the GELU's output is rounded too): a wrong permutation
# gives an error of order 1
PAIR_TOLERANCE = 0.1


def off(err: dict[str, float]) -> dict[str, float]:
    """The checks of build() that fail their tolerance."""
    return {k: v for k, v in err.items() if v > (PAIR_TOLERANCE if "->" in k else TOLERANCE)}


def _pad(t: torch.Tensor, rows: int, cols: int, value=0) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


INT4_OPS = {  # device type -> (pack (n, k) codes in [0, 15], mm)
    "cuda": (lambda q: torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8),
             torch._weight_int4pack_mm),
    "cpu": (lambda q: torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), torch._weight_int4pack_mm_for_cpu),
}


class Int4Rows:
    """tinygemm: w = (q - 8) * scale + zero per group of inputs (GROUPS); each row's own scale and zero point
    are written to every group (the plan's quantizer is per channel). Rows padded to 16, inputs to 128."""

    def __init__(self, codes, scale, zero, device) -> None:
        n, k = codes.shape
        self.n, self.kp = n, round_up(k, 128)
        self.group = next(g for g in GROUPS if self.kp % g == 0)
        pack, self.mm = INT4_OPS[device.type]
        self.packed = pack(_pad(codes.long(), round_up(n, 16), self.kp, 8).to(device))
        sz = torch.stack([scale.float(), (8 - zero.float()) * scale.float()], -1)
        sz = _pad(sz, round_up(n, 16), 2)
        self.sz = sz[None].expand(self.kp // self.group, -1, -1).contiguous().to(device, torch.bfloat16)
        self.nbytes = self.packed.numel() * self.packed.element_size() + self.sz.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.kp - x.shape[1])) if x.shape[1] != self.kp else x.contiguous()
        return self.mm(x, self.packed, self.group, self.sz)[:, : self.n]


@functools.cache
def int8_weight_only(device) -> bool:
    """torch._weight_int8pack_mm runs on this device (its CUDA kernel is newer than the CPU one)."""
    try:
        torch._weight_int8pack_mm(torch.ones(1, 32, device=device, dtype=torch.bfloat16),
                                  torch.ones(8, 32, device=device, dtype=torch.int8),
                                  torch.ones(8, device=device, dtype=torch.bfloat16))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Rows:
    """Int8 weight-only (A16), w = code * scale. torch._weight_int8pack_mm reads the weights once per token (on
    CUDA a dot product per output), so it runs only up to GEMV_MAX_TOKENS tokens, and only where the device has
    it and --int8-gemv allows (the result records both); otherwise the rows are widened to bf16 per call and
    cuBLAS multiplies them, the output scaled per row (torchao's eager path)."""

    GEMV_MAX_TOKENS = 4

    def __init__(self, codes, scale, device, gemv: bool = True) -> None:  # gemv: --int8-gemv int8pack
        self.w = codes.to(torch.int8).contiguous().to(device)
        self.s = scale.to(device, torch.bfloat16)
        self.nbytes = self.w.numel() + self.s.numel() * 2
        self.kernel = gemv and int8_weight_only(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.shape[0] <= self.GEMV_MAX_TOKENS:
            return torch._weight_int8pack_mm(x, self.w, self.s)
        return F.linear(x, self.w.to(x.dtype)) * self.s


class Int8A8Rows:
    """W8A8: each token rounded to int8 on its own absmax (symmetric, as the plan's A8 grid), torch._int_mm,
    then both scales. cuBLASLt's int8 GEMM wants more than 16 rows and multiples of 8: inputs are padded."""

    def __init__(self, codes, scale, device) -> None:
        n, k = codes.shape
        self.n = n
        self.wt = _pad(codes.to(torch.int8), round_up(n, 8), round_up(k, 8)).to(device).t()  # (K, N), column-major
        self.s = scale.float().to(device)
        self.s = F.pad(self.s, (0, round_up(n, 8) - n))
        self.nbytes = n * k + n * 4
        self.min_rows = 17 if device.type == "cuda" else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        step = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        q = torch.round(x.float() / step).to(torch.int8)
        q = _pad(q, max(m, self.min_rows), self.wt.shape[0])
        y = torch._int_mm(q, self.wt)[:m, : self.n].float()
        return (y * step * self.s[: self.n]).to(x.dtype)


class Bf16Rows:
    def __init__(self, rows, device) -> None:
        self.w = rows.to(device, torch.bfloat16)
        self.nbytes = self.w.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def bucket_kernel(bits: int, storage: dict, k: int, a_bits: int, device, gemv: bool = True):
    if bits == 16:
        return Bf16Rows(storage["w16"], device)
    codes, scale, zero = bucket_codes(storage, bits, k)
    if bits == 8:
        return Int8A8Rows(codes, scale, device) if a_bits == 8 else Int8Rows(codes, scale, device, gemv)
    return Int4Rows(codes, scale, zero, device)


class GpuLinear(nn.Module):
    """One planned layer: a kernel per bit-width bucket, each writing its rows' output columns (0-bit rows
    stay zero). With folded, the rows come in bucket order and the next layer's inputs were permuted to match."""

    def __init__(self, storage: dict, shape, a_bits: int, device, folded: bool = False, gemv: bool = True) -> None:
        super().__init__()
        bits = storage["bits"].long()
        self.n, k = shape
        self.buckets, start = [], 0
        for b in BUCKET_ORDER:
            idx = torch.nonzero(bits == b).flatten()
            if len(idx):
                cols = torch.arange(start, start + len(idx)) if folded else idx
                self.buckets.append((cols.to(device), bucket_kernel(b, storage, k, a_bits, device, gemv)))
                start += len(idx)
        self.weight_nbytes = sum(kern.nbytes for _, kern in self.buckets)
        self.direct = len(self.buckets) == 1 and start == self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.direct:
            return self.buckets[0][1](x).reshape(*lead, self.n)
        out = x.new_zeros(x.shape[0], self.n)
        for cols, kern in self.buckets:
            out.index_copy_(1, cols, kern(x))
        return out.reshape(*lead, self.n)


FORMS = {  # name -> (bits for (kind, name, n) or a plan key for scale.random_plan, activation bits)
    "bf16": (None, 16),
    "w8a8": (uniform(8), 8),
    "w8a16": (uniform(8), 16),
    "w4a16": (uniform(4), 16),
    "qvla-8": ((8.0, False), 8),
    "qvla-4-held": ((4.0, True), 16),
}


def build(kind: str, form: str, plans: dict, device, gemv: bool = True) -> tuple[Block, int, dict]:
    """-> (block on device, bytes of weights it holds, {check: relative output error}): each linear against its
    dequantized weights in float32 on random inputs of 64 tokens ("fc1") and of one ("fc1@1"), and each folded
    pair against the unfolded product of its dequantized weights ("fc1->fc2")."""
    bits_of, a_bits = FORMS[form]
    linears = make_linears(kind, seed=sum(map(ord, kind)))
    if bits_of is None:
        block = Block(kind, linears).to(device, torch.bfloat16)
        return block, sum(m.weight.numel() * 2 for m in linears.values()), {}
    bits = layer_bits(kind, bits_of, plans, linears)
    storages = {name: QuantLinear.from_linear(lin, bits[name], a_bits).storage() for name, lin in linears.items()}
    producers = dict(FOLDS.get(kind, []))
    consumers = {c: p for p, c in producers.items()}
    swapped, err = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, storage in storages.items():
        if name in consumers:
            storage = permute_inputs(storage, bucket_order(bits[consumers[name]]))
        shape = linears[name].weight.shape
        swapped[name] = GpuLinear(storage, shape, a_bits, device, folded=name in producers, gemv=gemv)
        ref_w = dequantize_storage(storage, shape)
        if name in producers:
            ref_w = ref_w[bucket_order(bits[name])]
        keep = ref_w.abs().amax(1) > 0  # 0-bit rows give zeros in both
        for m, key in ((64, name), (1, f"{name}@1")):  # a prefill's and a decode step's kernels
            x = torch.randn(m, shape[1], generator=g)
            ref = x @ ref_w.t()
            got = swapped[name](x.to(device, torch.bfloat16)).float().cpu()
            err[key] = float((got - ref)[:, keep].norm() / ref[:, keep].norm()) if keep.any() else 0.0
    for prod, cons in producers.items():  # the fold: the pair's output against the unpermuted weights'
        x = torch.randn(64, linears[prod].weight.shape[1], generator=g)
        ref = F.gelu(x @ dequantize_storage(storages[prod], linears[prod].weight.shape).t())
        ref = ref @ dequantize_storage(storages[cons], linears[cons].weight.shape).t()
        if cons in producers:  # it emits its own outputs in bucket order
            ref = ref[:, bucket_order(bits[cons])]
        xin = x[:, bucket_order(bits[consumers[prod]])] if prod in consumers else x  # it takes permuted inputs
        got = swapped[cons](F.gelu(swapped[prod](xin.to(device, torch.bfloat16)))).float().cpu()
        err[f"{prod}->{cons}"] = float((got - ref).norm() / ref.norm())
    return Block(kind, swapped), sum(m.weight_nbytes for m in swapped.values()), err


class Timer:
    """A case captured in a CUDA graph and replayed between CUDA events (on a CPU, called and timed). Before each
    replay a 256 MB buffer is written, so no weights are left in the GPU's L2 (60 MB on an H200) from the replay
    before: the model runs 24-32 distinct layers in a row, and a layer of the vision towers would fit there."""

    FLUSH_BYTES = 256 << 20

    def __init__(self, fn, device) -> None:
        self.device, self.fn = device, fn
        if device.type == "cuda":
            self.flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device=device)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()  # warm-up, as capture wants
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()
        else:
            fn()

    def ms(self, calls: int = 5) -> float:
        """Mean ms of `calls` replays, each timed alone after the flush."""
        if self.device.type != "cuda":
            t = time.perf_counter()
            for _ in range(calls):
                self.fn()
            return (time.perf_counter() - t) * 1e3 / calls
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for a, b in events:
            self.flush.zero_()  # the GPU is busy with it while the replay is queued behind
            a.record()
            self.graph.replay()
            b.record()
        events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in events) / calls


def device_record(device) -> dict:
    rec = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rec.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    return rec


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=20, help="rounds; each times every form once (5 replays)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--decoder-layers", type=int, default=LAYERS["decoder"],
                    help="decoder layers the step and the memory count (Llama-2-7B: 32)")
    ap.add_argument("--kinds", default=",".join(SHAPES), help="layer kinds to time (the control step needs all)")
    ap.add_argument("--int8-gemv", choices=("int8pack", "widen"), default="int8pack",
                    help="8-bit A16 rows at up to 4 tokens: torch._weight_int8pack_mm, or widened to bf16 as at more")
    a = ap.parse_args(argv)
    LAYERS["decoder"] = a.decoder_layers  # one layer of each kind is timed; counts extrapolate
    gemv = a.int8_gemv == "int8pack"
    device = torch.device(a.device)
    forms, kinds = a.forms.split(","), a.kinds.split(",")
    plans = {FORMS[f][0]: random_plan(*FORMS[f][0]) for f in forms if isinstance(FORMS[f][0], tuple)}
    result = {"device": device_record(device), "layers": LAYERS, "prefill_tokens": PREFILL, "runs": a.runs,
              "int4_groups": GROUPS, "tolerance": {"layer": TOLERANCE, "folded_pair": PAIR_TOLERANCE},
              "int8_weight_only": ("torch._weight_int8pack_mm up to 4 tokens, widened to bf16 beyond"
                                   if gemv and int8_weight_only(device) else "rows widened to bf16 per call"),
              "forms": {f: {"per_layer_ms": {}, "per_layer_bytes": {}, "rel_error": {}} for f in forms}}
    for kind in kinds:
        timers = {}
        for form in forms:
            block, nbytes, err = build(kind, form, plans, device, gemv)
            if off(err):
                raise RuntimeError(f"{form} {kind}: output off its dequantized weights: {off(err)} (all: {err})")
            r = result["forms"][form]
            r["per_layer_bytes"][kind], r["rel_error"][kind] = nbytes, err
            timers[form] = {case: Timer(fn, device)  # as scale.cases: prefill, and one decode step
                            for case, (fn, _) in cases(kind, block, torch.bfloat16, device).items()}
        times = {form: {case: [] for case in ts} for form, ts in timers.items()}
        for r in range(a.runs):
            for form in turned(forms, r):
                for case, timer in timers[form].items():
                    times[form][case].append(timer.ms())
        for form in forms:
            result["forms"][form]["per_layer_ms"][kind] = {c: statistics.median(v) for c, v in times[form].items()}
        print(kind, {f: {c: round(v, 4) for c, v in result["forms"][f]["per_layer_ms"][kind].items()} for f in forms},
              file=sys.stderr, flush=True)
        del timers, block
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if set(kinds) == set(SHAPES):
        for form, r in result["forms"].items():
            r["model_bytes"] = model_bytes(form, r["per_layer_bytes"])
            r["control_step_ms"] = control_step(r["per_layer_ms"])
        if "bf16" in forms:
            ref = result["forms"]["bf16"]
            for r in result["forms"].values():
                r["memory_vs_bf16"] = r["model_bytes"] / ref["model_bytes"]
                r["speedup_vs_bf16"] = {k: ref["control_step_ms"][k] / v for k, v in r["control_step_ms"].items()}
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
