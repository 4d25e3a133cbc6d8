"""Scale benchmark: memory and batch-1 control-step latency of an OpenVLA-7B-shaped stack on this machine.

The stack has OpenVLA's shapes with random weights: a Llama-2-7B decoder (hidden 4096, MLP 11008,
32 heads, 32 layers), the fused DINOv2-L (1024 / 4096, 24 layers) + SigLIP-so400m (1152 / 4304, 27
layers) vision towers on 256 patches, the fused-GELU MLP projector (2176 -> 8704 -> 4096 -> 4096),
a 32000-token LM head (8 bits in every quantized form), and an OFT-style action head (4096 -> 4096 -> 4096 -> 7 on 56 action tokens).
One layer of each kind is built and timed; the full model is extrapolated by layer counts (--decoder-layers
sets the decoder's).

A control step is what OpenVLA runs per action: both towers on 256 patches, the projector, the
decoder prefill of 256 image + 20 prompt tokens, then 7 single-token decode steps with a preallocated KV cache,
each ending in the LM head. Forms compared: fp32, bf16, uniform W8A8 and W4A16 (RTN), and QVLA plans
at average budgets 8 and 4 allocated by the global greedy from random per-channel sensitivities
(lognormal channel importance times the 2^-b error of each width; pruning costs most).
The budget-4 plan also runs at W4A8 and W4A4 (`qvla-4-a8`, `qvla-4-a4`) and not only at W4A16, and at W4A4 with
the input transform of each W4A4 method: qvla-sq-gptq's per-channel scales (`qvla-4-a4-smooth`) and qvla-rot-gptq's
block-Hadamard rotation (`qvla-4-a4-rot`).

    python bench/scale.py --out results/scale/cpu.json        # ~15 min on 2 cores
    python bench/scale.py --interleave --runs 9 --forms bf16,w8a8,w4a16,qvla-4,qvla-4-a4 --out FILE.json
                                                              # forms timed round by round, per-round ratios
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla import allocator
from qvla.bench import device_info
from qvla.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from qvla.quant import allocate
from qvla.quant.apply import QuantLinear
from qvla.quant.packed import PackedLinear, bucket_order
from qvla.quant.rotation import random_signs
from qvla.quant.storage import permute_inputs

PREFILL, DECODE_STEPS, PROMPT = 256 + 20, 7, 20
LAYERS = {"decoder": 32, "dino": 24, "siglip": 27, "projector": 1, "lm_head": 1, "action_head": 1}
SHAPES = {  # kind -> {linear name: (out, in)}
    "decoder": {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
                "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)},
    "dino": {"qkv": (3072, 1024), "proj": (1024, 1024), "fc1": (4096, 1024), "fc2": (1024, 4096)},
    "siglip": {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4304, 1152), "fc2": (1152, 4304)},
    "projector": {"fc1": (8704, 2176), "fc2": (4096, 8704), "fc3": (4096, 4096)},
    "lm_head": {"head": (32000, 4096)},
    "action_head": {"fc1": (4096, 4096), "fc2": (4096, 4096), "fc3": (7, 4096)},
}
HEADS = {"decoder": 32, "dino": 16, "siglip": 16}
ERR = {16: 0.0, 8: 1.0, 4: 16.0, 2: 64.0, 0: 400.0}  # activation error of each width, relative to 8 bits
FOLDS = {"dino": [("fc1", "fc2")], "siglip": [("fc1", "fc2")], "projector": [("fc1", "fc2"), ("fc2", "fc3")]}
EMBED_PARAMS = 32000 * 4096  # token embedding: a table lookup, kept at 16 bits (fp32 in the fp32 form)


def make_linears(kind: str, seed: int) -> dict[str, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, k) in SHAPES[kind].items():
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) / math.sqrt(k))
        out[name] = lin
    return out


def random_plan(budget: float, held: bool = False, seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    """Global greedy over one layer of every kind, each channel weighted by how often its layer repeats."""
    rng = np.random.default_rng(seed)
    keys, cost, fan_in = [], [], []
    for kind, shapes in SHAPES.items():
        if kind == "lm_head":
            continue  # the LM head stays at 16 bits, as the embedding (reported on their own)
        for name, (n, k) in shapes.items():
            importance = rng.lognormal(0.0, 1.0, n) * LAYERS[kind]
            cost.append(importance[:, None] * np.array([ERR[b] for b in allocate.CHAIN])[None] * math.sqrt(k))
            fan_in.append(np.full(n, k * LAYERS[kind]))
            keys.append(((kind, name), n))
    cost, fan_in = np.concatenate(cost), np.concatenate(fan_in).astype(float)
    widths = tuple(allocate.HELD[b] for b in allocate.CHAIN) if held else allocate.CHAIN
    bits = allocate.greedy(allocate.Problem(cost, fan_in, np.ones_like(cost, dtype=bool), widths), budget)
    plan, i = {}, 0
    for key, n in keys:
        plan[key] = torch.from_numpy(bits[i:i + n].copy()).long()
        i += n
    return plan


def uniform(bits: int):
    return lambda kind, name, n: torch.full((n,), bits, dtype=torch.long)


def quantized(kind: str, linears: dict[str, nn.Linear], bits: dict[str, torch.Tensor], a_bits: int,
              fold: bool, transform=None, tensors: dict | None = None) -> dict[str, PackedLinear]:
    """Packed layers of one block; with fold, each GELU MLP's producer emits its channels by bucket and the
    consumer's input columns are permuted to match (as qvla.load does for a policy's fold_pairs).
    transform: (fan-in, seed) -> the input transform every layer runs. tensors: filled with the packed
    storage a checkpoint of the block writes."""
    storages = {name: QuantLinear.from_linear(lin, bits[name], a_bits,
                                              transform(lin.weight.shape[1], i) if transform else None).storage()
                for i, (name, lin) in enumerate(linears.items())}
    # a rotated layer mixes all of its inputs: it cannot take them permuted (the pairs qvla.load drops too)
    producers = {p: c for p, c in FOLDS.get(kind, []) if "in_signs" not in storages[c]} if fold else {}
    consumers = {c: p for p, c in producers.items()}
    out = {}
    for name, storage in storages.items():
        if name in consumers:
            storage = permute_inputs(storage, bucket_order(bits[consumers[name]]))
        if tensors is not None:
            tensors.update({f"{name}.{key}": t for key, t in storage.items()})
        out[name] = PackedLinear(storage, linears[name].weight.shape, None, a_bits, folded=name in producers)
    return out


class KVCache:
    """A preallocated KV cache, as gpt-fast keeps one: the prefill writes the first positions, a decode step
    writes its own in place and attends over the filled prefix, so no step copies the cache (a torch.cat of
    the whole cache per step had cost ~1.3 ms of a 16 ms fp32 W8A8 decode step of the 7B decoder layer on the
    AVX2 CPU). fork() is a step that is not kept: it shares the buffers and writes the next slot again."""

    def __init__(self, size: int = PREFILL + DECODE_STEPS) -> None:
        self.size, self.len, self.k, self.v = size, 0, None, None

    def fork(self) -> "KVCache":
        c = KVCache(self.size)
        c.len, c.k, c.v = self.len, self.k, self.v
        return c

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = (z.new_empty(*z.shape[:2], self.size, z.shape[3]) for z in (k, v))
        end = self.len + k.shape[2]
        if end > self.size:
            raise ValueError(f"KV cache of {self.size} positions cannot take {end}")
        self.k[:, :, self.len:end], self.v[:, :, self.len:end] = k, v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Block(nn.Module):
    """One layer of a kind, with its linears swapped for the form under test; attention / MLP glue in fp32
    (bf16 for the bf16 form)."""

    def __init__(self, kind: str, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.ModuleDict(linears)
        self.attend = F.scaled_dot_product_attention  # an attribute, so bench/decode_parts.py can time it

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        L = self.lin
        if self.kind in ("projector", "action_head"):
            for i, name in enumerate(L):
                x = L[name](x)
                x = F.gelu(x) if i < len(L) - 1 else x
            return x
        if self.kind == "lm_head":
            return L["head"](x)
        heads = HEADS[self.kind]
        b, t, d = x.shape
        if self.kind == "decoder":
            q, k, v = L["q"](x), L["k"](x), L["v"](x)
        else:
            q, k, v = L["qkv"](x).split(d, -1)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v)
        a = self.attend(q, k, v, is_causal=self.kind == "decoder" and t > 1)
        x = x + (L["o"] if "o" in L else L["proj"])(a.transpose(1, 2).reshape(b, t, d))
        if self.kind == "decoder":
            return x + L["down"](F.silu(L["gate"](x)) * L["up"](x))
        return x + L["fc2"](F.gelu(L["fc1"](x)))


FORMS = {  # name -> (bits for (kind, name, n) or a plan budget, activation bits, dtype)
    "fp32": (None, 16, torch.float32),
    "bf16": (None, 16, torch.bfloat16),
    "w8a8": (uniform(8), 8, torch.float32),
    "w4a16": (uniform(4), 16, torch.float32),
    "qvla-8": ((8.0, False), 8, torch.float32),
    "qvla-4": ((4.0, False), 16, torch.float32),  # budget counts bits as stored (= held by qvla's kernel)
    "qvla-4-a8": ((4.0, False), 8, torch.float32),  # the budget-4 plan with activations at 8 bits (W4A8)
    "qvla-4-a4": ((4.0, False), 4, torch.float32),  # ... and at 4 bits: the published W4A4 setting
    "qvla-4-held": ((4.0, True), 16, torch.float32),  # 2-bit rows counted as 4 (torch int4 fallback)
    "qvla-4-scatter": ((4.0, False), 16, torch.float32),  # qvla-4 with the permutation undone by index copy
    "qvla-4-a4-smooth": ((4.0, False), 4, torch.float32),  # W4A4 with qvla-sq-gptq's per-input-channel scales
    "qvla-4-a4-rot": ((4.0, False), 4, torch.float32),  # W4A4 with qvla-rot-gptq's randomized block-Hadamard
}
# the input transform a form's layers run (as the checkpoint stores it): (fan-in, seed) -> transform
TRANSFORMS = {
    "qvla-4-a4-smooth": lambda k, seed: {"in_scale": torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.5},
    "qvla-4-a4-rot": lambda k, seed: {"in_signs": random_signs(k, seed)},
}


def layer_bits(kind: str, bits_of, plans: dict, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Each linear's per-channel bits in a quantized form: its plan's (bits_of a plan key) or uniform ones."""
    plan = plans[bits_of] if isinstance(bits_of, tuple) else None
    bits = {}
    for name, lin in linears.items():
        if kind == "lm_head":  # kept at 8 bits in every quantized form (a plan pin; it runs once per token)
            bits[name] = torch.full((lin.weight.shape[0],), 8, dtype=torch.long)
        else:
            bits[name] = plan[(kind, name)] if plan is not None else bits_of(kind, name, lin.weight.shape[0])
    return bits


