"""Quantize to an accuracy target (docs/METHOD.md, "Accuracy targets").

`--target agreement>=0.99` (or cosine, sqnr, accuracy, task, metric; `<=` for a metric where
lower is better) or `--max-drop 0.01`: the cheapest allocation whose export, run in onnxruntime on
the --eval data, meets the target. Candidates come from the integer program on the measured
sensitivities: the least Omega under a decreasing ladder of bit-operation limits (and the user's
own limits). The most accurate candidate is checked first. If it fails, the stem and head take
16-bit activations too; if that fails, layers fall back to float on the most accurate allocation,
the most rewarding first (ranking.float_gains), 1, 2, 4, ... of them, then a bisection for the
fewest that pass; if even all of them fail, nothing
reaches the target: exit 3, nothing written. Otherwise (no layer float) a bisection over the ladder
finds the cheapest candidate that passes. Then every uniform allocation (all packs at one bit
option) within the user's limits and at most as costly in BOPs as the most accurate candidate is
checked too: the chosen allocation becomes the cheapest uniform one that passes where that is
cheaper, and a mixed point that a uniform one equals or beats at no more BOPs drops off the front
(on the direction classifier the most accurate candidate read 0.998 agreement at 1.87 GBOPs, as
uniform W8A8 does at 1.04). Every checked candidate is a point of the Pareto front (metric vs
weight bytes, BOPs and measured onnxruntime time).
Candidates are checked at round-to-nearest; reconstruction runs afterwards at the chosen bits.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import data, runtime, validate
from .errors import UsageError
from .solvers import ilp

NAMES = ("agreement", "cosine", "sqnr", "accuracy", "task", "metric")
LADDER = 12  # bit-operation limits between the cheapest and the most accurate allocation


class TargetNotMet(UsageError):
    """No allocation reaches the target: exit code 3."""

    exit_code = 3


@dataclass
class Target:
    metric: str                    # one of NAMES
    op: str = ">="                 # ">=": higher is better; "<=": lower is better (metric only)
    value: float | None = None     # the threshold (max_drop: set once the float value is known)
    max_drop: float | None = None  # the metric may fall this much below the float model's own value

    def text(self) -> str:
        if self.max_drop is not None:
            return f"{self.metric} drop <= {self.max_drop:g}"
        return f"{self.metric}{self.op}{self.value:g}"

    def passes(self, v: float) -> bool:
        return v >= self.value if self.op == ">=" else v <= self.value

    def better(self, a: float, b: float) -> bool:
        return a > b if self.op == ">=" else a < b


def is_target(text: str) -> bool:
    return any(c in text for c in "<>=")


def parse(text: str) -> Target:
    m = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if not m or m.group(1) not in NAMES:
        raise UsageError(f"cannot read --target {text!r}: expected METRIC>=VALUE with METRIC one of "
                         f"{', '.join(NAMES)}, e.g. agreement>=0.99")
    name, op, v = m.group(1), m.group(2), m.group(3)
    if op == "<=" and name != "metric":
        raise UsageError(f"--target {text!r}: {name} is better when higher; use >=")
    try:
        return Target(name, op, float(v))
    except ValueError:
        raise UsageError(f"cannot read the value in --target {text!r}") from None


def from_drop(drop: float) -> Target:
    """--max-drop: on accuracy where the eval data has labels, else on --metric, else on the task's
    agreement (decided in eval_set, once the data is read)."""
    if not 0 <= drop < 1:
        raise UsageError(f"--max-drop must be in [0, 1), got {drop}")
    return Target("auto", ">=", None, drop)


@dataclass
class EvalSet:
    """The held-out data, the float model's outputs on it, and the threshold the target means."""
    feeds: dict
    labels: object
    ref: list
    names: list
    float_value: float
    metric_fn: object


def scores(es: EvalSet, got: list, opts) -> dict:
    """Every metric a target can name, float vs quantized outputs on the eval data."""
    ms = validate.compare_outputs(es.names, es.ref, got, es.labels)
    cls = next((m for m in ms if m.top1_agreement is not None), None)
    out = {"cosine": min(m.cosine for m in ms), "sqnr": min(m.sqnr_db for m in ms),
           "agreement": None if cls is None else cls.top1_agreement,
           "accuracy": None if cls is None else cls.acc_quant}
    t = validate.task_scores(opts.task, es.metric_fn, es.ref, got, es.feeds)
    out["task"] = t.get("task_agreement")
    out["metric"] = t.get("metric")
    return out


