"""QVLA + OmniQuant: QVLA's per-channel bit allocation, then OmniQuant's learnable weight clipping and
learnable equivalent transformation trained on each Linear layer *at its planned mixed bits*
(omniquant.train_layer with per-row widths: rows at 16 bits are exact, pruned rows a fixed error the
training cannot change). The allocation is made from the untransformed layers' sensitivities, as
qvla-awq's. Convs keep QVLA's plain rounding."""
from __future__ import annotations

from qvla.quant.layer_inputs import planned_linear_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.omniquant import STEPS, train_layer
from qvla.quant.methods.qvla import make_plan as qvla_plan


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    sens, observations = calibration
    plan = qvla_plan(policy, cfg, sens, provenance)
    mods = dict(policy.model.named_modules())
    plan.transforms = {n: train_layer(x, mods[n].weight, mods[n].bias, plan.bits[n].long(), cfg.a_bits)
                       for n, x in planned_linear_inputs(policy, plan, observations, cfg.a_bits, 4096).items()}
    plan.method = "qvla-omni"
    plan.provenance["steps"] = STEPS
    return plan
