"""Action-space sensitivity of every output channel of every layer, summed over calibration episodes.

For layer l, channel c, weight bits b (and the layer's activation bits), at calibration step n:
    dy_n,c^(b) = Q_a(x_n) Q_b(W)_c^T - x_n W_c^T      the real output error of that channel alone
    J_n,c      = d outputs / d y_c                   from backward passes over the whole network
Continuous outputs (chunk head, or the token head's expected action), D = K*A backward passes per batch:
    product   S[l,c,b] = sum_n ||J_n,c||_F * ||dy_n,c||           (the proxy ||J|| * ||dx||)
    projected P[l,c,b] = sum_n ||J_n,c dy_n,c||_2                 (the first-order term itself, tighter)
    energy    E[l,c,b] = sum_n ||J_n,c dy_n,c||_2^2               (its square: what adds up over channels)
The channels' action errors J_c dy_c point in different directions, so the norm of their sum is far below
the sum of their norms (0.06-0.29x for a chunk-policy layer at 4 bits, ~1/sqrt(channels), as for
independent errors); their squares do add up when the errors are uncorrelated, E||sum_c J_c dy_c||^2 =
sum_c ||J_c dy_c||^2, so a plan minimizing the energy minimizes the summed squared action error.
Token logits (form "logits"): KL(p_fp || p_q) has no first-order term, so we use its second-order
(Fisher) form  KL ~ 1/2 dz^T (diag(p) - p p^T) dz,  dz = J_z dy.  With R random probes
v = sqrt(p)*eps - p * sum(sqrt(p)*eps), eps ~ N(0, I), E[v v^T] = diag(p) - p p^T exactly, so one backward
pass per probe gives h = J_z^T v with E[(h . dy)^2] = dy^T J_z^T F J_z dy (unbiased):
    product   S = sum_n 1/2 E||h_n,c||^2 ||dy_n,c||^2,   projected P = sum_n 1/2 E[(h_n,c . dy_n,c)^2]
(already quadratic in dy: energy E = P there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla.quant.apply import transformed
from qvla.quant.primitives import fake_quant_activation, fake_quant_rows
from qvla.quant.storage import input_transform

SENS_BITS = (16, 8, 4, 2, 0)  # columns of every sensitivity table


@dataclass
class Sensitivity:
    product: dict[str, torch.Tensor]  # layer -> (C, 5) over SENS_BITS
    projected: dict[str, torch.Tensor]
    jacobian: dict[str, torch.Tensor]  # layer -> (C,) sum_n ||J_n,c||
    fan_in: dict[str, int]
    roles: dict[str, str]
    meta: dict = field(default_factory=dict)
    energy: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (C, 5); empty in older files


def quantizable(model: nn.Module, roles: dict[str, str]) -> dict[str, nn.Module]:
    """Linear and Conv2d modules with a role other than 'embedding' (embeddings stay in floating point)."""
    mods = dict(model.named_modules())
    return {n: mods[n] for n, r in roles.items() if r != "embedding" and isinstance(mods[n], (nn.Linear, nn.Conv2d))}


def quant_act_input(mod: nn.Module, x: torch.Tensor, a_bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token activation quantization; for a conv a token is one spatial position (all channels)."""
    if a_bits >= 16:
        return x
    if isinstance(mod, nn.Conv2d):
        return fake_quant_activation(x.movedim(1, -1), a_bits).movedim(-1, 1)
    return fake_quant_activation(x, a_bits, clip)


