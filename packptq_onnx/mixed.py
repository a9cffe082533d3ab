"""Pack-wise mixed precision (docs/METHOD.md, step 3): measured sensitivity per pack and bit option,
then the exact integer program in solvers/ilp.py under a weight-byte budget.

Omega_p(w, a) = mean over calibration samples of the output loss (KL for classifiers, MSE
otherwise) with only pack p quantized at weight bits w and activation bits a, the rest float.
With several activation options, activation memory (input elements x bits) is held to what
uniform --abits would use, so activation bits are traded between packs, not simply raised.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

import torch

from . import state
from .errors import UsageError
from .sensitivity import batch_size, loss_sum
from .solvers import ilp


@dataclass
class MixedOptions:
    budget: float | None = None        # weight bytes of all quantized layers
    avg_wbits: float | None = None
    wbits: tuple = (2, 3, 4, 8)
    abits: tuple = (4, 8)
    fixed_bits: int = 8                # stem and head layers, weights and activations
    fixed_abits: int | None = None     # stem and head activations, if not fixed_bits
    solver: str = "cbc"
    time_limit: float | None = 60.0
    cache: str | None = None           # JSON file of measured sensitivities

    @property
    def enabled(self) -> bool:
        return self.budget is not None or self.avg_wbits is not None


@dataclass
class MixedResult:
    """The bit allocation: the measured table, and per pack the option the solver chose."""
    budget_bytes: float
    predicted_bytes: float             # fixed stem/head bytes + the packs' chosen bytes
    fixed_bytes: float
    options: list                      # (wbits, abits) per column of `sensitivity`
    sensitivity: list                  # Omega[pack][option]
    choice: list                       # option index per pack
    solver: str
    solve_seconds: float
    objective: float
    counted_bytes: int | None = None   # weight bytes counted in the written model (set by the pipeline)

    def chosen(self, pack_id: int) -> tuple[int, int, float]:
        """(wbits, abits, Omega) chosen for a pack."""
        k = self.choice[pack_id]
        w, a = self.options[k]
        return w, a, self.sensitivity[pack_id][k]


def options(mo: MixedOptions) -> list[tuple[int, int]]:
    return list(itertools.product(sorted(set(mo.wbits)), sorted(set(mo.abits))))


def _outputs(res) -> list:
    return list(res) if isinstance(res, (list, tuple)) else [res]


@torch.no_grad()
def measure(gm, qls, pack_layers: list[list[str]], opts: list[tuple[int, int]], batches) -> list[list[float]]:
    """Omega[p][k]: loss with only pack p at option k; every layer is left as it was found."""
    by_name = {q.layer.name: q for q in qls}
    data = list(batches())
    with state.quantized(qls, only=[]):
        ref = [[t.detach() for t in _outputs(gm(*args))] for args in data]
    n = sum(batch_size(args) for args in data)
    table = []
    with state.snapshot(qls):
        for names in pack_layers:
            own = [by_name[x] for x in names]
            row = []
            for w, a in opts:
                for q in own:
                    state.set_bits(q, w, a)
                state.match_output_bits(qls)  # outputs read by the pack at its input bits
                with state.quantized(qls, only=own):
                    tot = sum(float(loss_sum(_outputs(gm(*args)), r, batch_size(args)))
                              for args, r in zip(data, ref))
                row.append(tot / n)
            table.append(row)
    return table


def act_elements(gm, qls, sample_args) -> dict[str, int]:
    """Input-activation elements per sample of each quantized layer (for the activation-memory limit)."""
    counts = {}

    def count(name):
        return lambda _m, args: counts.__setitem__(name, args[0][0].numel())
    moving = [q for q in qls if q.layer.fixed_abits is None]  # joins keep their bits: no choice to count
    with torch.no_grad(), state.capture(pre=[(q, count(q.layer.name)) for q in moving]):
        gm(*sample_args)
    return counts


def allocate(gm, qls, packs, units, batches, mo: MixedOptions, abits_uniform: int, fingerprint: str,
             log=print) -> MixedResult:
    """Choose (wbits, abits) per pack; apply them (and fixed bits to stem/head)."""
    pack_layers = [[n for b in p.blocks for n in units.blocks[b].layers] for p in packs]
    in_pack = {n for names in pack_layers for n in names}
    fixed = [q for q in qls if q.layer.name not in in_pack]
    for q in fixed:
        state.set_bits(q, mo.fixed_bits, mo.fixed_abits or mo.fixed_bits)
    opts = options(mo)
    elems = {q.layer.name: q.weight.numel() for q in qls}
    fixed_bytes = sum(elems[q.layer.name] * mo.fixed_bits / 8 for q in fixed)
    total_elems = sum(elems.values())
    budget = mo.budget if mo.budget is not None else total_elems * mo.avg_wbits / 8
    size = [[sum(elems[n] for n in names) * w / 8 for w, _ in opts] for names in pack_layers]

    def infeasible() -> UsageError:
        smallest = fixed_bytes + ilp.min_size(size)
        return UsageError(f"weight budget {budget:,.0f} bytes is infeasible: the smallest possible size is "
                          f"{smallest:,.0f} bytes ({smallest * 8 / total_elems:.2f} average bits, stem/head "
                          f"at {mo.fixed_bits} bits)")

    if fixed_bytes + ilp.min_size(size) > budget:  # known before the costly sensitivity measurement
        raise infeasible()
    # what Ω depends on besides the model and data: the packs' layers and the fixed stem/head bits
    fingerprint = json.dumps([fingerprint, pack_layers, mo.fixed_bits, mo.fixed_abits])
    table = _cached(mo.cache, fingerprint, opts)
    if table is None:
        table = measure(gm, qls, pack_layers, opts, batches)
        if mo.cache:
            _save_cache(mo.cache, fingerprint, opts, table)
    extra = []
    if len(set(a for _, a in opts)) > 1:
        first = next(iter(batches()))
        act = act_elements(gm, qls, tuple(t[:1] for t in first))
        aelems = [sum(act.get(n, 0) for n in names) for names in pack_layers]
        extra.append(([[e * a / 8 for _, a in opts] for e in aelems],
                      sum(aelems) * abits_uniform / 8 + 1e-6, "activation bytes"))
    try:
        sol = ilp.solve(table, size, budget - fixed_bytes, extra, mo.solver, mo.time_limit)
    except ilp.Infeasible as exc:
        if exc.what == "budget" and exc.smallest is not None:
            raise infeasible() from None
        raise UsageError(str(exc)) from None
    by_name = {q.layer.name: q for q in qls}
    for p, names, k in zip(packs, pack_layers, sol.choice):
        w, a = opts[k]
        for n in names:
            state.set_bits(by_name[n], w, a)
        log(f"  pack {p.id}: W{w}A{a}  {size[p.id][k] / 1e3:.1f} kB  Omega {table[p.id][k]:.4g}")
    state.tie_inputs(qls)
    return MixedResult(budget, fixed_bytes + sol.size, fixed_bytes, opts, table, list(sol.choice), sol.solver,
                       round(sol.seconds, 4), sol.objective)


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
