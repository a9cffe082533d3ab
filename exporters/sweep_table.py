"""A sweep's results: results.md (one table per model), results.json, and <model>.png (task metric
vs weight bytes and vs latency, one line per method, the Pareto front marked)."""
from __future__ import annotations

import os

from packptq_onnx.exporters import files

from packptq_onnx.errors import UsageError

COLUMNS = (("job", "id", "{}"), ("method", "method", "{}"), ("W/A", None, None), ("metric", "metric", "{:.4f}"),
           ("cosine", "cosine", "{:.4f}"), ("weights kB", "weight_bytes", "kB"), ("latency ms", "latency_ms", "{:.3f}"),
           ("× float", "speedup", "{:.2f}"), ("parity codes", "parity_max_code_diff", "{}"),
           ("seconds", "seconds", "{:.0f}"), ("front", "front", "{}"))


def front(rows: list, cost: str = "weight_bytes") -> list:
    """The rows (ok, with a metric and a cost) that no other row beats: at most the cost and at least
    the metric, and strictly better in one of the two."""
    pts = [r for r in rows if r.get("status") == "ok" and r.get("metric") is not None and r.get(cost) is not None]
    return [p for p in pts if not any(q is not p and q[cost] <= p[cost] and q["metric"] >= p["metric"]
                                      and (q[cost] < p[cost] or q["metric"] > p["metric"]) for q in pts)]


def pareto(rows: list) -> None:
    """Mark each row's place on the weight-bytes front (the table's column)."""
    on = {id(r) for r in front(rows)}
    for r in rows:
        r["front"] = id(r) in on


def _cell(r: dict, key, fmt) -> str:
    if key is None:
        return f"W{r['wbits']}A{r['abits']}" if "wbits" in r else ""
    v = r.get(key)
    if v is None or (key == "front" and r.get("status") != "ok"):
        return ""
    if key == "front":
        return "*" if v else ""
    return f"{v / 1e3:.1f}" if fmt == "kB" else fmt.format(v)


def markdown(rows: list) -> str:
    out = ["# Sweep results", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        names = {r.get("metric_name") for r in mine if r.get("metric_name")}
        out += [f"## {model}", "", f"metric: {', '.join(sorted(names)) or 'none'}; front: no other job has "
                "fewer or equal weight bytes and a higher or equal metric", ""]
        out.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for r in sorted(mine, key=lambda r: (r.get("status") != "ok", r.get("weight_bytes") or 0, r["id"])):
            if r.get("status") == "ok":
                out.append("| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |")
            else:
                out.append(f"| {r['id']} | failed: {r.get('error', '?')} |" + " |" * (len(COLUMNS) - 2))
        out.append("")
    return "\n".join(out)


def plot(path: str, model: str, rows: list) -> None:
    from packptq_onnx.exporters.plots import _plt, _save

    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("metric") is not None]
    keys = [("weight_bytes", "weight kB", 1e3)] + ([("latency_ms", "latency ms (batch 1, 1 thread)", 1.0)]
                                                  if all(r.get("latency_ms") for r in ok) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], keys):
        for m in dict.fromkeys(r["method"] for r in ok):
            pts = sorted((r[key] / scale, r["metric"]) for r in ok if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        best = sorted((r[key] / scale, r["metric"]) for r in front(ok, key))
        ax.plot([p[0] for p in best], [p[1] for p in best], "o", ms=12, mfc="none", mec="k", label="front")
        ax.set_xlabel(label)
        ax.set_ylabel(ok[0].get("metric_name", "metric") if ok else "metric")
    axes[0][0].set_title(model)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def write(rows: list, out: str, log=print) -> list:
    """results.md, results.json and a PNG per model (when matplotlib is there); returns the paths."""
    for model in dict.fromkeys(r["model"] for r in rows):
        pareto([r for r in rows if r["model"] == model])
    md, js = os.path.join(out, "results.md"), os.path.join(out, "results.json")
    files.save_text(markdown(rows) + "\n", md)
    files.save_json({"jobs": rows}, js)
    paths = [md, js]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        if not any(r.get("status") == "ok" and r.get("metric") is not None for r in mine):
            continue
        path = os.path.join(out, f"{model}.png")
        try:
            plot(path, model, mine)
        except UsageError as exc:
            log(f"note: no plot ({exc})")
            break
        paths.append(path)
    return paths
