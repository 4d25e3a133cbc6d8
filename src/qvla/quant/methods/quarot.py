"""QuaRot-RTN (Ashkboos et al., 2024): rotate every Linear layer's inputs by a randomized Hadamard matrix,
then round weights (per channel) and activations (per token) as RTN does.

The rotation (rotation.py) is exact in floating point and spreads outlier channels over their Hadamard
block, which helps 4-bit activations most. QuaRot fuses the rotations into the neighbouring layers of a
Llama; we keep one per layer as its input transform (an online Hadamard, K log K adds per token), which
also covers layers with no foldable predecessor. Convs are rounded as in RTN.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import uniform_bits, uniform_plan
from qvla.quant.rotation import random_signs


def rotation_transforms(policy, names, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """layer -> {"in_signs": D} for every Linear among `names`, a fixed sign pattern per layer."""
    mods = dict(policy.model.named_modules())
    linears = [n for n in names if isinstance(mods[n], nn.Linear)]
    return {n: {"in_signs": random_signs(mods[n].in_features, seed + i)} for i, n in enumerate(linears)}


def make_plan(policy, cfg: QuantConfig, observations=None, provenance: dict | None = None):
    transforms = rotation_transforms(policy, list(uniform_bits(policy, cfg)))
    return uniform_plan(policy, cfg, transforms, {**(provenance or {}),
                                                  "coverage": "Linear layers rotated; convs RTN"})
