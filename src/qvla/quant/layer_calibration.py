"""Layer-calibrated sensitivities (the '+lc' suffix): the first-order proxy checked, layer by layer, against the
action deviation it predicts, at the plan the allocation actually makes.

The per-channel costs add up channel by channel. Within one layer that mostly holds (token policy, 3-bit
plan: measured / predicted has median 1.02, 32 of 39 layers within 0.8-1.25) and fails where the allocation
prunes most of a layer (429 of the 512 channels of a vision MLP: the measured deviation is 3.3x the sum of
the channels' costs, 4.3x for the layer after it; removing most of a layer's output is not a small
perturbation). So:

    repeat R rounds:
        bits  = allocate(costs)
        for every layer l the plan quantizes:
            truth_l = deviation of the policy's outputs when only layer l is quantized at bits[l]
            pred_l  = sum_c raw_cost[l, c, bits[l, c]]
            scale_l = max(scale_l, truth_l / pred_l)        (starts at 1)
        costs[l] = scale_l * raw_cost[l]
    then allocate once more and measure that allocation (the plan's), without rescaling.

Under the action distance (form "action": continuous heads, or a token head's expected action) the sum of a layer's channel costs is an upper bound on its
deviation (the triangle inequality: ||sum_c J_c dx_c|| <= sum_c ||J_c dx_c||), loose by how much the channels'
action errors cancel: on the chunk policy every layer measures 0.1-0.7x its sum, so comparing with 1 would
never rescale anything. There the unit is the median ratio over the measured layers (a common factor that
does not change the allocation): a layer is rescaled by how much worse than the typical layer its proxy
does, scale_l = max(scale_l, ratio_l / median_k ratio_k). KL costs (token heads, Fisher form) add up, so
their unit is 1.

'+lcl' (form "action" only) replaces that unit with an additive baseline: each layer's measured deviation is
compared with its own first-order prediction, the linearized error of the whole layer,
pred_l = sum_n ||J_n dy_n,l|| (dy_n,l: the layer's output error at its planned bits, every channel at once; J_n
from one backward pass per output dimension). The ratio then measures only how far the layer is from its
linearization, e.g. where most of it is pruned, and the unit is 1. The channel sum also holds the
cancellation between channels, which differs from layer to layer (0.1-0.7x on the chunk policy), and the
median unit only approximates it.

Scales only grow: a layer found worse than its proxy stays penalized after the allocation backs off from it,
rather than being cut again in the next round; a layer the proxy overestimates keeps its raw costs. Measured
with the same quantizer the sensitivities were (the plan's fake-quant layer with RTN at the planned bits,
per-token activation rounding at the plan's activation bits, and the layer's rotation where the tables were
measured on rotated layers) and the same deviation (L2 action deviation, or KL of the action-token
distributions), weighted per step as the sensitivities were.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from qvla.quant.apply import FACTORIES
from qvla.quant.sensitivity import (
    SENS_BITS,
    Sensitivity,
    _probe_scalars,
    _Recorder,
    batches,
    output_errors,
    per_sample,
    per_step_deviation,
    quantizable,
)

ROUNDS = 3
BASELINES = ("channels", "linearized")


@torch.no_grad()
def layer_deviations(policy, batches: list[dict], form: str, bits: dict[str, torch.Tensor], a_bits: int,
                     step_w: torch.Tensor, transforms: dict[str, dict[str, torch.Tensor]] | None = None
                     ) -> dict[str, float]:
    """layer -> weighted sum over calibration steps of the output deviation with only that layer quantized,
    as the plan's fake-quant layer runs it (RTN at its bits, activation rounding, the layer's transform)."""
    model = policy.model.eval()
    ref = [policy.action_outputs(b, form) for b in batches]
    out = {}
    for n, b in bits.items():
        if bool((b >= 16).all()) and a_bits >= 16:
            continue
        parent, _, child = n.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        mod = getattr(holder, child)
        setattr(holder, child, FACTORIES[type(mod)](mod, b.long(), a_bits, (transforms or {}).get(n)))
        try:
            dev = torch.cat([per_step_deviation(r, policy.action_outputs(bt, form), form)
                             for r, bt in zip(ref, batches)])
        finally:
            setattr(holder, child, mod)
        out[n] = float((dev.double() * step_w).sum())
    return out


def linearized_deviations(policy, batches: list[dict], bits: dict[str, torch.Tensor], a_bits: int,
                          step_w: torch.Tensor, transforms: dict[str, dict[str, torch.Tensor]] | None = None
                          ) -> dict[str, float]:
    """layer -> weighted sum over calibration steps of ||J dy_layer||, the first-order prediction of
    layer_deviations' action deviation (form "action"): dy_layer is the layer's output error with every
    channel at its planned bits (the same RTN rounding, activation rounding and transform), J the Jacobian
    of the actions w.r.t. the layer's output, one exact backward pass per action dimension."""
    model = policy.model.eval()
    targets = {n: model.get_submodule(n) for n in bits}
    names = list(targets)
    cols = {n: torch.tensor([SENS_BITS.index(int(x)) for x in bits[n]]) for n in names}
    out = {n: 0.0 for n in names}
    rec, start = _Recorder(targets), 0
    try:
        for b in batches:
            rec.active = True
            with torch.enable_grad():
                y = policy.action_outputs(b, "action")
            rec.active = False
            B = y.shape[0]
            dy = {}
            for n in names:
                errs = torch.stack(list(output_errors(targets[n], rec.inputs[n], a_bits, B,
                                                      (transforms or {}).get(n)).values()), -1)  # (B, T, C, 5)
                dy[n] = errs.gather(-1, cols[n].view(1, 1, -1, 1).expand(*errs.shape[:-1], 1)).squeeze(-1)
            sq = {n: torch.zeros(B, dtype=torch.float64) for n in names}
            ys = [rec.outputs[n] for n in names]
            for scalar, _ in _probe_scalars(y, "action", None, None):
                grads = torch.autograd.grad(scalar, ys, retain_graph=True, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        lin = (per_sample(g, B, isinstance(targets[n], torch.nn.Conv2d)) * dy[n]).sum((1, 2))
                        sq[n] += lin.double().pow(2)
            w = step_w[start:start + B]
            for n in names:
                out[n] += float((sq[n].sqrt() * w).sum())
            start += B
            del y, ys, dy
    finally:
        rec.close()
    return out


def predicted(table: dict[str, torch.Tensor], bits: dict[str, torch.Tensor]) -> dict[str, float]:
    """layer -> sum over its channels of the cost at the planned bits."""
    return {n: float(table[n][torch.arange(len(b)), torch.tensor([SENS_BITS.index(int(x)) for x in b])].sum())
            for n, b in bits.items()}


def scaled(sens: Sensitivity, scale: dict[str, float], prune_scale: dict[str, float] | None = None) -> Sensitivity:
    """The sensitivity with every table of layer l multiplied by scale[l] (1 where absent); with prune_scale,
    its 0-bit column by prune_scale[l] instead."""
    def factor(n: str, t: torch.Tensor) -> torch.Tensor | float:
        if prune_scale is None:
            return scale.get(n, 1.0)
        f = torch.full((t.shape[-1],), scale.get(n, 1.0), dtype=t.dtype)
        f[SENS_BITS.index(0)] = prune_scale.get(n, 1.0)
        return f

    def mul(tables):
        return {n: t * factor(n, t) for n, t in tables.items()}
    meta = {**sens.meta, "layer_scale": {n: round(s, 4) for n, s in scale.items()}}
    if prune_scale is not None:
        meta["layer_prune_scale"] = {n: round(s, 4) for n, s in prune_scale.items()}
    return dataclasses.replace(sens, product=mul(sens.product), projected=mul(sens.projected),
                               energy=mul(sens.energy), meta=meta)


def split_pruning(bits: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (every layer with its pruned channels kept at 16 bits, the layers that prune with only their pruned
    channels quantized): the plan's rounding and its pruning, to be measured apart."""
    rounding = {n: torch.where(b == 0, torch.full_like(b, 16), b) for n, b in bits.items()}
    pruning = {n: torch.where(b == 0, b, torch.full_like(b, 16)) for n, b in bits.items() if bool((b == 0).any())}
    return rounding, pruning


def calibrate_layers(policy, sens: Sensitivity, allocate_bits, observations: list, table: str,
                     weights: torch.Tensor | None = None, rounds: int = ROUNDS, batch_size: int = 32,
                     transforms: dict[str, dict[str, torch.Tensor]] | None = None, log=None,
                     prune_apart: bool = False, baseline: str = "channels") -> Sensitivity:
    """R rounds of allocate -> measure each quantized layer -> rescale its costs (see the module docstring).

    allocate_bits(sens) -> layer -> (C,) bits: the method's own allocation, so that layers are measured at the
    bits the method would give them. Returns the rescaled sensitivity; meta["layer_calibration"] keeps each
    round's measured and predicted deviations, the last entry ("final") those of the allocation the returned
    costs give, which is the plan's when allocate_bits is the method's allocation. `transforms`: the layer
    transforms the sensitivities were measured on (rotation), given exactly when sens.meta["transforms"] names
    some.

    prune_apart ('+lcp'): a layer that prunes is measured twice, with only its rounding (pruned channels at 16
    bits) and with only its pruning (the rest at 16 bits), and its 0-bit costs are rescaled by the second
    ratio, the rest of its table by the first (the unit is the median rounding ratio). Cutting most of a
    layer is far from a small perturbation while rounding it is not, so one scale per layer either
    overprices its rounding or underprices its pruning. The history's "truth" / "predicted" are then the
    rounding's, "truth_pruning" / "predicted_pruning" the pruning's.

    baseline: what a layer's measured deviation is compared with: "channels", the sum of its channels' costs
    (unit: the median ratio under the action distance, 1 for KL), or "linearized" ('+lcl', form "action"), the
    first-order prediction of the whole layer's deviation (linearized_deviations; unit 1). The history's
    "predicted" is the baseline's, "predicted_channels" the channel sum."""
    if table not in ("product", "projected"):
        raise ValueError(f"layer calibration compares summed action distances with the {table!r} table's units; "
                         "use the product or projected proxy")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "linearized" and (sens.meta["form"] != "action" or prune_apart):
        raise ValueError("the linearized baseline ('+lcl') is for the action distance (form 'action'), without '+lcp'")
    if rounds < 1:
        raise ValueError(f"layer calibration needs at least one round, got {rounds}")
    if bool(sens.meta.get("transforms")) != bool(transforms):
        raise ValueError(f"sensitivities measured on {sens.meta.get('transforms') or 'untransformed'} layers need "
                         f"the same layers measured here; got {'transforms' if transforms else 'none'}")
    missing = set(sens.product) - set(quantizable(policy.model, policy.module_roles()))
    if missing:
        raise ValueError(f"sensitivity layers not in the policy: {sorted(missing)[:3]}")
    form, a_bits = sens.meta["form"], sens.meta["a_bits"]
    steps = batches(policy, observations, batch_size)
    step_w = torch.ones(len(observations), dtype=torch.float64) if weights is None else weights.double()
    raw = getattr(sens, table)
    scale = {n: 1.0 for n in sens.product}
    prune_scale = {n: 1.0 for n in sens.product} if prune_apart else None
    history, current = [], sens
    for r in range(rounds + 1):  # the last pass measures the allocation the final costs give: the plan's
        bits = allocate_bits(current)
        rounding, pruning = split_pruning(bits) if prune_apart else (bits, {})
        truth = layer_deviations(policy, steps, form, rounding, a_bits, step_w, transforms)
        channels = predicted(raw, {n: rounding[n] for n in truth})
        if baseline == "linearized":
            pred = linearized_deviations(policy, steps, {n: rounding[n] for n in truth}, a_bits, step_w, transforms)
        else:
            pred = channels
        ratio = {n: truth[n] / pred[n] for n in truth if pred[n] > 0}
        unit = float(np.median(list(ratio.values()))) if form == "action" and baseline == "channels" and ratio else 1.0
        unit = unit if unit > 0 else 1.0  # most layers measured no deviation at all: compare with 1
        entry = {"round": r, "final": r == rounds, "truth": truth, "predicted": pred, "unit": unit,
                 "pruned": {n: int((bits[n] == 0).sum()) for n in truth}}
        if baseline != "channels":
            entry["predicted_channels"] = channels
        prune_ratio = {}
        if pruning:
            truth0 = layer_deviations(policy, steps, form, pruning, a_bits, step_w, transforms)
            pred0 = predicted(raw, {n: pruning[n] for n in truth0})
            prune_ratio = {n: truth0[n] / pred0[n] for n in truth0 if pred0[n] > 0}
            entry.update({"truth_pruning": truth0, "predicted_pruning": pred0})
            if log:
                log(f"  pruning measured apart in {len(truth0)} layers: measured/predicted "
                    + ", ".join(f"{n} {q:.2f}" for n, q in sorted(prune_ratio.items(), key=lambda kv: -kv[1])[:3]))
        history.append(entry)
        if log:
            worst = sorted(ratio, key=ratio.get, reverse=True)[:3]
            log(f"layer calibration {'final plan' if r == rounds else f'round {r + 1}/{rounds}'}: measured/predicted "
                f"median {np.median(list(ratio.values())):.2f}, summed {sum(truth.values()):.4g} vs "
                f"{sum(pred.values()):.4g}, highest " + ", ".join(f"{n} {ratio[n]:.2f}" for n in worst))
        if r == rounds:
            break
        for n, q in ratio.items():
            scale[n] = max(scale[n], q / unit)
        for n, q in prune_ratio.items():
            prune_scale[n] = max(prune_scale[n], q / unit)
        current = scaled(sens, scale, prune_scale)
    current.meta["layer_calibration"] = {"rounds": rounds, "table": table, "history": history, "baseline": baseline,
                                         **({"prune_apart": True} if prune_apart else {})}
    return current
