"""RESULTS.md of a benchmark run: environment, one table and one plot per model."""
from __future__ import annotations

import importlib
import math
import os
import platform
import time

import numpy as np
from rows import BITS, OURS, ROWS
from tasks import TASKS, Task


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def secs(v) -> str:
    return "–" if v is None else f"{v:.2f}" if v < 10 else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "onnx", "onnxruntime", "numpy", "packptq_onnx"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(task: Task, res: dict) -> list[str]:
    rows = res["rows"]
    score_keys = []
    for r in rows.values():
        for k, v in r.get("scores", {}).items():
            if k not in score_keys and isinstance(v, (int, float)):
                score_keys.append(k)
    show_argmax = task.argmax and not any(k.startswith("top1_agree") for k in score_keys)  # not twice
    head = (["row", "bits"] + score_keys + ["cosine to float"] + (["argmax agree"] if show_argmax else [])
            + ["weight bytes", "quantize s", "peak RSS MB", "latency ms", "speed-up", "recon units / iters", "parity"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        row = ROWS[name]
        if r.get("status") != "ok":
            err = (r.get("error") or "?").replace("|", "\\|")
            lines.append(f"| {name} | {row.bits} | failed: {err} |" + " |" * (len(head) - 3))
            continue
        sc = r.get("scores", {})
        par = None if row.kind != "ours" else (
            ("ok" if r.get("parity_ok") else "NO") + f" ({r.get('parity_max_code_diff')} code"
            + (f", {100 * r['parity_over_one']:.3f}% >1" if r.get("parity_over_one") else "")
            + (f"; layers {r['parity_layers']}" if r.get("parity_layers") is not None else "") + ")")
        cells = ([name, row.bits] + [fmt(sc.get(k)) for k in score_keys]
                 + [fmt(r.get("cosine"))] + ([fmt(r.get("argmax_agreement"))] if show_argmax else [])
                 + [fmt(int(round(r["weight_bytes"]))),
                    secs(r.get("quantize_seconds")), fmt(r.get("peak_rss_mb")), fmt(r.get("latency_ms")),
                    f"{r['speedup']:.2f}x",
                    f"{r['recon_units']} / {r['recon_iters']:,}" if r.get("recon_units") else "–", par or "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COLORS = {"float": "black", "rtn": "tab:gray", "adaround": "tab:blue", "block": "tab:orange", "pack": "tab:red",
          "pack-mixed": "tab:purple", "pack-fine": "tab:pink", "pack-mixed-fine": "tab:brown"}


def plot_metrics(task: Task, res: dict) -> list[str]:
    present = [k for r in res["rows"].values() for k, v in r.get("scores", {}).items() if isinstance(v, (int, float))]
    chosen = [m for m in task.metrics if m in present]
    return chosen or present[:1]


def plot(task: Task, res: dict, path: str) -> str | None:
    metrics = plot_metrics(task, res)
    if not metrics:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        series, hollow = {}, set()
        for name, r in res["rows"].items():
            v = r.get("scores", {}).get(metric) if r.get("status") == "ok" else None
            if isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(ROWS[name].method, []).append((r["weight_bytes"], v, ROWS[name]))
        markers = "os^vD<>pP*hX"
        for i, (m, pts) in enumerate(sorted(series.items())):
            if m == "float":
                ax.axhline(pts[0][1], color="black", linestyle=":", linewidth=1)
                ax.plot([pts[0][0]], [pts[0][1]], marker="*", color="black", linestyle="none", label="float")
                drawn = True
                continue
            # the line joins WbAb rows (and mixed); rows with other activation bits are hollow markers
            line = sorted(p for p in pts if p[2].wbits == p[2].abits or p[2].mixed)
            side = [p for p in pts if p not in line]
            hollow.update(f"W{p[2].wbits}A{p[2].abits}" for p in side)
            mk, col = markers[i % len(markers)], COLORS.get(m)
            h = ax.plot([p[0] for p in line], [p[1] for p in line], marker=mk, color=col, label=m,
                        linestyle="-" if len(line) > 1 else "none", alpha=0.85)[0] if line else None
            if side:
                ax.plot([p[0] for p in side], [p[1] for p in side], marker=mk, linestyle="none", alpha=0.85,
                        markerfacecolor="none", color=h.get_color() if h else col,
                        label=None if h else m)
            drawn = True
        ax.set_xscale("log")
        ax.set_xlabel("weight bytes (Conv/Gemm/MatMul weights, log scale)")
        ax.set_ylabel(metric)
        note = f" (hollow: {', '.join(sorted(hollow))})" if hollow else ""
        ax.set_title(f"{task.name}: {metric} vs weight bytes{note}")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8, ncol=2)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LOWER_IS_BETTER = ("cer", "kl")
MIXED_VS_UNIFORM = (("pack-mixed-W4", "pack-W4A4"), ("pack-mixed-fine-W4", "pack-fine-W4A4"),
                    ("pack-mixed-W3", "pack-W3A4"), ("pack-mixed-fine-W3", "pack-fine-W3A4"))


def checks(task: Task, res: dict) -> list[str]:
    """What the issues claim, read off the rows: at each bit width where all four of ours ran, does
    pack >= block > adaround > rtn hold (per plotted metric and cosine); does mixed precision beat
    uniform pack at the same weight bytes; which of ours and onnxruntime's rows is best per bit width."""
    ok = {n: r for n, r in res["rows"].items() if r.get("status") == "ok"}
    metrics = plot_metrics(task, res)

    def raw(name, m):
        return ok[name]["cosine"] if m == "cosine" else ok[name].get("scores", {}).get(m)

    def val(name, m):  # oriented so that larger is better
        v = raw(name, m)
        return None if v is None else -v if m in LOWER_IS_BETTER else v

    def shown(name, m):
        return fmt(raw(name, m))

    out = []
    for w, a in BITS:
        names = [f"{m}-W{w}A{a}" for m in OURS]
        for m in metrics + ["cosine"]:
            if not all(n in ok and val(n, m) is not None for n in names):
                continue
            rtn, ada, blk, pack = (val(n, m) for n in names)
            holds = pack >= blk > ada > rtn
            out.append(f"- W{w}A{a}, {m}: " + ", ".join(f"{o} {shown(n, m)}" for o, n in zip(OURS, names))
                       + f": pack ≥ block > adaround > rtn {'holds' if holds else 'does not hold'}")
    for mixed, uniform in MIXED_VS_UNIFORM:
        for m in metrics:
            if mixed in ok and uniform in ok and val(mixed, m) is not None and val(uniform, m) is not None:
                d = val(mixed, m) - val(uniform, m)
                verdict = "beats" if d > 0 else "ties" if d == 0 else "loses to"
                out.append(f"- {mixed} {verdict} {uniform} on {m}: {shown(mixed, m)} vs {shown(uniform, m)}")
    for (w, a), m in ((b, m) for b in BITS for m in metrics):
        best = {}
        for kind in ("ort", "ours"):
            cands = [n for n in ok if ROWS[n].kind == kind and not ROWS[n].mixed and not ROWS[n].max_pack_blocks
                     and (ROWS[n].wbits, ROWS[n].abits) == (w, a) and val(n, m) is not None]
            if cands:
                best[kind] = max(cands, key=lambda n: val(n, m))
        if len(best) == 2:
            o, u = best["ort"], best["ours"]
            d = val(u, m) - val(o, m)
            verdict = "ahead of" if d > 0 else "level with" if d == 0 else "behind"
            out.append(f"- W{w}A{a}, {m}: best of ours ({u} {shown(u, m)}) is {verdict} "
                       f"the best onnxruntime row ({o} {shown(o, m)})")
    return ["Read off the rows:", ""] + out if out else []


def write_results(all_res: dict, a, command: str) -> str:
    os.makedirs(a.results, exist_ok=True)
    v = versions()
    lines = ["# Benchmark results", "",
             f"Command: `{command}`", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  ",
             f"CPU: {cpu_name()}  ",
             f"Mode: {'quick' if a.quick else 'full'}, seed {a.seed}"
             + "".join(f", {k} {v}" for k, v in (("--calib-samples", a.calib_samples), ("--iters-total", a.iters_total),
                                                  ("--eval-samples", a.eval_samples),
                                                  ("--latency-runs", a.latency_runs)) if v is not None), "",
             "Columns: the model's task metrics on the evaluation data (disjoint from the calibration data); "
             "cosine of all outputs to the float model's and argmax agreement along the last axis; weight bytes "
             "of the Conv/ConvTranspose/Gemm/MatMul weights at their bit width (ours: as quantized, W4 in int8 "
             "containers counts 4 bits; onnxruntime: the stored type); quantize wall time and peak RSS of the "
             "row's process at the end of quantization (includes interpreter and library imports); onnxruntime "
             "latency at batch 1, 1 thread, median, and the float / row latency ratio with both timed alternately "
             "in the same process; parity: our onnxruntime output vs our torch simulation (max code difference at "
             "one 8-bit step of the output range, the share of values more than one code apart, and the worst "
             "layer when each layer is fed onnxruntime's own input); recon units / iters: reconstruction units "
             "(layers, blocks or packs, "
             "with stem and head layers) and the iterations they got in total.", "",
             "Rows: `ort-*` are onnxruntime `quantize_static` QDQ, per-channel int8 weights (symmetric), "
             "activations u8/s8 per tensor, calibrated with MinMax / Percentile (99.999) / Entropy, `-rr` = "
             "reduce_range, W4 rows via TensorQuantOverrides (per-channel QInt4 weights, opset 21, QUInt4 "
             "activations for A4). Ours: `rtn`, `adaround`, `block`, `pack` (equal total reconstruction iterations "
             "for the last three; 8-bit weights in the 7-bit range, the pipeline's default), "
             "`pack-mixed-W4/W3`: pack + mixed precision (weights 2/3/4/8 bits, activations "
             "A4/A8 capped at uniform A4 memory) under the weight bytes of uniform W4 / W3, stem and head "
             "fixed at W4A4 / W3A4 as in the uniform rows; `-fine`: packs of at most 3 blocks "
             "(--max-pack-blocks 3), which gives the allocation more packs to trade between; "
             "`*-fullrange-W8A8`: 8-bit weights in [-128, 127].", ""]
    for name, res in all_res.items():
        task = TASKS[name]
        lines += [f"## {name}: {task.title}", ""]
        if res.get("missing"):
            lines += [f"Not built yet: {res['missing']}.", ""]
            continue
        info, cfg = res["info"], res["cfg"]
        # a data folder made by bench/targets.py has no build.json: its sizes are unknown here
        n_eval, n_calib = info.get("n_eval", "?"), info.get("n_calib", "?")
        if cfg["eval_samples"] and n_eval != "?":
            n_eval = min(n_eval, cfg["eval_samples"])
        if n_calib != "?":
            n_calib = min(n_calib, cfg["calib_samples"])
        lines += [f"Model `{os.path.basename(info['model'])}`; calibration {n_calib}"
                  f" samples, evaluation {n_eval}"
                  f" samples (overlap {info.get('overlap', '?')}); "
                  f"reconstruction iterations in total: {cfg['iters_total']}; "
                  f"latency median of {cfg['latency_runs']} runs.", ""]
        if task.notes:
            lines += [task.notes, ""]
        if not res["rows"]:
            lines += ["No rows selected.", ""]
            continue
        lines += table(task, res)
        notes = [f"- {n}: {'; '.join(r['notes'])}" for n, r in res["rows"].items() if r.get("notes")]
        mixed = [f"- {n}: budget {r['mixed']['budget_bytes']:,.0f} B, (wbits, abits) per pack "
                 f"{fmt(r['mixed']['packs'])}" for n, r in res["rows"].items() if r.get("mixed")]
        if notes or mixed:
            lines += [""] + notes + mixed
        found = checks(task, res)
        if found:
            lines += [""] + found
        png = plot(task, res, os.path.join(a.results, f"bench_{name}.png"))
        if png:
            lines += ["", f"![{name}]({os.path.relpath(png, a.results)})"]
        lines.append("")
    path = os.path.join(a.results, "RESULTS.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path
