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

from qvla.quant.packed import bucket_order, conv_params, packed_layer
from qvla.quant.plan import Plan, signature
from qvla.quant.primitives import dequantize_rows, fake_quant_activation, quantize_rows
from qvla.quant.rotation import rotate_weight
from qvla.quant.storage import (
    INPUT_KEYS,
    from_storage,
    input_transform,
    input_transform_of,
    permute_inputs,
    to_storage,
    validate_storage,
)


TRANSFORM_KEYS = ("in_scale", "in_shift", "in_signs", "a_clip", "bias_add", "clip", "clip_lo", "weight", "grid_scale", "grid_zero")


def transformed(w: torch.Tensor, bias: torch.Tensor | None, t: dict[str, torch.Tensor] | None):
    """A baseline's equivalent transform of one layer -> (weight to quantize, bias, input transform).

    in_scale s and in_shift d (K,) rewrite y = W x + b as y = (W diag(s)) ((x - d) / s) + (b + W d):
    the same output in floating point, with the difficulty moved between weights and activations
    (SmoothQuant, AWQ, OmniQuant's LET). in_signs D then rotates: y = (W diag(s) D H)(H D (x - d) / s) + ...
    (rotation.py; QuaRot). bias_add (N,) is added to the bias (bias correction). "weight" replaces the transformed weight (GPTQ's updates).
    """
    t = t or {}
    bad = sorted(set(t) - set(TRANSFORM_KEYS))
    if bad:
        raise ValueError(f"unknown transform keys {bad}; allowed: {TRANSFORM_KEYS}")
    inp = {k: t[k].float() for k in INPUT_KEYS if k in t}
    if inp and w.dim() != 2:
        raise ValueError("input scale/shift transforms apply to Linear layers only")
    if "in_shift" in inp:
        shift = w.float() @ inp["in_shift"]
        bias = shift if bias is None else bias.float() + shift
    if "bias_add" in t:  # bias correction (bias_correction.py)
        bias = t["bias_add"].float() if bias is None else bias.float() + t["bias_add"].float()
    if "in_scale" in inp:
        w = w * inp["in_scale"][None]
    if "in_signs" in inp:
        w = rotate_weight(w.float(), inp["in_signs"])
    if "weight" in t:
        w = t["weight"].float()
    return w, bias, inp


