"""Activation clipping: per-token 4-bit activations lay 16 levels over each token's [min, max] (8-bit: 255
over [-max, max]), so one large entry coarsens the grid for all the others. Saturating the largest entries
(QuaRot clips A4 at 0.9 of the maximum) trades a few clipped values for a finer grid everywhere else. Per
Linear layer we pick the ratio that minimizes the layer's squared output error on its calibration inputs,
the layer run as the plan runs it (its weights at their planned bits, its transforms); the ratio is stored
with the layer (a_clip) and applied by the fake-quant layer, the real-kernel layer and the sensitivity's
error model alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qvla.quant.apply import QuantLinear
from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.plan import Plan

RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 (no clipping) down to 0.5


@torch.no_grad()
def clip_ratios(policy, plan: Plan, observations: list, max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """layer -> (1,) the ratio in RATIOS with the smallest output error (ties: the larger ratio)."""
    if plan.a_bits >= 16:
        raise ValueError("activation clipping needs quantized activations (A8 or A4); this plan keeps them in "
                         "floating point")
    mods = dict(policy.model.named_modules())
    names = [n for n in plan.bits if isinstance(mods[n], nn.Linear)]
    out = {}
    for n, x in collect_inputs(policy, observations, names, max_rows=max_rows).items():
        ref = mods[n](x)
        layer = QuantLinear.from_linear(mods[n], plan.bits[n].long(), plan.a_bits, plan.transforms.get(n))
        errs = []
        for r in RATIOS:
            layer.inp["a_clip"] = torch.tensor([r])
            errs.append(float((layer(x) - ref).pow(2).sum()))
        out[n] = torch.tensor([RATIOS[errs.index(min(errs))]])  # the first minimum: the larger ratio
    return out


def clip_activations(policy, plan: Plan, observations: list) -> Plan:
    """The plan with each Linear layer's activation clipping ratio added to its transforms (key "a_clip")."""
    ratios = clip_ratios(policy, plan, observations)
    for n, r in ratios.items():
        plan.transforms[n] = {**plan.transforms.get(n, {}), "a_clip": r}
    plan.method = f"{plan.method}+ac"
    plan.provenance["a_clip"] = {n: float(r) for n, r in ratios.items()}
    return plan
