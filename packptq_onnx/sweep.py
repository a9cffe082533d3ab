"""`packptq sweep SWEEP.toml -o OUT`: many quantize jobs (models x bit widths x methods ...) run by
the engine (Ray tasks, or processes one after another), then one results table and a plot per model.

OUT/jobs/<id>/ holds each job's model.onnx, report.json (quantize's report), log.txt and
result.json (the summary the table is made from: status, metric, weight bytes, latency, error).
A job whose result.json exists with the same key (inputs and options) is not run again.
The design: docs/METHOD.md, "Sweeps and parallel sensitivity".
"""
from __future__ import annotations

import os

import numpy as np

from . import engine as eng
from .engine import RAY_HINT, Call, Engine
from .errors import UsageError
from .sweepfile import Sweep, load


def run_job(payload: dict) -> dict:
    """One sweep job in a worker: quantize (the CLI's own code path, its log in the job's log),
    then the summary of its report and, when asked, batch-1 latency against the float model."""
    import json

    from .cli import cmd_quantize, parser

    a = parser().parse_args(["quantize", *payload["argv"]])
    a.debug = False
    rc = cmd_quantize(a)
    with open(payload["report"]) as f:
        rep = json.load(f)
    res = {"status": "ok" if rc == 0 else "failed", **summary(rep)}
    if rc != 0:
        res["error"] = (rep.get("evaluation_error") or {}).get("message", f"exit {rc}")
        res["exit_code"] = rc
    elif payload["latency_runs"]:
        res.update(latency(payload["model"], payload["output"], payload["latency_runs"], payload["eval"]))
    return res


def summary(rep: dict) -> dict:
    """The numbers a sweep compares, from a quantize report."""
    o = rep["options"]
    out = {"wbits": o["wbits"], "abits": o["abits"], "method": o["method"], "seed": o["seed"],
           "weight_bytes": rep["weight_bytes"]["quantized"], "float_weight_bytes": rep["weight_bytes"]["float32"],
           "file_bytes": rep["file_bytes"], "parity_max_code_diff": max(p["max_code_diff"] for p in rep["parity"]),
           "seconds": rep["seconds"]["total"], "peak_rss_mb": rep["peak_rss_mb"]}
    mp = rep.get("mixed_precision")
    if mp:
        out["avg_wbits"] = mp["predicted"]["avg_wbits"]
        out["avg_abits"] = mp["predicted"]["avg_abits"]
    if not rep.get("validation"):
        return out
    first = rep["validation"][0]
    out["cosine"] = first["cosine"]
    if first.get("top1_agreement") is not None:
        out["top1_agreement"] = first["top1_agreement"]
    task = rep.get("task") or {}
    scores = {k: v for k, v in task.items() if k not in ("task", "guessed", "metric") and isinstance(v, (int, float))}
    if "metric" in task:
        out["metric_name"], out["metric"] = "metric", task["metric"]
    elif first.get("acc_quant") is not None:
        out["metric_name"], out["metric"] = "accuracy", first["acc_quant"]
        out["float_metric"] = first["acc_float"]
    elif scores:
        out["metric_name"], out["metric"] = next(iter(scores.items()))
    else:
        out["metric_name"], out["metric"] = "cosine", first["cosine"]
    return out


def latency(model: str, output: str, runs: int, eval_path: str | None) -> dict:
    """Median batch-1 latency at 1 thread, float and quantized timed alternately in this worker, on
    the first evaluation sample (zeros of the declared shape where the data does not load)."""
    import onnx

    from . import data, runtime
    from .shapes import specs

    sess = runtime.session(model)
    feeds = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], _np_type(i.type))
             for i in sess.get_inputs()}
    if eval_path:
        try:
            declared = specs(onnx.load(model, load_external_data=False))  # the inputs only: no second import
            f, _ = data.load(eval_path, declared, log=lambda *_: None)
            feeds = {k: v[:1] for k, v in f.items()}
        except Exception:  # samples on another axis, an image folder needing options: zeros time as well
            pass
    tf, tq = runtime.paired_latency(model, output, feeds, runs)
    return {"latency_ms": round(tq * 1e3, 4), "float_latency_ms": round(tf * 1e3, 4), "speedup": round(tf / tq, 3)}


def _np_type(t: str):
    return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(float16)": np.float16, "tensor(bool)": np.bool_}.get(t, np.float32)


def calls(sweep: Sweep, out: str) -> list[Call]:
    s = sweep.settings
    res = []
    for j in sweep.jobs:
        d = os.path.join(out, "jobs", j.id)
        output, report = os.path.join(d, "model.onnx"), os.path.join(d, "report.json")
        gpus = s.gpus if s.gpus is not None else (1 if j.options.get("device") == "cuda" else 0)
        payload = {"argv": j.quantize_argv(output, report), "model": j.model, "output": output, "report": report,
                   "latency_runs": s.latency_runs, "eval": j.eval}
        res.append(Call(j.id, "packptq_onnx.sweep:run_job", payload, os.path.join(d, "result.json"),
                        os.path.join(d, "log.txt"), key=j.key + f":{s.latency_runs}", cpus=s.cpus, gpus=gpus))
    return res


def sweep(path: str, out: str, address: str | None = None, workers: int | None = None, backend: str = "auto",
          retry_failed: bool = False, log=print) -> dict:
    """Run a sweep file; returns {"jobs": {id: result}, "table": path}. Checks everything first."""
    sw = load(path)
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"-o {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    engine = Engine(backend, workers, address, sw.settings.retries, sw.settings.timeout, log)
    if engine.backend == "process":
        ray = eng.have_ray()
        log(f"{'--no-ray' if ray else 'Ray is not installed'}: {len(sw.jobs)} jobs run one after another in "
            "processes" + ("" if ray else f" ({RAY_HINT})"))
    todo = calls(sw, out)
    n = len(todo)
    count = [0]

    def done(c: Call, res: dict, was_cached: bool) -> None:
        count[0] += 1
        what = "cached" if was_cached else f"{res.get('worker_seconds', 0):.0f} s"
        if res.get("status") == "ok":
            m = res.get("metric")
            log(f"[{count[0]}/{n}] {c.id}: {res.get('metric_name', 'metric')} "
                f"{'-' if m is None else f'{m:.4f}'}, {res['weight_bytes'] / 1e3:.1f} kB ({what})")
        else:
            log(f"[{count[0]}/{n}] {c.id}: FAILED: {res.get('error')} ({what})")

    with engine:
        results = engine.run(todo, retry_failed, done)
    from .exporters.sweep_table import write

    rows = [dict(results[j.id], id=j.id, model=j.model_name, options=j.options) for j in sw.jobs]
    paths = write(rows, out)
    failed = [r["id"] for r in rows if r.get("status") != "ok"]
    log(f"wrote {', '.join(paths)}" + (f"; {len(failed)} job(s) failed: {', '.join(failed)}" if failed else ""))
    return {"jobs": {r["id"]: r for r in rows}, "files": paths, "failed": failed}
