"""QVLA + smoothing: QVLA's per-channel bit allocation, plus SmoothQuant's per-input-channel scales so that
4- and 8-bit activations lose less. The allocation is made on the unsmoothed layers' sensitivities; the
scales (alpha = cfg.alpha) are applied when the plan is. Meant for WxA4 / WxA8 settings, where activation
error, which the bit allocation alone cannot reduce, dominates."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla import make_plan as qvla_plan
from qvla.quant.methods.smoothquant import smoothing_transforms


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    sens, observations = calibration
    plan = qvla_plan(policy, cfg, sens, provenance)
    plan.transforms = smoothing_transforms(policy, observations, list(plan.bits), cfg.alpha)
    plan.method = "qvla-sq"
    plan.provenance["alpha"] = cfg.alpha
    return plan
