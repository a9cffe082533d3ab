"""Validation in onnxruntime: float vs quantized on real data, and ORT vs our torch simulation."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from . import data, runtime, shapes


@dataclass
class OutputMetrics:
    output: str
    cosine: float
    sqnr_db: float
    max_abs_diff: float
    top1_agreement: float | None = None
    acc_float: float | None = None
    acc_quant: float | None = None


CHUNK = 1 << 20  # elements summed at a time in float64: no float64 copy of a whole output


def _sums(a, b) -> dict:
    """a.b, |a|^2, |b|^2, |a-b|^2 and max |a-b| in float64, a chunk at a time."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    s = dict(ab=0.0, aa=0.0, bb=0.0, dd=0.0, dmax=0.0)
    for i in range(0, a.size, CHUNK):
        x, y = a[i:i + CHUNK].astype(np.float64), b[i:i + CHUNK].astype(np.float64)
        d = x - y
        s["ab"] += float(x @ y)
        s["aa"] += float(x @ x)
        s["bb"] += float(y @ y)
        s["dd"] += float(d @ d)
        s["dmax"] = max(s["dmax"], float(np.abs(d).max()) if d.size else 0.0)
    return s


def _cos(s: dict, a, b) -> float:
    den = np.sqrt(s["aa"]) * np.sqrt(s["bb"])
    return float(s["ab"] / den) if den > 0 else float(np.array_equal(a, b))


def cosine(a, b) -> float:
    return _cos(_sums(a, b), a, b)


def compare_outputs(names, ref: list, got: list, labels=None) -> list[OutputMetrics]:
    res = []
    for name, a, b in zip(names, ref, got):
        s = _sums(a, b)
        sqnr = float("inf") if s["dd"] == 0 else 10 * np.log10(max(s["aa"], 1e-30) / s["dd"])
        m = OutputMetrics(name, _cos(s, a, b), sqnr, s["dmax"])
        if a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating):
            pa, pb = a.argmax(1), b.argmax(1)
            m.top1_agreement = float((pa == pb).mean())
            if labels is not None and len(labels) == len(a):
                m.acc_float, m.acc_quant = float((pa == labels).mean()), float((pb == labels).mean())
        res.append(m)
    return res


def run_both(float_model, quant_model, feeds: dict, device: str = "cpu", batch_size: int = 64):
    """(output names, float outputs, quantized outputs) from onnxruntime on the same feeds."""
    fs, qs = runtime.session(float_model, device), runtime.session(quant_model, device)
    names = [o.name for o in fs.get_outputs()]
    return names, runtime.run(fs, feeds, batch_size), runtime.run(qs, feeds, batch_size)


def input_hw(feeds: dict):
    """Height and width of the first image-like (rank 4, NCHW) input, for detection decoding."""
    a = next((v for v in feeds.values() if v.ndim == 4), None)
    return None if a is None else tuple(a.shape[2:4])


def task_scores(task: str | None, metric, ref: list, got: list, feeds: dict) -> dict:
    """Task-level agreement (packptq_onnx.tasks) of output 0: the task given, or guessed from the
    float outputs (a guess that does not fit the outputs scores nothing); plus a user metric."""
    from . import tasks
    from .errors import UsageError

    hw = input_hw(feeds)
    name = task or tasks.guess(ref, hw)
    out = {"task": name, "guessed": task is None}
    if name is not None:
        n = data.n_samples(feeds)
        axis = data.sample_axis([np.shape(ref[0])], [n]) if np.ndim(ref[0]) else 0
        try:
            out.update(tasks.score(name, ref, got, hw, batch_axis=axis))
        except UsageError:
            if task is not None:
                raise
            out["task"] = None
    if metric is not None:
        out["metric"] = metric(ref, got)
    return out


def task_line(scores: dict) -> str:
    if scores.get("task") is None and "metric" not in scores:
        return "task: none recognised from the output shapes (give --task or --metric)"
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
             if k not in ("task", "guessed")]
    head = f"task {scores['task']}" + (" (guessed from the output shapes)" if scores["guessed"] else "")
    return f"{head}: {', '.join(parts)}" if scores.get("task") else f"metric: {scores['metric']:.4f}"


@dataclass
class Parity:
    """onnxruntime vs torch simulation on one output.

    step = one 8-bit quantization step of the output's range. Float ops outside the quantizers
    (GEMM accumulation order, LayerNorm, Softmax) differ by ~1e-7 between the two runtimes and can
    flip a rounding in a later quantizer (a value on a rounding tie), so exact equality is not
    guaranteed. One layer alone stays within one code everywhere (tests/test_parity_grid.py); through
    a deep network an isolated flip can grow (one Softmax value can move by many codes), so `ok`
    means at most 0.1% of the output values differ by more than one code, and `exact` that none do."""
    output: str
    max_abs_diff: float
    step: float
    max_code_diff: int
    over_one: float  # fraction of output values more than one code apart
    ok: bool
    exact: bool


