"""OmniQuant trained block by block, as the paper does (Shao et al., 2024, Algorithm 1): the blocks of the
policy (`policy.quant_blocks()`: ViT blocks, projector, decoder layers, action head, in forward order) are
trained one after the other, each block's LWC and LET parameters (omniquant.OmniLinear, every Linear of the
block at once) fitted so that the quantized block, fed the outputs of the blocks already quantized, matches
the full-precision block fed full-precision inputs:

    for block k:  min  || block_k^q(x_k^q) - block_k(x_k) ||^2,   then  x_{k+1}^q = block_k^q(x_k^q)

so each block learns to undo the error its quantized inputs carry, which the per-layer `omniquant` (each
Linear on its full-precision inputs) does not see. AdamW on the calibration steps' batches, EPOCHS passes,
the learning rates of the per-layer version. Weight-only settings train LWC alone, as the paper's scripts
run Llama models (`--lwc`; `--lwc --let` with quantized activations): on the chunk policy at W4A16, LET
trained per block left every block's error higher than LWC alone did and the actions' deviation on the
calibration steps at 15.5 against 8.6. Linear layers outside every block (the proprio projection, the
token head's lm_head) are trained per layer as `omniquant` trains them; convs are rounded as RTN; both are
quantized before the first block, so the first block's inputs carry their error too.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from qvla.quant.apply import FACTORIES
from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.omniquant import OmniLinear, train_layer
from qvla.quant.methods.rtn import uniform_bits, uniform_plan

EPOCHS = 20  # passes over the calibration batches per block
LR = 5e-3
BATCH = 16  # calibration steps per batch


def _batches(policy, observations: list) -> list[dict]:
    return [policy.teacher_ids(policy.batch(observations[s:s + BATCH])) for s in range(0, len(observations), BATCH)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_calls(policy, block: str, batches: list[dict]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """Every call of the block during the policy's forward over the batches -> (args, kwargs, its output)."""
    calls: list = []
    mod = policy.model.get_submodule(block)
    pre = mod.register_forward_pre_hook(lambda m, a, k: calls.append([a, k]), with_kwargs=True)
    post = mod.register_forward_hook(lambda m, a, out: calls[-1].append(_first(out).detach()))
    form = policy.output_forms()[0]
    try:
        for b in batches:
            policy.action_outputs(b, form)
    finally:
        pre.remove()
        post.remove()
    return [tuple(c) for c in calls]


def _swap(model: nn.Module, names: dict[str, nn.Module]) -> None:
    for n, new in names.items():
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def train_block(block: nn.Module, q_calls: list, fp_outputs: list[torch.Tensor], bits: dict[str, int],
                a_bits: int, epochs: int = EPOCHS, lr: float = LR, seed: int = 0, let: bool = True
                ) -> tuple[dict[str, dict], dict]:
    """-> ({Linear name within the block: its OmniQuant transform}, the block's mean squared output error
    before and after training), trained jointly on the block's output.
    block: a full-precision copy (changed in place); q_calls: (args, kwargs) of each call, inputs quantized."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n in bits
               and (bits[n] < 16 or a_bits < 16)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for args, kwargs in q_calls:
            block(*args, **kwargs)
    for h in hooks:
        h.remove()
    layers = {n: OmniLinear(torch.cat(seen[n]).float(), m.weight, m.bias, bits[n], a_bits, let)
              for n, m in linears.items()}
    _swap(block, layers)
    for p in block.parameters():
        p.requires_grad_(False)
    groups = [g for layer in layers.values() for g in layer.param_groups(lr)]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_now() -> float:
        with torch.no_grad():
            return sum(float((_first(block(*a, **k)) - o).pow(2).mean()) for (a, k), o in zip(q_calls, fp_outputs)) / len(q_calls)

    history = {"start": loss_now()}
    for _ in range(epochs):
        for i in torch.randperm(len(q_calls), generator=gen).tolist():
            args, kwargs = q_calls[i]
            loss = (_first(block(*args, **kwargs)) - fp_outputs[i]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    history["end"] = loss_now()
    return {n: layer.transform() for n, layer in layers.items()}, history


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    if not hasattr(policy, "quant_blocks"):
        raise ValueError(f"omniquant-block trains the policy's blocks: {policy.name} lists none (quant_blocks())")
    bits = uniform_bits(policy, cfg)
    mods = dict(policy.model.named_modules())
    blocks = policy.quant_blocks()
    let = cfg.a_bits < 16  # the paper's scripts train Llama models weight-only with LWC alone
    owner = {n: next((b for b in blocks if n.startswith(b + ".")), None) for n in bits}
    low = {n for n in bits if int(bits[n][0]) < 16}
    outside = [n for n in low if owner[n] is None and isinstance(mods[n], nn.Linear)]
    transforms = {n: train_layer(x, mods[n].weight, mods[n].bias, int(bits[n][0]), cfg.a_bits)
                  for n, x in collect_inputs(policy, observations, outside, max_rows=4096).items()}
    quant = copy.deepcopy(policy)  # the policy with every layer trained so far quantized
    _swap(quant.model, {n: FACTORIES[type(mods[n])](mods[n], bits[n].long(), cfg.a_bits, transforms.get(n))
                        for n in bits if owner[n] is None})
    batches = _batches(policy, observations)
    losses: dict[str, dict] = {}
    for b in blocks:
        inside = {n[len(b) + 1:]: int(bits[n][0]) for n in bits if owner[n] == b}
        fp = block_calls(policy, b, batches)
        q = block_calls(quant, b, batches)
        if len(fp) != len(q):
            raise RuntimeError(f"block {b} ran {len(q)} times quantized and {len(fp)} times in full precision")
        found, losses[b] = train_block(copy.deepcopy(mods[b]), [(a, k) for a, k, _ in q], [o for _, _, o in fp], inside,
                                       cfg.a_bits, let=let)
        transforms.update({f"{b}.{n}": t for n, t in found.items()})
        _swap(quant.model, {f"{b}.{n}": FACTORIES[type(mods[f"{b}.{n}"])](mods[f"{b}.{n}"], bits[f"{b}.{n}"].long(),
                                                                           cfg.a_bits, transforms.get(f"{b}.{n}"))
                            for n in inside})
    return uniform_plan(policy, cfg, transforms,
                        {**(provenance or {}), "epochs": EPOCHS, "let": let, "blocks": blocks, "block_loss": losses,
                         "coverage": "Linear layers trained per block (per layer outside blocks); convs RTN"})
