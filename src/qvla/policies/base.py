"""The policy protocol every policy family implements, and module roles for quantization."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from qvla.envs.base import Observation

ROLES = ("vision", "projector", "llm", "action_head", "embedding", "lm_head")


class Policy(Protocol):
    name: str  # registry name or checkpoint path it was loaded from
    model: torch.nn.Module

    def reset(self) -> None: ...

    def act(self, obs: Observation) -> np.ndarray:
        """-> (K, action_dim) action chunk; the caller executes it open-loop."""
        ...

    def module_roles(self) -> dict[str, str]:
        """Module name -> one of ROLES, for every quantizable (Linear / Conv) module."""
        ...

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(producer, consumer) Linear pairs where the producer's outputs reach only the consumer, through
        elementwise ops: a mixed-precision producer may emit its channels permuted, the consumer's input
        columns absorbing the permutation. Pairs that share a consumer fold only when their producers emit
        the same order. Optional; no pairs means no folding."""
        ...

    def tied_channels(self) -> list[list[str]]:
        """Groups of layers whose channel c must share its bits (outputs multiplied elementwise). Optional."""
        ...


def roles_by_prefix(model: torch.nn.Module, table: list[tuple[str, str]]) -> dict[str, str]:
    """Tags every Linear/Conv/Embedding (or a quantized layer that replaced one) with the role of the first
    matching name prefix; fails on a gap."""
    roles = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) or getattr(mod, "quantized_layer", False):
            role = next((r for prefix, r in table if name.startswith(prefix)), None)
            if role is None:
                raise ValueError(f"module {name} matches no role prefix in {table}")
            roles[name] = role
    return roles
