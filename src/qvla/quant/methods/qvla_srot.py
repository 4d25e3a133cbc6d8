"""QVLA + smoothing + rotation: SmoothQuant's per-input-channel scales (alpha = cfg.alpha) first, then the
randomized Hadamard rotation of qvla-rot, both as each Linear layer's input transform; the action-space
sensitivities are measured on the transformed layers and QVLA allocates from them. Smoothing tames the
few channels that are far larger than the rest, which a rotation alone only spreads over its block."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla_rot import transformed_plan
from qvla.quant.methods.qvla_rot import transforms_for as rotations
from qvla.quant.methods.smoothquant import smoothing_transforms


def transforms_for(policy, cfg: QuantConfig, observations) -> dict:
    rot = rotations(policy, cfg, observations)
    smooth = smoothing_transforms(policy, observations, list(rot), cfg.alpha)
    return {n: {**smooth.get(n, {}), **t} for n, t in rot.items()}  # a layer never reached keeps no scale


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    plan = transformed_plan(policy, cfg, calibration, provenance, "qvla-srot")
    plan.provenance["alpha"] = cfg.alpha
    return plan
