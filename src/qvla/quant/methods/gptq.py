"""GPTQ (Frantar et al., 2023): quantize a layer's weights column by column, each column's rounding error
spread over the columns not yet quantized through the inverse Hessian of the layer's squared output error.

H = 2 X^T X / n over the layer's calibration inputs, damped by 1 % of its mean diagonal; the per-channel
grid is laid on the original rows first (as in the paper's per-channel setting), its range searched per row
at 2 and 4 bits: the shrink p in {1, 0.99, ..., 0.21} of [min, max] whose grid rounds the row with the
smallest sum |q - w|^2.4 (the reference implementation's `mse` grid; min-max, p = 1, is one candidate).
Columns are processed in blocks of 128 with lazy batch updates. The result is stored as the updated weight
plus its grid, so that the apply step reproduces GPTQ's codes exactly. A conv is GPTQ'd as the Linear layer
it is on its input patches (layer_inputs.conv_patches): weight.reshape(out, C * kh * kw).
"""
from __future__ import annotations

import torch

from qvla.quant.methods import QuantConfig
from qvla.quant.methods.rtn import layerwise_plan
from qvla.quant.primitives import check_bits, dequantize_rows, quant_params, quantize_rows

SHRINKS = 1 - torch.arange(80) / 100  # range fractions the grid search tries, 1 (min-max) first
NORM = 2.4  # the search's error norm, as in the reference implementation
SEARCHED = (2, 4)  # widths whose range is searched (8 bits: symmetric max-abs grid, rounding error ~1/127)


def searched_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scale, zero), each (N,): per row, the grid over a shrunk [min, max] that rounds the row with the
    smallest sum |q - w|^NORM; never worse than the min-max grid on that measure (it is the first candidate)."""
    w = w.float()
    best = torch.full((w.shape[0],), float("inf"))
    scale, zero = torch.ones(w.shape[0]), torch.zeros(w.shape[0])
    for p in SHRINKS.tolist():
        codes, s, z = quantize_rows(w, bits, torch.full((w.shape[0],), p))
        err = (dequantize_rows(codes, s, z) - w).abs().pow(NORM).sum(1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def mixed_grid(w: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row grid for rows at their own bits -> (scale, zero, qmin, qmax), each (N,); 2- and 4-bit rows on
    their searched range. Rows at 16 (kept in floating point) and 0 (pruned) get a placeholder grid;
    gptq_quantize never rounds them."""
    n = w.shape[0]
    scale, zero = torch.ones(n), torch.zeros(n)
    qmin, qmax = torch.zeros(n), torch.zeros(n)
    for b in (2, 4, 8):
        rows = bits == b
        if rows.any():
            s, z, lo, hi = quant_params(w[rows], b)
            if b in SEARCHED:
                s, z = searched_grid(w[rows], b)
            scale[rows], zero[rows], qmin[rows], qmax[rows] = s, z, float(lo), float(hi)
    return scale, zero, qmin, qmax


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int | torch.Tensor, damp: float = 0.01,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (quantized weight, dequantized, (N, K); scale (N,); zero (N,)).

    bits: one width for every row, or (N,) per-row widths in {0, 2, 4, 8, 16}. GPTQ's updates are row by
    row (every row shares the Hessian but not its rounding), so mixed widths are exact: rows at 16 stay as
    they are, pruned rows are zero, and every other row is GPTQ at its own width."""
    w = w.clone().float()
    bits = torch.full((w.shape[0],), int(bits)) if not torch.is_tensor(bits) else bits.long()
    if bits.shape != (w.shape[0],):
        raise ValueError(f"bits has shape {tuple(bits.shape)}, expected one width per row ({w.shape[0]},)")
    for b in bits.unique():
        check_bits(int(b))
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale, zero, qmin, qmax = mixed_grid(w, bits)
    rounded = ((bits > 0) & (bits < 16)).float()  # rows GPTQ rounds; the others carry no error forward
    keep = (bits == 16).float()
    q_all = torch.zeros_like(w)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = (torch.minimum(torch.maximum(torch.round(col / scale) + zero, qmin), qmax) - zero) * scale
            q = q * rounded + col * keep
            q_all[:, i1 + i] = q
            e = (col - q) * rounded / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all, scale, zero


def output_matched(w: torch.Tensor, x: torch.Tensor, x_seen: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight W' (N, K) that best maps the inputs as the quantized layer sees them, x_seen (rows, K), to
    the layer's full-precision outputs W x: argmin ||x W^T - x_seen W'^T||^2, its correction to W damped as
    GPTQ damps its Hessian. Its residual is orthogonal to every V x_seen, so for any weight V
    ||W x - V x_seen||^2 = ||W x - W' x_seen||^2 + ||(W' - V) x_seen||^2: GPTQ rounding W' on x_seen's Hessian
    minimises the error against the full-precision output, activation rounding included (the asymmetric
    calibration of GPTAQ, Li et al. 2025, here on the layer's own rounded inputs)."""
    xs = x_seen.double()
    h = xs.t() @ xs
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    # W'^T = W^T + H^-1 x_seen^T (x - x_seen) W^T: the damping shrinks only the correction (damped as a
    # whole, a layer with outlier channels had its other directions shrunk, and came out worse than W)
    return (w.double() + torch.linalg.solve(h, xs.t() @ (x.double() - xs) @ w.double().t()).t()).float()


def gptq_transform(x: torch.Tensor, w: torch.Tensor, bits: int | torch.Tensor,
                   x_seen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GPTQ of weight w (N, K), or a conv's (N, C, kh, kw), on inputs x (rows, K) (a conv's patches) -> the
    transform entries that make the plan apply it. With x_seen (x as the quantized layer multiplies it, its
    activations rounded) GPTQ rounds output_matched(w, x, x_seen) on x_seen's Hessian instead."""
    w2 = w.reshape(w.shape[0], -1)
    if x_seen is not None:
        w2, x = output_matched(w2, x, x_seen), x_seen
    q, scale, zero = gptq_quantize(w2, 2 * x.t().double() @ x.double() / len(x), bits)
    return {"weight": q.reshape(w.shape), "grid_scale": scale, "grid_zero": zero}


def make_plan(policy, cfg: QuantConfig, observations, provenance: dict | None = None):
    def transform(x: torch.Tensor, mod, bits: int) -> dict[str, torch.Tensor]:
        return gptq_transform(x, mod.weight.detach(), bits)

    return layerwise_plan(policy, cfg, observations, transform, 8192,
                          {**(provenance or {}), "coverage": "Linear layers and convs"}, convs=True)
