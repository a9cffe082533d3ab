"""Convergence: task metric against reconstruction work, per method (issue 24, item 3).

    python bench/converge.py --out DIR [--models cls] [--iters 300,1000,3000] [--samples 256]
                             [--bits W4A4,W4A8] [--methods rtn,adaround,block,pack] [--report-only]

Every point is one row of bench/run.py (rtn / adaround / block / pack at the given bits) at
`--iters-total N` and `--calib-samples S`, so rows are cached exactly as there (DIR/<task>/<config>/)
and the table fills over several runs. --iters-total is a compute budget: adaround, block and pack
spend the same multiply-accumulates at one N (reconstruct.split_iters). rtn does no iterations and is
run once per sample count. Writes bench/CONVERGENCE.md and bench/converge_<task>.png (the metric
against the budget, log scale, and against minutes of quantization; one line per method and sample
count).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tasks import TASKS  # noqa: E402


def run_points(a, task: str) -> None:
    for s in a.samples:
        for n in a.iters:
            methods = [m for m in a.methods if m != "rtn" or n == a.iters[0]]
            rows = ",".join(f"{m}-{b}" for m in methods for b in a.bits)
            cmd = [sys.executable, os.path.join(HERE, "run.py"), "--out", a.out, "--models", task, "--rows", rows,
                   "--calib-samples", str(s), "--iters-total", str(n), "--latency-runs", "5",
                   "--results", os.path.join(a.out, "results-converge")]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)


def points(out: str, task: str, methods=("rtn", "adaround", "block", "pack")) -> list[dict]:
    res = []
    for f in glob.glob(os.path.join(out, task, "*", "*.json")):
        with open(f) as fh:
            r = json.load(fh)
        if r.get("status") == "ok" and r.get("method") in methods and r.get("config"):
            res.append(r)
    return res


def read_off(sel: list[dict], metric: str, iters: list[int]) -> list[str]:
    """Per sample count: the order of the methods at the largest budget, and what the last step added."""
    out = []
    for s in sorted({p["config"]["calib_samples"] for p in sel}):
        score = {(p["method"], p["config"]["iters_total"]): p["scores"][metric] for p in sel
                 if p["config"]["calib_samples"] == s}
        rtn = next((v for (m, _), v in score.items() if m == "rtn"), None)
        top = max((n for (m, n) in score if m != "rtn"), default=None)
        if top is None:
            continue
        have = [m for m in ("pack", "block", "adaround") if (m, top) in score]
        ranked = sorted(have, key=lambda m: -score[(m, top)])
        vals = [(m, score[(m, top)]) for m in ranked] + ([("rtn", rtn)] if rtn is not None else [])
        order = f"{vals[0][0]} {vals[0][1]:.4f}" + "".join(
            f" {'=' if v == u else '>'} {m} {v:.4f}" for (_, u), (m, v) in zip(vals, vals[1:]))
        out.append(f"- {s} samples, {top} iterations: {order}")
        prev = max((n for n in iters if n < top), default=None)
        for m in have:
            if prev is not None and (m, prev) in score:
                d = score[(m, top)] - score[(m, prev)]
                out.append(f"  - {m}: {prev} -> {top} iterations {d:+.4f} ({'still rising' if d > 0.005 else 'flat'})")
    return out


def key_metric(task: str) -> str:
    return TASKS[task].metrics[0]


def report(a, tasks: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Convergence: metric against reconstruction work (issue 24)", "",
             f"Made by `python bench/converge.py --out DIR --models {','.join(tasks)} --iters "
             f"{','.join(map(str, a.iters))} --samples {','.join(map(str, a.samples))}` (2 CPU cores; rows "
             "cached as bench/run.py rows). `iters` is `--iters-total`, a compute budget: adaround, block "
             "and pack spend the same multiply-accumulates at one value. Cell: metric (minutes of "
             "quantization). Code changes between runs invalidate rows, so every cell comes from the code "
             "of the commit that wrote this file. Minutes are wall time on a 2-core machine that sometimes ran "
             "other work at the same time, so they are rough; the iterations are exact.", ""]
    for task in tasks:
        pts = points(a.out, task)
        metric = key_metric(task)
        if not pts:
            continue
        lines += [f"## {task}: {metric}", ""]
        bits = sorted({p["bits"] for p in pts})
        fig, axes = plt.subplots(2, len(bits), figsize=(5 * len(bits), 8), squeeze=False)
        for col, b in enumerate(bits):
            ax, ax2 = axes[0][col], axes[1][col]
            sel = [p for p in pts if p["bits"] == b]
            samples = sorted({p["config"]["calib_samples"] for p in sel})
            iters = sorted({p["config"]["iters_total"] for p in sel if p["method"] != "rtn"})
            lines += [f"**{b}**", "", "| method | samples | " + " | ".join(f"{n} iters" for n in iters) + " |",
                      "|---|---|" + "---|" * len(iters)]
            for m in ("rtn", "adaround", "block", "pack"):
                for s in samples:
                    row = {p["config"]["iters_total"]: p for p in sel
                           if p["method"] == m and p["config"]["calib_samples"] == s}
                    if not row:
                        continue
                    if m == "rtn":
                        p = next(iter(row.values()))
                        cells = [f"{p['scores'][metric]:.4f} ({p['quantize_seconds'] / 60:.1f})"] * len(iters)
                    else:
                        cells = [f"{row[n]['scores'][metric]:.4f} ({row[n]['quantize_seconds'] / 60:.1f})"
                                 if n in row else "–" for n in iters]
                        xs = sorted(row)
                        ys = [row[n]["scores"][metric] for n in xs]
                        ax.plot(xs, ys, "o-", label=f"{m} ({s} samples)")
                        ax2.plot([row[n]["quantize_seconds"] / 60 for n in xs], ys, "o", label=f"{m} ({s} samples)")
                    lines.append(f"| {m} | {s} | " + " | ".join(cells) + " |")
                    if m == "rtn":
                        for a_ in (ax, ax2):
                            a_.axhline(next(iter(row.values()))["scores"][metric], color="grey", ls="--",
                                       label=f"rtn ({s} samples)")
            lines += [""] + read_off(sel, metric, iters) + [""]
            ax.set_title(f"{task} {b}")
            ax.set_xscale("log")
            ax.set_xlabel("--iters-total (equal compute per method)")
            ax2.set_xlabel("quantization minutes (2 CPU cores)")
            for a_ in (ax, ax2):
                a_.set_ylabel(metric)
                a_.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.results, f"converge_{task}.png"), dpi=90)
        plt.close(fig)
        lines += [f"![{task}](converge_{task}.png)", ""]
    with open(os.path.join(a.results, "CONVERGENCE.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="cls")
    ap.add_argument("--iters", default="300,1000,3000")
    ap.add_argument("--samples", default="256")
    ap.add_argument("--bits", default="W4A4,W4A8")
    ap.add_argument("--methods", default="rtn,adaround,block,pack")
    ap.add_argument("--results", default=HERE)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    a.iters = [int(x) for x in a.iters.split(",")]
    a.samples = [int(x) for x in a.samples.split(",")]
    a.bits, a.methods = a.bits.split(","), a.methods.split(",")
    tasks = a.models.split(",")
    if not a.report_only:
        for t in tasks:
            run_points(a, t)
    report(a, tasks)


if __name__ == "__main__":
    main()