def build(kind: str, form: str, plans: dict, tensors: dict | None = None) -> tuple[Block, int]:
    """-> (block, bytes of weights it holds); tensors: filled with what a checkpoint of the block writes."""
    bits_of, a_bits, dtype = FORMS[form]
    linears = make_linears(kind, seed=sum(map(ord, kind)))  # the same weights in every process (hash() is salted)
    if bits_of is None:
        block = Block(kind, linears).to(dtype)
        if tensors is not None:
            tensors.update({f"{name}.weight": lin.weight.detach() for name, lin in block.lin.items()})
        return block, sum(m.weight.numel() for m in linears.values()) * (2 if dtype == torch.bfloat16 else 4)
    bits = layer_bits(kind, bits_of, plans, linears)
    swapped = quantized(kind, linears, bits, a_bits, not form.endswith("-scatter"), TRANSFORMS.get(form), tensors)
    return Block(kind, swapped), sum(m.weight_nbytes for m in swapped.values())


def timed(fn) -> float:
    """ms one call of fn takes."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def write_result(out: str, result: dict, show: tuple[str, ...] = ()) -> None:
    """The benchmark's JSON to `out`; the keys in `show` printed too."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    if show:
        print(json.dumps({k: result[k] for k in show}, indent=1))


def median_ms(fn, runs: int) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(runs))


