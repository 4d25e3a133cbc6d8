"""Pure tensor math for quantization: no I/O, no model or simulator knowledge.

Weights: per-output-channel uniform quantization. 8 bits are symmetric (what int8 GEMM kernels take);
4 and 2 bits are asymmetric (scale + zero point), which matters most at 2 bits where a symmetric grid
wastes a level. 16 means "kept in floating point"; 0 means the channel is pruned (all zeros).
Activations: per-token dynamic quantization (one grid per row of the last dimension): symmetric at 8 bits,
asymmetric at 4 (activation_grid).
"""
from __future__ import annotations

import torch

BITS = (0, 2, 4, 8, 16)  # allowed bit widths, low to high
DEMOTION = {16: 8, 8: 4, 4: 2, 2: 0}  # the greedy walks this chain


def check_bits(bits: int) -> int:
    if int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return int(bits)


def quant_params(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None,
                 clip_lo: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-row (dim 0) scale and zero point for `bits` -> (scale, zero, qmin, qmax); w is (C, ...).

    clip (C,) in (0, 1] shrinks each row's range before the grid is laid (AWQ / OmniQuant clipping);
    clip_lo, if given, shrinks the low end separately (OmniQuant's two clipping factors)."""
    flat = w.reshape(w.shape[0], -1).float()
    c = torch.ones(flat.shape[0]) if clip is None else clip.float()
    c_lo = c if clip_lo is None else clip_lo.float()
    if bits == 8:
        qmax = 127
        scale = (flat.abs().amax(1) * c).clamp_min(1e-12) / qmax
        return scale, torch.zeros_like(scale), -qmax, qmax
    lo, hi = flat.amin(1).clamp(max=0) * c_lo, flat.amax(1).clamp(min=0) * c
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return scale, zero, 0, qmax


def quantize_rows(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None,
                  grid: tuple[torch.Tensor, torch.Tensor] | None = None, clip_lo: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (uint8/int8 range, stored as int16) plus scale and zero point, per row.

    grid = (scale, zero) imposes a given grid (GPTQ lays it before its updates move the weights)."""
    scale, zero, qmin, qmax = quant_params(w, bits, clip, clip_lo)
    if grid is not None:
        scale, zero = grid[0].float(), grid[1].float()
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w.float() / scale.view(shape)) + zero.view(shape), qmin, qmax)
    return q.to(torch.int16), scale, zero


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() - zero.view(shape)) * scale.view(shape)


def fake_quant_rows(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """w rounded to its `bits`-bit grid, in w's dtype; 16 leaves it alone, 0 zeroes it.
    clip (C,): per-row range ratios, as in quant_params."""
    bits = check_bits(bits)
    if bits == 16:
        return w.clone()
    if bits == 0:
        return torch.zeros_like(w)
    return dequantize_rows(*quantize_rows(w, bits, clip)).to(w.dtype)


def fake_quant_mixed(w: torch.Tensor, bits_per_row: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Each output channel (row) at its own bit width (and, if given, its own clip ratio)."""
    if bits_per_row.shape != (w.shape[0],):
        raise ValueError(f"bits_per_row has shape {tuple(bits_per_row.shape)}, expected ({w.shape[0]},)")
    out = torch.empty_like(w)
    for b in bits_per_row.unique().tolist():
        rows = bits_per_row == b
        out[rows] = fake_quant_rows(w[rows], int(b), None if clip is None else clip[rows])
    return out


def activation_grid(x: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None):
    """Each token's (last dim) integer grid -> (step, lo, hi): x rounds to clamp(round(x / step), lo, hi) * step.
    A8 is symmetric (|code| <= 127). A4 is asymmetric (as OmniQuant's and Atom's activations): the token's
    [min, max], widened to hold 0, spans the 16 levels, so a skewed input (post-GELU, pixels) keeps all of
    them; the zero point z is folded into the bounds (codes in [-z, 15 - z], |code| <= 15), so the codes
    stay symmetric int8 values for the integer kernels. clip in (0, 1] lays the grid on that fraction of the
    range (values beyond it saturate)."""
    if bits == 8:
        step = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return step * (1 if clip is None else clip), -127.0, 127.0
    if bits != 4:
        raise ValueError(f"activation bits must be 4, 8 or 16, got {bits}")
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    step = (hi - lo).clamp_min(1e-8) / 15
    z = torch.round(-lo / step)
    return step * (1 if clip is None else clip), -z, 15 - z


def fake_quant_activation(x: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-token dynamic quantization on activation_grid; 16 leaves x alone."""
    if bits >= 16:
        return x
    step, lo, hi = activation_grid(x, bits, clip)
    return torch.clamp(torch.round(x / step), lo, hi) * step


def weight_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized minus original weight, same shape as w."""
    return fake_quant_rows(w, bits) - w