def eval_set(imp, model_for_float, target: Target, eval_path: str, labels_path: str | None, opts, given,
             log=print) -> EvalSet:
    """Load the eval data, run the float model, and check the target can be measured on it: a
    one-line error before any long work when it cannot."""
    from .tasks import load_metric

    feeds, labels = data.load(eval_path, given, log=log, **opts.image)
    if labels_path:
        labels = data.load_array(labels_path)
    if target.metric == "accuracy" and labels is None:
        raise UsageError("--target accuracy (or --max-drop with labels) needs labels: the npz key 'labels' "
                         "or --labels")
    fn = load_metric(opts.metric) if opts.metric else None
    if target.metric == "auto":
        target.metric = "accuracy" if labels is not None else "metric" if fn is not None else "task"
    if target.metric == "metric" and fn is None:
        raise UsageError("--target metric needs --metric MODULE:FUNCTION")
    sess = runtime.session(model_for_float, opts.device)
    names = [o.name for o in sess.get_outputs()]
    ref = runtime.run(sess, feeds)
    es = EvalSet(feeds, labels, ref, names, 0.0, fn)
    own = scores(es, ref, opts)  # the float model against itself: what a perfect export scores
    if own[target.metric] is None:
        why = {"agreement": "no output is a classifier's scores [N, classes]",
               "accuracy": "no output is a classifier's scores [N, classes]",
               "task": "no task recognised from the outputs (give --task)"}[target.metric]
        raise UsageError(f"--target {target.metric} cannot be measured on this model: {why}")
    es.float_value = own[target.metric]
    if target.max_drop is not None:
        target.value = es.float_value - target.max_drop
    log(f"target {target.text()}: float model scores {es.float_value:.4f} on {data.n_samples(feeds)} eval "
        f"samples; the export must reach {target.op} {target.value:.4f}")
    return es


@dataclass
class Point:
    choice: list
    metric: float
    passed: bool
    weight_bytes: float
    avg_wbits: float
    avg_abits: float
    bops: float
    ms_per_sample: float   # onnxruntime's time on the eval data (batches of 64), per sample
    stem_head_abits: int
    float_layers: int = 0  # layers fallen back to float (the last resort)
    front: bool = False
    uniform: bool = False  # every pack at one bit option (a reference the mixed points must beat)


def proxy(target: Target, es: EvalSet, opts):
    """The target's metric as score(float outputs, quantized outputs) on any data, higher better
    (accuracy becomes agreement: calibration data has no labels), for the metrics that read an
    argmax or a decision; None for cosine and SQNR, which the output loss already follows (on the
    sample, ranking by calibration cosine left 10 layers float where the loss left 8)."""
    if target.metric in ("cosine", "sqnr"):
        return None
    name = "agreement" if target.metric == "accuracy" else target.metric
    sign = 1.0 if target.op == ">=" else -1.0

    def score(ref, got):
        samples = {"samples": np.zeros(len(ref[0]))}  # the samples' count: outputs are samples first
        v = scores(EvalSet(samples, None, ref, list(es.names), 0.0, es.metric_fn), got, opts)[name]
        return 0.0 if v is None or math.isnan(v) else sign * v
    return score


def check(es: EvalSet, target: Target, model, opts) -> tuple[float, float]:
    """(metric, ms per sample) of an exported candidate in onnxruntime."""
    sess = runtime.session(model, opts.device)
    t0 = time.perf_counter()
    got = runtime.run(sess, es.feeds)
    ms = 1e3 * (time.perf_counter() - t0) / max(data.n_samples(es.feeds), 1)
    v = scores(es, got, opts)[target.metric]
    return (float("nan") if v is None else float(v)), ms


