"""Empirical bias correction (Nagel et al., 2019, "Data-Free Quantization", §4.2, measured on calibration
data): quantization error that is systematic, E[y_q - y] != 0, shifts every step's action the same way, and
in closed loop a constant push compounds where zero-mean noise averages out. For each quantized Linear we
measure the mean output error of the quantized layer (its weights, activation rounding and transforms, as
the plan runs it) on the layer's calibration inputs and subtract it through the bias; a pruned channel then
emits its mean output instead of zero. Convs (the vision stem) are left as they are. The error is that of
the fake-quant layer; the real kernels round A4 activations on a finer grid (kernels.Int8Kernel), so there
the corrected mean error is small rather than zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qvla.quant.apply import QuantLinear
from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.plan import Plan


@torch.no_grad()
def bias_corrections(policy, plan: Plan, observations: list, max_rows: int = 8192) -> dict[str, torch.Tensor]:
    """layer -> (C,) to add to the layer's bias: minus its mean output error over calibration inputs."""
    mods = dict(policy.model.named_modules())
    # a layer kept entirely at 16 bits with float activations makes no error to correct
    names = [n for n, b in plan.bits.items() if isinstance(mods[n], nn.Linear)
             and (plan.a_bits < 16 or bool((b < 16).any()))]
    out = {}
    for n, x in collect_inputs(policy, observations, names, max_rows=max_rows).items():
        q = QuantLinear.from_linear(mods[n], plan.bits[n].long(), plan.a_bits, plan.transforms.get(n))
        out[n] = -(q(x) - mods[n](x)).mean(0)
    return out


def correct_biases(policy, plan: Plan, observations: list) -> Plan:
    """The plan with each Linear's bias correction added to its transforms (key "bias_add")."""
    for n, d in bias_corrections(policy, plan, observations).items():
        plan.transforms[n] = {**plan.transforms.get(n, {}), "bias_add": d}
    plan.method = f"{plan.method}+bc"
    return plan
