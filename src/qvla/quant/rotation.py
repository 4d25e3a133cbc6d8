"""Randomized Hadamard rotation of a layer's inputs (QuaRot, Ashkboos et al. 2024; QuIP#): pure tensor math.

An orthogonal R = H D (D = diag of random signs, H the normalized Walsh-Hadamard matrix, block-diagonal with
power-of-two blocks when K is not a power of two) spreads an outlier channel's energy over all channels of
its block, so per-token activation rounding and per-channel weight rounding both lose less. The layer
computes (W D H)(H D x) = W x: exact in floating point. The activation side runs as a fast transform,
K log K adds per token; the weight side is folded into the stored weights.
"""
from __future__ import annotations

import functools

import torch


def block_size(k: int) -> int:
    """The largest power of two dividing k (384 -> 128): the Hadamard blocks along the input."""
    return k & -k


# Blocks up to this size are multiplied with the dense Hadamard matrix: one GEMM instead of log2(b) small
# butterfly ops, which at a control step's few tokens cost more in dispatch than in arithmetic (128-wide
# blocks: ~0.2 ms a call as butterflies on 2 cores). Larger blocks keep the K log K butterfly.
DENSE_BLOCK = 256


@functools.cache
def hadamard(b: int) -> torch.Tensor:
    """The normalized b x b Walsh-Hadamard matrix (Sylvester order, symmetric and orthogonal), b a power of 2."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * b**-0.5


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized block-diagonal Walsh-Hadamard transform along the last dim (orthogonal and symmetric)."""
    k = x.shape[-1]
    b = block_size(k)
    lead = x.shape[:-1]
    y = x.reshape(-1, k // b, b)
    if b <= DENSE_BLOCK:
        return (y @ hadamard(b).to(y.dtype)).reshape(*lead, k)
    h = 1
    while h < b:
        y = y.reshape(-1, k // b, b // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), -2)
        h *= 2
    return (y.reshape(*lead, k) * b ** -0.5)


def random_signs(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (k,), generator=g).float() * 2 - 1


def rotate_inputs(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x -> H D x, per row (the activation side)."""
    return fwht(x * signs)


def rotate_weight(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W -> W D H (the weight side), so that rotate_weight(W) @ rotate_inputs(x) = W @ x."""
    return fwht(w * signs[None])