def ladder(plan, mo) -> list[ilp.Allocation]:
    """Least-Omega allocations under bit-operation limits from the cheapest feasible to the most
    accurate one, distinct, cheapest first."""
    from .mixed import solve

    c = plan.costs
    user = _user_limits(plan)
    top = solve(plan.table, c, plan.limits, mo)
    low = ilp.solve(c.bops, None, None, user, mo.solver, mo.time_limit)
    lo, hi = c.total("bops", low.choice), c.total("bops", top.choice)
    found = {tuple(top.choice): top}
    for i in range(LADDER - 1):
        level = lo * (hi / lo) ** (i / (LADDER - 1)) if lo > 0 else lo + (hi - lo) * i / (LADDER - 1)
        try:
            a = ilp.solve(plan.table, None, None, user + [(c.bops, level - c.fixed["bops"] + 1e-6, "bops")],
                          mo.solver, mo.time_limit)
        except ilp.Infeasible:
            continue
        found.setdefault(tuple(a.choice), a)
    return sorted(found.values(), key=lambda a: (c.total("bops", a.choice), a.objective))


def _user_limits(plan) -> list:
    c = plan.costs
    return [(getattr(c, lim.key), lim.total - c.fixed[lim.key], lim.flag) for lim in plan.limits]


def uniform(plan, below: float, known) -> list[ilp.Allocation]:
    """Allocations with every pack at one option, within the user's limits, cheaper than `below`
    BOPs and not among the `known` (already checked) choices; cheapest first."""
    c, out, user = plan.costs, [], _user_limits(plan)
    n = len(plan.table)
    for k in range(len(plan.options)):
        ch = [k] * n
        fits = all(sum(vec[p][k] for p in range(n)) <= cap * (1 + 1e-9) for vec, cap, _ in user)
        if fits and c.total("bops", ch) < below and tuple(ch) not in known:
            out.append(ilp.Allocation(ch, sum(plan.table[p][k] for p in range(n)),
                                      c.total("weight_bytes", ch), 0.0, "uniform"))
    return sorted(out, key=lambda a: c.total("bops", a.choice))


@dataclass
class Hooks:
    """What the search does to the simulation, given by the pipeline: apply(choice) sets the packs'
    bits; export() returns the candidate's ONNX model; stem_abits(bits) re-bits stem and head and
    returns the Costs that follow; rank() names the layers in the order they should fall back to
    float; fall_back(names) leaves those layers float and returns what that adds to (weight bytes,
    act bits, BOPs); saved() is a context that puts every quantizer back on exit."""
    apply: object
    export: object
    stem_abits: object
    rank: object
    fall_back: object
    saved: object


