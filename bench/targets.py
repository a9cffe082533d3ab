"""Accuracy targets and activation-bit limits on the bench models (issue 25); writes bench/TARGETS.md.

  python bench/targets.py --out DIR [--models rec,effnet,cls,minilm] [--rows PATTERN] [--calib-samples 128]
                          [--iters-total N] [--seed S]

Every row is one `packptq quantize` run (round to nearest unless the row says pack) on the task's
calibration split, checked on its eval split; rows are cached as DIR/rows/MODEL.ROW.json, so the
table can be filled over several sessions. Row kinds:
  uniform   W{w}A{a} everywhere: the reference curve at equal weight bytes
  target    --target METRIC>=X (or --max-drop): the chosen point and the Pareto front it checked
  limits    --avg-wbits / --avg-abits with activation options 4, 8, 16
  worst-k   the recognizer at W8A4 with only the k layers that `inspect --sensitivity` ranks worst
            (Omega at W8A4, each layer alone) given 8-bit activations (in-process, no CLI flag);
            8-bit weights, so that what remains is the 4-bit activations' loss
The bench scores (exact lines, accuracy, Spearman) come from bench/tasks.py, as in RESULTS.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REC_FIXED = ["--fixed-bits", "4", "--fixed-abits", "8"]
UNIFORM = [(2, 8), (3, 8), (4, 8), (8, 8), (4, 4), (8, 16)]
ROWS = {
    # -fine: packs of at most 3 blocks, more packs for the allocation to trade between (MiniLM's
    # default packing puts all 12 blocks in one pack, and every candidate is then a uniform model)
    "effnet": [("target", ["--target", "agreement>=0.99"]),
               ("target-fine", ["--target", "agreement>=0.99", "--max-pack-blocks", "3"])],
    "cls": [("target", ["--target", "agreement>=0.99"])],
    "minilm": [("target", ["--target", "cosine>=0.99"]),
               ("target-fine", ["--target", "cosine>=0.99", "--max-pack-blocks", "3"])],
    # the head MatMul holds 30% of the recognizer's weights: at the default 8 fixed bits it alone
    # spends 2.4 of the 4 average bits, so these rows fix stem and head at W4A8
    "rec": [("maxdrop", ["--max-drop", "0.01"]),
            ("worst-k", None),
            ("worst-k-gain", None),
            ("W8A5", ["--wbits", "8", "--abits", "5"]),
            ("W8A6", ["--wbits", "8", "--abits", "6"]),
            ("limits-a56", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,5,6,8", *REC_FIXED,
                            "--target", "task>=0.8"]),
            ("w4-target", ["--avg-wbits", "4", "--abits-options", "4,8,16", *REC_FIXED, "--target", "task>=0.8"]),
            ("limits", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,8,16", *REC_FIXED]),
            ("limits-target", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,8,16", *REC_FIXED,
                               "--target", "task>=0.8"]),
            ("limits-fine", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,8", *REC_FIXED,
                             "--max-pack-blocks", "1", "--target", "task>=0.8"]),
            ("limits-pack", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,8,16", *REC_FIXED]),
            ("limits-a48-pack", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,8", *REC_FIXED]),
            ("limits-a4568-pack", ["--avg-wbits", "4", "--avg-abits", "5", "--abits-options", "4,5,6,8",
                                   *REC_FIXED])],
}
WORST_K = (1, 2, 4, 8, 16)
WORST_W = 8


def rows_for(model: str) -> list:
    uni = [(f"W{w}A{a}", ["--wbits", str(w), "--abits", str(a)]) for w, a in UNIFORM]
    return uni + ROWS[model]


def task_info(model: str, work: str, calib_samples: int) -> dict:
    import tasks

    t = tasks.TASKS[model]
    path = os.path.join(work, model, "data.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    n_calib, n_eval = tasks.DATA_SIZES[model]
    d = t.build(os.path.join(work, model), os.path.join(work, "models"),
                {"n_calib": n_calib, "n_eval": n_eval, "seed": 0})
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    return d


def _run(model_path: str, feeds: dict) -> list:
    from packptq_onnx import runtime

    return runtime.run(runtime.session(model_path), feeds)


def _eval(info: dict):
    from packptq_onnx import data
    from packptq_onnx.onnx_import import load
    from packptq_onnx.shapes import specs

    feeds, labels = data.load(info["eval"], specs(load(info["model"]).original), log=lambda *_: None)
    if info.get("labels") and str(info["labels"]).endswith(".npy"):
        labels = np.load(info["labels"])
    elif info.get("labels"):
        labels = info["labels"]
    return feeds, labels


def bench_scores(model: str, info: dict, path: str, cache: dict) -> dict:
    import tasks

    if "eval" not in cache:
        cache["eval"] = _eval(info)
        cache["float"] = _run(info["model"], cache["eval"][0])
    feeds, labels = cache["eval"]
    out = tasks.TASKS[model].score(_run(path, feeds), cache["float"], labels, info)
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float, np.floating))}


def run_row(model: str, name: str, args: list, info: dict, a, cache: dict) -> dict:
    out = os.path.join(a.out, "rows", f"{model}.{name}")
    cached = out + ".json"
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    if args is None:
        res = worst_k(model, info, a, cache, by_gain=name.endswith("-gain"))
    else:
        method = ["--method", "pack", "--iters-total", str(a.iters_total)] if name.endswith("-pack") else \
            ["--method", "rtn"]
        method += ["--seed", str(a.seed)] if a.seed else []
        cmd = [sys.executable, "-m", "packptq_onnx.cli", "quantize", info["model"], "--calib", info["calib"],
               "--eval", info["eval"], "--calib-samples", str(a.calib_samples), "--batch-size", "16",
               "-o", out + ".onnx", "--report", out + ".report.json", *method, *args,
               "--sensitivity-cache", os.path.join(a.out, "rows", f"{model}.sensitivity.json")]
        if model == "rec":
            cmd += ["--input-shape", "x:N,3,48,320"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PACKPTQ_QUIET": "1"})
        res = {"cmd": " ".join(cmd[2:]), "rc": p.returncode, "seconds": round(time.time() - t0, 1),
               "log_tail": (p.stdout + p.stderr).strip().splitlines()[-40:]}
        if os.path.exists(out + ".report.json") and p.returncode == 0:
            with open(out + ".report.json") as f:
                rep = json.load(f)
            mp = rep.get("mixed_precision") or {}
            res.update(weight_bytes=rep["weight_bytes"]["quantized"], search=mp.get("search"),
                       predicted=mp.get("predicted"), options=mp.get("options"), choice=mp.get("choice"),
                       ranking=(mp.get("ranking") or [])[:5], validation=rep.get("validation"), task=rep.get("task"),
                       bench=bench_scores(model, info, out + ".onnx", cache))
        elif p.returncode == 3:
            with open(os.path.splitext(out + ".onnx")[0] + ".front.json") as f:
                res["search"] = json.load(f)
    with open(cached, "w") as f:
        json.dump(res, f, indent=1)
    return res


def worst_k(model: str, info: dict, a, cache: dict, by_gain: bool = False) -> dict:
    """W8A4 with only the k worst layers at 8-bit activations. Worst: by Omega at W8A4 with each layer
    quantized alone, the rest float (`inspect --sensitivity`); by_gain: by what raising that layer
    alone to A8 removes of the output loss with every other layer at W8A4 (gain_ranking)."""
    from packptq_onnx import state
    from packptq_onnx.pipeline import Options, analyse, candidate, prepare
    from packptq_onnx.ranking import measure_report

    opts = Options(wbits=WORST_W, abits=4, method="rtn", calib_samples=a.calib_samples, batch_size=16,
                   input_shapes={"x": [None, 3, 48, 320]})
    p = prepare(info["model"], info["calib"], opts, log=lambda *_: None)
    t0 = time.time()
    if by_gain:
        rep, ranked = None, gain_ranking(p, opts)
    else:
        an = analyse(p, opts, log=lambda *_: None)
        pack_layers = [[n for b in pk.blocks for n in an.units.blocks[b].layers] for pk in an.packs]
        rep = measure_report(p.gm, p.qls, pack_layers, [(WORST_W, 4), (WORST_W, 8)], lambda: p.batches(opts),
                             p.n_samples)
        ranked = [it.name for it in rep.ranked()]
    res = {"ranked": ranked[:max(WORST_K)], "report_seconds": round(time.time() - t0, 1), "k": {}}
    tmp = os.path.join(a.out, "rows", f"{model}.worst.onnx")
    import onnx
    for k in (0, *WORST_K):
        for q in p.qls:
            state.set_bits(q, WORST_W, 8 if q.layer.name in ranked[:k] else 4)
        state.tie_inputs(p.qls)
        onnx.save(candidate(p, opts), tmp)
        res["k"][k] = bench_scores(model, info, tmp, cache)
        res["k"][k]["a8_elements_share"] = _a8_share(p, opts, ranked[:k])
        print(f"  worst-{k} at A8: {res['k'][k]}", flush=True)
    for q in p.qls:
        state.set_bits(q, WORST_W, 8)
    state.tie_inputs(p.qls)
    onnx.save(candidate(p, opts), tmp)
    res["all_a8"] = bench_scores(model, info, tmp, cache)
    if rep is not None:
        res["pack_omega"] = [(it.name, it.omega) for it in rep.packs]
    return res


def gain_ranking(p, opts, samples: int = 64) -> list:
    """Layers by what raising each alone from A4 to A8 takes off the output loss, every other layer
    at W8A4, on the first calibration samples; the largest gain first."""
    from packptq_onnx import state
    from packptq_onnx.layers import is_join
    from packptq_onnx.ranking import float_gains

    for q in p.qls:
        state.set_bits(q, WORST_W, 4)
    state.tie_inputs(p.qls)

    def raise_a8(q):
        state.set_bits(q, WORST_W, 8)
        state.tie_inputs(p.qls)
    joins = {q.layer.name for q in p.qls if is_join(q.layer)}
    gains = [g for g in float_gains(p.gm, p.qls, lambda: p.batches(opts), samples, change=raise_a8)
             if g["layer"] not in joins]
    print("  gain ranking: top gains " + ", ".join(f"{g['layer']} {g['gain']:.3g}" for g in gains[:5]), flush=True)
    return [g["layer"] for g in gains]


def _a8_share(p, opts, names) -> float:
    """Share of activation elements (per sample) read at 8 bits."""
    from packptq_onnx.mixed import act_elements

    acts = act_elements(p.gm, p.qls, next(iter(p.batches(opts))))
    return sum(acts.get(n, 0) for n in names) / max(sum(acts.values()), 1)


METRIC = {"effnet": ("top1_agree", "agreement"), "cls": ("acc", "agreement"), "minilm": ("wordsim", "cosine"),
          "rec": ("line_acc", "task")}


def _load(a, model, name):
    path = os.path.join(a.out, "rows", f"{model}.{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _uniform_at(uni: list, nbytes: float, key: str, abits: float | None = None):
    """The best uniform row with at most these weight bytes, and with abits given at most these average
    activation bits (None when none is that small)."""
    ok = [r for r in uni if r["weight_bytes"] <= nbytes * 1.0001 and r.get(key) is not None
          and (abits is None or r["avg_abits"] <= abits + 1e-6)]
    return max(ok, key=lambda r: r[key]) if ok else None


def _is_uniform(p: dict, uni: list) -> bool:
    """A checked point with every pack at one option (the search's own uniform references), or one of
    the uniform rows (same weight bytes and activation bits)."""
    return p.get("uniform", False) or any(abs(p["weight_bytes"] - r["weight_bytes"]) <= 1e-4 * r["weight_bytes"]
               and abs(p["avg_abits"] - r["avg_abits"]) < 0.005 for r in uni)


def _beat(p: dict, u: dict | None, key: str) -> str:
    if u is None:
        return "-"
    return "tie" if abs(p["metric"] - u[key]) < 1e-6 else "yes" if p["metric"] > u[key] else "no"


def report(a) -> str:
    lines = ["# Accuracy targets and activation-bit limits (issue 25)", "",
             "Made by `python bench/targets.py --out DIR` (rows cached; " + f"{a.calib_samples} calibration samples, "
             "round to nearest unless a row says pack; eval split never seen by calibration). "
             "Search metric: what `--target` measures in onnxruntime (agreement / cosine / the task's line "
             "agreement); bench metric: the task's own score from bench/tasks.py. ms/sample: onnxruntime's time "
             "on the eval data while the candidate was checked (batches of 64; a rough figure on a shared 2-core "
             "machine, bench/LATENCY.md has careful ones).", ""]
    for model in a.models.split(","):
        bench_key, search_key = METRIC[model]
        uni = []
        lines += [f"## {model}", "", f"| row | weight kB | avg abits | {search_key} (eval) | {bench_key} | seconds |",
                  "|---|---|---|---|---|---|"]
        for name, args in rows_for(model):
            r = _load(a, model, name)
            if r is None or args is None:
                continue
            if r.get("rc") != 0:
                lines.append(f"| {name} | - | - | exit {r.get('rc')} | - | {r.get('seconds')} |")
                continue
            val = _search_value(r, model)
            pred = r.get("predicted") or {}
            ab = pred.get("avg_abits")
            if name.startswith("W"):
                w, ab = name[1:].split("A")
                uni.append({"weight_bytes": r["weight_bytes"], search_key: val, "name": name, "avg_abits": float(ab)})
            lines.append(f"| {name} | {r['weight_bytes'] / 1e3:.1f} | {float(ab):.2f} | {_f(val)} | "
                         f"{_f(r['bench'].get(bench_key))} | {r['seconds']} |")
        for name, args in rows_for(model):
            r = _load(a, model, name)
            if r is None or args is None or not r.get("search"):
                continue
            s = r["search"]
            lines += ["", f"**{model} {name}** (`{' '.join(args)}`): target {s['target']} "
                      f"{'met' if s['met'] else 'NOT met'}; written model scores "
                      f"{_f((s.get('final') or {}).get('value'))}. Checked candidates:", "",
                      f"| {search_key} | weight kB | avg wbits | avg abits | GBOPs | ms/sample | front | best uniform "
                      "at <= bytes | beats it | best uniform at <= bytes and <= abits | beats it |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            wins, fair = [], []
            for i, p in sorted(enumerate(s["points"]), key=lambda x: x[1]["bops"]):
                u, v = _uniform_at(uni, p["weight_bytes"], search_key), \
                    _uniform_at(uni, p["weight_bytes"], search_key, p["avg_abits"])
                beat, beat2 = _beat(p, u, search_key), _beat(p, v, search_key)
                if _is_uniform(p, uni):
                    beat2 = "is uniform"
                if p["front"]:
                    wins.append(beat)
                    fair.append(beat2)
                lines.append(f"| {_f(p['metric'])}{' (chosen)' if i == s['chosen'] else ''} | "
                             f"{p['weight_bytes'] / 1e3:.1f} | {p['avg_wbits']:.2f} | {p['avg_abits']:.2f} | "
                             f"{p['bops'] / 1e9:.4g} | {p['ms_per_sample']:.3f} | {'*' if p['front'] else ''} | "
                             f"{'-' if u is None else u['name'] + ' ' + _f(u[search_key])} | {beat} | "
                             f"{'-' if v is None else v['name'] + ' ' + _f(v[search_key])} | {beat2} |")
            mixed = [b for b in fair if b != "is uniform"]
            lines += ["", f"Front points that beat the best uniform row at no more weight bytes: "
                      f"{wins.count('yes')} of {len(wins)}" + (f" ({wins.count('-')} smaller than every uniform row)"
                                                               if '-' in wins else "") + ". "
                      f"Mixed front points (not themselves a uniform row) that beat the best uniform row at no more "
                      f"weight bytes and no more average activation bits: {mixed.count('yes')} of {len(mixed)}"
                      + (f" ({mixed.count('-')} below every uniform row)" if '-' in mixed else "") + "."]
        for wk_name in ("worst-k", "worst-k-gain"):
            wk = _load(a, model, wk_name)
            if wk:
                lines += _worst_k_lines(wk, wk_name)
        lines.append("")
    return "\n".join(lines)


def _worst_k_lines(wk: dict, name: str) -> list:
    how = ("what raising that layer alone to A8 takes off the output loss, every other layer at "
           f"W{WORST_W}A4, on 64 calibration lines" if name.endswith("-gain") else
           f"`inspect --sensitivity`: Omega at W{WORST_W}A4, each layer alone")
    lines = ["", f"**rec {name}: W{WORST_W}A4 with only the k worst layers at A8** (ranked by {how}). Worst first: "
             + ", ".join(f"`{n}`" for n in wk["ranked"][:8]),
             "", "| k | share of activation elements at A8 | line_acc | line agreement with float | cer |",
             "|---|---|---|---|---|"]
    for k, v in wk["k"].items():
        lines.append(f"| {k} | {v['a8_elements_share']:.3f} | {_f(v.get('line_acc'))} | "
                     f"{_f(v.get('line_agree'))} | {_f(v.get('cer'))} |")
    v = wk["all_a8"]
    lines.append(f"| all (W{WORST_W}A8) | 1.000 | {_f(v.get('line_acc'))} | {_f(v.get('line_agree'))} | "
                 f"{_f(v.get('cer'))} |")
    return lines


def _search_value(r, model):
    if model == "minilm":
        return min(v["cosine"] for v in r["validation"])
    if model == "rec":
        return (r.get("task") or {}).get("task_agreement")
    v = r["validation"][0]
    return v.get("top1_agreement")


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="rec,effnet,cls,minilm")
    ap.add_argument("--rows", default="*")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--iters-total", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="quantize's --seed (rows are cached by name: use another DIR)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--write", action="store_true", help="write bench/TARGETS.md (default: DIR/TARGETS.md)")
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "rows"), exist_ok=True)
    for model in a.models.split(","):
        info = task_info(model, a.out, a.calib_samples)
        cache: dict = {}
        for name, args in rows_for(model):
            if a.report_only or not fnmatch.fnmatch(name, a.rows):
                continue
            print(f"{model} {name} ...", flush=True)
            r = run_row(model, name, args, info, a, cache)
            print(f"{model} {name}: rc {r.get('rc')} {r.get('seconds')} s {r.get('bench')}", flush=True)
    text = report(a)
    with open(os.path.join(HERE, "TARGETS.md") if a.write else os.path.join(a.out, "TARGETS.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
