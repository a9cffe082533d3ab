"""What a benchmark worker runs (bench/run.py, through packptq_onnx.engine): build a task's model
and data, or quantize one row, evaluate it against the float model and time it."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from feeds import load_feeds, load_labels, overlap
from quantizers import ort_quantize, ours_quantize, stored_weight_bytes
from records import save_json
from rows import ROWS
from tasks import TASKS

from packptq_onnx.memory import peak_rss_mb
from packptq_onnx.runtime import paired_latency


def float_outputs(info: dict, cfg: dict, work: str, feeds: dict) -> list:
    from packptq_onnx import runtime

    path = os.path.join(work, f"float_outputs_{cfg['eval_samples'] or 'all'}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return [z[f"o{i}"] for i in range(len(z.files))]
    outs = runtime.run(runtime.session(info["model"]), feeds, 32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{f"o{i}": o for i, o in enumerate(outs)})
    os.replace(tmp, path)
    return outs


def row_job(payload: dict) -> dict:
    """A row as an engine call (bench/run.py): a fresh worker process, Ray's or a child process."""
    return run_row(payload["task"], payload["row"], payload["out"], payload["cfg"])


def build_job(payload: dict) -> dict:
    return build_task(payload["task"], payload["out"], payload["models_dir"], payload["cfg"])


def run_row(task_name: str, row_name: str, out_dir: str, cfg: dict) -> dict:
    """Quantize (ORT or ours), then evaluate and time; returns the row's result."""
    os.environ.setdefault("PACKPTQ_QUIET", "1")
    task, row = TASKS[task_name], ROWS[row_name]
    work = os.path.join(out_dir, task_name)
    with open(os.path.join(work, "data.json")) as f:
        info = json.load(f)
    mdir = os.path.join(work, f"models-{cfg['tag']}")
    os.makedirs(mdir, exist_ok=True)
    res = {"task": task_name, "row": row_name, "method": row.method, "bits": row.bits, "config": cfg}
    t0 = time.time()
    if row.kind == "float":
        qpath = info["model"]
        res["weight_bytes"] = stored_weight_bytes(qpath)
    else:
        qpath = os.path.join(mdir, f"{row_name}.onnx")
        if row.kind == "ort":
            res.update(ort_quantize(row, info, cfg, qpath, work, task.ort_op_types))
            res["weight_bytes"] = stored_weight_bytes(qpath)
        else:
            res.update(ours_quantize(row, info, cfg, qpath))
        res["quantize_seconds"] = round(time.time() - t0, 2)
        res["peak_rss_mb"] = peak_rss_mb()
    res["file_bytes"] = os.path.getsize(qpath)
    from packptq_onnx import runtime
    from packptq_onnx.validate import cosine

    feeds, labels = load_feeds(info["eval"], info["model"], cfg["eval_samples"])
    if info.get("labels"):
        labels = load_labels(info, cfg["eval_samples"])
    ref = float_outputs(info, cfg, work, feeds)
    outs = ref if row.kind == "float" else runtime.run(runtime.session(qpath), feeds, 32)
    scores = task.score(outs, ref, labels, info)
    res["scores"] = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                     for k, v in scores.items()}
    res["cosine"] = float(np.mean([cosine(a, b) for a, b in zip(outs, ref)]))
    if task.argmax and ref[0].ndim >= 2 and ref[0].shape[-1] > 1:
        res["argmax_agreement"] = float((outs[0].argmax(-1) == ref[0].argmax(-1)).mean())
    # latency: batch 1, 1 thread, median; float and row timed alternately in this process for the speed-up
    one = {k: v[:1] for k, v in feeds.items()}
    lat_f, lat_q = paired_latency(info["model"], None if row.kind == "float" else qpath, one, cfg["latency_runs"])
    res["latency_ms"] = round(lat_q * 1e3, 4)
    res["float_latency_ms"] = round(lat_f * 1e3, 4)
    res["speedup"] = round(lat_f / lat_q, 3)
    res["status"] = "ok"
    res["row_seconds"] = round(time.time() - t0, 2)
    return res


def build_task(task_name: str, out_dir: str, models_dir: str, cfg: dict) -> dict:
    task = TASKS[task_name]
    work = os.path.join(out_dir, task_name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(models_dir, exist_ok=True)
    t0 = time.time()
    info = {k: (os.path.abspath(v) if k in ("model", "calib", "eval", "labels") and isinstance(v, str) else v)
            for k, v in task.build(work, models_dir, cfg).items()}
    for k in ("model", "calib", "eval"):
        if not info.get(k) or not os.path.exists(info[k]):
            raise RuntimeError(f"build did not produce '{k}' ({info.get(k)})")
    info["overlap"] = overlap(info["calib"], info["eval"], info["model"])
    if info["overlap"]:
        raise RuntimeError(f"{info['overlap']} evaluation samples also appear in the calibration data")
    info["n_calib"] = len(next(iter(load_feeds(info["calib"], info["model"])[0].values())))
    info["n_eval"] = len(next(iter(load_feeds(info["eval"], info["model"])[0].values())))
    info["build_seconds"] = round(time.time() - t0, 2)
    info["status"] = "ok"
    save_json(info, os.path.join(work, "data.json"))
    return info
