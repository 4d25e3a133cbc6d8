"""Layers that hold packed weights and run real integer kernels (the deployed form of a plan).

PackedLinear groups output channels into buckets by bit width, runs each bucket with its kernel
(kernels.py) and writes the bucket's outputs into their channels. PackedConv2d keeps the packed codes
and dequantizes them per call (the micro-VLA's convs are a few thousand weights: the float conv is the
fast path there), so its memory still follows the bits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla.quant.kernels import build_kernel
from qvla.quant.primitives import fake_quant_activation
from qvla.quant.storage import dequantize_storage, input_transform, input_transform_of, storage_nbytes


def conv_params(mod: nn.Conv2d) -> dict:
    return {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}


class PackedLinear(nn.Module):
    quantized_layer = True  # module_roles() still tags it with its role

    def __init__(self, storage: dict[str, torch.Tensor], shape, bias: torch.Tensor | None, a_bits: int) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.a_bits = a_bits
        bits = storage["bits"].long()
        self.inp = input_transform_of(storage)
        self.buckets = [(torch.nonzero(bits == b).flatten(), build_kernel(b, storage, self.in_features, a_bits))
                        for b in (8, 4, 2, 16) if (bits == b).any()]
        # one bucket holding every channel in order needs no scatter
        self.direct = len(self.buckets) == 1 and len(self.buckets[0][0]) == self.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("bits", bits.to(torch.int8))

    @property
    def weight_nbytes(self) -> int:
        return sum(k.nbytes for _, k in self.buckets) + self.bits.numel() + sum(4 * v.numel() for v in self.inp.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = fake_quant_activation(input_transform(x.reshape(-1, self.in_features).float(), self.inp), self.a_bits)
        if self.direct:
            y = self.buckets[0][1](x2)
        else:
            y = x2.new_zeros(x2.shape[0], self.out_features)
            for idx, kernel in self.buckets:
                y.index_copy_(1, idx, kernel(x2))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class PackedConv2d(nn.Module):
    quantized_layer = True  # module_roles() still tags it with its role

    def __init__(self, storage: dict[str, torch.Tensor], shape, bias: torch.Tensor | None, a_bits: int,
                 conv: dict) -> None:
        super().__init__()
        self.shape, self.a_bits, self.conv = tuple(shape), a_bits, conv
        for k, v in storage.items():
            self.register_buffer(f"q_{k}", v)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def storage(self) -> dict[str, torch.Tensor]:
        return {n[2:]: b for n, b in self.named_buffers() if n.startswith("q_")}

    @property
    def weight_nbytes(self) -> int:
        return storage_nbytes(self.storage())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits < 16:
            x = fake_quant_activation(x.movedim(1, -1), self.a_bits).movedim(-1, 1)
        return F.conv2d(x, dequantize_storage(self.storage(), self.shape), self.bias, **self.conv)


def packed_layer(mod: nn.Module, storage: dict[str, torch.Tensor], bias, a_bits: int) -> nn.Module:
    """The packed replacement for an nn.Linear / nn.Conv2d of the float model."""
    if isinstance(mod, nn.Conv2d):
        return PackedConv2d(storage, mod.weight.shape, bias, a_bits, conv_params(mod))
    return PackedLinear(storage, mod.weight.shape, bias, a_bits)
