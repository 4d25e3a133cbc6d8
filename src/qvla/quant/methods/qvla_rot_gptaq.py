"""QVLA + rotation + output-matched GPTQ: qvla-rot-gptq, with each rotated Linear layer's weight first
matched, by least squares, to its full-precision outputs from its inputs rounded on the plan's activation grid
(gptq.output_matched), then GPTQ-rounded on the rounded inputs' Hessian: the rounding then minimises the
layer's error against full precision with its activations quantized (A8 / A4), not only the weight's own
error. At A16 it is qvla-rot-gptq."""
from __future__ import annotations

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla_gptq import gptq_at_planned_bits
from qvla.quant.methods.qvla_rot import transformed_plan, transforms_for

__all__ = ["make_plan", "transforms_for"]  # qvla-rot's rotation, so the three share their tables


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    return gptq_at_planned_bits(policy, transformed_plan(policy, cfg, calibration, provenance, "qvla-rot-gptaq"),
                                calibration[2], match_rounded=True)
