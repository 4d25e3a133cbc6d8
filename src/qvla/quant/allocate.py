"""Bit allocation over all channels of all layers: global greedy, and the exact optimum to check it.

Objective: minimise sum_c s_c(b_c) subject to sum_c fan_in_c * b_c <= budget * sum_c fan_in_c, each
b_c in a channel's allowed set. The greedy starts every channel at 16 bits and repeatedly applies the next
demotion (16 -> 8 -> 4 -> 2 -> 0) with the smallest rho = (s(lo) - s(hi)) / ((hi - lo) * fan_in), i.e.
sensitivity added per bit saved, until the average meets the budget. The exact solver is the
multiple-choice knapsack as a mixed-integer program (scipy's HiGHS).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from qvla.quant.primitives import BITS

CHAIN = (16, 8, 4, 2, 0)  # column order of every cost table
HELD = {16: 16, 8: 8, 4: 4, 2: 4, 0: 0}  # bits the CPU kernels hold in memory: 2-bit rows run as int4


@dataclass
class Problem:
    """Flattened over channels: cost (N, 5) over CHAIN, fan_in (N,), allowed (N, 5) bool.

    widths: the bits each CHAIN level counts against the budget, CHAIN itself for bits as stored, or
    HELD's values for bits as the kernels hold them in memory (then 2 bits saves nothing over 4).
    """

    cost: np.ndarray
    fan_in: np.ndarray
    allowed: np.ndarray
    widths: tuple = CHAIN

    def __post_init__(self) -> None:
        n = len(self.fan_in)
        if self.cost.shape != (n, len(CHAIN)) or self.allowed.shape != (n, len(CHAIN)):
            raise ValueError(f"cost and allowed must be ({n}, {len(CHAIN)}), got {self.cost.shape}, {self.allowed.shape}")
        if not self.allowed[:, 0].all():
            raise ValueError("16 bits must be allowed for every channel (it is the starting point)")

    def average_bits(self, bits: np.ndarray) -> float:
        width = dict(zip(CHAIN, self.widths))
        return float((self.fan_in * np.vectorize(width.get)(bits)).sum() / self.fan_in.sum())

    def objective(self, bits: np.ndarray) -> float:
        cols = np.array([CHAIN.index(int(b)) for b in bits])
        return float(self.cost[np.arange(len(bits)), cols].sum())

    def min_average(self) -> float:
        lowest = np.array([min((self.widths[i], CHAIN[i]) for i in np.nonzero(a)[0])[1] for a in self.allowed])
        return self.average_bits(lowest)


def check_budget(budget: float) -> float:
    if not (0 < budget <= 16):
        raise ValueError(f"budget (average bits per weight) must be in (0, 16], got {budget}")
    return float(budget)


def greedy(p: Problem, budget: float, hull: bool = True) -> np.ndarray:
    """Channel bits (N,) with average <= budget; raises if the allowed bits cannot reach the budget.

    hull=False takes only the next demotion of the chain (16->8->4->2->0). With hull=True a demotion may
    skip levels: from the current bits it goes to the lower level with the smallest cost per bit saved,
    i.e. it walks each channel's lower convex hull. Where a channel's costs are not convex in the bits
    (8->4 costly, 4->2 nearly free) the chain-only greedy overpays; the hull greedy is the classic
    multiple-choice-knapsack greedy whose result is within one channel of the LP optimum.
    """
    budget = check_budget(budget)
    if p.min_average() > budget + 1e-12:
        raise ValueError(f"budget {budget} is below the lowest average the pins allow ({p.min_average():.4f})")
    n = len(p.fan_in)
    level = np.zeros(n, dtype=np.int64)  # index into CHAIN
    total, limit = float((p.fan_in * 16).sum()), budget * float(p.fan_in.sum())

    def next_step(c: int):
        best = None
        for lo in range(level[c] + 1, len(CHAIN)):
            if not p.allowed[c, lo]:
                continue
            saved = (p.widths[level[c]] - p.widths[lo]) * p.fan_in[c]
            if saved <= 0:
                continue
            rho = (p.cost[c, lo] - p.cost[c, level[c]]) / saved
            if best is None or rho < best[0]:
                best = (rho, c, lo)
            if not hull:
                break
        return best

    heap = [s for c in range(n) if (s := next_step(c)) is not None]
    heapq.heapify(heap)
    while total > limit + 1e-9:
        _, c, lo = heapq.heappop(heap)
        total -= (p.widths[level[c]] - p.widths[lo]) * p.fan_in[c]
        level[c] = lo
        if (s := next_step(c)) is not None:
            heapq.heappush(heap, s)
    return np.array(CHAIN)[level]


def exact(p: Problem, budget: float, time_limit: float = 120.0) -> tuple[np.ndarray, dict]:
    """Optimal bits by MILP (HiGHS) and a certificate: a lower bound on the optimum (the LP relaxation's
    value and the MILP's dual bound), so that any allocation's gap to the optimum is bounded even when
    the MILP stops at its time limit."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    budget = check_budget(budget)
    n, k = p.cost.shape
    c = np.where(p.allowed, p.cost, 0.0).ravel()
    rows = np.repeat(np.arange(n), k)
    one_hot = csr_matrix((np.ones(n * k), (rows, np.arange(n * k))), shape=(n, n * k))
    weights = (p.fan_in[:, None] * np.array(p.widths)[None]).ravel()[None]
    cons = [LinearConstraint(one_hot, 1, 1),
            LinearConstraint(weights, -np.inf, budget * p.fan_in.sum())]
    ub = p.allowed.ravel().astype(float)
    scale = max(np.abs(c).max(), 1e-30)  # HiGHS tolerances are absolute: work on a unit scale
    lp = milp(c / scale, constraints=cons, integrality=np.zeros(n * k), bounds=Bounds(0, ub))
    res = milp(c / scale, constraints=cons, integrality=np.ones(n * k), bounds=Bounds(0, ub),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
    if res.x is None:
        raise RuntimeError(f"exact solver found no solution: {res.message}")
    choice = res.x.reshape(n, k).argmax(1)
    bits = np.array(CHAIN)[choice]
    dual = float(getattr(res, "mip_dual_bound", np.nan)) * scale
    lp_bound = float(lp.fun) * scale if lp.success else np.nan
    cert = {"status": res.message, "objective": p.objective(bits), "dual_bound": dual,
            "lp_bound": lp_bound, "lower_bound": float(np.nanmax([dual, lp_bound])),
            "mip_gap": float(getattr(res, "mip_gap", np.nan))}
    return bits, cert


assert set(CHAIN) == set(BITS)
