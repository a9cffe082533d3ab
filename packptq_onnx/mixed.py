"""Pack-wise mixed precision (docs/METHOD.md, step 3): measured sensitivity per pack and bit option,
then the exact integer program in solvers/ilp.py under the limits the user pays for.

Omega_p(w, a) = mean over calibration samples of the output loss (KL for classifiers, MSE
otherwise) with only pack p quantized at weight bits w and activation bits a, the rest float.
Limits, alone or together (no hidden one): weight bytes (--budget / --avg-wbits), average
activation bits weighted by input elements per sample (--avg-abits), and bit-operations per sample
(--bops: sum of MACs x wbits x abits). Stem and head layers count at their fixed bits in every
limit. Activation bits vary per pack only over --abits-options; without an activation limit the
solver simply takes the highest one (a warning says so).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

import torch

from . import state
from .errors import UsageError
from .sensitivity import batch_size, loss_sum
from .solvers import ilp


@dataclass
class MixedOptions:
    budget: float | None = None        # weight bytes of all quantized layers
    avg_wbits: float | None = None
    avg_abits: float | None = None     # mean activation bits, weighted by input elements per sample
    bops: float | None = None          # bit-operations per sample: sum of MACs x wbits x abits
    wbits: tuple = (2, 3, 4, 8)
    abits: tuple | None = None         # None: uniform --abits only (an accuracy target: 4, 8, 16)
    fixed_bits: int = 8                # stem and head layers, weights and activations
    fixed_abits: int | None = None     # stem and head activations, if not fixed_bits
    solver: str = "cbc"
    time_limit: float | None = 60.0
    cache: str | None = None           # JSON file of measured sensitivities
    spread: object = None              # spread.Spread: sensitivity measured on Ray workers
    target: object = None              # accuracy.Target: the cheapest allocation that meets it

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.budget, self.avg_wbits, self.avg_abits, self.bops))

    @property
    def enabled(self) -> bool:
        return self.limited or self.target is not None


@dataclass
class MixedResult:
    """The bit allocation: the measured table, and per pack the option the solver chose."""
    budget_bytes: float | None         # the weight-byte limit (None: weights not limited)
    predicted_bytes: float             # fixed stem/head bytes + the packs' chosen bytes
    fixed_bytes: float
    options: list                      # (wbits, abits) per column of `sensitivity`
    sensitivity: list                  # Omega[pack][option]
    choice: list                       # option index per pack
    solver: str
    solve_seconds: float
    objective: float
    counted_bytes: int | None = None   # weight bytes counted in the written model (set by the pipeline)
    limits: dict = field(default_factory=dict)     # the limits as given: budget_bytes, avg_abits, bops
    predicted: dict = field(default_factory=dict)  # the chosen allocation's avg_wbits, avg_abits, bops
    chosen_for: str = ""               # the budget or the target the allocation was chosen for
    search: dict | None = None         # accuracy target: the candidates checked in onnxruntime
    ranking: list | None = None        # every layer alone at its chosen bits, costliest first (ranking.py)
    float_layers: list = field(default_factory=list)  # layers an accuracy target left float (last resort)

    def chosen(self, pack_id: int) -> tuple[int, int, float]:
        """(wbits, abits, Omega) chosen for a pack."""
        k = self.choice[pack_id]
        w, a = self.options[k]
        return w, a, self.sensitivity[pack_id][k]


TARGET_ABITS = (4, 8, 16)


def options(mo: MixedOptions, abits_uniform: int) -> list[tuple[int, int]]:
    abits = mo.abits or (TARGET_ABITS if mo.target is not None else (abits_uniform,))
    return list(itertools.product(sorted(set(mo.wbits)), sorted(set(abits))))


def _outputs(res) -> list:
    return list(res) if isinstance(res, (list, tuple)) else [res]


@torch.no_grad()
def measure(gm, qls, pack_layers: list[list[str]], opts: list[tuple[int, int]], batches, cosine: list | None = None,
            progress=None, spread=None) -> list[list[float]]:
    """Omega[p][k]: loss with only group p (a pack, or one layer) at option k; every layer is left as
    it was found. cosine: a list that receives, per group and option, the output cosine to float.
    spread (spread.Spread): the groups measured as Ray tasks, the same numbers (spread.py)."""
    data = list(batches())
    ref = float_outputs(gm, qls, data)
    n = sum(batch_size(args) for args in data)
    if spread is not None and spread.enabled and len(pack_layers) > 1:
        from .spread import measure as spread_measure

        table, cos = spread_measure(spread, gm, qls, pack_layers, opts, data, ref, n)
    else:
        table, cos = measure_groups(gm, qls, pack_layers, opts, data, ref, n, progress)
    if cosine is not None:
        cosine.extend(cos)
    return table


def measure_groups(gm, qls, groups: list, opts: list, data: list, ref: list, n: int, progress=None,
                   before: list = ()) -> tuple[list, list]:
    """Omega and cosine rows of these groups, one after another. before: the groups measured before
    them in the same sequence; they are left at the last option, as a sequential run leaves them."""
    by_name = {q.layer.name: q for q in qls}
    table, cosines = [], []
    with state.snapshot(qls):
        for names in before:
            for x in names:
                state.set_bits(by_name[x], *opts[-1])
        for names in (progress(groups) if progress else groups):
            own = [by_name[x] for x in names]
            row, cos = [], []
            for w, a in opts:
                for q in own:
                    state.set_bits(q, w, a)
                state.match_output_bits(qls)  # outputs read by the group at its input bits
                loss, c = output_cost(gm, qls, own, data, ref)
                row.append(loss / n)
                cos.append(c)
            table.append(row)
            cosines.append(cos)
    return table, cosines


@torch.no_grad()
def float_outputs(gm, qls, data) -> list:
    """The float model's outputs on these batches (every quantizer off)."""
    with state.quantized(qls, only=[]):
        return [[t.detach() for t in _outputs(gm(*args))] for args in data]


