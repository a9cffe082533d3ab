"""Benchmark harness: every model x every method, one command, resumable.

    python bench/run.py --out bench/out [--models sample,cls,rec,effnet,minilm] [--rows PATTERNS] [--quick]

For each model (a *task* in bench/tasks.py) it builds the model and its calibration / evaluation
data once, then runs each row (float, onnxruntime's quantize_static variants, our rtn / adaround /
block / pack at W8A8 .. W3A3, pack + mixed precision; defined in rows.toml) in a fresh worker
process of the sweep engine (packptq_onnx.engine: a Ray task, on a local cluster or the one at
--address, or a child process with --no-ray), --cpus-per-row cores each. A row's result is
cached as JSON under OUT/<task>/<config>/<row>.json, so a rerun skips finished rows (failed rows
too, unless --retry-failed). At the end it writes RESULTS.md and one PNG per model (metric vs
weight bytes per method) into --results (default: bench/).

Per row: the task's metrics on the evaluation data (disjoint from the calibration data), cosine
and argmax agreement to the float model's outputs, weight bytes of the quantizable layers (Conv /
ConvTranspose / Gemm / MatMul weights) at their stored bit width, quantization wall time, peak RSS
of the row's process at the end of quantization, onnxruntime latency (batch 1, 1 thread, median
of --latency-runs) and the speed-up over the float model measured in the same process.

--rows takes names or shell patterns, e.g. --rows 'float,ort-minmax-u8-W8A8,pack-*'.
--list prints the rows. --quick uses fewer calibration samples and reconstruction iterations.
Reconstruction rows (adaround, block, pack) get the same --iters-total budget
(ReconOptions.iters_total), which gives every mode the same multiply-accumulates
(reconstruct.split_iters), so they do equal work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# this file is the driver: arguments, configuration tag, engine calls, cache. The rest of the
# harness: rows.py (the rows of rows.toml), tasks.py (the models, their data and scores), row_child.py
# (what a worker runs, with feeds.py, quantizers.py, records.py) and report.py (RESULTS.md, plots).
from records import save_json  # noqa: E402
from report import fmt, write_results  # noqa: E402
from rows import ROWS, Row, select_rows  # noqa: E402
from tasks import DATA_SIZES, TASKS, Task  # noqa: E402

from packptq_onnx.engine import Call, Engine  # noqa: E402


# ---- configuration -----------------------------------------------------------------------------
def row_config(task: Task, a) -> dict:
    q = 1 if a.quick else 0
    cfg = {"quick": bool(a.quick), "seed": a.seed,
           "calib_samples": a.calib_samples or task.calib_samples[q],
           "iters_total": a.iters_total if a.iters_total is not None else task.iters_total[q],
           "eval_samples": a.eval_samples or task.eval_samples[q],
           "latency_runs": a.latency_runs or (20 if a.quick else 50),
           "batch_size": task.batch_size}
    if a.device != "cpu":  # in the configuration tag only when not the default, so CPU caches stay valid
        cfg["device"] = a.device
    return cfg


def code_version() -> str:
    """Hash of the package's sources: a cached row of ours made by other code is run again."""
    h = hashlib.sha1()
    for top in ("packptq_onnx", "exporters", "solvers"):
        for d, _, files in sorted(os.walk(os.path.join(ROOT, top))):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(d, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    return h.hexdigest()[:12]


def config_tag(task: Task, a) -> str:
    cfg = row_config(task, a)
    base = dict(cfg, calib_samples=task.calib_samples[int(a.quick)], iters_total=task.iters_total[int(a.quick)],
                eval_samples=task.eval_samples[int(a.quick)], latency_runs=20 if a.quick else 50, seed=0)
    name = "quick" if a.quick else "full"
    if cfg == base:
        return name
    return f"{name}-" + hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


# ---- rows and builds as engine calls (Ray tasks, or processes) ----------------------------------
def call(kind: str, cid: str, payload: dict, result: str, log_path: str, a) -> Call:
    """A row ("row") or a task's data build ("build") as an engine call, run by row_child.py."""
    if os.path.exists(log_path):
        os.unlink(log_path)
    return Call(cid, f"row_child:{kind}_job", payload, result, log_path, cpus=a.cpus_per_row,
                gpus=1 if getattr(a, "device", "cpu") == "cuda" else 0, sys_path=[HERE])


def spawn(engine: Engine, c: Call, cfg: dict | None = None) -> dict:
    """Run one call; its failure is a record with a one-line error."""
    return finish(engine.run([c], reuse=False)[c.id], c, cfg)


def finish(res: dict, c: Call, cfg: dict | None) -> dict:
    if "wall_seconds" not in res:  # the names RESULTS.md reads (the engine's worker_* figures)
        res.setdefault("config", cfg)  # failure records too: the code they failed with
        res["wall_seconds"] = res.get("worker_seconds")
        res["process_peak_rss_mb"] = res.get("worker_peak_rss_mb")
        save_json(res, c.result)
    return res


def run_task(task: Task, rows: list[Row], a, engine: Engine, log=print) -> dict:
    """Build (cached), then every row (cached). Returns {'info', 'rows': {name: result}, 'skipped'}."""
    why = task.missing()
    if why:
        log(f"[{task.name}] not built yet: {why}")
        return {"info": None, "rows": {}, "missing": why}
    cfg = row_config(task, a)
    tag = config_tag(task, a)
    cfg["tag"], cfg["code"] = tag, code_version()
    work = os.path.join(a.out, task.name)
    rdir = os.path.join(work, tag)
    os.makedirs(rdir, exist_ok=True)
    data_json = os.path.join(work, "data.json")
    build_res = os.path.join(work, "build.json")
    info = None
    if os.path.exists(data_json):
        with open(data_json) as f:
            info = json.load(f)
    elif os.path.exists(build_res) and not a.retry_failed:
        with open(build_res) as f:
            b = json.load(f)
        return {"info": None, "rows": {}, "missing": f"data build failed: {b.get('error')}"}
    if info is None:
        sizes = DATA_SIZES.get(task.name) or (None, None)
        bcfg = {"seed": a.seed, "n_calib": sizes[0], "n_eval": sizes[1]}
        log(f"[{task.name}] building model and data ...")
        c = call("build", f"{task.name}/build", {"task": task.name, "out": os.path.abspath(a.out),
                                                 "models_dir": a.models_dir, "cfg": bcfg},
                 build_res, os.path.join(work, "build.log"), a)
        r = spawn(engine, c)
        if r.get("status") != "ok":
            log(f"[{task.name}] data build failed: {r.get('error')}")
            return {"info": None, "rows": {}, "missing": f"data build failed: {r.get('error')}"}
        with open(data_json) as f:
            info = json.load(f)
    results, todo = {}, []
    for row in rows:
        path = os.path.join(rdir, f"{row.name}.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            stale = ROWS[row.name].kind == "ours" and res.get("config", {}).get("code") != cfg["code"]
            if not stale and (res.get("status") == "ok" or (res.get("status") == "failed" and not a.retry_failed)):
                results[row.name] = res
                log(f"[{task.name}] {row.name:<26} cached ({res.get('status')})")
                continue
            if stale:
                log(f"[{task.name}] {row.name:<26} cached by other code: running again")
        log(f"[{task.name}] {row.name:<26} queued")
        todo.append(call("row", row.name, {"task": task.name, "row": row.name, "out": os.path.abspath(a.out),
                                           "cfg": cfg}, path, os.path.join(rdir, f"{row.name}.log"), a))

    def done(c: Call, res: dict, _cached: bool) -> None:
        res = finish(res, c, cfg)
        results[c.id] = res
        if res.get("status") == "ok":
            log(f"[{task.name}] {c.id:<26} done in {res['wall_seconds']:.0f} s: "
                + ", ".join(f"{k} {fmt(v)}" for k, v in list(res.get("scores", {}).items())[:3]))
        else:
            log(f"[{task.name}] {c.id:<26} FAILED: {res.get('error')}")

    engine.run(todo, on_done=done, reuse=False)  # the rows this run decided to run (above)
    results = {r.name: results[r.name] for r in rows}
    return {"info": info, "rows": results, "missing": None, "tag": tag, "cfg": cfg}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="work folder: data, models, cached rows")
    ap.add_argument("--models", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--rows", default=None, help="comma list of row names or shell patterns (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer calibration samples and iterations")
    ap.add_argument("--results", default=HERE, help="folder for RESULTS.md and the PNG plots (default bench/)")
    ap.add_argument("--models-dir", default=None, help="folder of the real ONNX models (default OUT/models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where our rows calibrate and learn (onnxruntime always evaluates on the CPU)")
    ap.add_argument("--calib-samples", type=int, default=None, help="override the task's calibration samples")
    ap.add_argument("--iters-total", type=int, default=None, help="override the total reconstruction iterations")
    ap.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--latency-runs", type=int, default=None, help="latency: median of N runs (50; quick 20)")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds before a row is killed and failed")
    ap.add_argument("--retry-failed", action="store_true", help="rerun rows cached as failed")
    ap.add_argument("--list", action="store_true", help="print the rows and tasks, then exit")
    ap.add_argument("--address", help="run the rows on the Ray cluster at auto or HOST:PORT (every node needs this "
                    "checkout, the bench wheels and OUT at the same paths)")
    ap.add_argument("--workers", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    ap.add_argument("--no-ray", action="store_true", help="rows one after another in processes (the default "
                    "without Ray)")
    ap.add_argument("--cpus-per-row", type=float, default=float(os.cpu_count() or 1),
                    help="CPUs a row reserves (default: all of this machine's, so rows never share cores and "
                    "timings stay clean; on a cluster, a node's cores)")
    a = ap.parse_args(argv)
    if a.list:
        for t in TASKS.values():
            print(f"task {t.name:<8} {t.title}" + (f"  [{t.missing()}]" if t.missing() else ""))
        for r in ROWS.values():
            print(f"row  {r.name:<26} {r.kind:<6} {r.bits}")
        return 0
    a.out = os.path.abspath(a.out)
    import signal
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: the running row's process is killed too
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with & from a script
        signal.signal(signal.SIGINT, _terminate)
    a.results = os.path.abspath(a.results)
    a.models_dir = os.path.abspath(a.models_dir or os.path.join(a.out, "models"))
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    for n in names:
        if n not in TASKS:
            raise SystemExit(f"--models: unknown model {n!r} (available: {', '.join(TASKS)})")
    os.makedirs(a.out, exist_ok=True)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(os.path.abspath(__file__), os.getcwd())]
                                   + list(argv))
    os.environ["PACKPTQ_QUIET"] = "1"  # rows log into their own files; workers inherit it
    all_res = {}
    backend = "process" if a.no_ray else "ray" if a.address else "auto"
    with Engine(backend, a.workers, a.address, retries=1, timeout=a.row_timeout) as engine:
        for n in names:
            task = TASKS[n]
            all_res[n] = run_task(task, select_rows(a.rows, task.rows), a, engine)
    path = write_results(all_res, a, command)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