def cases(kind: str, block: Block, dtype, device=None) -> dict[str, tuple]:
    """What is timed of one block: {case: (fn, calls per run)}. Decode steps are short, so each run takes
    three of them (their median)."""
    if kind in ("dino", "siglip"):
        x = torch.randn(1, 256, block_dim(kind), dtype=dtype, device=device)
        return {"prefill": (lambda: block(x), 1)}
    d_in = next(iter(SHAPES[kind].values()))[1]
    if kind in ("projector", "action_head"):
        x = torch.randn(1, 256 if kind == "projector" else 56, d_in, dtype=dtype, device=device)
        return {"prefill": (lambda: block(x), 1)}
    if kind == "lm_head":
        x = torch.randn(1, 1, d_in, dtype=dtype, device=device)
        return {"decode": (lambda: block(x), 1)}
    x = torch.randn(1, PREFILL, d_in, dtype=dtype, device=device)
    cache = KVCache()
    block(x, cache)
    one = torch.randn(1, 1, d_in, dtype=dtype, device=device)
    return {"prefill": (lambda: block(x, KVCache()), 1), "decode": (lambda: block(one, cache.fork()), 3)}


@torch.no_grad()
def time_kind(kind: str, block: Block, dtype, runs: int) -> dict[str, float]:
    return {case: median_ms(fn, runs * calls) for case, (fn, calls) in cases(kind, block, dtype).items()}


