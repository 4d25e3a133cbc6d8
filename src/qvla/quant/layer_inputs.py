"""Recording each Linear layer's inputs on calibration observations (orchestration, for the baselines)."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def collect_inputs(policy, observations: list, names: list[str], max_rows: int = 4096, batch_size: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """layer -> (rows, K) inputs seen over the observations (tokens of all steps), at most max_rows of them,
    drawn uniformly without replacement by a seeded generator. Runs the forward the sensitivity uses
    (teacher-forced on the policy's own greedy tokens for a token head)."""
    mods = dict(policy.model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, args, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names if isinstance(mods[n], nn.Linear)]
    form = policy.output_forms()[0]
    try:
        for i in range(0, len(observations), batch_size):
            batch = policy.teacher_ids(policy.batch(observations[i:i + batch_size]))
            policy.action_outputs(batch, form)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, chunks in rows.items():
        if not chunks:
            continue
        x = torch.cat(chunks)
        if len(x) > max_rows:
            x = x[torch.randperm(len(x), generator=g)[:max_rows]]
        out[n] = x
    return out


def planned_linear_inputs(policy, plan, observations: list, a_bits: int, max_rows: int) -> dict[str, torch.Tensor]:
    """collect_inputs for the Linear layers of a plan that a per-layer search or training can change: those
    with rows below 16 bits, or every one when activations are quantized (the QVLA hybrids' skeleton)."""
    mods = dict(policy.model.named_modules())
    names = [n for n, b in plan.bits.items() if isinstance(mods[n], nn.Linear)
             and (a_bits < 16 or bool((b < 16).any()))]
    return collect_inputs(policy, observations, names, max_rows=max_rows)
