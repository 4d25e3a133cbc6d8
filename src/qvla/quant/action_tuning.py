"""Action-tuned scales (the '+at' suffix): the plan's integer codes kept, each quantized channel's scale (and
each layer's bias) trained end to end so that the quantized policy's actions match the full-precision
policy's on the calibration steps.

Every other refinement here judges a layer by its own output error (GPTQ, AWQ, OmniQuant's clipping, bias
correction, activation clipping), and a smaller layer error does not mean a smaller action error: bias
correction and activation clipping lower the first and raise the second (README, *Not there yet*). Here the
objective is the one the allocation prices, the deviation of the actions:

    min over g, d   sum_n w_n * D(A_fp(o_n), A_q(o_n; g, d))
    A_q: the plan's quantized policy with each quantized row's dequantized weight (q - z) * s * exp(g_c),
         each layer's bias b + d
    D:   squared L2 distance of the actions (form "action"), KL(p_fp || p_q) of the action tokens ("logits")

Only scales and biases move, so the codes, the bits and the memory stay the plan's; one scalar per output
channel (and one bias) against every calibration step's whole action vector is far fewer parameters than
data. Activation rounding passes gradients straight through. The calibration steps are split: one
contiguous fifth of every episode is held out, and the parameters kept are those of the epoch with the lowest
held-out deviation (the untouched plan if no epoch beats it), so the tuning stops where it starts to fit the
training steps rather than the policy.

The result is written into the plan's transforms as a weight and grid that reproduce the same codes with the
new scales (grid_scale = s * exp(g)), plus bias_add: the checkpoint, the real kernels and the fake-quant path
read it as they read any other plan.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla.quant.apply import QuantConv2d, QuantLinear, dequantize_weight, quantize_
from qvla.quant.plan import Plan
from qvla.quant.primitives import fake_quant_activation
from qvla.quant.sensitivity import batches as policy_batches
from qvla.quant.storage import input_transform

EPOCHS = 24
LR = 3e-4  # Adam, on log-gains (a relative change of the scale) and on biases in units of the layer's output scale
HOLDOUT = 5  # a fifth of every calibration episode is held out
BATCH = 16
PARAMS = {"scale": "log_gain", "bias": "bias_offset"}  # what the tuning may move
TRAINED = ("scale", "bias")


def _ste(x: torch.Tensor, bits: int, clip=None) -> torch.Tensor:
    """x rounded per token as the plan rounds it, with the gradient of the identity."""
    return x if bits >= 16 else x + (fake_quant_activation(x, bits, clip) - x).detach()


class _Tuned(nn.Module):
    """A quantized layer with a trainable log-gain per output channel on its quantized rows and a bias offset."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.q = q
        bits = q.payload["bits"].long()
        self.register_buffer("rounded", ((bits > 0) & (bits < 16)).float())
        self.log_gain = nn.Parameter(torch.zeros(len(bits)))
        w = q.weight.reshape(len(bits), -1)
        # bias offsets are learned in units of each channel's typical weight magnitude, so one learning rate fits
        self.register_buffer("unit", w.abs().mean(1).clamp_min(1e-8))
        self.bias_offset = nn.Parameter(torch.zeros(len(bits)))

    def gain(self) -> torch.Tensor:
        return 1 + self.rounded * (self.log_gain.exp() - 1)

    def bias_add(self) -> torch.Tensor:
        return self.bias_offset * self.unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        shape = (-1,) + (1,) * (q.weight.dim() - 1)
        w = q.weight * self.gain().view(shape)
        b = self.bias_add() if q.bias is None else q.bias + self.bias_add()
        if isinstance(q, QuantConv2d):
            if q.a_bits < 16:
                x = _ste(x.movedim(1, -1), q.a_bits).movedim(-1, 1)
            return F.conv2d(x, w, b, **q.conv)
        return F.linear(_ste(input_transform(x, q.inp), q.a_bits, q.inp.get("a_clip")), w, b)


def _loss(ref: torch.Tensor, new: torch.Tensor, form: str) -> torch.Tensor:
    """(B,) per-step deviation, differentiable: squared L2 of the actions, or KL of the action tokens."""
    if form == "logits":
        r, n = ref.log_softmax(-1), new.log_softmax(-1)
        return (r.exp() * (r - n)).flatten(1).sum(1)
    return (new - ref).flatten(1).pow(2).sum(1)


