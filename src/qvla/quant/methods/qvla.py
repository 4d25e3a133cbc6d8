"""QVLA: action-space sensitivity over calibration episodes -> global bit allocation -> plan."""
from __future__ import annotations

import numpy as np
import torch

from qvla.quant import allocate
from qvla.quant.apply import layer_shapes
from qvla.quant.methods import TRANSFORMED, QuantConfig
from qvla.quant.plan import Plan, signature
from qvla.quant.sensitivity import Sensitivity


def tie(problem: allocate.Problem, owner: np.ndarray) -> tuple[allocate.Problem, np.ndarray]:
    """Merges channels that must share bits (owner[i] = the channel i is tied to) into one item each: costs
    and fan-ins add, allowed bits intersect. -> (merged problem, index of each channel's item)."""
    items, inverse = np.unique(owner, return_inverse=True)
    cost = np.zeros((len(items), problem.cost.shape[1]))
    fan_in = np.zeros(len(items))
    allowed = np.ones((len(items), problem.cost.shape[1]), dtype=bool)
    np.add.at(cost, inverse, problem.cost)
    np.add.at(fan_in, inverse, problem.fan_in)
    np.logical_and.at(allowed, inverse, problem.allowed)
    return allocate.Problem(cost, fan_in, allowed, problem.widths), inverse


def problem_from(sens: Sensitivity, cfg: QuantConfig, table: str) -> tuple[allocate.Problem, list]:
    """Flattens per-layer sensitivity into the allocation problem, with pins and no-prune roles applied."""
    layers = list(sens.product)
    tables = getattr(sens, table)
    cost = np.concatenate([tables[n].numpy() for n in layers])
    fan_in = np.concatenate([np.full(len(tables[n]), sens.fan_in[n]) for n in layers]).astype(np.float64)
    allowed = np.ones_like(cost, dtype=bool)
    row = 0
    for n in layers:
        rows = slice(row, row + len(tables[n]))
        floor = cfg.pinned_bits(n, sens.roles[n])
        if floor is not None:  # a pinned layer never goes below its floor (16 = kept in floating point)
            allowed[rows] &= np.array(allocate.CHAIN)[None] >= floor
        if sens.roles[n] in cfg.no_prune:
            allowed[rows, allocate.CHAIN.index(0)] = False
        row += len(tables[n])
    widths = allocate.CHAIN if cfg.count == "stored" else tuple(allocate.HELD[b] for b in allocate.CHAIN)
    return allocate.Problem(cost, fan_in, allowed, widths), layers


def tie_owners(policy, sens: Sensitivity, layers: list[str]) -> np.ndarray:
    """owner[i]: the flat channel that channel i shares its bits with (itself if untied), from the policy's
    tied_channels() groups (same channel c of every layer in a group)."""
    offset = dict(zip(layers, np.cumsum([0] + [len(sens.product[n]) for n in layers[:-1]])))
    owner = np.arange(sum(len(sens.product[n]) for n in layers))
    for group in getattr(policy, "tied_channels", list)():
        if not all(n in offset for n in group):
            continue
        sizes = {len(sens.product[n]) for n in group}
        if len(sizes) != 1:
            raise ValueError(f"tied layers {group} have different channel counts {sorted(sizes)}")
        c = sizes.pop()
        for n in group[1:]:
            owner[offset[n]:offset[n] + c] = np.arange(offset[group[0]], offset[group[0]] + c)
    return owner


def make_plan(policy, cfg: QuantConfig, sens: Sensitivity, provenance: dict | None = None) -> Plan:
    wanted = TRANSFORMED.get(cfg.method)  # None: the plain layers' tables
    if sens.meta.get("transforms") != wanted:
        raise ValueError(f"{cfg.method} allocates from sensitivities measured on "
                         f"{f'its transformed layers ({wanted})' if wanted else 'the untransformed layers'}, "
                         f"these were measured on {sens.meta.get('transforms') or 'untransformed ones'}")
    if sens.meta["a_bits"] != cfg.a_bits:
        raise ValueError(f"sensitivity was computed for a_bits={sens.meta['a_bits']}, plan wants {cfg.a_bits}")
    problem, layers = problem_from(sens, cfg, cfg.proxy)
    solved, expand = tie(problem, tie_owners(policy, sens, layers)) if cfg.tie else (problem, slice(None))
    if cfg.solver == "exact":
        flat, cert = allocate.exact(solved, cfg.w_bits)
    else:
        flat, cert = allocate.greedy(solved, cfg.w_bits), {}
    flat = flat[expand]
    bits, row = {}, 0
    for n in layers:
        c = len(sens.product[n])
        bits[n] = torch.from_numpy(flat[row:row + c].astype(np.int8))
        row += c
    prov = {**(provenance or {}), "sensitivity": sens.meta, "proxy": cfg.proxy,
            "solver": "greedy-hull" if cfg.solver == "greedy" else cfg.solver,
            "objective": problem.objective(flat), "solver_certificate": cert, "pins": cfg.pins,
            "no_prune": list(cfg.no_prune), "count": cfg.count, "tie": cfg.tie}
    return Plan(bits, dict(sens.fan_in), dict(sens.roles), cfg.a_bits, float(cfg.w_bits), "qvla",
                signature(layer_shapes(policy.model, layers)), prov)
