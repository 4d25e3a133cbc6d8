"""QVLA + rotation + GPTQ: qvla-rot's allocation (sensitivities measured on the rotated layers), then each
rotated Linear layer rounded by GPTQ at its planned mixed bits on its rotated calibration inputs (QuaRot's
own recipe puts GPTQ after the rotation)."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla_gptq import gptq_at_planned_bits
from qvla.quant.methods.qvla_rot import transformed_plan, transforms_for

__all__ = ["make_plan", "transforms_for"]  # transforms_for: qvla-rot's rotation, so the two share their tables


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    return gptq_at_planned_bits(policy, transformed_plan(policy, cfg, calibration, provenance, "qvla-rot-gptq"),
                                calibration[2])
