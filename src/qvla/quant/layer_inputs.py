"""Recording each Linear layer's inputs on calibration observations (orchestration, for the baselines)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_patches(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A conv's input (B, C, H, W) -> its (B * L, C * kh * kw) patches: the rows the conv multiplies with
    weight.reshape(out, -1), so a conv is the Linear layer y = W p on them."""
    if mod.groups != 1 or mod.padding_mode != "zeros":
        raise ValueError(f"conv patches need groups=1 and zero padding, got groups={mod.groups}, "
                         f"padding_mode={mod.padding_mode!r}")
    p = F.unfold(x.float(), mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return p.transpose(1, 2).reshape(-1, p.shape[1])


@torch.no_grad()
def collect_inputs(policy, observations: list, names: list[str], max_rows: int = 4096, batch_size: int = 16,
                   seed: int = 0, convs: bool = False) -> dict[str, torch.Tensor]:
    """layer -> (rows, K) inputs seen over the observations (tokens of all steps), at most max_rows of them,
    drawn uniformly without replacement by a seeded generator. Runs the forward the sensitivity uses
    (teacher-forced on the policy's own greedy tokens for a token head). Linear layers only, unless convs:
    then the named convs' input patches too (conv_patches; a batch's patches are first cut to a random
    max_rows of them, so that a high-resolution stem never holds all its patches at once)."""
    mods = dict(policy.model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    patch_g = torch.Generator().manual_seed(seed + 1)  # its own stream: the Linear layers' draw stays as it was

    def record(m, args, n):
        x = args[0].detach()
        if isinstance(m, nn.Conv2d):
            p = conv_patches(m, x)
            rows[n].append(p[torch.randperm(len(p), generator=patch_g)[:max_rows]] if len(p) > max_rows else p)
        else:
            rows[n].append(x.reshape(-1, x.shape[-1]).float())

    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    hooks = [mods[n].register_forward_pre_hook(lambda m, args, n=n: record(m, args, n))
             for n in names if isinstance(mods[n], kinds)]
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