def quantize_weight_codes(w: torch.Tensor, bits: torch.Tensor, t: dict[str, torch.Tensor] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Integer codes + per-channel scale/zero for rows at 2/4/8 bits; rows at 16 keep their float values."""
    t = t or {}
    codes = torch.zeros(w.shape, dtype=torch.int8)  # 8-bit codes are symmetric (-127..127), 2/4-bit 0..15
    scale, zero = torch.zeros(w.shape[0]), torch.zeros(w.shape[0])
    for b in (2, 4, 8):
        rows = bits == b
        if rows.any():
            clip = t["clip"][rows] if "clip" in t else None
            grid = (t["grid_scale"][rows], t["grid_zero"][rows]) if "grid_scale" in t else None
            q, s, z = quantize_rows(w[rows], b, clip, grid, t["clip_lo"][rows] if "clip_lo" in t else None)
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

    quantized_layer = True  # module_roles() still tags it with its role

    def __init__(self, payload: dict[str, torch.Tensor], shape, bias: torch.Tensor | None, a_bits: int,
                 inp: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.a_bits, self.payload, self.inp = a_bits, payload, dict(inp or {})
        self.register_buffer("weight", dequantize_weight(payload, shape))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, mod: nn.Linear, bits: torch.Tensor, a_bits: int,
                    t: dict[str, torch.Tensor] | None = None) -> "QuantLinear":
        w, bias, inp = transformed(mod.weight.detach(), mod.bias, t)
        return cls(quantize_weight_codes(w, bits, t), mod.weight.shape, bias, a_bits, inp)

    def storage(self) -> dict[str, torch.Tensor]:
        """The packed form of this layer (storage.py), input transform included: what a checkpoint holds."""
        p = self.payload
        return {**to_storage(p["codes"], p["scale"], p["zero"], p["bits"], p["fp_rows"]), **self.inp}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quant_activation(input_transform(x, self.inp), self.a_bits, self.inp.get("a_clip"))
        return F.linear(x, self.weight, self.bias)


class QuantConv2d(QuantLinear):
    def __init__(self, payload, shape, bias, a_bits, conv: dict) -> None:
        super().__init__(payload, shape, bias, a_bits)
        self.conv = conv  # stride / padding / dilation / groups

    @classmethod
    def from_conv(cls, mod: nn.Conv2d, bits: torch.Tensor, a_bits: int,
                  t: dict[str, torch.Tensor] | None = None) -> "QuantConv2d":
        w, bias, _ = transformed(mod.weight.detach(), mod.bias, t)
        return cls(quantize_weight_codes(w, bits, t), mod.weight.shape, bias, a_bits, conv_params(mod))

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
                 lambda m, n: FACTORIES[type(m)](m, plan.bits[n].long(), plan.a_bits, plan.transforms.get(n)))
    policy.plan = plan


def quantized_tensors(policy) -> dict[str, torch.Tensor]:
    """State to save: quantized layers in packed storage (storage.py), everything else as is."""
    out = {}
    for name, mod in policy.model.named_modules():
        if isinstance(mod, QuantLinear):
            for k, v in mod.storage().items():
                out[f"{name}.q.{k}"] = v
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias
    quantized = {n for n, m in policy.model.named_modules() if isinstance(m, QuantLinear)}
    for k, v in policy.model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quantized:
            out[k] = v
    return out


def _simulated(mod: nn.Module, storage: dict[str, torch.Tensor], bias, a_bits: int) -> nn.Module:
    """The fake-quant layer (dequantized weights held in fp32) that the packed storage encodes."""
    payload, inp = from_storage(storage, mod.weight.shape), input_transform_of(storage)
    if isinstance(mod, nn.Conv2d):
        return QuantConv2d(payload, mod.weight.shape, bias, a_bits, conv_params(mod))
    return QuantLinear(payload, mod.weight.shape, bias, a_bits, inp)


LOADERS: dict[str, Callable] = {"real": packed_layer, "simulated": _simulated}


def folds(policy, plan: Plan) -> dict[str, tuple[str, torch.Tensor]]:
    """producer -> (consumer, the producer's bucket order) for the policy's foldable Linear pairs whose
    producer's bucket order is not already the identity (so folding removes a scatter)."""
    by_consumer: dict[str, dict[str, torch.Tensor]] = {}
    for p, c in getattr(policy, "fold_pairs", list)():
        if p in plan.bits and c in plan.bits:
            by_consumer.setdefault(c, {})[p] = bucket_order(plan.bits[p])
    out = {}
    for c, orders in by_consumer.items():
        first = next(iter(orders.values()))
        # producers of one consumer (SwiGLU's gate and up) fold only if they emit one and the same order
        if all(torch.equal(o, first) for o in orders.values()) and not torch.equal(first, torch.arange(len(first))):
            out.update({p: (c, o) for p, o in orders.items()})
    return out


def load_quantized(path: str | Path, meta: dict, kernels: str = "real"):
    """Rebuilds a quantized policy from its packed checkpoint, without running any of its code.

    kernels="real" runs integer kernels on packed weights (packed.py); "simulated" holds the
    dequantized weights in fp32 and computes in float, as quantize_ does.
    """
    from qvla.checkpoint import load_checkpoint, load_state_strict
    from qvla.policies import FAMILIES

    if kernels not in LOADERS:
        raise ValueError(f"kernels must be one of {sorted(LOADERS)}, got {kernels!r}")
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

    producers = folds(policy, plan) if kernels == "real" else {}
    # a rotated layer mixes all of a block's inputs: it cannot take them permuted
    producers = {p: (c, o) for p, (c, o) in producers.items() if f"{c}.q.in_signs" not in tensors}
    consumers = dict(producers.values())  # consumer -> the order its inputs arrive in

    def rebuild(mod: nn.Module, name: str) -> nn.Module:
        prefix = f"{name}.q."
        storage = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        validate_storage(storage, tuple(mod.weight.shape), f"checkpoint {path}: layer {name}")
        if not torch.equal(storage["bits"].long(), plan.bits[name].long()):
            raise ValueError(f"checkpoint {path}: layer {name} bits differ from the plan's")
        if name in consumers:  # takes its inputs in the producer's bucket order
            storage = permute_inputs(storage, consumers[name])
        extra = {"folded": True} if name in producers else {}
        return LOADERS[kernels](mod, storage, tensors.get(f"{name}.bias"), plan.a_bits, **extra)

    swap_modules(model, lambda m, n: n in plan.bits and type(m) in FACTORIES, rebuild)
    policy.plan, policy.checkpoint, policy.kernels = plan, str(path), kernels
    return policy


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of weights the model holds: packed layers count what their kernels hold, the rest as stored."""
    total, seen = 0, set()
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_nbytes"):
            total += mod.weight_nbytes
            seen.update(f"{name}.{b}" for b, _ in mod.named_buffers())
            if getattr(mod, "bias", None) is not None:
                seen.discard(f"{name}.bias")
    for k, v in model.state_dict().items():
        if k not in seen:
            total += v.numel() * v.element_size()
    return total
