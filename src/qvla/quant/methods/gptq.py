"""GPTQ (Frantar et al., 2023): quantize a layer's weights column by column, each column's rounding error
spread over the columns not yet quantized through the inverse Hessian of the layer's squared output error.

H = 2 X^T X / n over the layer's calibration inputs, damped by 1 % of its mean diagonal; the per-channel
grid is laid on the original rows first (as in the paper's per-channel setting); columns are processed
in blocks of 128 with lazy batch updates. The result is stored as the updated weight plus its grid, so
that the apply step reproduces GPTQ's codes exactly. Convs are rounded as in RTN.
"""
from __future__ import annotations

import torch

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import layerwise_plan
from qvla.quant.primitives import quant_params


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float = 0.01, block: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (quantized weight, dequantized, (N, K); scale (N,); zero (N,))."""
    w = w.clone().float()
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale, zero, qmin, qmax = quant_params(w, bits)
    q_all = torch.zeros_like(w)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = (torch.clamp(torch.round(col / scale) + zero, qmin, qmax) - zero) * scale
            q_all[:, i1 + i] = q
            e = (col - q) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all, scale, zero


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    def transform(x: torch.Tensor, mod, bits: int) -> dict[str, torch.Tensor]:
        q, scale, zero = gptq_quantize(mod.weight.detach(), 2 * x.t().double() @ x.double() / len(x), bits)
        return {"weight": q, "grid_scale": scale, "grid_zero": zero}

    return layerwise_plan(policy, cfg, observations, transform, 8192,
                          {**(provenance or {}), "coverage": "Linear layers; convs RTN"})
