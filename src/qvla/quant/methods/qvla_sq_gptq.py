"""QVLA + smoothing + GPTQ: SmoothQuant's per-input-channel scales (alpha = cfg.alpha) as every Linear layer's
input transform, the action-space sensitivities measured on the smoothed layers (activation rounding
included), QVLA's allocation from them, then GPTQ at the planned mixed bits on the smoothed inputs: the
counterpart of qvla-rot-gptq with SmoothQuant's remedy for activation outliers instead of a rotation. Unlike
qvla-sq, whose allocation is made on the unsmoothed layers, each channel is priced as the smoothed layer
rounds it."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla_gptq import gptq_at_planned_bits
from qvla.quant.methods.qvla_rot import transformed_plan
from qvla.quant.methods.smoothquant import smoothing_transforms
from qvla.quant.sensitivity import quantizable


def transforms_for(policy, cfg: QuantConfig, observations) -> dict:
    return smoothing_transforms(policy, observations, list(quantizable(policy.model, policy.module_roles())),
                                cfg.alpha)


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    plan = transformed_plan(policy, cfg, calibration, provenance, "qvla-sq-gptq")
    plan.provenance["alpha"] = cfg.alpha
    return gptq_at_planned_bits(policy, plan, calibration[2])
