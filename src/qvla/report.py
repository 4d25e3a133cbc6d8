"""`qvla report`: plots and a markdown summary read from saved artifacts only (sensitivity file, plans)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qvla.quant import sensitivity as S
from qvla.quant.plan import Plan
from qvla.quant.primitives import BITS

ROLE_ORDER = ("vision", "projector", "llm", "action_head", "lm_head")


def role_sensitivity(sens: S.Sensitivity, bits: int = 4) -> dict[str, float]:
    """Mean per-weight sensitivity of each role at `bits` (weight-normalised so roles of any size compare)."""
    col = S.SENS_BITS.index(bits)
    out = {}
    for role in ROLE_ORDER:
        layers = [n for n, r in sens.roles.items() if r == role]
        if layers:
            tot = sum(float(sens.product[n][:, col].sum()) for n in layers)
            weights = sum(len(sens.product[n]) * sens.fan_in[n] for n in layers)
            out[role] = tot / weights
    return out


def finding(rs: dict[str, float]) -> str:
    """States plainly whether the published finding holds: vision robust, projector and action head sensitive."""
    if "vision" not in rs:
        return "No vision layers were analysed."
    robust = min(rs, key=rs.get) == "vision"
    sensitive = [r for r in ("projector", "action_head") if r in rs and rs[r] > rs.get("llm", 0)]
    return (f"Published finding (vision encoder robust; projector and action head sensitive): vision is "
            f"{'' if robust else 'not '}the least sensitive role per weight; "
            f"{', '.join(sensitive) or 'neither projector nor action head'} "
            f"{'is' if len(sensitive) == 1 else 'are'} more sensitive per weight than the language model.")


def write_report(sens_file: str | Path, plan_dirs: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sens, meta = S.load(sens_file)
    lines = [f"# Sensitivity report: {meta['provenance'].get('policy')}", "",
             f"Source: `{sens_file}` ({meta['observations']} calibration steps, form `{meta['form']}`, "
             f"A{meta['a_bits']}).", ""]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for b in (8, 4, 2, 0):
        rs = role_sensitivity(sens, b)
        ax.plot(list(rs), list(rs.values()), marker="o", label=f"{b} bits")
    ax.set_yscale("log"), ax.set_ylabel("sensitivity per weight"), ax.legend(), ax.set_title("Sensitivity by role")
    fig.tight_layout(), fig.savefig(out / "sensitivity_by_role.png", dpi=120), plt.close(fig)
    rs4 = role_sensitivity(sens, 4)
    lines += ["## Sensitivity per weight at 4 bits, by role", "", "| role | per-weight sensitivity | vs vision |",
              "|---|---|---|"]
    lines += [f"| {r} | {v:.3e} | {v / rs4.get('vision', np.nan):.1f}x |" for r, v in rs4.items()]
    lines += ["", finding(rs4), ""]
    layers = list(sens.product)
    col = S.SENS_BITS.index(4)
    per_layer = [float(sens.product[n][:, col].sum()) / (len(sens.product[n]) * sens.fan_in[n]) for n in layers]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    colors = {r: f"C{i}" for i, r in enumerate(ROLE_ORDER)}
    ax.bar(range(len(layers)), per_layer, color=[colors[sens.roles[n]] for n in layers])
    ax.set_yscale("log"), ax.set_xlabel("layer (network order)"), ax.set_ylabel("sensitivity per weight, 4 bits")
    for r, c in colors.items():
        ax.bar([], [], color=c, label=r)
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(out / "sensitivity_by_layer.png", dpi=120), plt.close(fig)
    lines += ["", "![by role](sensitivity_by_role.png)", "![by layer](sensitivity_by_layer.png)", ""]
    for d in plan_dirs:
        plan = Plan.load(d)
        summ = plan.summary()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        roles = [r for r in ROLE_ORDER if r in summ]
        for i, b in enumerate(BITS):
            share = [summ[r]["hist"][str(b)] / summ[r]["channels"] for r in roles]
            ax.bar(np.arange(len(roles)) + (i - 2) * 0.16, share, width=0.16, label=f"{b} bits")
        ax.set_xticks(range(len(roles)), roles), ax.set_ylabel("share of channels"), ax.legend(fontsize=7)
        ax.set_title(f"{plan.method} W{plan.budget:g}A{plan.a_bits}: bits per role")
        name = f"bits_{plan.method}_w{plan.budget:g}a{plan.a_bits}.png"
        fig.tight_layout(), fig.savefig(out / name, dpi=120), plt.close(fig)
        lines += [f"## Plan {plan.method} W{plan.budget:g}A{plan.a_bits} (average {plan.average_bits:.3f} bits)", "",
                  "| role | average bits | pruned channels | 2 | 4 | 8 | 16 |", "|---|---|---|---|---|---|---|"]
        for r in roles:
            h, n = summ[r]["hist"], summ[r]["channels"]
            lines.append(f"| {r} | {summ[r]['average_bits']:.2f} | {100 * h['0'] / n:.1f}% | "
                         + " | ".join(f"{100 * h[str(b)] / n:.0f}%" for b in (2, 4, 8, 16)) + " |")
        lines += ["", f"![bits]({name})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"role_sensitivity_4bit": rs4}, indent=1))
    return out / "report.md"
