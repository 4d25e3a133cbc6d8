"""Policy registry: a name maps to a family, a default config and the checkpoint shipped in the package."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qvla.checkpoint import load_checkpoint, read_meta
from qvla.policies.base import ROLES, Policy
from qvla.policies.microvla import VARIANTS, MicroVLAConfig, MicroVLAPolicy

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass(frozen=True)
class Family:
    config_from_dict: Callable[[dict], object]
    build: Callable[[object, str], Policy]


FAMILIES: dict[str, Family] = {
    "microvla": Family(MicroVLAConfig.from_dict, lambda cfg, name: MicroVLAPolicy(cfg, name)),
}
POLICIES: dict[str, tuple[str, object]] = {name: ("microvla", cfg) for name, cfg in VARIANTS.items()}


def build_policy(name: str) -> Policy:
    """A freshly initialised (untrained) policy of a registered name."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; registered policies: {sorted(POLICIES)}")
    family, cfg = POLICIES[name]
    return FAMILIES[family].build(cfg, name)


def resolve(name_or_dir: str | Path) -> Path:
    """A registered name -> its shipped checkpoint directory; anything else must be a directory."""
    if str(name_or_dir) in POLICIES:
        path = SHIPPED / str(name_or_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"no shipped checkpoint for {name_or_dir} at {path}; train one with "
                                    f"'qvla train --policy {name_or_dir}'")
        return path
    path = Path(name_or_dir)
    if not path.is_dir():
        raise KeyError(f"{str(name_or_dir)!r} is neither a registered policy ({sorted(POLICIES)}) "
                       f"nor a checkpoint directory")
    return path


def load_policy(name_or_dir: str | Path, kernels: str = "real") -> Policy:
    """Loads a trained policy (a registered name or a checkpoint directory), verifying checksums and shapes.

    A quantized checkpoint runs on real integer kernels (kernels="real") or on the fake-quant path
    ("simulated"); a float checkpoint ignores `kernels`.
    """
    path = resolve(name_or_dir)
    meta = read_meta(path)
    family = meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"checkpoint {path}: unknown family {family!r}; known: {sorted(FAMILIES)}")
    if meta.get("quantization"):
        from qvla.quant.apply import load_quantized  # a quantized checkpoint rebuilds its layers first

        return load_quantized(path, meta, kernels)
    meta, tensors = load_checkpoint(path)
    cfg = FAMILIES[family].config_from_dict(meta["config"])
    policy = FAMILIES[family].build(cfg, meta.get("policy", str(path)))
    policy.load_tensors(tensors, str(path))
    policy.checkpoint = str(path)
    return policy


__all__ = ["FAMILIES", "POLICIES", "ROLES", "Policy", "build_policy", "load_policy", "resolve"]
