"""Issue 27's table: low-rank compensation and the focus quantizer against plain pack, with paired
bootstrap intervals, from the rows bench/run.py cached.

    python bench/transformer_table.py --out OUT [--tag TAG,...] [--tag-vit TAG,...] [--md bench/TRANSFORMERS.md]

For each bit width, every `pack-*-W{b}A{b}` row is compared with `pack-W{b}A{b}` of the same run
on the same evaluation items: MiniLM's SimLex-999 / WordSim-353 Spearman rho (word pairs resampled),
the digits ViT's accuracy (images resampled). A difference of 0.03 in rho on WordSim's 353 pairs is
within noise, so each difference gets a 90% interval from 2000 paired bootstrap resamples (the same
resample for both rows). The exported models are rerun in onnxruntime; their scores equal the rows'.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

N_BOOT = 2000
VARIANTS = ("focus", "lrauto", "lr8", "lr32", "lrauto-focus", "lrbranch", "lrbranch-focus")


def spearman_boot(sim_a, sim_b, human, idx) -> np.ndarray:
    """rho(sim_a) - rho(sim_b) on each resample of pairs (rows of idx)."""
    from scipy.stats import rankdata

    def rho(x, h):
        rx = np.apply_along_axis(rankdata, 1, x)
        rh = np.apply_along_axis(rankdata, 1, h)
        rx -= rx.mean(1, keepdims=True)
        rh -= rh.mean(1, keepdims=True)
        return (rx * rh).sum(1) / np.sqrt((rx ** 2).sum(1) * (rh ** 2).sum(1))
    return rho(sim_a[idx], human[idx]) - rho(sim_b[idx], human[idx])


def minilm_items(out: str, tag: str, rows: list[str]) -> dict:
    """row -> {benchmark: pair similarities}, plus "_human"."""
    import minilm
    info = json.load(open(os.path.join(out, "minilm", "data.json")))
    with np.load(info["pairs"]) as z:
        pairs = {k: tuple(z[f"{k}_{i}"] for i in range(3)) for k in info["benchmarks"]}
    res = {"_human": {k: v[2] for k, v in pairs.items()}}
    for r in rows:
        path = info["model"] if r == "float" else os.path.join(out, "minilm", f"models-{tag}", f"{r}.onnx")
        if not os.path.exists(path):
            continue
        emb = np.asarray(minilm.embed(path, info["eval"]))
        res[r] = {k: minilm._cos_rows(emb[ia], emb[ib]) for k, (ia, ib, _) in pairs.items()}
    return res


def vit_items(out: str, tag: str, rows: list[str]) -> dict:
    """row -> {"accuracy": per-image correctness}."""
    import onnxruntime as ort
    info = json.load(open(os.path.join(out, "vit", "data.json")))
    ev = np.load(info["eval"])
    res = {}
    for r in rows:
        path = info["model"] if r == "float" else os.path.join(out, "vit", f"models-{tag}", f"{r}.onnx")
        if not os.path.exists(path):
            continue
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = s.run(None, {"x": ev["x"]})[0]
        res[r] = {"accuracy": (logits.argmax(-1) == ev["labels"]).astype(np.float64)}
    return res


def compare(items: dict, base: str, row: str, seed: int = 0) -> dict:
    """metric -> (value of row, value of base, difference, 5th and 95th percentile of the difference)."""
    from scipy.stats import spearmanr
    rng = np.random.default_rng(seed)
    out = {}
    for k, a in items[row].items():
        b = items[base][k]
        idx = rng.integers(len(a), size=(N_BOOT, len(a)))
        if "_human" in items:
            h = items["_human"][k]
            va, vb = float(spearmanr(a, h)[0]), float(spearmanr(b, h)[0])
            d = spearman_boot(a, b, h, idx)
        else:
            va, vb = float(a.mean()), float(b.mean())
            d = a[idx].mean(1) - b[idx].mean(1)
        out[k] = (va, vb, va - vb, float(np.percentile(d, 5)), float(np.percentile(d, 95)))
    return out


def comparisons(items: dict, bits: list[str]) -> list[tuple[str, str, dict]]:
    """(row, its plain pack row, compare()) for every row present, plain pack first at each width."""
    out = []
    for b in bits:
        base = f"pack-{b}"
        if base in items:
            out += [(row, base, compare(items, base, row)) for row in [base] + [f"pack-{v}-{b}" for v in VARIANTS]
                    if row in items]
    return out


def table(comps: list, rows_meta: dict) -> list[str]:
    lines = ["| row | metric | value | plain pack | difference | 90% interval | latency ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for row, base, res in comps:
        meta = rows_meta.get(row, {})
        lat, sp = meta.get("latency_ms"), meta.get("speedup")
        for k, (va, vb, d, lo, hi) in res.items():
            diff = "–" if row == base else f"{d:+.4f}"
            ci = "–" if row == base else f"[{lo:+.4f}, {hi:+.4f}]"
            lines.append(f"| {row} | {k} | {va:.4f} | {vb:.4f} | {diff} | {ci} | "
                         f"{lat if lat is not None else '–'} | {f'{sp:.2f}x' if sp else '–'} |")
    return lines


def summary(per_tag: list[list]) -> list[str]:
    """Mean difference to plain pack over the runs (seeds), and in how many runs it was above 0."""
    acc: dict = {}
    for comps in per_tag:
        for row, base, res in comps:
            if row != base:
                for k, (_, _, d, _, _) in res.items():
                    acc.setdefault((row, k), []).append(d)
    lines = ["| row | metric | runs | mean difference | runs above plain pack |", "|---|---|---|---|---|"]
    for (row, k), ds in acc.items():
        lines.append(f"| {row} | {k} | {len(ds)} | {np.mean(ds):+.4f} | {sum(d > 0 for d in ds)} of {len(ds)} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="bench/run.py's --out")
    ap.add_argument("--tag", help="MiniLM's configuration tags, comma-separated (folders under OUT/minilm)")
    ap.add_argument("--tag-vit", help="the digits ViT's configuration tags, comma-separated (folders under OUT/vit)")
    ap.add_argument("--md", default=None, help="write the tables here (markdown)")
    a = ap.parse_args()
    bits = ["W8A8", "W4A4", "W3A3"]
    out = []
    for task, tags, fn in (("minilm", a.tag, minilm_items), ("vit", a.tag_vit, vit_items)):
        per_tag, runs = [], []
        for tag in (tags or "").split(","):
            if not tag:
                continue
            rdir = os.path.join(a.out, task, tag)
            meta = {f[:-5]: json.load(open(os.path.join(rdir, f))) for f in sorted(os.listdir(rdir))
                    if f.endswith(".json")}
            seed = next((m["config"].get("seed") for m in meta.values() if m.get("config")), None)
            runs.append((seed if seed is not None else -1, tag, meta))
        for seed, tag, meta in sorted(runs, key=lambda r: r[0]):  # seed 0 first
            comps = comparisons(fn(a.out, tag, sorted(meta)), bits)
            per_tag.append(comps)
            out += [f"## {task}, seed {seed} ({tag})", ""] + table(comps, meta) + [""]
        if len(per_tag) > 1:
            out += [f"## {task}: over the {len(per_tag)} runs", ""] + summary(per_tag) + [""]
    text = "\n".join(out)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