OVER_ONE_OK = 1e-3


def sim_parity(names, ort_out: list, sim_out: list) -> list[Parity]:
    res = []
    for name, a, b in zip(names, ort_out, sim_out):
        a, b = a.astype(np.float64), b.astype(np.float64)
        # one 8-bit step of the output's range; an output that is nearly constant (a model whose weights
        # are constant fills: the onnx wheel's light_densenet121, range 0.1% of its values) has no range
        # to speak of, and float rounding through 121 layers (15 float32 ulps) read as 800000 steps, all
        # values "more than one apart": a step is at least 1e-5 of the output's magnitude
        step = max(float(np.ptp(b)) / 255.0, 1e-5 * float(np.abs(b).max()), 1e-12)
        diff = np.abs(np.round(a / step) - np.round(b / step))
        over = float((diff > 1).mean())
        res.append(Parity(name, float(np.abs(a - b).max()), step, int(diff.max()), over, over <= OVER_ONE_OK,
                          bool(diff.max() <= 1)))
    return res


def table(metrics: list[OutputMetrics]) -> str:
    rows = [("output", "cosine", "SQNR dB", "max|diff|", "top-1 agree", "acc float", "acc quant")]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for m in metrics:
        rows.append((m.output, f"{m.cosine:.5f}", f"{m.sqnr_db:.2f}", f"{m.max_abs_diff:.4g}",
                     pct(m.top1_agreement), pct(m.acc_float), pct(m.acc_quant)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def as_dicts(items) -> list[dict]:
    return [asdict(i) for i in items]


def evaluate(imp, quant_model, eval_path, labels_path, opts, log=print,
             given: list | None = None) -> dict:
    """Float vs quantized in onnxruntime on the eval data, and again at a second size where the file
    leaves spatial or sequence dims dynamic (the export must run wherever the float model runs).
    given: the inputs as the data gives them (sample axes); both models take samples first."""
    declared = shapes.specs(imp.original)
    given = given or declared
    groups = data.load_groups(eval_path, given, log=log) if os.path.isdir(eval_path) and \
        data.npz_files(eval_path) else []
    feeds, labels = (groups[0].feeds, groups[0].labels) if groups else \
        data.load(eval_path, given, log=log, **opts.image)
    if labels_path:
        labels = data.load_array(labels_path)
    from .tasks import load_metric

    metric = load_metric(opts.metric) if opts.metric else None
    names, ref, got = run_both(imp.original, quant_model, feeds, opts.device)
    metrics = compare_outputs(names, ref, got, labels)
    log(table(metrics))
    res = {"validation": as_dicts(metrics),
           "task": task_scores(opts.task, metric, ref, got, feeds)}
    log(task_line(res["task"]))
    if len(groups) > 1:
        res["validation_other_shapes"] = []
        for g in groups[1:]:
            _, ref, got = run_both(imp.original, quant_model, g.feeds, opts.device)
            m = compare_outputs(imp.outputs, ref, got, g.labels)
            t = task_scores(res["task"]["task"] or None, metric, ref, got, g.feeds)
            res["validation_other_shapes"].append({"shape": g.shape, "files": g.files,
                                                   "metrics": as_dicts(m), "task": t})
            log(f"eval samples of shape {g.shape}:\n" + table(m) + "\n" + task_line(t))
    other = shapes.second_size(declared, feeds)
    if other is not None:
        sizes = {k: list(v.shape[1:]) for k, v in other.items()}
        entry = {"inputs": sizes}
        try:
            ref = runtime.run(runtime.session(imp.original, opts.device), other)
        except Exception as exc:
            entry["skipped"] = f"the float model does not run at this size ({str(exc).splitlines()[0][:160]})"
        else:
            try:
                got = runtime.run(runtime.session(quant_model, opts.device), other)
            except Exception as exc:
                entry["error"] = f"the exported model fails at this size: {str(exc).splitlines()[0][:200]}"
                log(f"warning: {entry['error']}")
            else:
                m2 = compare_outputs(imp.outputs, ref, got, labels)
                entry["metrics"] = as_dicts(m2)
                entry["task"] = task_scores(res["task"]["task"] or None, metric, ref, got, other)
                entry["task"]["guessed"] = res["task"]["guessed"]
                log(f"at a second size ({', '.join(f'{k} {v}' for k, v in sizes.items())}):\n"
                    + table(m2) + "\n" + task_line(entry["task"]))
        res["validation_second_size"] = entry
    return res
