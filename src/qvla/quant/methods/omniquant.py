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


class OmniLinear(torch.nn.Module):
    """A Linear layer as OmniQuant trains it: LET (input scale s and shift d, y = (W diag(s)) ((x - d) / s) +
    (b + W d)) and LWC (per-row clipping of both ends of the grid), weights and activations rounded with
    straight-through rounds. Initialised from the statistics of its inputs x (rows, K): s from SmoothQuant's
    alpha = 0.5 scales, d at the middle of each channel's range, clipping at sigmoid(4) ~ none."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, bits: int | torch.Tensor,
                 a_bits: int, let: bool = True) -> None:
        super().__init__()
        self.w = w.detach().float()
        self.rows = torch.full((w.shape[0],), bits) if isinstance(bits, int) else bits.long()
        self.b = torch.zeros(w.shape[0]) if bias is None else bias.detach().float()
        self.a_bits = a_bits
        self.let = let  # without LET (weight-only, as the paper's scripts run Llama models): s = 1, d = 0
        k = w.shape[1]
        self.log_s = torch.nn.Parameter(smooth_scales(x.abs().amax(0), self.w, 0.5).log() if let else torch.zeros(k))
        self.shift = torch.nn.Parameter(((x.amax(0) + x.amin(0)) / 2).clone() if let else torch.zeros(k))
        self.g_hi = torch.nn.Parameter(torch.full((w.shape[0],), 4.0))
        self.g_lo = torch.nn.Parameter(torch.full((w.shape[0],), 4.0))

    def param_groups(self, lr: float) -> list[dict]:
        clip = {"params": [self.g_hi, self.g_lo], "lr": 2 * lr}
        return [{"params": [self.log_s, self.shift], "lr": lr}, clip] if self.let else [clip]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.log_s.exp()
        wq = lwc_qdq_rows(self.w * s, self.rows, torch.sigmoid(self.g_hi), torch.sigmoid(self.g_lo))
        return ste_act((x - self.shift) / s, self.a_bits) @ wq.t() + self.b + self.w @ self.shift

    @torch.no_grad()
    def transform(self) -> dict[str, torch.Tensor]:
        clip = {"clip": torch.sigmoid(self.g_hi).detach(), "clip_lo": torch.sigmoid(self.g_lo).detach()}
        if not self.let:
            return clip
        return {"in_scale": self.log_s.exp().detach().clone(), "in_shift": self.shift.detach().clone(), **clip}


def train_layer(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, bits: int | torch.Tensor, a_bits: int,
                steps: int = STEPS, lr: float = 5e-3, batch: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """-> transform {in_scale, in_shift, clip, clip_lo} for one Linear layer; bits: one width for every row,
    or (N,) per-row widths (a QVLA plan's)."""
    g = torch.Generator().manual_seed(seed)
    layer = OmniLinear(x, w, bias, bits, a_bits)
    opt = torch.optim.AdamW(layer.param_groups(lr), weight_decay=0.0)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (min(batch, len(x)),), generator=g)]
        loss = (layer(xb) - (xb @ layer.w.t() + layer.b)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.transform()


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    return layerwise_plan(policy, cfg, observations,
                          lambda x, mod, bits: train_layer(x, mod.weight, mod.bias, bits, cfg.a_bits), 4096,
                          {**(provenance or {}), "steps": STEPS, "coverage": "Linear layers trained; convs RTN"})
