"""Layers that hold packed weights and run real integer kernels (the deployed form of a plan).

PackedLinear groups output channels into buckets by bit width, runs each bucket with its kernel
(kernels.py) and writes the bucket's outputs into their channels. Where the graph allows (a layer whose
outputs reach only one Linear, through elementwise ops), the layer instead emits its channels in bucket
order (`bucket_order`) and the next layer takes its inputs in that order (storage.permute_inputs): the
permutation is folded into the next layer's weights, with no scatter at run time. PackedConv2d keeps the packed codes
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


BUCKET_ORDER = (8, 4, 2, 16)  # kernels run in this order; 0-bit (pruned) channels come last


def bucket_order(bits: torch.Tensor) -> torch.Tensor:
    """Channel indices in the order a folded PackedLinear emits them: bucket by bucket, then pruned ones."""
    bits = bits.long()
    return torch.cat([torch.nonzero(bits == b).flatten() for b in (*BUCKET_ORDER, 0)])


def conv_params(mod: nn.Conv2d) -> dict:
    return {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}


class PackedLinear(nn.Module):
    quantized_layer = True  # module_roles() still tags it with its role

    def __init__(self, storage: dict[str, torch.Tensor], shape, bias: torch.Tensor | None, a_bits: int,
                 folded: bool = False) -> None:
        """folded: emit channels in bucket_order(bits) (the next layer's inputs were permuted to match)."""
        super().__init__()
        self.out_features, self.in_features = shape
        self.a_bits, self.folded = a_bits, folded
        bits = storage["bits"].long()
        self.inp = input_transform_of(storage)
        self.buckets = [(torch.nonzero(bits == b).flatten(), build_kernel(b, storage, self.in_features, a_bits))
                        for b in BUCKET_ORDER if (bits == b).any()]
        self.pruned = int((bits == 0).sum())
        if sum(len(idx) for idx, _ in self.buckets) + self.pruned != self.out_features:  # forward fills every column
            raise ValueError(f"PackedLinear: bits must be 0 or one of {BUCKET_ORDER}, got {sorted(set(bits.tolist()))}")
        # every kernel rounds its input on the plan's grid itself (and no clipping changes that grid): the
        # rounding here would be done twice
        self.kernels_round = a_bits < 16 and "a_clip" not in self.inp and all(
            k.rounds_input for _, k in self.buckets)
        # one bucket holding every channel in order needs no scatter
        self.direct = len(self.buckets) == 1 and len(self.buckets[0][0]) == self.out_features
        # the output columns of each bucket: its channels, or (folded) its run of the bucket order
        starts = torch.tensor([0] + [len(idx) for idx, _ in self.buckets]).cumsum(0).tolist()
        self.cols = [torch.arange(s, s + len(idx)) if folded else idx for s, (idx, _) in zip(starts, self.buckets)]
        if bias is not None and folded:
            bias = bias[bucket_order(bits)]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("bits", bits.to(torch.int8))

    @property
    def weight_nbytes(self) -> int:
        return sum(k.nbytes for _, k in self.buckets) + self.bits.numel() + sum(4 * v.numel() for v in self.inp.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = input_transform(x.reshape(-1, self.in_features).float(), self.inp)
        if not self.kernels_round:
            x2 = fake_quant_activation(x2, self.a_bits, self.inp.get("a_clip"))
        if self.direct:
            y = self.buckets[0][1](x2)
        else:  # each bucket into its columns (folded: its run of the bucket order, which the next layer's weights take)
            y = (x2.new_zeros if self.pruned else x2.new_empty)(x2.shape[0], self.out_features)
            for cols, (_, kernel) in zip(self.cols, self.buckets):
                if kernel.writes_into:  # the kernel's epilogue writes the columns in place
                    kernel(x2, out=y, cols=cols)
                elif self.folded:
                    y.narrow(1, int(cols[0]), len(cols)).copy_(kernel(x2))
                else:
                    y.index_copy_(1, cols, kernel(x2))
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


def packed_layer(mod: nn.Module, storage: dict[str, torch.Tensor], bias, a_bits: int,
                 folded: bool = False) -> nn.Module:
    """The packed replacement for an nn.Linear / nn.Conv2d of the float model."""
    if isinstance(mod, nn.Conv2d):
        return PackedConv2d(storage, mod.weight.shape, bias, a_bits, conv_params(mod))
    return PackedLinear(storage, mod.weight.shape, bias, a_bits, folded)
