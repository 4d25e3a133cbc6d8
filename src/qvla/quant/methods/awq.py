"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales, searched, then weight clipping, searched.

Per Linear layer, on its recorded calibration inputs X:
1. scale search: s = mean|X_j|^alpha (normalised so max*min = 1) for alpha on a grid of 21 values in
   [0, 1]; keep the alpha whose quantized layer Q(W diag(s)) applied to diag(s)^-1 X is closest to W X
   (alpha = 0 is plain RTN, so the search never does worse than RTN on X);
2. clip search: per output channel, the range ratio in {1.0, 0.95, ..., 0.5} with the smallest output
   error. Activation quantization, when the setting has it, is inside both errors.
The paper searches per block of layers sharing an input and groups of 128 weights; we search per layer
with per-channel grids, as every other method here. Convs are rounded as in RTN. Both searches also take
per-channel bits (a QVLA plan's mixed rows; methods/qvla_awq.py).
"""
from __future__ import annotations

import torch

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import layerwise_plan
from qvla.quant.primitives import fake_quant_activation, fake_quant_mixed, fake_quant_rows

ALPHAS = torch.linspace(0, 1, 21)
CLIPS = torch.linspace(1.0, 0.5, 11)


def qdq(w: torch.Tensor, bits: int | torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
    """w rounded row by row; bits is one width for all rows or (N,) widths (16 = kept, 0 = zeroed)."""
    return fake_quant_rows(w, bits, clip) if isinstance(bits, int) else fake_quant_mixed(w, bits, clip)


def output_error(x: torch.Tensor, w: torch.Tensor, bits: int | torch.Tensor, a_bits: int, s: torch.Tensor,
                 clip: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) squared output error per channel of the scaled, quantized layer against W x."""
    ref = x @ w.t()
    out = fake_quant_activation(x / s, a_bits) @ qdq(w * s, bits, clip).t()
    return (out - ref).pow(2).sum(0)


def search_scale(x: torch.Tensor, w: torch.Tensor, bits: int | torch.Tensor, a_bits: int = 16) -> tuple[torch.Tensor, float]:
    """-> (scales (K,), best alpha)."""
    mean = x.abs().mean(0).clamp_min(1e-8)
    best = None
    for alpha in ALPHAS.tolist():
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = float(output_error(x, w, bits, a_bits, s).sum())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int | torch.Tensor, a_bits: int, s: torch.Tensor) -> torch.Tensor:
    """(N,) per-channel range ratio with the smallest output error (1 = no clipping)."""
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0])
    for c in CLIPS.tolist():
        err = output_error(x, w, bits, a_bits, s, torch.full((w.shape[0],), c))
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, c), best)
    return best


def search(x: torch.Tensor, w: torch.Tensor, bits: int | torch.Tensor, a_bits: int
           ) -> tuple[dict[str, torch.Tensor], float]:
    """Both searches on one layer -> (its transform {"in_scale", "clip"}, the chosen alpha)."""
    s, alpha = search_scale(x, w, bits, a_bits)
    return {"in_scale": s, "clip": search_clip(x, w, bits, a_bits, s)}, alpha


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    alphas: dict[int, float] = {}

    def transform(x: torch.Tensor, mod, bits: int) -> dict[str, torch.Tensor]:
        t, alphas[len(alphas)] = search(x, mod.weight.detach().float(), bits, cfg.a_bits)
        return t

    plan = layerwise_plan(policy, cfg, observations, transform, 2048,
                          {**(provenance or {}), "coverage": "Linear layers searched; convs RTN"})
    plan.provenance["alphas"] = dict(zip(plan.transforms, alphas.values(), strict=True))
    return plan
