"""Exact bit allocation (docs/METHOD.md, step 3) as a 0-1 integer program in PuLP.

minimise  sum_p sum_k x_pk * cost[p][k]
s.t.      sum_p sum_k x_pk * size[p][k] <= budget        (weight bytes, when limited)
          sum_p sum_k x_pk * extra_j[p][k] <= limit_j     (optional: BOPs, activation bytes)
          sum_k x_pk = 1,  x_pk in {0, 1}
CBC ships inside pulp; HiGHS is used when highspy is installed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from packptq_onnx.errors import UsageError

SOLVERS = ("cbc", "highs")


class Infeasible(ValueError):
    """No choice fits: `what` ("budget" or an extra limit's name) allows `limit`, and the smallest
    possible total is `smallest` (None when the solver found no solution for another reason)."""

    def __init__(self, what: str, limit: float, smallest: float | None, message: str):
        super().__init__(message)
        self.what, self.limit, self.smallest = what, limit, smallest


@dataclass
class Allocation:
    choice: list[int]      # option index per group
    objective: float
    size: float
    seconds: float
    solver: str


def _solver(name: str, time_limit: float | None):
    import pulp

    if name == "cbc":
        # CBC's preprocessing returned a non-optimal answer labelled "Optimal" on a 4x3 instance
        # found by tests/test_mixed.py; without it CBC is exact and still fast enough here
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, options=["preprocess off"])
    if name == "highs":
        s = pulp.HiGHS(msg=False, timeLimit=time_limit)
        if not s.available():
            raise UsageError("--solver highs needs highspy: pip install highspy")
        return s
    raise UsageError(f"unknown solver {name!r} (available: {', '.join(SOLVERS)})")


def min_size(size: list[list[float]]) -> float:
    return sum(min(s) for s in size)


def solve(cost: list[list[float]], size: list[list[float]] | None, budget: float | None,
          extra: list[tuple[list[list[float]], float, str]] = (), solver: str = "cbc",
          time_limit: float | None = None, unit: str = "bytes") -> Allocation:
    """The cheapest choice under the limits. size/budget: the weight-byte limit (None: none);
    extra: further (table, limit, name) limits."""
    import pulp

    if size is not None and (len(cost) != len(size) or any(len(c) != len(s) for c, s in zip(cost, size))):
        raise ValueError("cost and size must have the same shape")
    if size is not None and budget is not None:
        smallest = min_size(size)
        if smallest > budget:
            raise Infeasible("budget", budget, smallest, f"budget {budget:,.0f} {unit} is infeasible: the "
                             f"smallest possible size is {smallest:,.0f} {unit}")
    for table, limit, what in extra:
        if min_size(table) > limit:
            raise Infeasible(what, limit, min_size(table), f"{what} limit {limit:,.0f} is infeasible: the "
                             f"smallest possible is {min_size(table):,.0f}")
    limits = ([(size, budget)] if size is not None and budget is not None else []) + [(t, v) for t, v, _ in extra]
    t0 = time.time()
    prob = pulp.LpProblem("bits", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{p}_{k}", cat="Binary") for k in range(len(c))] for p, c in enumerate(cost)]
    prob += pulp.lpSum(x[p][k] * cost[p][k] for p in range(len(cost)) for k in range(len(cost[p])))
    for table, limit in limits:
        prob += pulp.lpSum(x[p][k] * table[p][k] for p in range(len(table)) for k in range(len(table[p]))) <= limit
    for row in x:
        prob += pulp.lpSum(row) == 1
    status = prob.solve(_solver(solver, time_limit))
    if pulp.LpStatus[status] != "Optimal":
        raise Infeasible("budget", budget, None, f"bit allocation found no solution ({pulp.LpStatus[status]}): "
                         "relax the budget or the extra limits")
    choice = [max(range(len(row)), key=lambda k: row[k].value() or 0) for row in x]
    obj = sum(cost[p][k] for p, k in enumerate(choice))
    total = sum(size[p][k] for p, k in enumerate(choice)) if size is not None else 0.0
    return Allocation(choice, obj, total, time.time() - t0, solver)


def smallest_each(limits: list[tuple[list[list[float]], float, str]], solver: str = "cbc") -> dict:
    """For limits that cannot all hold at once: per limit, the smallest total it can reach while
    the others hold as given (None where the others alone already conflict)."""
    out = {}
    for i, (table, _, what) in enumerate(limits):
        others = [c for j, c in enumerate(limits) if j != i]
        try:
            out[what] = solve(table, None, None, others, solver).objective
        except Infeasible:
            out[what] = None
    return out


def parse_budget(text: str) -> float:
    """'1.2MB', '300kB', '5000' (bytes) -> bytes."""
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("mib", 2 ** 20), ("kib", 2 ** 10), ("gb", 1e9), ("mb", 1e6), ("kb", 1e3), ("b", 1)):
        if t.endswith(suffix):
            t, m = t[: -len(suffix)], mult
            break
    else:
        m = 1
    try:
        v = float(t) * m
    except ValueError:
        raise UsageError(f"cannot read budget {text!r}: use bytes, kB or MB, e.g. 1.2MB") from None
    if v <= 0:
        raise UsageError(f"budget must be positive, got {text!r}")
    return v


def parse_count(text: str, flag: str) -> float:
    """'40G', '1.5M', '2e9' -> a number (bit-operations)."""
    t = text.strip().upper().replace(" ", "").removesuffix("BOPS").removesuffix("OPS")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise UsageError(f"cannot read {flag} {text!r}: use a number with K, M, G or T, e.g. 40G") from None
    if v <= 0:
        raise UsageError(f"{flag} must be positive, got {text!r}")
    return v