@torch.no_grad()
def output_cost(gm, qls, only, data, ref, keep: list | None = None) -> tuple[float, float]:
    """With only these layers quantized (None: all): the summed output loss over the batches
    (sensitivity's loss_sum) and the cosine of all floating outputs to the float ones, taken
    together. keep: a list that receives the quantized outputs of each batch."""
    tot, dots = 0.0, torch.zeros(3, dtype=torch.float64)
    with state.quantized(qls, only=only):
        for args, r in zip(data, ref):
            got = _outputs(gm(*args))
            if keep is not None:
                keep.append([t.detach() for t in got])
            tot += float(loss_sum(got, r, batch_size(args)))
            for x, y in zip(r, got):
                if x.is_floating_point():
                    x, y = x.double().ravel(), y.double().ravel()
                    dots += torch.stack([x @ y, x @ x, y @ y])
    return tot, float(dots[0] / (dots[1].sqrt() * dots[2].sqrt()).clamp_min(1e-300))


def act_elements(gm, qls, args) -> dict[str, int]:
    """Elements per sample entering each quantized layer's activation quantizers (both inputs of a
    join or an activation MatMul); an input the guard keeps float counts nothing."""
    counts: dict = {}
    n = max(batch_size(args), 1)

    def count(q):
        def fn(_m, inputs):
            k = 2 if q.layer.act_input2 is not None else 1
            counts[q.layer.name] = sum(t.numel() for t, quantizer in zip(inputs[:k], (q.aq, q.aq2))
                                       if torch.is_tensor(t) and quantizer is not None) / n
        return fn
    with torch.no_grad(), state.capture(pre=[(q, count(q)) for q in qls]):
        gm(*args)
    return counts


@dataclass
class Costs:
    """What each option of each pack costs in every limit, and what the fixed stem/head cost."""
    weight_bytes: list             # [pack][option]
    act_bits: list                 # input elements x activation bits, per sample
    bops: list                     # MACs x wbits x abits, per sample
    fixed: dict                    # the same three for the stem/head layers
    weight_elements: float         # of every quantized layer (for average bits)
    act_elements: float
    acts: dict = field(default_factory=dict)  # per layer: activation elements quantized, per sample
    macs: dict = field(default_factory=dict)  # per layer: MACs per sample

    def total(self, what: str, choice: list) -> float:
        return self.fixed[what] + sum(getattr(self, what)[p][k] for p, k in enumerate(choice))

    def summary(self, choice: list) -> dict:
        return {"weight_bytes": self.total("weight_bytes", choice),
                "avg_wbits": self.total("weight_bytes", choice) * 8 / max(self.weight_elements, 1),
                "avg_abits": self.total("act_bits", choice) / max(self.act_elements, 1),
                "bops": self.total("bops", choice)}


def layer_counts(gm, qls, args) -> tuple[dict, dict]:
    """Per layer and sample: activation elements quantized (act_elements) and MACs, from one batch."""
    from .reconstruct import layer_macs

    return act_elements(gm, qls, args), layer_macs(gm, qls, args)


