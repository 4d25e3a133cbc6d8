"""qvla: action-sensitivity guided mixed-precision quantization of VLA policies, proven in closed loop."""
from __future__ import annotations

__version__ = "0.1.0"


def load_policy(name_or_dir, kernels: str = "real"):
    """A registered policy name (shipped checkpoint) or a checkpoint directory, quantized or not.

    Quantized checkpoints run on real integer kernels by default; kernels="simulated" gives the
    fake-quant reference."""
    from qvla.policies import load_policy as _load

    return _load(name_or_dir, kernels)


load = load_policy


def quantize_(policy, plan) -> None:
    """Applies a plan (per-channel bits + activation bits) to the policy in place."""
    from qvla.quant.apply import quantize_ as _q

    _q(policy, plan)


def evaluate(policy, suite: str = "mt10", episodes_per_task: int = 20, **kw) -> dict:
    from qvla.evaluate import evaluate as _e

    return _e(policy, suite, episodes_per_task, **kw)


__all__ = ["evaluate", "load", "load_policy", "quantize_"]