def search(plan, mo, target: Target, es: EvalSet, opts, hooks: Hooks, log=print):
    """The cheapest ladder allocation whose export meets the target; returns (allocation or None,
    points, the chosen point or the best one, names of the layers fallen back to float)."""
    cands = ladder(plan, mo)
    points: dict = {}
    state = {"stem": mo.fixed_abits or mo.fixed_bits, "float": [], "extra": (0.0, 0.0, 0.0)}

    def evaluate(i):
        key = (i, state["stem"], len(state["float"]))
        if key not in points:
            a = cands[i]
            hooks.apply(a.choice)
            v, ms = check(es, target, hooks.export(), opts)
            s = plan.costs.summary(a.choice)
            eb, ea, eo = state["extra"]
            c = plan.costs
            p = Point(list(a.choice), v, target.passes(v), s["weight_bytes"] + eb,
                      (s["weight_bytes"] + eb) * 8 / max(c.weight_elements, 1),
                      s["avg_abits"] + ea / max(c.act_elements, 1), s["bops"] + eo, ms, state["stem"],
                      len(state["float"]), uniform=len(set(a.choice)) == 1)
            points[key] = p
            log(f"  candidate {len(points)}: {target.metric} {v:.5f} ({'meets' if p.passed else 'misses'} the "
                f"target), {p.weight_bytes / 1e3:.1f} kB, A{p.avg_abits:.2f}, {p.bops / 1e9:.4g} GBOPs"
                + (f", {p.float_layers} layer(s) float" if p.float_layers else ""))
        return points[key].passed

    log(f"accuracy target {target.text()}: {len(cands)} candidate allocations from the integer program")
    top = len(cands) - 1
    met = evaluate(top)
    room = not plan.limits  # the last resorts add bytes and bit-operations: only without user limits
    if not met and not room:
        log("  the most accurate allocation within the limits misses the target; the last resorts (16-bit "
            "stem and head, float layers) would break the limits")
    if not met and room and state["stem"] < 16 and any(a == 16 for _, a in plan.options):
        state["stem"] = 16
        log("  the most accurate allocation misses the target: stem and head take 16-bit activations too")
        plan.costs = hooks.stem_abits(16)
        met = evaluate(top)
    if not met and room:  # the last resort: layers compute in float, 1, 2, 4, ... of them, then bisect
        ranked = hooks.rank()
        log(f"  still missed: layers fall back to float, the most rewarding first ({', '.join(ranked[:3])}, ...)")

        def with_float(k):
            with hooks.saved():
                state["extra"], state["float"] = hooks.fall_back(ranked[:k]), ranked[:k]
                return evaluate(top)
        k, fail = 1, 0
        while ranked and not with_float(k):
            if k == len(ranked):
                ranked = []
                break
            fail, k = k, min(2 * k, len(ranked))
        met = bool(ranked)
        while met and k - fail > 1:  # the fewest float layers between the last miss and the first pass
            mid = (fail + k) // 2
            fail, k = (fail, mid) if with_float(mid) else (mid, k)
        if met:
            state["extra"], state["float"] = hooks.fall_back(ranked[:k]), ranked[:k]
            evaluate(top)
    if not met:
        _mark_front(points, target)
        sign = 1 if target.op == ">=" else -1
        best = max(points.values(), key=lambda p: (not math.isnan(p.metric), sign * p.metric))
        return None, list(points.values()), best, state["float"]
    if state["float"]:
        _mark_front(points, target)
        hooks.apply(cands[top].choice)  # the fallbacks were tried on the most accurate allocation only
        return cands[top], list(points.values()), points[(top, state["stem"], len(state["float"]))], state["float"]
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid):
            hi = mid
        else:
            lo = mid + 1
    bops = plan.costs.total
    checked = {tuple(cands[i].choice) for i, _, _ in points}
    refs = uniform(plan, bops("bops", cands[top].choice) * (1 + 1e-9), checked)
    if refs:
        log(f"  {len(refs)} uniform allocation(s) within the limits: checked as references")
    for a in refs:  # cheapest first: once one passes, no later one is cheaper than it
        cands.append(a)
        if evaluate(len(cands) - 1) and bops("bops", a.choice) < bops("bops", cands[hi].choice):
            hi = len(cands) - 1
    _mark_front(points, target)
    hooks.apply(cands[hi].choice)
    return cands[hi], list(points.values()), points[(hi, state["stem"], 0)], []


def _mark_front(points: dict, target: Target) -> None:
    """A point is on the front when no other is at most as costly in BOPs and at least as good in the
    metric, and better in one of the two."""
    ps = list(points.values())
    for p in ps:
        p.front = not any(q is not p and q.bops <= p.bops and not target.better(p.metric, q.metric)
                          and (q.bops < p.bops or target.better(q.metric, p.metric)) for q in ps)


def front_table(points: list, target: Target, chosen) -> str:
    rows = [("", target.metric, "weights kB", "avg wbits", "avg abits", "GBOPs", "ms/sample", "stem/head A",
             "float layers", "front", "packs")]
    for p in sorted(points, key=lambda p: p.bops):
        rows.append(("->" if p is chosen else "", f"{p.metric:.5f}", f"{p.weight_bytes / 1e3:.1f}",
                     f"{p.avg_wbits:.2f}", f"{p.avg_abits:.2f}", f"{p.bops / 1e9:.4g}", f"{p.ms_per_sample:.3f}",
                     str(p.stem_head_abits), str(p.float_layers), "*" if p.front else "",
                     "uniform" if p.uniform else "mixed"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def write_front(prefix: str, search: dict, points: list, target: Target, chosen, log=print) -> None:
    """Print the front, and write it as PREFIX.md, PREFIX.json and PREFIX.png (without matplotlib: no PNG)."""
    from .exporters import files

    text = front_table(points, target, chosen)
    log(text)
    files.save_json(search, prefix + ".json")
    files.save_text(text + "\n", prefix + ".md")
    try:
        from .exporters.plots import plot_front
        plot_front(prefix + ".png", points, target, chosen)
    except UsageError as exc:
        log(f"note: no front plot ({exc})")


def as_dict(points: list, target: Target, chosen, met: bool, float_value: float) -> dict:
    return {"target": target.text(), "metric": target.metric, "threshold": target.value, "met": met,
            "float_value": float_value, "chosen": None if chosen is None else points.index(chosen),
            "points": [asdict(p) for p in points]}