def costs(qls, pack_layers, fixed, opts, fixed_w, fixed_a, acts: dict, macs: dict) -> Costs:
    """The cost tables from the per-layer counts (layer_counts) at these options and stem/head bits."""
    by = {q.layer.name: q for q in qls}

    def of(names, w, a):
        wb = ab = bo = 0.0
        for n in names:
            q = by[n]
            la = q.layer.fixed_abits or a
            ab += acts.get(n, 0) * la
            if q.layer.has_weight:
                wb += q.weight.numel() * w / 8
                bo += macs.get(n, 0) * w * la
            elif q.layer.op == "MatMul":  # two activations: both at the input bits
                bo += macs.get(n, 0) * la * la
        return wb, ab, bo
    per = [[of(names, w, a) for w, a in opts] for names in pack_layers]
    f = of([q.layer.name for q in fixed], fixed_w, fixed_a)
    return Costs([[c[0] for c in row] for row in per], [[c[1] for c in row] for row in per],
                 [[c[2] for c in row] for row in per], dict(zip(("weight_bytes", "act_bits", "bops"), f)),
                 sum(q.weight.numel() for q in qls if q.layer.has_weight), sum(acts.values()), acts, macs)


@dataclass
class Limit:
    key: str            # the Costs field it limits
    flag: str           # how the user gave it
    total: float        # what the user allows, whole model
    show: object        # total -> text in the user's unit


def limits(mo: MixedOptions, c: Costs) -> list[Limit]:
    out = []
    wunit = lambda v: f"{v:,.0f} bytes ({v * 8 / max(c.weight_elements, 1):.2f} average weight bits)"  # noqa: E731
    if mo.budget is not None:
        out.append(Limit("weight_bytes", "--budget", mo.budget, wunit))
    if mo.avg_wbits is not None:
        out.append(Limit("weight_bytes", "--avg-wbits", c.weight_elements * mo.avg_wbits / 8, wunit))
    if mo.avg_abits is not None:
        out.append(Limit("act_bits", "--avg-abits", c.act_elements * mo.avg_abits,
                         lambda v: f"{v / max(c.act_elements, 1):.2f} average activation bits"))
    if mo.bops is not None:
        out.append(Limit("bops", "--bops", mo.bops, lambda v: f"{v / 1e9:.4g} GBOPs per sample"))
    return out


def check_limits(c: Costs, lims: list[Limit], solver: str = "cbc") -> None:
    """One line naming the smallest feasible value of each limit when they cannot hold (alone or
    together); costs nothing but a small integer program, so it runs before any measurement."""
    for lim in lims:
        smallest = c.fixed[lim.key] + ilp.min_size(getattr(c, lim.key))
        if smallest > lim.total * (1 + 1e-9):
            raise UsageError(f"{lim.flag} is infeasible: the smallest possible is {lim.show(smallest)}"
                             + (" with the stem and head at their fixed bits" if c.fixed[lim.key] else ""))
    rows = [(getattr(c, lim.key), lim.total - c.fixed[lim.key], lim.flag) for lim in lims]
    if len(rows) > 1:
        zero = [[0.0] * len(r) for r in rows[0][0]]
        try:
            ilp.solve(zero, None, None, rows, solver)
        except ilp.Infeasible:
            best = ilp.smallest_each(rows, solver)
            parts = [f"{lim.flag} {lim.show(c.fixed[lim.key] + best[lim.flag])}" for lim in lims
                     if best[lim.flag] is not None]
            raise UsageError("these limits cannot all hold; the smallest feasible value of each with the "
                             "others as given: " + "; ".join(parts)) from None


def solve(table, c: Costs, lims: list[Limit], mo: MixedOptions, extra=()) -> ilp.Allocation:
    rows = [(getattr(c, lim.key), lim.total - c.fixed[lim.key], lim.flag) for lim in lims] + list(extra)
    try:
        return ilp.solve(table, None, None, rows, mo.solver, mo.time_limit)
    except ilp.Infeasible as exc:
        check_limits(c, lims, mo.solver)
        raise UsageError(str(exc)) from None


@dataclass
class Plan:
    """Everything the allocation needs, measured once: the packs' layers, the options, Omega, costs."""
    pack_layers: list
    fixed: list                    # QuantLayers outside every pack (stem and head)
    options: list
    table: list
    costs: Costs
    limits: list


