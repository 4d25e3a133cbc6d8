"""Method registry: a method turns (policy, settings, calibration) into a Plan. One file + one line each."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from qvla.quant.plan import A_BITS
from qvla.quant.primitives import BITS


# suffixes: any method followed by a stage that refines its plan, applied in this order
SUFFIXES = {"+ac": "act_clip",  # activation clipping ratios (activation_clip.py)
            "+bc": "bias_correct",  # bias correction (bias_correction.py)
            "+lc": "layer_calibrate",  # sensitivities rescaled per layer by measured deviation (layer_calibration.py)
            "+lcp": "layer_calibrate_prune",  # +lc with each layer's pruning measured and priced apart from its rounding
            "+lcl": "layer_calibrate_linear",  # +lc against each layer's linearized deviation (action distance)
            "+at": "action_tune"}  # scales and biases trained end to end on the action deviation (action_tuning.py)


def split_method(name: str) -> tuple[str, set[str]]:
    """'qvla-rot+ac+bc' -> ('qvla-rot', {'+ac', '+bc'})."""
    found = set()
    while suffix := next((s for s in SUFFIXES if name.endswith(s)), None):
        found.add(suffix)
        name = name[: -len(suffix)]
    return name, found


# Roles the allocation may not prune (0 bits) by default, by budget: below an average of 4 bits the greedy
# prunes a quarter of the token policy's vision channels, which the first-order proxy prices far too low
# (forbidding it at 3 bits: +13.0 and +0.5 points on the token table's and the seed-1 episodes, +6.5 and
# +9.0 with GPTQ on the min-max grid, -0.5 on the chunk policy; on the chunk policy at 2.5 and 2 bits -2.5
# and -4.5, not significant: mixed evidence, see the README).
# An explicit QuantConfig.no_prune (--no-prune, even empty) replaces it, and so does '+lcp', which measures
# each layer's pruning apart from its rounding and prices it by what it measures.
PROXIES = ("projected", "product", "energy")  # which sensitivity table the allocation reads
NO_PRUNE_BELOW: tuple[tuple[float, tuple[str, ...]], ...] = ((4.0, ("vision",)),)


@dataclass
class QuantConfig:
    method: str = "qvla"
    w_bits: float = 4.0  # average weight bits per weight over all quantized layers (the budget)
    a_bits: int = 16  # activation bits: 16 (weight-only), 8 or 4
    form: str = "action"  # sensitivity output: "action" (continuous / expected action) or "logits" (KL)
    proxy: str = "projected"  # "projected" = ||J dx|| (ranks like the truth), "product" = ||J||*||dx||, "energy" = ||J dx||^2
    solver: str = "greedy"  # "greedy" or "exact" (MILP)
    pins: dict[str, int] = field(default_factory=dict)  # role or "re:<layer regex>" -> lowest bits allowed
    no_prune: tuple[str, ...] | None = None  # roles in which 0 bits is forbidden; None: NO_PRUNE_BELOW's
    batch_size: int = 16  # calibration steps per sensitivity batch
    probes: int | None = None  # backward passes per batch: None = exact (continuous) / 16 (KL)
    alpha: float = 0.5  # SmoothQuant's migration strength
    count: str = "stored"  # the budget counts bits as "stored" on disk, or as "held" by the CPU kernels
    tie: bool = False  # channels the policy ties (SwiGLU gate/up) share bits, so their permutation folds
    bias_correct: bool = False  # method "M+bc": M, then bias correction on the calibration inputs
    act_clip: bool = False  # method "M+ac": M, then per-layer activation clipping ratios (A8 / A4)
    weighting: str = "steps"  # calibration steps weigh 1 each ("steps") or each episode weighs the same ("episode")
    layer_calibrate: bool = False  # method "M+lc": a QVLA method allocating from layer-calibrated sensitivities
    layer_calibrate_prune: bool = False  # method "M+lcp": +lc with pruning and rounding calibrated apart
    layer_calibrate_linear: bool = False  # method "M+lcl": +lc against the whole layer's linearized deviation
    action_tune: bool = False  # method "M+at": M, then its scales and biases tuned to the actions (last stage)

    def __post_init__(self) -> None:
        self.method, suffixes = split_method(self.method)
        for s in suffixes:
            setattr(self, SUFFIXES[s], True)
        if self.layer_calibrate + self.layer_calibrate_prune + self.layer_calibrate_linear > 1:
            raise ValueError("+lc, +lcp and +lcl are three layer calibrations; give one")
        if self.layer_calibrate_linear and self.form != "action":
            raise ValueError("+lcl compares with the linearized action deviation: it needs --form action")
        self.layer_calibrate = self.layer_calibrate or self.layer_calibrate_prune or self.layer_calibrate_linear
        if self.no_prune is None:  # +lcp prices pruning by measurement instead of the rule by role
            rule = next((roles for below, roles in NO_PRUNE_BELOW if self.w_bits < below), ())
            self.no_prune = () if self.layer_calibrate_prune else rule
        self.no_prune = tuple(self.no_prune)
        if self.act_clip and self.a_bits >= 16:
            raise ValueError(f"activation clipping ({self.method}+ac) needs --a-bits 8 or 4, got {self.a_bits}")
        if self.method not in METHODS:
            raise KeyError(f"unknown method {self.method!r}; available: {sorted(METHODS)}")
        if self.layer_calibrate and NEEDS[self.method] not in ("sensitivity", "both", "transformed"):
            raise ValueError(f"+lc rescales the sensitivities a QVLA allocation reads; {self.method} has none "
                             f"(use one of {sorted(m for m, n in NEEDS.items() if n in ('sensitivity', 'both', 'transformed'))})")
        if not (0 < self.w_bits <= 16):
            raise ValueError(f"--w-bits (average bits per weight) must be in (0, 16], got {self.w_bits}")
        if self.a_bits not in A_BITS:
            raise ValueError(f"--a-bits must be one of {A_BITS}, got {self.a_bits}")
        for key, b in self.pins.items():
            if b not in BITS:
                raise ValueError(f"pin {key}={b}: bits must be one of {BITS}")
        if self.proxy not in PROXIES or self.solver not in ("greedy", "exact"):
            raise ValueError(f"proxy must be one of {'|'.join(PROXIES)} and solver greedy|exact, got {self.proxy}, {self.solver}")
        if self.proxy == "energy" and self.layer_calibrate:
            raise ValueError("layer calibration (+lc, +lcp, +lcl) compares action distances, not their squares: "
                             "use --proxy projected or product with it")

        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha (SmoothQuant's migration strength) must be in [0, 1], got {self.alpha}")
        if self.weighting not in ("steps", "episode"):
            raise ValueError(f"--weighting must be 'steps' or 'episode', got {self.weighting!r}")
        if self.count not in ("stored", "held"):
            raise ValueError(f"--count must be 'stored' or 'held', got {self.count!r}")

    def pinned_bits(self, layer: str, role: str) -> int | None:
        for key, b in self.pins.items():
            if (key.startswith("re:") and re.search(key[3:], layer)) or key == role:
                return b
        return None


def _method(module: str) -> Callable:
    def make_plan(*a, **k):
        import importlib

        return importlib.import_module(f"qvla.quant.methods.{module}").make_plan(*a, **k)
    return make_plan


# name -> plan maker; NEEDS says what it calibrates on: nothing, per-layer inputs, or sensitivities
METHODS: dict[str, Callable] = {m: _method(m) for m in ("qvla", "rtn", "smoothquant", "awq", "gptq", "omniquant",
                                                         "quarot")}
METHODS["omniquant-block"] = _method("omniquant_block")
METHODS["qvla-sq"] = _method("qvla_sq")
METHODS["qvla-awq"] = _method("qvla_awq")
METHODS["qvla-rot"] = _method("qvla_rot")
METHODS["qvla-srot"] = _method("qvla_srot")
METHODS["qvla-omni"] = _method("qvla_omni")
METHODS["qvla-gptq"] = _method("qvla_gptq")
METHODS["qvla-rot-gptq"] = _method("qvla_rot_gptq")
METHODS["qvla-rot-gptaq"] = _method("qvla_rot_gptaq")
METHODS["qvla-sq-gptq"] = _method("qvla_sq_gptq")
# "transformed": sensitivities measured on the layers after the method's transforms_for(); the plan maker
# then gets (sensitivity, transforms, observations)
NEEDS: dict[str, str | None] = {"qvla": "sensitivity", "rtn": None, "smoothquant": "observations",
                                "awq": "observations", "gptq": "observations", "omniquant": "observations",
                                "omniquant-block": "observations",
                                "quarot": None, "qvla-sq": "both", "qvla-awq": "both", "qvla-omni": "both", "qvla-rot": "transformed",
                                "qvla-srot": "transformed", "qvla-gptq": "both", "qvla-rot-gptq": "transformed",
                                "qvla-rot-gptaq": "transformed", "qvla-sq-gptq": "transformed"}
# what each "transformed" method's sensitivities are labelled (two methods with one label share the tables)
TRANSFORMED: dict[str, str] = {"qvla-rot": "rotation", "qvla-srot": "smoothrot", "qvla-rot-gptq": "rotation",
                               "qvla-rot-gptaq": "rotation", "qvla-sq-gptq": "smooth"}


def transforms_for(method: str) -> Callable:
    import importlib

    return importlib.import_module(f"qvla.quant.methods.{method.replace('-', '_')}").transforms_for
