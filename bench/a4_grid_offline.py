"""Where a W4A4 checkpoint's output error comes from, offline (no simulator): its deviation from the FP
policy on recorded observations (KL over action tokens for token heads, L2 for continuous ones) as it runs,
with its activations left in float (the weights' share), and with its A4 activations on the symmetric
per-token grid instead of the plan's asymmetric one (what that grid costs).

Usage: python bench/a4_grid_offline.py --policy microvla-token --calib DIR --form logits \
           --checkpoints DIR [DIR ...] [--stride 3] --out results/a4-grid/offline-NAME.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import qvla.quant.apply as apply_mod
import qvla.quant.packed as packed_mod
from qvla.policies import load_policy
from qvla.quant.primitives import fake_quant_activation
from qvla.quant.sensitivity import _deviation, _outputs

sys.path.insert(0, str(Path(__file__).parent))
from offline_deviation import add_row, reference, save  # noqa: E402  (the same reference and output)


def symmetric_a4(x: torch.Tensor, bits: int, clip=None) -> torch.Tensor:
    """The earlier A4 grid: 15 levels over [-max|x|, max|x|] per token (A8 and A16 unchanged)."""
    if bits != 4:
        return fake_quant_activation(x, bits, clip)
    step = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7 * (1 if clip is None else clip)
    return torch.clamp(torch.round(x / step), -7, 7) * step


def float_activations(x: torch.Tensor, bits: int, clip=None) -> torch.Tensor:
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--form", default="action")
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--stride", type=int, default=3, help="every STRIDE-th calibration step")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    obs, steps, ref = reference(a.policy, a.calib, a.form, a.stride)
    res = {"policy": a.policy, "form": a.form, "observations": len(obs), "rows": []}
    for ck in a.checkpoints:
        q = load_policy(ck, kernels="simulated")
        row = {"checkpoint": ck}
        for name, fn in [("as_planned", fake_quant_activation), ("float_activations", float_activations),
                         ("symmetric_a4", symmetric_a4)]:
            apply_mod.fake_quant_activation = packed_mod.fake_quant_activation = fn
            try:
                row[name] = _deviation(ref, _outputs(q, steps, a.form), a.form) / len(obs)
            finally:
                apply_mod.fake_quant_activation = packed_mod.fake_quant_activation = fake_quant_activation
        add_row(res, row)
    save(res, a.out)


if __name__ == "__main__":
    main()