def prepare(gm, qls, packs, units, batches, mo: MixedOptions, abits_uniform: int, fingerprint: str,
            log=print) -> Plan:
    """Fixed bits on the stem/head, limits checked, then Omega measured (or read from the cache)."""
    pack_layers = [[n for b in p.blocks for n in units.blocks[b].layers] for p in packs]
    in_pack = {n for names in pack_layers for n in names}
    fixed = [q for q in qls if q.layer.name not in in_pack]
    fixed_a = mo.fixed_abits or mo.fixed_bits
    for q in fixed:
        state.set_bits(q, mo.fixed_bits, fixed_a)
    opts = options(mo, abits_uniform)
    c = costs(qls, pack_layers, fixed, opts, mo.fixed_bits, fixed_a, *layer_counts(gm, qls, next(iter(batches()))))
    lims = limits(mo, c)
    check_limits(c, lims, mo.solver)  # before the costly sensitivity measurement
    if len(pack_layers) == 1:
        log("warning: one pack holds every block, so each allocation is a uniform one; --max-pack-blocks K "
            "gives the allocation packs to trade between")
    if len({a for _, a in opts}) > 1 and mo.avg_abits is None and mo.bops is None and mo.target is None:
        log("warning: several --abits-options but no activation limit (--avg-abits, --bops or --target): "
            "every pack takes the highest")
    # what Omega depends on besides the model and data: the packs' layers and the fixed stem/head bits
    fingerprint = json.dumps([fingerprint, pack_layers, mo.fixed_bits, mo.fixed_abits])
    table = _cached(mo.cache, fingerprint, opts)
    if table is None:
        table = measure(gm, qls, pack_layers, opts, batches, spread=mo.spread)
        if mo.cache:
            _save_cache(mo.cache, fingerprint, opts, table)
    return Plan(pack_layers, fixed, opts, table, c, lims)


def apply(qls, plan: Plan, choice: list) -> None:
    """Set every pack's layers to its chosen bits and tie shared quantizers again."""
    by_name = {q.layer.name: q for q in qls}
    for names, k in zip(plan.pack_layers, choice):
        w, a = plan.options[k]
        for n in names:
            state.set_bits(by_name[n], w, a)
    state.tie_inputs(qls)


def result(plan: Plan, alloc: ilp.Allocation, mo: MixedOptions, chosen_for: str) -> MixedResult:
    pred = plan.costs.summary(alloc.choice)
    wlim = [lim.total for lim in plan.limits if lim.key == "weight_bytes"]
    return MixedResult(min(wlim) if wlim else None, pred["weight_bytes"], plan.costs.fixed["weight_bytes"],
                       plan.options, plan.table, list(alloc.choice), alloc.solver, round(alloc.seconds, 4),
                       alloc.objective, limits={lim.flag: lim.total for lim in plan.limits}, predicted=pred,
                       chosen_for=chosen_for)


def describe_limits(mo: MixedOptions) -> str:
    parts = [f"{k} {v:g}" for k, v in (("--budget", mo.budget), ("--avg-wbits", mo.avg_wbits),
                                       ("--avg-abits", mo.avg_abits), ("--bops", mo.bops)) if v is not None]
    return ", ".join(parts)


def allocate(gm, qls, packs, units, batches, mo: MixedOptions, abits_uniform: int, fingerprint: str,
             log=print) -> MixedResult:
    """Choose (wbits, abits) per pack under the limits; apply them (and fixed bits to stem/head)."""
    plan = prepare(gm, qls, packs, units, batches, mo, abits_uniform, fingerprint, log)
    alloc = solve(plan.table, plan.costs, plan.limits, mo)
    apply(qls, plan, alloc.choice)
    log_choice(plan, alloc.choice, log)
    return result(plan, alloc, mo, describe_limits(mo))


def log_choice(plan: Plan, choice: list, log=print) -> None:
    for p, k in enumerate(choice):
        w, a = plan.options[k]
        log(f"  pack {p}: W{w}A{a}  {plan.costs.weight_bytes[p][k] / 1e3:.1f} kB  Omega {plan.table[p][k]:.4g}")
    s = plan.costs.summary(choice)
    log(f"  total: {s['weight_bytes'] / 1e3:.1f} kB weights ({s['avg_wbits']:.2f} average bits), "
        f"{s['avg_abits']:.2f} average activation bits, {s['bops'] / 1e9:.4g} GBOPs per sample")


def _cached(path, fingerprint, opts):
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if d.get("fingerprint") == fingerprint and d.get("options") == [list(o) for o in opts]:
        return d["table"]
    return None


def _save_cache(path, fingerprint, opts, table):
    from .exporters.files import save_json
    save_json({"fingerprint": fingerprint, "options": opts, "table": table}, path)
