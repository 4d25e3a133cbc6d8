"""QVLA + smoothing: QVLA's per-channel bit allocation, plus SmoothQuant's per-input-channel scales so that
4- and 8-bit activations lose less. The allocation is made on the unsmoothed layers' sensitivities; the
scales (alpha = cfg.alpha) are applied when the plan is. Meant for WxA4 / WxA8 settings, where activation
error, which the bit allocation alone cannot reduce, dominates."""
from __future__ import annotations

from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla import make_plan as qvla_plan
from qvla.quant.methods.smoothquant import smooth_scales


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    sens, observations = calibration
    plan = qvla_plan(policy, cfg, sens, provenance)
    mods = dict(policy.model.named_modules())
    inputs = collect_inputs(policy, observations, list(plan.bits))
    plan.transforms = {n: {"in_scale": smooth_scales(x.abs().amax(0), mods[n].weight.detach(), cfg.alpha)}
                       for n, x in inputs.items()}
    plan.method = "qvla-sq"
    plan.provenance["alpha"] = cfg.alpha
    return plan
