"""Giant packs: accuracy against cost for packs capped at K blocks (issue 24, item 5).

    python bench/pack_cap.py --out DIR [--models effnet,cls] [--iters-total 3000] [--samples 256]
                             [--bits W4A8,W4A4] [--report-only]

The packing rule cuts before each block whose score is the lowest of those left, so a network whose
early block scores lowest becomes one pack (EfficientNet-Lite0: 17 of its 23 blocks). Each point is
a bench/run.py row at one `--iters-total` (equal multiply-accumulates in every row): block, pack with
no cap, and pack-cap{2,4,8} (`--max-pack-blocks K`). Writes bench/PACK_CAP.md: per model and bits,
the largest pack, the task metric, quantization and reconstruction minutes, the slowest unit, the
largest unit cache (rows made since the report has it) and the peak RSS of the row's process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from converge import key_metric, points  # noqa: E402
from rows import CAPS  # noqa: E402

# pack-nocap: Pack-PTQ's rule; pack: the product's default (no cap until the default became 4 blocks,
# so `pack` rows made before then are uncapped: the table's "largest unit" column tells)
METHODS = ["block"] + [f"pack-cap{k}" for k in CAPS] + ["pack-nocap", "pack"]


def run(a, task: str) -> None:
    rows = ",".join(f"{m}-{b}" for m in METHODS for b in a.bits)
    cmd = [sys.executable, os.path.join(HERE, "run.py"), "--out", a.out, "--models", task, "--rows", rows,
           "--calib-samples", str(a.samples), "--iters-total", str(a.iters_total), "--latency-runs", "5",
           "--results", os.path.join(a.out, "results-pack-cap")]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)


def table(a, task: str) -> list[str]:
    metric = key_metric(task)
    pts = [p for p in points(a.out, task, METHODS) if p["config"]["iters_total"] == a.iters_total
           and p["config"]["calib_samples"] == a.samples]
    out = []
    for b in a.bits:
        sel = {p["method"]: p for p in pts if p["row"].endswith(f"-{b}")}
        if not sel:
            continue
        out += [f"**{task} {b}** ({metric})", "",
                "| rows | largest unit (blocks) | units | " + metric + " | quantize min | reconstruct min | "
                "slowest unit min | largest unit cache MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        for m in METHODS:
            p = sel.get(m)
            if p is None:
                continue
            largest = 1 if m == "block" else max(p.get("pack_blocks") or [0])
            rs = p.get("recon_seconds")
            us = p.get("recon_unit_seconds") or []
            cache = max(p["recon_cache_mb"]) if p.get("recon_cache_mb") else None
            out.append(f"| {m} | {largest} | {p.get('recon_units', '–')} | {p['scores'][metric]:.4f} | "
                       f"{p['quantize_seconds'] / 60:.1f} | {rs / 60 if rs else float('nan'):.1f} | "
                       f"{max(us) / 60 if us else float('nan'):.1f} | {'–' if cache is None else f'{cache:.0f}'} | "
                       f"{p['peak_rss_mb']:.0f} |")
        out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="effnet,cls")
    ap.add_argument("--iters-total", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--bits", default="W4A8,W4A4")
    ap.add_argument("--results", default=HERE)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    a.bits = a.bits.split(",")
    tasks = a.models.split(",")
    if not a.report_only:
        for t in tasks:
            run(a, t)
    lines = ["# Packs capped at K blocks: accuracy against cost (issue 24, item 5)", "",
             f"Made by `python bench/pack_cap.py --out DIR --models {','.join(tasks)} --iters-total {a.iters_total} "
             f"--samples {a.samples} --bits {','.join(a.bits)}` (2 CPU cores; rows cached as bench/run.py rows). "
             "Every row spends the same multiply-accumulates (`--iters-total`). `pack-capK`: "
             "`--max-pack-blocks K`; block: every block its own unit; pack-nocap: `--max-pack-blocks 0`, the paper's "
             "rule; pack: the product's default when the row was made (uncapped until it became 4 blocks: the "
             "largest unit column tells).", ""]
    for t in tasks:
        lines += table(a, t)
    with open(os.path.join(a.results, "PACK_CAP.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