def split_steps(episodes: list, holdout: int = HOLDOUT, twins: list | None = None) -> tuple[list[int], list[int]]:
    """-> (training steps, held-out steps): each calibration episode cut into `holdout` contiguous segments,
    episode k's segment k mod holdout held out, so that every task (one episode each, in the shipped
    calibration sets) is seen in both and the held-out steps are not neighbours of training steps.
    twins: per step, the episode whose k an episode takes (default its own): an episode acted from the same
    start as a calibration episode (`--tune-on`) holds out the same segment, so that neither side's near-copies
    of the other's steps cross the split."""
    if None in episodes:
        raise ValueError("action tuning holds out part of each calibration episode: every step needs its episode id")
    twins = episodes if twins is None else twins
    steps: dict = {}
    order: dict = {}  # twin -> k, in order of first appearance
    for i, (e, t) in enumerate(zip(episodes, twins)):
        steps.setdefault(e, []).append(i)
        order.setdefault(t, len(order))
    fit, held = [], []
    for idx in steps.values():
        k = order[twins[idx[0]]]
        seg = [j * holdout // len(idx) for j in range(len(idx))]
        fit += [i for i, s in zip(idx, seg) if s != k % holdout]
        held += [i for i, s in zip(idx, seg) if s == k % holdout]
    if not held or not fit:
        raise ValueError(f"action tuning needs calibration episodes of at least {holdout} steps")
    return fit, held


def tune(policy, plan: Plan, observations: list, form: str, step_w: torch.Tensor | None = None,
         epochs: int = EPOCHS, lr: float = LR, holdout: int = HOLDOUT, seed: int = 0, train: tuple = TRAINED,
         episodes: list | None = None, log=None) -> tuple[dict[str, tuple[QuantLinear, torch.Tensor, torch.Tensor]], dict]:
    """-> (layer -> (its quantized layer, gain (C,), bias add (C,)) of the best held-out epoch, history).
    policy: the full-precision policy (left as it is); episodes: each step's episode id (default: the
    observations' own)."""
    step_w = torch.ones(len(observations), dtype=torch.float64) if step_w is None else step_w
    twins = None
    if episodes is None:
        episodes = [(o.extras or {}).get("episode") for o in observations]
        twins = [(o.extras or {}).get("twin", e) for o, e in zip(observations, episodes)]
    fit, held = split_steps(episodes, holdout, twins)
    policy.model.eval()
    quant = copy.deepcopy(policy)
    quantize_(quant, plan)
    tuned: dict[str, _Tuned] = {}

    def wrap(module: nn.Module, prefix: str = "") -> None:
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, QuantLinear):
                tuned[full] = _Tuned(child)
                setattr(module, name, tuned[full])
            else:
                wrap(child, full + ".")

    wrap(quant.model)
    quant.model.eval()
    for p in quant.model.parameters():
        p.requires_grad_(False)
    params = [getattr(t, PARAMS[k]) for t in tuned.values() for k in train]
    for p in params:
        p.requires_grad_(True)

    def make(idx: list[int]) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        out = []
        for s in range(0, len(idx), BATCH):
            chunk = idx[s:s + BATCH]
            b = policy_batches(policy, [observations[i] for i in chunk], len(chunk))[0]
            with torch.no_grad():
                ref = policy.action_outputs(b, form)
            out.append((b, ref, step_w[chunk].float()))
        return out

    gen = torch.Generator().manual_seed(seed)
    train_idx = [fit[i] for i in torch.randperm(len(fit), generator=gen).tolist()]
    train_b, held_b = make(train_idx), make(held)

    def held_loss() -> float:
        with torch.no_grad():
            return float(sum((_loss(r, quant.action_outputs(b, form), form) * w).sum() for b, r, w in held_b))

    opt = torch.optim.Adam(params, lr=lr)
    best = held_loss()
    history = {"held_out": [best], "train": [], "held_out_steps": len(held), "train_steps": len(fit),
               "trained": list(train),
               "epochs": epochs, "lr": lr}
    keep = {n: (t.log_gain.detach().clone(), t.bias_offset.detach().clone()) for n, t in tuned.items()}
    best_epoch = 0
    for epoch in range(1, epochs + 1):
        total = 0.0
        for i in torch.randperm(len(train_b), generator=gen).tolist():
            b, r, w = train_b[i]
            loss = (_loss(r, quant.action_outputs(b, form), form) * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        h = held_loss()
        history["train"].append(total)
        history["held_out"].append(h)
        if log:
            log(f"action tuning epoch {epoch}: train {total:.4g}, held out {h:.4g} (start {history['held_out'][0]:.4g})")
        if h < best:
            best, best_epoch = h, epoch
            keep = {n: (t.log_gain.detach().clone(), t.bias_offset.detach().clone()) for n, t in tuned.items()}
    history["best_epoch"] = best_epoch
    out = {}
    for n, t in tuned.items():
        g, d = keep[n]
        out[n] = (t.q, 1 + t.rounded * (g.exp() - 1), d * t.unit)
    return out, history


def tuned_transform(q: QuantLinear, gain: torch.Tensor, bias_add: torch.Tensor, t: dict) -> dict:
    """The transform entries that make the plan rebuild q with its rows' scales times gain and its bias plus
    bias_add: the same codes, on the grid (scale * gain, zero)."""
    p = q.payload
    w = dequantize_weight(p, q.weight.shape)
    shape = (-1,) + (1,) * (w.dim() - 1)
    out = {**t, "weight": w * gain.view(shape), "grid_scale": p["scale"] * gain, "grid_zero": p["zero"].clone()}
    out["bias_add"] = bias_add if "bias_add" not in t else t["bias_add"].float() + bias_add
    return out


def tune_to_actions(policy, plan: Plan, observations: list, form: str, step_w: torch.Tensor | None = None,
                    log=None, **kw) -> Plan:
    """The plan with every quantized layer's scales and bias tuned to the actions (transforms, method '+at')."""
    found, history = tune(policy, plan, observations, form, step_w, log=log, **kw)
    for n, (q, gain, bias_add) in found.items():
        plan.transforms[n] = tuned_transform(q, gain, bias_add, plan.transforms.get(n, {}))
    plan.method = f"{plan.method}+at"
    plan.provenance["action_tuning"] = history
    return plan