@torch.no_grad()
def turned(items: list, r: int) -> list:
    """items in the order of round r: turned by r places, so each comes first in turn."""
    return items[r % len(items):] + items[:r % len(items)]


def time_interleaved(kind: str, blocks: dict[str, tuple[Block, torch.dtype]], rounds: int,
                     probe) -> tuple[list[dict[str, dict[str, float]]], list[float]]:
    """Every round times each form once (in an order that turns every round), so a drift of the machine
    hits all forms alike, and the memory read probe once. -> ([{form: {case: ms}} per round], [GB/s])."""
    timers = {form: cases(kind, block, dtype) for form, (block, dtype) in blocks.items()}
    for ts in timers.values():
        for fn, _ in ts.values():
            fn()  # warm-up
    forms, out, read = list(blocks), [], []
    for r in range(rounds):
        this = {}
        for form in turned(forms, r):
            this[form] = {case: statistics.median(timed(fn) for _ in range(calls))
                          for case, (fn, calls) in timers[form].items()}
        read.append(probe())
        out.append(this)
    return out, read


def read_probe(mb: int = 512):
    """A plain read of `mb` MB (an fp32 sum, both threads): the memory bandwidth the machine gives this process
    now, against which a decode step, a stream of weights, is measured. -> fn() -> GB/s."""
    buf = torch.rand(mb * 2**20 // 4)

    def probe() -> float:
        return buf.numel() * 4 / 1e9 / (timed(buf.sum) / 1e3)
    return probe


def block_dim(kind: str) -> int:
    return SHAPES[kind]["proj"][0]


def control_step(t: dict[str, dict[str, float]]) -> dict[str, float]:
    """Extrapolated per-step latency (ms) of the OpenVLA step from per-layer timings."""
    vision = LAYERS["dino"] * t["dino"]["prefill"] + LAYERS["siglip"] * t["siglip"]["prefill"]
    prefill = LAYERS["decoder"] * t["decoder"]["prefill"] + t["projector"]["prefill"]
    decode = DECODE_STEPS * (LAYERS["decoder"] * t["decoder"]["decode"] + t["lm_head"]["decode"])
    return {"vision": vision, "prefill": prefill, "decode": decode, "step": vision + prefill + decode,
            "oft_step": vision + prefill + LAYERS["decoder"] * 56 / PREFILL * t["decoder"]["prefill"]
            + t["action_head"]["prefill"]}


def model_bytes(form: str, per_kind: dict[str, int]) -> int:
    """The whole model's bytes from one layer's of each kind, by layer counts, with the token embedding (a table
    lookup: 16 bits, fp32 in the fp32 form)."""
    return sum(LAYERS[k] * per_kind[k] for k in SHAPES) + EMBED_PARAMS * (4 if form == "fp32" else 2)


def form_result(form: str, per_layer: dict, nbytes: dict) -> dict:
    return {"per_layer_ms": per_layer, "per_layer_bytes": nbytes, "model_bytes": model_bytes(form, nbytes),
            "control_step_ms": control_step(per_layer)}


def interleaved(forms: list[str], make: Builder, rounds: int, result: dict) -> None:
    """--interleave: per layer kind, every form's block is built and the forms are timed round by round.
    Adds each form's per-round control steps and their ratios to bf16's in the same rounds (the spread a
    ratio has on this machine), and the decode step's weight read rate against the read probe's."""
    probe = read_probe()
    per_round = {form: [{} for _ in range(rounds)] for form in forms}
    nbytes, reads = {form: {} for form in forms}, {}
    for kind in SHAPES:
        blocks = {}
        for form in forms:
            block, nbytes[form][kind] = make(kind, form)
            blocks[form] = (block, FORMS[form][2])
        times, reads[kind] = time_interleaved(kind, blocks, rounds, probe)
        del blocks
        for r, this in enumerate(times):
            for form, t in this.items():
                per_round[form][r][kind] = t
        print(kind, {f: {c: round(statistics.median(tr[f][c] for tr in times), 2) for c in times[0][f]}
                     for f in forms}, f"read {statistics.median(reads[kind]):.1f} GB/s", file=sys.stderr, flush=True)
    result["read_probe_gbs"] = {kind: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                for kind, v in reads.items()}
    read = statistics.median(reads["decoder"])
    for form in forms:
        per_layer = {kind: {case: statistics.median(rd[kind][case] for rd in per_round[form])
                            for case in per_round[form][0][kind]} for kind in SHAPES}
        r = result["forms"][form] = form_result(form, per_layer, nbytes[form])
        r["rounds_control_step_ms"] = [control_step(rd) for rd in per_round[form]]
        r["rounds_per_layer_ms"] = per_round[form]
        gbs = nbytes[form]["decoder"] / 1e9 / (per_layer["decoder"]["decode"] / 1e3)
        r["decoder_decode_read_gbs"] = {"gbs": gbs, "vs_read_probe": gbs / read}
    result["interleaved"] = True
    if "bf16" in forms:
        ref = result["forms"]["bf16"]["rounds_control_step_ms"]
        for form in forms:
            r = result["forms"][form]
            r["rounds_speedup_vs_bf16"] = spread(ref, r["rounds_control_step_ms"])
            r["rounds_decoder_vs_bf16"] = spread([rd["decoder"] for rd in per_round["bf16"]],
                                                 [rd["decoder"] for rd in per_round[form]])


def spread(ref: list[dict[str, float]], ms: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max over rounds of ref's time / ms, per key."""
    ratios = [{k: b[k] / q[k] for k in q} for b, q in zip(ref, ms)]
    return {k: {"median": statistics.median(x[k] for x in ratios), "min": min(x[k] for x in ratios),
                "max": max(x[k] for x in ratios)} for k in ratios[0]}


class Builder:
    """build() for the timing loops; with disk_dir, each block's tensors are also written as a qvla checkpoint
    (safetensors + config with checksums), read back with its checksums checked, and its weight file's bytes
    kept in disk[form][kind] (--disk)."""

    def __init__(self, plans: dict, disk_dir: str | None = None) -> None:
        self.plans, self.dir, self.disk = plans, disk_dir, {}

    def __call__(self, kind: str, form: str) -> tuple[Block, int]:
        tensors = {} if self.dir else None
        block, nbytes = build(kind, form, self.plans, tensors)
        if self.dir:
            out = save_checkpoint(Path(self.dir) / f"{form}-{kind}", {"form": form, "kind": kind}, tensors)
            _, back = load_checkpoint(out)
            if back.keys() != tensors.keys() or any(not torch.equal(back[k], t) for k, t in tensors.items()):
                raise RuntimeError(f"{form} {kind}: the checkpoint read back differs from what was written")
            self.disk.setdefault(form, {})[kind] = (out / WEIGHTS).stat().st_size
            shutil.rmtree(out)
        return block, nbytes

    def record(self, result: dict) -> None:
        """Each form's bytes on disk, extrapolated as the memory is."""
        for form, per_kind in self.disk.items():
            r = result["forms"][form]
            r["per_layer_disk_bytes"], r["model_disk_bytes"] = per_kind, model_bytes(form, per_kind)
            print(form, "on disk", f"{r['model_disk_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--decoder-layers", type=int, default=LAYERS["decoder"],
                    help="decoder layers the step and the memory count (Llama-2-7B: 32)")
    ap.add_argument("--interleave", action="store_true",
                    help="time the forms round by round (--runs rounds), each layer kind's blocks built side by "
                         "side, with a memory read probe per round; per-round ratios to bf16 in the output")
    ap.add_argument("--disk", action="store_true",
                    help="also write each form's layers as qvla checkpoints and report the bytes on disk")
    a = ap.parse_args(argv)
    LAYERS["decoder"] = a.decoder_layers  # one layer of each kind is timed; counts extrapolate
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()  # freed activations are reused, for every form timed here (qvla.allocator)
    torch.set_flush_denormal(True)
    forms = a.forms.split(",")
    plans = {FORMS[f][0]: random_plan(*FORMS[f][0]) for f in forms if isinstance(FORMS[f][0], tuple)}
    result = {"device": device_info(a.threads), "layers": LAYERS, "prefill_tokens": PREFILL,
              "decode_steps": DECODE_STEPS, "runs": a.runs, "forms": {}}
    for (b, held), plan in plans.items():
        allb = torch.cat(list(plan.values()))
        result[f"plan_{b:g}{'_held' if held else ''}_channels_by_bits"] = {
            int(k): int((allb == k).sum()) for k in (16, 8, 4, 2, 0)}
    with tempfile.TemporaryDirectory() as disk_dir:
        make = Builder(plans, disk_dir if a.disk else None)
        if a.interleave:
            interleaved(forms, make, a.runs, result)
        else:
            for form in forms:
                per_layer, nbytes = {}, {}
                for kind in SHAPES:
                    block, nbytes[kind] = make(kind, form)
                    per_layer[kind] = time_kind(kind, block, FORMS[form][2], a.runs)
                    del block
                    print(form, kind, {k: round(v, 2) for k, v in per_layer[kind].items()}, file=sys.stderr,
                          flush=True)
                result["forms"][form] = form_result(form, per_layer, nbytes)
        make.record(result)
    ref = result["forms"].get("bf16")
    for form, r in result["forms"].items():
        if ref:
            r["memory_vs_bf16"] = r["model_bytes"] / ref["model_bytes"]
            if a.disk:
                r["disk_vs_bf16"] = r["model_disk_bytes"] / ref["model_disk_bytes"]
            r["speedup_vs_bf16"] = {k: ref["control_step_ms"][k] / v for k, v in r["control_step_ms"].items()}
        if "fp32" in result["forms"]:
            f32 = result["forms"]["fp32"]["control_step_ms"]
            r["speedup_vs_fp32"] = {k: f32[k] / v for k, v in r["control_step_ms"].items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