def apply_weight(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    return F.linear(x, w)


def per_sample(y: torch.Tensor, batch: int, conv: bool) -> torch.Tensor:
    """Layer output -> (batch, tokens, C): channels last, every other position a token of its sample."""
    if conv:
        y = y.movedim(1, -1)
    return y.reshape(batch, -1, y.shape[-1])


def output_errors(mod: nn.Module, x: torch.Tensor, a_bits: int, batch: int,
                  t: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """bits -> (batch, tokens, C) output error of quantizing each channel's weights to `bits`.

    With an equivalent transform t (apply.transformed: input scale / shift / rotation), the error is that
    of the transformed layer, which is what the plan will run: Q_a(T(x)) Q_b(W')^T + W d - x W^T."""
    w = mod.weight.detach()
    ref = apply_weight(mod, x, w)
    wt, shift, inp = transformed(w, None, t) if t else (w, None, {})
    xa = quant_act_input(mod, input_transform(x, inp) if inp else x, a_bits, inp.get("a_clip"))
    if shift is not None:
        ref = ref - shift
    conv = isinstance(mod, nn.Conv2d)
    return {b: per_sample(apply_weight(mod, xa, fake_quant_rows(wt, b)) - ref, batch, conv) for b in SENS_BITS}


class _Recorder:
    """Forward hooks that keep each target layer's input and (graph-attached) output."""

    def __init__(self, targets: dict[str, nn.Module]) -> None:
        self.inputs, self.outputs, self.active = {}, {}, False
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def hook(_mod, args, out):
            if self.active:
                self.inputs[name], self.outputs[name] = args[0].detach(), out
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _probe_scalars(out: torch.Tensor, form: str, probes: int | None, g: torch.Generator):
    """Scalars whose gradients give the Jacobian rows (continuous) or Fisher probes (logits).

    Continuous outputs: one backward pass per output dimension (exact), or with `probes` < D, Rademacher
    projections u (E[u u^T] = I, so E[(u^T J dy)^2] = ||J dy||^2 and E||u^T J||^2 = ||J||_F^2: unbiased).
    """
    if form == "action":
        if probes is None or probes >= out.shape[1]:
            for j in range(out.shape[1]):
                yield out[:, j].sum(), 1.0
            return
        for _ in range(probes):
            u = torch.randint(0, 2, out.shape, generator=g).float() * 2 - 1
            yield (u * out).sum(), 1.0 / probes
        return
    p = out.detach().softmax(-1)
    sp = p.sqrt()
    for _ in range(probes):
        eps = torch.randn(p.shape, generator=g)
        v = sp * eps - p * (sp * eps).sum(-1, keepdim=True)
        yield (v * out).sum(), 1.0 / probes


WEIGHTINGS = ("steps", "episode")


def step_weights(episodes: list, weighting: str) -> torch.Tensor:
    """(N,) weight of each calibration step (given its episode id) in the sums. "steps": 1 each, so an
    episode counts by its length; "episode": N / (episodes * its episode's length), so every calibration
    episode weighs the same however long it ran (a failed episode runs to the step limit and would
    otherwise outweigh a short successful one several times over). Both sum to N."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "steps":
        return torch.ones(len(episodes), dtype=torch.float64)
    if None in episodes:
        raise ValueError("episode weighting needs each calibration step's episode id")
    counts = {e: episodes.count(e) for e in set(episodes)}
    return torch.tensor([len(episodes) / len(counts) / counts[e] for e in episodes], dtype=torch.float64)


def compute(policy, observations: list, form: str = "action", a_bits: int = 16, batch_size: int = 16,
            probes: int | None = None, seed: int = 0, progress=None,
            transforms: tuple[str, dict[str, dict[str, torch.Tensor]]] | None = None,
            weights: torch.Tensor | None = None) -> Sensitivity:
    """Sensitivity of all quantizable channels at all bit widths over the calibration observations;
    `transforms` = (label, layer -> equivalent transform) makes each channel's error that of its
    transformed layer (the label is recorded in meta["transforms"]); `weights` (N,) weighs each step's
    terms (default 1 each; see step_weights)."""
    if form not in policy.output_forms():
        raise ValueError(f"form {form!r} not available for {policy.name}; choose from {policy.output_forms()}")
    roles = policy.module_roles()
    model = policy.model.eval()
    targets = quantizable(model, roles)
    names = list(targets)
    prod = {n: torch.zeros(m.weight.shape[0], len(SENS_BITS), dtype=torch.float64) for n, m in targets.items()}
    proj = {n: torch.zeros_like(prod[n]) for n in names}
    energy = {n: torch.zeros_like(prod[n]) for n in names}
    jac = {n: torch.zeros(prod[n].shape[0], dtype=torch.float64) for n in names}
    rec = _Recorder(targets)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    kl = form == "logits"
    layer_t = transforms[1] if transforms else {}
    step_w = torch.ones(len(observations), dtype=torch.float64) if weights is None else weights.double()
    if len(step_w) != len(observations):
        raise ValueError(f"{len(step_w)} weights for {len(observations)} observations")
    if kl and probes is None:
        probes = 16
    try:
        starts = range(0, len(observations), batch_size)
        for s in (progress(starts) if progress else starts):
            batch = policy.teacher_ids(policy.batch(observations[s:s + batch_size]))
            B = batch["images"].shape[0]
            rec.active = True
            with torch.enable_grad():
                out = policy.action_outputs(batch, form)
            rec.active = False
            ys = [rec.outputs[n] for n in names]
            errs = {n: torch.stack(list(output_errors(targets[n], rec.inputs[n], a_bits, B,
                                                      layer_t.get(n)).values()), -1)
                    for n in names}  # (B, T, C, 5)
            j2 = {n: torch.zeros(B, prod[n].shape[0]) for n in names}
            p2 = {n: torch.zeros(B, prod[n].shape[0], len(SENS_BITS)) for n in names}
            for scalar, weight in _probe_scalars(out, form, probes, g):
                grads = torch.autograd.grad(scalar, ys, retain_graph=True, allow_unused=True)
                for n, gr in zip(names, grads):
                    if gr is None:
                        continue
                    gs = per_sample(gr, B, isinstance(targets[n], nn.Conv2d))
                    j2[n] += weight * gs.pow(2).sum(1)
                    p2[n] += weight * torch.einsum("btc,btck->bck", gs, errs[n]).pow(2)
            w = step_w[s:s + B]
            for n in names:
                dy = errs[n].pow(2).sum(1).double()  # (B, C, 5)
                jn, pn = j2[n].double(), p2[n].double()
                if kl:
                    prod[n] += torch.einsum("b,bck->ck", w, 0.5 * jn[..., None] * dy)
                    proj[n] += torch.einsum("b,bck->ck", w, 0.5 * pn)
                    energy[n] += torch.einsum("b,bck->ck", w, 0.5 * pn)
                else:
                    prod[n] += torch.einsum("b,bck->ck", w, jn.sqrt()[..., None] * dy.sqrt())
                    proj[n] += torch.einsum("b,bck->ck", w, pn.sqrt())
                    energy[n] += torch.einsum("b,bck->ck", w, pn)
                jac[n] += torch.einsum("b,bc->c", w, jn.sqrt())
            del out, ys, errs
    finally:
        rec.close()
    fan_in = {n: targets[n].weight[0].numel() for n in names}
    meta = {"form": form, "a_bits": a_bits, "observations": len(observations), "probes": probes,
            "seconds": round(time.time() - t0, 2), "bits": list(SENS_BITS), "batch_size": batch_size}
    if transforms:
        meta["transforms"] = transforms[0]
    return Sensitivity(prod, proj, jac, fan_in, {n: roles[n] for n in names}, meta, energy)


def save(path, sens: Sensitivity, provenance: dict) -> None:
    """One .safetensors file: tensors per layer plus JSON metadata in its header."""
    import json

    from safetensors.torch import save_file

    tensors = {}
    for n in sens.product:
        tensors[f"product/{n}"] = sens.product[n]
        tensors[f"projected/{n}"] = sens.projected[n]
        tensors[f"jacobian/{n}"] = sens.jacobian[n]
        if n in sens.energy:
            tensors[f"energy/{n}"] = sens.energy[n]
    meta = {"format": "qvla-sensitivity/1", **sens.meta, "fan_in": sens.fan_in, "roles": sens.roles,
            "provenance": provenance}
    save_file(tensors, str(path), metadata={"qvla": json.dumps(meta)})


def load(path) -> tuple[Sensitivity, dict]:
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        if "qvla" not in header:
            raise ValueError(f"{path} is not a qvla sensitivity file")
        meta = json.loads(header["qvla"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    layers = list(meta["roles"])
    sens = Sensitivity({n: t[f"product/{n}"] for n in layers}, {n: t[f"projected/{n}"] for n in layers},
                       {n: t[f"jacobian/{n}"] for n in layers}, meta["fan_in"], meta["roles"],
                       {k: meta[k] for k in ("form", "a_bits", "observations", "probes", "seconds", "bits",
                                             "batch_size", "transforms", "weighting") if k in meta},
                       {n: t[f"energy/{n}"] for n in layers if f"energy/{n}" in t})
    return sens, meta


def batches(policy, observations: list, batch_size: int) -> list[dict]:
    """The observations as the policy's batches, token heads teacher-forced on their own greedy tokens."""
    return [policy.teacher_ids(policy.batch(observations[s:s + batch_size]))
            for s in range(0, len(observations), batch_size)]


@torch.no_grad()
def _outputs(policy, batches: list[dict], form: str) -> list[torch.Tensor]:
    return [policy.action_outputs(b, form) for b in batches]


def per_step_deviation(ref: torch.Tensor, new: torch.Tensor, form: str) -> torch.Tensor:
    """(B,) deviation of each step's outputs: KL(p_ref || p_new) over its action tokens, or L2 distance."""
    if form == "logits":
        r, n = ref.log_softmax(-1), new.log_softmax(-1)
        return (r.exp() * (r - n)).flatten(1).sum(1)
    return (new - ref).flatten(1).norm(dim=1)


def _deviation(ref: list[torch.Tensor], new: list[torch.Tensor], form: str) -> float:
    """Summed over steps (KL for logits, L2 distance for actions)."""
    return float(sum(per_step_deviation(r, n, form).sum() for r, n in zip(ref, new)))


def validate(policy, observations: list, sens: Sensitivity, k: int, seed: int = 0, batch_size: int = 32,
             progress=None) -> dict:
    """Quantizes K random (layer, channel, bits) triples one at a time and correlates proxy with truth."""
    import numpy as np
    from scipy.stats import spearmanr

    if sens.meta["a_bits"] != 16:
        raise ValueError("validation measures weight-only quantization: compute sensitivities with a_bits=16")
    form = sens.meta["form"]
    mods = dict(policy.model.named_modules())
    rng = np.random.default_rng(seed)
    layers = list(sens.product)
    sizes = np.array([sens.product[n].shape[0] for n in layers])
    steps = batches(policy, observations, batch_size)
    ref = _outputs(policy, steps, form)
    rows, t0 = [], time.time()
    flat = rng.choice(sizes.sum(), size=k, replace=k > sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for i in (progress(range(k)) if progress else range(k)):
        li = int(np.searchsorted(offsets, flat[i], side="right") - 1)
        name, c = layers[li], int(flat[i] - offsets[li])
        b = int(rng.choice([8, 4, 2, 0]))
        w = mods[name].weight
        saved = w.data[c].clone()
        w.data[c] = fake_quant_rows(saved[None], b)[0]
        truth = _deviation(ref, _outputs(policy, steps, form), form)
        w.data[c] = saved
        col = SENS_BITS.index(b)
        rows.append({"layer": name, "role": sens.roles[name], "channel": c, "bits": b, "truth": truth,
                     "product": float(sens.product[name][c, col]), "projected": float(sens.projected[name][c, col])})
    seconds_per_truth = (time.time() - t0) / k
    truth = [r["truth"] for r in rows]
    result = {"k": k, "form": form, "observations": len(observations),
              "spearman_product": float(spearmanr([r["product"] for r in rows], truth).statistic),
              "spearman_projected": float(spearmanr([r["projected"] for r in rows], truth).statistic),
              "by_bits": {}, "seconds_per_truth": seconds_per_truth,
              "channels": int(sizes.sum()), "proxy_seconds": sens.meta["seconds"]}
    for b in (8, 4, 2, 0):
        sub = [r for r in rows if r["bits"] == b]
        if len(sub) > 2:
            result["by_bits"][str(b)] = {
                "n": len(sub),
                "spearman_product": float(spearmanr([r["product"] for r in sub], [r["truth"] for r in sub]).statistic),
                "spearman_projected": float(spearmanr([r["projected"] for r in sub], [r["truth"] for r in sub]).statistic)}
    exhaustive = seconds_per_truth * sizes.sum() * 4
    result["exhaustive_seconds_estimate"] = exhaustive
    result["exhaustive_over_proxy"] = exhaustive / max(sens.meta["seconds"], 1e-9)
    result["triples"] = rows
    return result
