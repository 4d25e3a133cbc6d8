"""The plan artifact: per-channel weight bits for every quantizable layer, plus how they were chosen.

On disk: DIR/plan.json (settings, per-layer summary, provenance) and DIR/plan.safetensors (bits per
channel, int8, one tensor per layer). A plan is tied to a model architecture by `signature`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qvla.quant.primitives import BITS

FORMAT = "qvla-plan/2"  # /2: A4 activations on the asymmetric grid (primitives.activation_grid)
# plans of an earlier format that mean the same thing here: /1 differs only in its symmetric A4 grid
COMPATIBLE = {"qvla-plan/1": lambda meta: meta["a_bits"] != 4}
TRANSFORMS = "plan-transforms.safetensors"  # only for methods that transform weights (baselines)
A_BITS = (4, 8, 16)


def signature(shapes: dict[str, tuple[int, ...]]) -> str:
    """A hash of the quantizable layers' names and weight shapes: a plan only fits the model it was made for."""
    text = ";".join(f"{n}:{tuple(s)}" for n, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    bits: dict[str, torch.Tensor]  # layer -> (C,) int8 weight bits per output channel, in BITS
    fan_in: dict[str, int]  # layer -> weights per output channel
    roles: dict[str, str]
    a_bits: int  # activation bits for every quantized layer's input (16 = none)
    budget: float  # requested average weight bits
    method: str
    signature: str
    provenance: dict = field(default_factory=dict)
    transforms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # baselines: layer -> tensors

    def __post_init__(self) -> None:
        if self.a_bits not in A_BITS:
            raise ValueError(f"a_bits must be one of {A_BITS}, got {self.a_bits}")
        if not (0 < self.budget <= 16):
            raise ValueError(f"budget (average bits per weight) must be in (0, 16], got {self.budget}")
        for n, b in self.bits.items():
            bad = sorted(set(b.unique().tolist()) - set(BITS))
            if bad:
                raise ValueError(f"layer {n}: bits {bad} not in {BITS}")

    @property
    def average_bits(self) -> float:
        total = sum(float(b.double().sum()) * self.fan_in[n] for n, b in self.bits.items())
        return total / sum(len(b) * self.fan_in[n] for n, b in self.bits.items())

    def summary(self) -> dict:
        per_role: dict[str, dict] = {}
        for n, b in self.bits.items():
            r = per_role.setdefault(self.roles[n], {"weights": 0, "bit_weights": 0.0, "channels": 0,
                                                    "hist": {str(x): 0 for x in BITS}})
            r["weights"] += len(b) * self.fan_in[n]
            r["bit_weights"] += float(b.double().sum()) * self.fan_in[n]
            r["channels"] += len(b)
            for x in BITS:
                r["hist"][str(x)] += int((b == x).sum())
        for r in per_role.values():
            r["average_bits"] = r.pop("bit_weights") / r["weights"]
        return per_role

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: b.to(torch.int8).contiguous() for n, b in self.bits.items()}, out / "plan.safetensors")
        if self.transforms:
            save_file({f"{n}::{k}": v.float().contiguous() for n, t in self.transforms.items() for k, v in t.items()},
                      out / TRANSFORMS)
        meta = {"format": FORMAT, "method": self.method, "budget": self.budget, "a_bits": self.a_bits,
                "average_bits": self.average_bits, "signature": self.signature, "fan_in": self.fan_in,
                "roles": self.roles, "per_role": self.summary(), "provenance": self.provenance}
        (out / "plan.json").write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        for f in ("plan.json", "plan.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path} is not a plan directory: {f} is missing")
        meta = json.loads((path / "plan.json").read_text())
        fmt = meta.get("format")
        if fmt != FORMAT and not (fmt in COMPATIBLE and COMPATIBLE[fmt](meta)):
            why = (" (its A4 activations were rounded on the symmetric grid: quantize again)"
                   if fmt in COMPATIBLE else "")
            raise ValueError(f"{path}/plan.json: format {fmt!r}, expected {FORMAT!r}{why}")
        bits = {n: t.to(torch.int8) for n, t in load_file(path / "plan.safetensors").items()}
        transforms: dict[str, dict[str, torch.Tensor]] = {}
        if (path / TRANSFORMS).is_file():
            for key, v in load_file(path / TRANSFORMS).items():
                n, k = key.split("::", 1)
                transforms.setdefault(n, {})[k] = v
        return cls(bits, meta["fan_in"], meta["roles"], meta["a_bits"], meta["budget"], meta["method"],
                   meta["signature"], meta["provenance"], transforms)
