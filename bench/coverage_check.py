"""Run the coverage set (bench/coverage_models.py) through packptq and onnxruntime's quantize_static.

    python bench/coverage_check.py --dir DIR [--only a,b] [--rows rtn-W8A8,ort-W8A8,pack-W4A8]
                                   [--timeout 1800] [--force]

Rows, each run as its own process (wall time and peak RSS are that process's), with no shape flags:
- rtn-W8A8:  `packptq quantize M --calib C --eval E --task T --wbits 8 --abits 8 --method rtn --target this`
             (the 8-bit weight range this machine's CPU computes exactly, as onnxruntime's rows use)
- ort-W8A8:  onnxruntime `quantize_static` QDQ, per-channel s8 weights, u8 activations, MinMax and
             Percentile (99.999) calibration (bench/quantizers.py), each scored with `packptq
             validate F Q --data E --task T`; the better task agreement is the row
- pack-W4A8: `packptq quantize ... --wbits 4 --abits 8 --method pack --iters-total 300` (quick)
A finished row is cached in DIR/coverage_results.json and skipped when run again (--force reruns it),
so the set can be filled in pieces. Full logs: DIR/<model>_<row>.log.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ROWS = ("rtn-W8A8", "ort-W8A8", "pack-W4A8")
TARGET = "this"  # the machine the rows run on: full-range 8-bit weights where its CPU has VNNI, as
                 # onnxruntime's rows have (quantize_static's reduce_range=False)


def child(cmd, log, timeout):
    """Run cmd; (exit code, seconds, peak RSS MB of that process tree's largest process)."""
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(["timeout", str(timeout)] + cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, round(time.time() - t, 1), round(usage.ru_maxrss / 1024, 1)


def last_error(log):
    with open(log) as f:
        lines = [ln.strip() for ln in f if ln.strip() and "W:onnxruntime" not in ln]
    err = [ln for ln in lines if "error" in ln.lower()]
    return (err[-1] if err else lines[-1] if lines else "")[:300]


def task_args(e):
    args = ["--task", e["task"]] if e.get("task") else []
    if str(e.get("eval_labels", "")).endswith(".npy"):
        args += ["--labels", os.path.join(DIR, e["eval_labels"])]
    return args


def ours(e, row, timeout):
    m = e["name"]
    bits = ["--wbits", "8", "--abits", "8", "--method", "rtn"] if row == "rtn-W8A8" else \
        ["--wbits", "4", "--abits", "8", "--method", "pack", "--iters-total", "300"]
    bits += ["--target", TARGET]
    rep, log = os.path.join(DIR, f"{m}_{row}.json"), os.path.join(DIR, f"{m}_{row}.log")
    cmd = ["packptq", "quantize", os.path.join(DIR, e["file"]), "--calib", os.path.join(DIR, e["calib"]),
           "-o", os.path.join(DIR, f"{m}_{row}.onnx"), "--report", rep, "--eval", os.path.join(DIR, e["eval"]),
           *bits, *task_args(e)]
    rc, sec, rss = child(cmd, log, timeout)
    res = dict(rc=rc, seconds=sec, peak_rss_mb=rss)
    if rc == 0:
        with open(rep) as f:
            r = json.load(f)
        res.update(summary(r), shapes=r["shapes"]["summary"], output_quantizers=r.get("output_quantizers", {}),
                   quantized_weights=quantized_weights(os.path.join(DIR, f"{m}_{row}.onnx")),
                   second=second(r.get("validation_second_size")))
    else:
        res["error"] = last_error(log)
    return res


def summary(r):
    return dict(cosine=min(v["cosine"] for v in r["validation"]), task=r.get("task", {}))


def quantized_weights(path: str) -> int:
    """Weight DequantizeLinear nodes (reading an initializer) in the exported graph: 0 means the tool
    quantized nothing (e.g. every layer sits inside an If it cannot see into)."""
    import onnx

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in m.graph.node)


def second(entry):
    if not entry:
        return None
    if "metrics" not in entry:
        return {"note": entry.get("skipped") or entry.get("error")}
    return dict(inputs=entry["inputs"], cosine=min(v["cosine"] for v in entry["metrics"]), task=entry.get("task", {}))


def ort(e, timeout):
    m = e["name"]
    best = None
    for cal in ("MinMax", "Percentile"):
        out, log = os.path.join(DIR, f"{m}_ort-{cal}.onnx"), os.path.join(DIR, f"{m}_ort-W8A8.log")
        rc, sec, rss = child([sys.executable, __file__, "--ort-child", e["file"], e["calib"], out, cal, "--dir", DIR],
                             log, timeout)
        res = dict(calibrate=cal, rc=rc, seconds=sec, peak_rss_mb=rss)
        if rc == 0:
            rep = os.path.join(DIR, f"{m}_ort-{cal}.json")
            vrc, _, _ = child(["packptq", "validate", os.path.join(DIR, e["file"]), out, "--data",
                               os.path.join(DIR, e["eval"]), "--report", rep, *task_args(e)], log, timeout)
            if vrc == 0:
                with open(rep) as f:
                    res.update(summary(json.load(f)), quantized_weights=quantized_weights(out))
            else:
                res.update(rc=vrc, error="validate: " + last_error(log))
        else:
            res["error"] = last_error(log)
        if best is None or rank(res) > rank(best):
            best = res
    return best


def rank(r):
    """Better row first: ran, then task agreement, then cosine."""
    return r["rc"] == 0, (r.get("task") or {}).get("task_agreement") or -1, r.get("cosine", -1)


def ort_child(model, calib, out, cal):
    from quantizers import ort_quantize
    from rows import Row

    from packptq_onnx import runtime

    info = {"model": os.path.join(DIR, model), "calib": os.path.join(DIR, calib)}
    notes = ort_quantize(Row(f"ort-{cal.lower()}-u8-W8A8", "ort", f"ort-{cal.lower()}-u8", 8, 8, cal, "u8"),
                         info, {"calib_samples": 32}, out, DIR)
    runtime.session(out)  # it loads
    print("ort quantize_static:", notes)


def main():
    global DIR
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--ort-child", nargs=4, metavar=("MODEL", "CALIB", "OUT", "CALIBRATE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    DIR = a.dir
    if a.ort_child:
        return ort_child(*a.ort_child)
    with open(os.path.join(DIR, "coverage_models.json")) as f:
        table = json.load(f)
    only = {s for s in a.only.split(",") if s}
    path = os.path.join(DIR, "coverage_results.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for e in table:
        if only and e["name"] not in only:
            continue
        for row in a.rows.split(","):
            if row in results.get(e["name"], {}) and not a.force:
                continue
            if os.path.exists(log := os.path.join(DIR, f"{e['name']}_{row}.log")):
                os.unlink(log)
            res = ort(e, a.timeout) if row == "ort-W8A8" else ours(e, row, a.timeout)
            if os.path.exists(path):  # add to what is on disk: another run may have added rows
                with open(path) as f:
                    results = json.load(f)
            results.setdefault(e["name"], {})[row] = res
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, path)
            t = res.get("task") or {}
            print(f"{e['name']} {row}: rc={res['rc']} {res['seconds']} s {res['peak_rss_mb']} MB "
                  + (f"cosine {res['cosine']:.4f} {t.get('task')} {t.get('task_agreement')}" if res["rc"] == 0
                     else res.get("error", "")), flush=True)


DIR = "."

if __name__ == "__main__":
    main()
