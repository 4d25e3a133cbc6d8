"""Offline check of quantization methods, without the simulator: how far each quantized policy's outputs
move from the full-precision policy's on recorded observations (mean action L2 for continuous heads, KL
for token heads). A fast screen before closed-loop evaluation, not a substitute for it.

Usage: python bench/offline_deviation.py --policy microvla-chunk --calib DIR --runs W4A16:rtn,W4A16:quarot \
           [--form action] [--holdout DIR] --out results/offline/NAME.json
       python bench/offline_deviation.py --policy microvla-chunk --calib DIR --checkpoints CKPT,CKPT ... \
           (quantized checkpoints measured as they are)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qvla.calibrate import load_calibration
from qvla.policies import load_policy
from qvla.quant.methods import QuantConfig
from qvla.quant.pipeline import quantize
from qvla.quant.sensitivity import _deviation, _outputs, batches
from qvla.table import parse_setting


def reference(policy: str, observations: str, form: str, stride: int = 1):
    """-> (observations, their batches, the FP policy's outputs on them): what every row is measured against."""
    torch.set_flush_denormal(True)
    fp = load_policy(policy)
    _, obs = load_calibration(observations, None)
    obs = obs[::stride]
    steps = batches(fp, obs, 32)
    return obs, steps, _outputs(fp, steps, form)


def add_row(res: dict, row: dict) -> None:
    print(json.dumps(row), flush=True)
    res["rows"].append(row)


def save(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--holdout", help="observations to measure on (default: the calibration ones)")
    ap.add_argument("--runs", default="", help="comma list of SETTING:METHOD")
    ap.add_argument("--checkpoints", default="", help="comma list of quantized checkpoint directories")
    ap.add_argument("--form", default="action")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not (a.runs or a.checkpoints):
        raise SystemExit("give --runs, --checkpoints or both")
    obs, steps, ref = reference(a.policy, a.holdout or a.calib, a.form)
    res = {"policy": a.policy, "observations": len(obs), "form": a.form, "rows": []}
    for ckpt in filter(None, a.checkpoints.split(",")):
        q = load_policy(ckpt, kernels="simulated")
        add_row(res, {"checkpoint": ckpt, "deviation": _deviation(ref, _outputs(q, steps, a.form), a.form) / len(obs)})
    for run in filter(None, a.runs.split(",")):
        setting, method = run.split(":")
        w, ab = parse_setting(setting)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            quantize(a.policy, QuantConfig(method=method, w_bits=w, a_bits=ab, form=a.form), a.calib, tmp)
            q = load_policy(tmp, kernels="simulated")
            dev = _deviation(ref, _outputs(q, steps, a.form), a.form) / len(obs)
        add_row(res, {"setting": setting, "method": method, "deviation": dev, "seconds": round(time.time() - t0, 1)})
    save(res, a.out)


if __name__ == "__main__":
    main()
