"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then round both.

For each Linear layer, per input channel j: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha). The layer
computes (W diag(s)) (diag(s)^-1 X): unchanged in floating point, with flatter activations. The paper
folds s into the preceding LayerNorm; we keep it as the layer's input scale, which also covers layers
with no foldable predecessor (after GELU). Convs are rounded as in RTN (no smoothing).
"""
from __future__ import annotations

import torch

from qvla.quant.layer_inputs import collect_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import uniform_bits, uniform_plan


def smooth_scales(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) per-input-channel scales; channels that never fire keep 1."""
    w_absmax = w.abs().amax(0).clamp_min(1e-5)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(x_absmax > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def smoothing_transforms(policy, observations, names: list[str], alpha: float) -> dict[str, dict[str, torch.Tensor]]:
    """layer -> {"in_scale": s} for every Linear among `names`, from its calibration activation maxima."""
    inputs = collect_inputs(policy, observations, names)
    mods = dict(policy.model.named_modules())
    return {n: {"in_scale": smooth_scales(x.abs().amax(0), mods[n].weight.detach(), alpha)}
            for n, x in inputs.items()}


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    transforms = smoothing_transforms(policy, observations, list(uniform_bits(policy, cfg)), cfg.alpha)
    return uniform_plan(policy, cfg, transforms, {**(provenance or {}), "alpha": cfg.alpha,
                                                   "coverage": "Linear layers smoothed; convs RTN"})
