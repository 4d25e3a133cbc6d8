"""RTN: every channel of every quantized layer rounded to the same bits (the uniform baseline).

uniform_plan() is shared by the baselines: same bits everywhere, plus the method's transforms."""
from __future__ import annotations

from typing import Callable

import torch

from qvla.quant.apply import layer_shapes
from qvla.quant.methods import QuantConfig
from qvla.quant.plan import Plan, signature
from qvla.quant.sensitivity import quantizable


def uniform_bits(policy, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """layer -> (C,) bits: cfg.w_bits everywhere, raised to a pinned floor where one applies."""
    if cfg.w_bits not in (2, 4, 8, 16):
        raise ValueError(f"{cfg.method} needs integer --w-bits in (2, 4, 8, 16), got {cfg.w_bits}")
    roles = policy.module_roles()
    bits = {}
    for n, m in quantizable(policy.model, roles).items():
        floor = cfg.pinned_bits(n, roles[n]) or 0
        bits[n] = torch.full((m.weight.shape[0],), max(floor, int(cfg.w_bits)), dtype=torch.int8)
    return bits


def uniform_plan(policy, cfg: QuantConfig, transforms: dict | None = None, provenance: dict | None = None) -> Plan:
    bits = uniform_bits(policy, cfg)
    roles = policy.module_roles()
    mods = dict(policy.model.named_modules())
    return Plan(bits, {n: mods[n].weight[0].numel() for n in bits}, {n: roles[n] for n in bits},
                cfg.a_bits, float(cfg.w_bits), cfg.method, signature(layer_shapes(policy.model, bits)),
                provenance or {}, transforms or {})


def layerwise_plan(policy, cfg: QuantConfig, observations, transform: Callable, max_rows: int,
                   provenance: dict, convs: bool = False) -> Plan:
    """Uniform bits plus, for every quantized Linear (and conv, if convs: on its input patches),
    transform(inputs (rows, K), module, bits) -> tensors, computed on that layer's full-precision
    calibration inputs (the baselines' shared skeleton)."""
    from qvla.quant.layer_inputs import collect_inputs

    bits = uniform_bits(policy, cfg)
    inputs = collect_inputs(policy, observations, list(bits), max_rows=max_rows, convs=convs)
    mods = dict(policy.model.named_modules())
    transforms = {n: transform(x, mods[n], int(bits[n][0])) for n, x in inputs.items() if int(bits[n][0]) < 16}
    return uniform_plan(policy, cfg, transforms, provenance)


def make_plan(policy, cfg: QuantConfig, observations=None, provenance: dict | None = None) -> Plan:
    return uniform_plan(policy, cfg, None, provenance)
