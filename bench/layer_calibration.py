"""What layer calibration ('+lc') found: per layer and round, the measured deviation with only that layer
quantized at the planned bits against the sum of its channels' proxy costs, and the scale each layer ended
with. Reads the plan a `qvla quantize --method M+lc` checkpoint carries; its last entry ("final plan") is
measured on the plan itself.

Usage: python bench/layer_calibration.py CKPT_DIR --out results/ablation/NAME-layers.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    plan = json.loads((Path(a.checkpoint) / "plan.json").read_text())
    sens = plan["provenance"]["sensitivity"]
    if "layer_calibration" not in sens:
        raise SystemExit(f"{a.checkpoint} was not made with a '+lc' method (no layer calibration in its plan)")
    rounds = []
    for h in sens["layer_calibration"]["history"]:
        ratio = {n: h["truth"][n] / h["predicted"][n] for n in h["truth"] if h["predicted"][n] > 0}
        r = np.array(list(ratio.values()))
        rounds.append({"round": h["round"] + 1, "final": h.get("final", False), "layers": len(r), "median_ratio": float(np.median(r)), "unit": h.get("unit", 1.0),
                       "layers_within_0.8_1.25": int(((r >= 0.8) & (r <= 1.25)).sum()),
                       "measured_sum": float(sum(h["truth"].values())),
                       "predicted_sum": float(sum(h["predicted"].values())),
                       "pruned_channels": int(sum(h["pruned"].values())),
                       "highest": sorted(([n, round(q, 2), h["pruned"][n]] for n, q in ratio.items()),
                                         key=lambda t: -t[1])[:5]})
        x = rounds[-1]
        label = "final plan" if x["final"] else f"round {x['round']}"
        print(f"{label}: median measured/predicted {x['median_ratio']:.2f}, {x['layers_within_0.8_1.25']}/"
              f"{x['layers']} layers within 0.8-1.25, measured sum {x['measured_sum']:.1f} vs predicted "
              f"{x['predicted_sum']:.1f}, {x['pruned_channels']} channels pruned; highest [layer, ratio, pruned]: "
              f"{x['highest'][:3]}")
    out = {"checkpoint": a.checkpoint, "method": plan["method"], "budget": plan["budget"],
           "table": sens["layer_calibration"]["table"], "rounds": rounds, "scale": sens["layer_scale"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
