"""Bit packing of integer weight codes: pure tensor math.

Codes at b bits (0 <= code < 2**b) are packed along the last dimension, 8 // b codes per byte, the
first code in the lowest bits. A row of K codes takes ceil(K * b / 8) bytes. 8-bit codes are stored as
they are (int8). Packing is lossless: unpack(pack(c, b), b, K) == c for every row length K.
"""
from __future__ import annotations

import torch

PACKED_BITS = (2, 4, 8)


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of k codes at `bits`."""
    return (k * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, K) integer codes in [0, 2**bits) (8 bits: int8 in [-128, 127]) -> (R, ceil(K*bits/8)) bytes."""
    if bits not in PACKED_BITS:
        raise ValueError(f"pack: bits must be one of {PACKED_BITS}, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"pack: codes must be 2-D (rows, K), got shape {tuple(codes.shape)}")
    if bits == 8:
        if codes.numel() and (codes.min() < -128 or codes.max() > 127):
            raise ValueError("pack: 8-bit codes must lie in [-128, 127]")
        return codes.to(torch.int8).contiguous()
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"pack: {bits}-bit codes must lie in [0, {2**bits - 1}]")
    per = 8 // bits
    r, k = codes.shape
    padded = torch.zeros(r, packed_width(k, bits) * per, dtype=torch.uint8)
    padded[:, :k] = codes.to(torch.uint8)
    lanes = padded.view(r, packed_width(k, bits), per)
    out = torch.zeros(r, lanes.shape[1], dtype=torch.uint8)
    for i in range(per):
        out |= lanes[:, :, i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack: (R, ceil(k*bits/8)) bytes -> (R, k) codes (uint8; int8 for 8 bits)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"unpack: bits must be one of {PACKED_BITS}, got {bits}")
    if packed.shape[-1] != packed_width(k, bits):
        raise ValueError(f"unpack: {packed.shape[-1]} bytes per row cannot hold {k} codes at {bits} bits")
    if bits == 8:
        return packed.view(torch.int8)
    per, mask = 8 // bits, 2**bits - 1
    lanes = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(lanes, -1).reshape(packed.shape[0], packed.shape[1] * per)[:, :k]
