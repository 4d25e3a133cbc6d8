"""quantize_(policy, plan): swap every planned Linear/Conv2d for a quantized module, in place.

This module simulates the arithmetic exactly (weights rounded per channel to their bits and stored as
their dequantized values for compute, activations rounded per token); the quantized checkpoint stores
integer codes and scales, so its size follows the bits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla.quant.plan import Plan, signature
from qvla.quant.primitives import dequantize_rows, fake_quant_activation, quantize_rows


def quantize_weight_codes(w: torch.Tensor, bits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer codes + per-channel scale/zero for rows at 2/4/8 bits; rows at 16 keep their float values."""
    codes = torch.zeros(w.shape, dtype=torch.int8)  # 8-bit codes are symmetric (-127..127), 2/4-bit 0..15
    scale, zero = torch.zeros(w.shape[0]), torch.zeros(w.shape[0])
    for b in (2, 4, 8):
        rows = bits == b
        if rows.any():
            q, s, z = quantize_rows(w[rows], b)
            codes[rows] = q.to(torch.int8)
            scale[rows], zero[rows] = s, z
    return {"codes": codes, "scale": scale, "zero": zero, "bits": bits.to(torch.int8),
            "fp_rows": w[bits == 16].clone()}


def dequantize_weight(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    bits = p["bits"]
    w = dequantize_rows(p["codes"].to(torch.int16), p["scale"], p["zero"]).reshape(shape)
    w[bits == 16] = p["fp_rows"]
    w[bits == 0] = 0.0
    return w


class QuantLinear(nn.Module):
    """Per-channel mixed-precision weights (held dequantized for compute) and per-token activations."""

    def __init__(self, payload: dict[str, torch.Tensor], shape, bias: torch.Tensor | None, a_bits: int) -> None:
        super().__init__()
        self.a_bits, self.payload = a_bits, payload
        self.register_buffer("weight", dequantize_weight(payload, shape))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, mod: nn.Linear, bits: torch.Tensor, a_bits: int) -> "QuantLinear":
        return cls(quantize_weight_codes(mod.weight.detach(), bits), mod.weight.shape, mod.bias, a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x, self.a_bits), self.weight, self.bias)


class QuantConv2d(QuantLinear):
    def __init__(self, payload, shape, bias, a_bits, conv: dict) -> None:
        super().__init__(payload, shape, bias, a_bits)
        self.conv = conv  # stride / padding / dilation / groups

    @classmethod
    def from_conv(cls, mod: nn.Conv2d, bits: torch.Tensor, a_bits: int) -> "QuantConv2d":
        conv = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}
        return cls(quantize_weight_codes(mod.weight.detach(), bits), mod.weight.shape, mod.bias, a_bits, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits < 16:
            x = fake_quant_activation(x.movedim(1, -1), self.a_bits).movedim(-1, 1)
        return F.conv2d(x, self.weight, self.bias, **self.conv)


FACTORIES: dict[type, Callable] = {nn.Linear: QuantLinear.from_linear, nn.Conv2d: QuantConv2d.from_conv}


def swap_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool],
                 replace: Callable[[nn.Module, str], nn.Module], prefix: str = "") -> None:
    """Recursively replaces every child for which filter_fn(module, name) holds."""
    for child_name, child in list(model.named_children()):
        name = f"{prefix}{child_name}"
        if filter_fn(child, name):
            setattr(model, child_name, replace(child, name))
        else:
            swap_modules(child, filter_fn, replace, name + ".")


def layer_shapes(model: nn.Module, names) -> dict[str, tuple[int, ...]]:
    mods = dict(model.named_modules())
    return {n: tuple(mods[n].weight.shape) for n in names}


def quantize_(policy, plan: Plan) -> None:
    """Applies the plan to the policy's model in place; refuses a plan made for another model."""
    model = policy.model
    mods = dict(model.named_modules())
    missing = [n for n in plan.bits if n not in mods]
    if missing or signature(layer_shapes(model, [n for n in plan.bits if n in mods])) != plan.signature:
        raise ValueError(f"plan was made for another model (signature {plan.signature}); "
                         f"layers not in this model: {missing[:5]}")
    for n, b in plan.bits.items():
        if mods[n].weight.shape[0] != len(b):
            raise ValueError(f"plan has {len(b)} channels for {n}, model has {mods[n].weight.shape[0]}")
    swap_modules(model, lambda m, n: n in plan.bits and type(m) in FACTORIES,
                 lambda m, n: FACTORIES[type(m)](m, plan.bits[n].long(), plan.a_bits))
    policy.plan = plan


def quantized_tensors(policy) -> dict[str, torch.Tensor]:
    """State to save: quantized layers as codes + scales, everything else as is."""
    out = {}
    for name, mod in policy.model.named_modules():
        if isinstance(mod, QuantLinear):
            for k, v in mod.payload.items():
                out[f"{name}.q.{k}"] = v
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias
    quantized = {n for n, m in policy.model.named_modules() if isinstance(m, QuantLinear)}
    for k, v in policy.model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quantized:
            out[k] = v
    return out


def load_quantized(path: str | Path, meta: dict):
    """Rebuilds a quantized policy from its checkpoint (codes + scales), without running any of its code."""
    from qvla.checkpoint import load_checkpoint, load_state_strict
    from qvla.policies import FAMILIES

    meta, tensors = load_checkpoint(path)
    plan = Plan.load(path)
    family = FAMILIES[meta["family"]]
    policy = family.build(family.config_from_dict(meta["config"]), meta.get("policy", str(path)))
    model = policy.model
    plain = {k: v for k, v in tensors.items() if ".q." not in k and k.rsplit(".", 1)[0] not in plan.bits}
    state = model.state_dict()
    for n in plan.bits:  # layers about to be replaced: take their shapes from the model, not the file
        for k in (f"{n}.weight", f"{n}.bias"):
            if k in state:
                plain[k] = tensors.get(k, state[k]) if k.endswith("bias") else state[k]
    load_state_strict(model, plain, str(path))

    def rebuild(mod: nn.Module, name: str) -> nn.Module:
        keys = ("codes", "scale", "zero", "bits", "fp_rows")
        missing = [k for k in keys if f"{name}.q.{k}" not in tensors]
        if missing:
            raise ValueError(f"checkpoint {path}: layer {name} lacks quantized tensors {missing}")
        payload = {k: tensors[f"{name}.q.{k}"] for k in keys}
        if payload["codes"].shape != mod.weight.shape:
            raise ValueError(f"checkpoint {path}: {name} codes {tuple(payload['codes'].shape)} vs "
                             f"model {tuple(mod.weight.shape)}")
        bias = tensors.get(f"{name}.bias")
        if isinstance(mod, nn.Conv2d):
            conv = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}
            return QuantConv2d(payload, mod.weight.shape, bias, plan.a_bits, conv)
        return QuantLinear(payload, mod.weight.shape, bias, plan.a_bits)

    swap_modules(model, lambda m, n: n in plan.bits and type(m) in FACTORIES, rebuild)
    policy.plan, policy.checkpoint = plan, str(path)
    return policy

