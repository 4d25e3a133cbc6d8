"""QVLA + AWQ: QVLA's per-channel bit allocation, then AWQ's activation-aware scale and clip searches run
on each Linear layer *at its planned mixed bits* (rows at 16 bits are exact, pruned rows are a fixed error
the searches cannot change). The allocation is made on the unscaled layers' sensitivities, as qvla-sq's.
With activation quantization (A8 / A4) both searches include it, so the scale search is a searched,
per-layer smoothing strength rather than SmoothQuant's fixed alpha. Convs keep QVLA's plain rounding."""
from __future__ import annotations

from qvla.quant.layer_inputs import planned_linear_inputs
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.awq import search
from qvla.quant.methods.qvla import make_plan as qvla_plan


def make_plan(policy, cfg: QuantConfig, calibration, provenance: dict | None = None):
    sens, observations = calibration
    plan = qvla_plan(policy, cfg, sens, provenance)
    mods = dict(policy.model.named_modules())
    transforms, alphas = {}, {}
    for n, x in planned_linear_inputs(policy, plan, observations, cfg.a_bits, max_rows=2048).items():
        transforms[n], alphas[n] = search(x, mods[n].weight.detach().float(), plan.bits[n].long(), cfg.a_bits)
    plan.transforms, plan.method = transforms, "qvla-awq"
    plan.provenance["alphas"] = alphas
    return plan
