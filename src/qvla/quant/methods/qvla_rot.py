"""QVLA + rotation: every Linear layer's inputs are rotated first (quarot.rotation_transforms), the
action-space sensitivities are measured on the rotated layers (so each channel's error at each bit width
is the one the rotated layer really makes, activation rounding included), and QVLA's global allocation
is made from those. The rotation flattens activation outliers (A4 / A8) and makes each weight row easier
to round; the allocation then spends the bits where the actions need them."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.quarot import rotation_transforms
from qvla.quant.methods.qvla import make_plan as qvla_plan
from qvla.quant.sensitivity import quantizable


def transforms_for(policy, cfg: QuantConfig, observations) -> dict:
    """The transforms the sensitivities are measured under (and the plan applies)."""
    return rotation_transforms(policy, list(quantizable(policy.model, policy.module_roles())))


def transformed_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None, method: str):
    """QVLA's allocation from sensitivities measured on `method`'s transformed layers, plus the transforms."""
    sens, transforms = calibration[:2]
    plan = qvla_plan(policy, cfg, sens, provenance)  # which checks the tables were measured under `method`'s transforms
    plan.transforms, plan.method = transforms, method
    return plan


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    return transformed_plan(policy, cfg, calibration, provenance, "qvla-rot")
