"""RTN: every channel of every quantized layer rounded to the same bits (the uniform baseline)."""
from __future__ import annotations

import torch

from qvla.quant.apply import layer_shapes
from qvla.quant.methods import QuantConfig
from qvla.quant.plan import Plan, signature
from qvla.quant.sensitivity import quantizable


def make_plan(policy, cfg: QuantConfig, observations=None, provenance: dict | None = None) -> Plan:
    if cfg.w_bits not in (2, 4, 8, 16):
        raise ValueError(f"rtn needs integer --w-bits in (2, 4, 8, 16), got {cfg.w_bits}")
    roles = policy.module_roles()
    layers = quantizable(policy.model, roles)
    bits = {}
    for n, m in layers.items():
        floor = cfg.pinned_bits(n, roles[n]) or 0
        bits[n] = torch.full((m.weight.shape[0],), max(floor, int(cfg.w_bits)), dtype=torch.int8)
    return Plan(bits, {n: m.weight[0].numel() for n, m in layers.items()}, {n: roles[n] for n in layers},
                cfg.a_bits, float(cfg.w_bits), "rtn", signature(layer_shapes(policy.model, layers)),
                provenance or {})
