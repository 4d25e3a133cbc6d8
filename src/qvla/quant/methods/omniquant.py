"""OmniQuant (Shao et al., 2024): learnable weight clipping (LWC) and a learnable equivalent
transformation (LET), trained by gradient descent on each layer's calibration inputs.

LWC: per output channel, the grid spans [sigmoid(b) * min(w), sigmoid(g) * max(w)] (g, b start at 4,
i.e. ~no clipping). LET: per input channel, a scale s and shift d with y = (W diag(s)) ((x - d) / s) +
(b + W d) (s starts at SmoothQuant's alpha = 0.5 scales, d at the middle of each channel's range). The
loss is the squared error of the quantized layer's output (weights and, for WxAy, activations rounded
with a straight-through estimator) against the float output; AdamW, `steps` steps on minibatches.
The paper trains per transformer block; we train per Linear layer (the micro-VLAs' blocks mix roles).
Convs are rounded as in RTN.
"""
from __future__ import annotations

import torch

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import layerwise_plan
from qvla.quant.methods.smoothquant import smooth_scales
from qvla.quant.primitives import activation_grid


STEPS = 100  # AdamW steps per layer


def ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def lwc_qdq(w: torch.Tensor, bits: int, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Differentiable per-row quantize-dequantize with learnable clipping of max (gamma) and min (beta)."""
    if bits == 8:
        qmax = 127
        scale = (w.abs().amax(1) * gamma).clamp_min(1e-8) / qmax
        return torch.clamp(ste_round(w / scale[:, None]), -qmax, qmax) * scale[:, None]
    hi, lo = w.amax(1).clamp(min=0) * gamma, w.amin(1).clamp(max=0) * beta
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = ste_round(-lo / scale)
    return (torch.clamp(ste_round(w / scale[:, None]) + zero[:, None], 0, qmax) - zero[:, None]) * scale[:, None]


def lwc_qdq_rows(w: torch.Tensor, bits: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """lwc_qdq with each row at its own width (a QVLA plan's rows): 16 stays exact, 0 is zero."""
    out = w * (bits == 16).to(w.dtype)[:, None]
    for b in (2, 4, 8):
        rows = bits == b
        if rows.any():
            out = out + lwc_qdq(w, b, gamma, beta) * rows.to(w.dtype)[:, None]
    return out


def ste_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The plan's per-token activation rounding (primitives.activation_grid), with a straight-through round."""
    if bits >= 16:
        return x
    step, lo, hi = activation_grid(x, bits)
    return torch.clamp(ste_round(x / step), lo, hi) * step


def train_layer(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, bits: int | torch.Tensor, a_bits: int,
                steps: int = STEPS, lr: float = 5e-3, batch: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """-> transform {in_scale, in_shift, clip, clip_lo} for one Linear layer; bits: one width for every row,
    or (N,) per-row widths (a QVLA plan's)."""
    g = torch.Generator().manual_seed(seed)
    w = w.detach().float()
    rows = torch.full((w.shape[0],), bits) if isinstance(bits, int) else bits.long()
    b = torch.zeros(w.shape[0]) if bias is None else bias.detach().float()
    log_s = smooth_scales(x.abs().amax(0), w, 0.5).log().requires_grad_()
    shift = ((x.amax(0) + x.amin(0)) / 2).clone().requires_grad_()
    g_hi, g_lo = torch.full((w.shape[0],), 4.0, requires_grad=True), torch.full((w.shape[0],), 4.0, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [log_s, shift], "lr": lr}, {"params": [g_hi, g_lo], "lr": 2 * lr}],
                            weight_decay=0.0)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (min(batch, len(x)),), generator=g)]
        s = log_s.exp()
        wq = lwc_qdq_rows(w * s, rows, torch.sigmoid(g_hi), torch.sigmoid(g_lo))
        out = ste_act((xb - shift) / s, a_bits) @ wq.t() + b + w @ shift
        loss = (out - (xb @ w.t() + b)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {"in_scale": log_s.exp().detach(), "in_shift": shift.detach(),
                "clip": torch.sigmoid(g_hi).detach(), "clip_lo": torch.sigmoid(g_lo).detach()}


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    return layerwise_plan(policy, cfg, observations,
                          lambda x, mod, bits: train_layer(x, mod.weight, mod.bias, bits, cfg.a_bits), 4096,
                          {**(provenance or {}), "steps": STEPS, "coverage": "Linear layers trained; convs RTN"})
