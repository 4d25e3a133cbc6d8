"""QVLA + GPTQ: QVLA's per-channel bit allocation, then every Linear layer rounded by GPTQ at its planned
mixed bits (gptq.gptq_quantize: GPTQ's updates are row by row, so each row is GPTQ at its own width; rows
at 16 stay exact, pruned rows zero), and every conv too, as the Linear layer it is on its input patches.
The allocation is made from the RTN-rounded layers' sensitivities, an upper bound on what GPTQ's rounding
costs."""
from __future__ import annotations

import torch.nn as nn

from qvla.quant.apply import transformed
from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.gptq import gptq_transform
from qvla.quant.methods.qvla import make_plan as qvla_plan
from qvla.quant.plan import Plan
from qvla.quant.primitives import fake_quant_activation
from qvla.quant.storage import input_transform


def gptq_at_planned_bits(policy, plan: Plan, observations, max_rows: int = 8192, match_rounded: bool = False) -> Plan:
    """Adds GPTQ's weights to every Linear layer and conv of the plan with rows at 2, 4 or 8 bits, computed on
    the layer as the plan runs it: after the plan's own input transform (rotation, scaling) if it has one.
    match_rounded (A8 / A4 plans): each Linear layer's weight is first matched to its full-precision output
    from its inputs rounded on the plan's activation grid, as the quantized layer multiplies them
    (gptq.output_matched); convs, whose inputs are rounded per pixel before the patches, are GPTQ'd as before."""
    mods = dict(policy.model.named_modules())
    names = [n for n, b in plan.bits.items()
             if isinstance(mods[n], (nn.Linear, nn.Conv2d)) and bool(((b > 0) & (b < 16)).any())]
    for n, x in collect_inputs(policy, observations, names, max_rows=max_rows, convs=True).items():
        t = plan.transforms.get(n, {})
        w, _, inp = transformed(mods[n].weight.detach().float(), None, t)
        x = input_transform(x, inp)
        seen = None
        if match_rounded and plan.a_bits < 16 and isinstance(mods[n], nn.Linear):
            seen = fake_quant_activation(x, plan.a_bits, inp.get("a_clip"))
        plan.transforms[n] = {**t, **gptq_transform(x, w, plan.bits[n], seen)}
    return plan


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    sens, observations = calibration
    plan = qvla_plan(policy, cfg, sens, provenance)
    plan.method = "qvla-gptq"
    return gptq_at_planned_bits(policy, plan, observations)
