"""Where onnxruntime spends a model's time: kernel microseconds per op type, from its profiler.

    python bench/op_profile.py --calib C.npz MODEL.onnx [MODEL2.onnx ...] [--runs 300]

Batch 1, one thread, the CPU execution provider; each model is warmed up in a first session, then
`--runs` calls of a second one are profiled and every node's kernel time is summed by op type and
divided by the runs. Kernel time leaves out the session's own overhead between nodes, so a model's
total here is below its wall latency (bench/LATENCY.md). Prints one markdown table per model.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import onnxruntime as ort
from feeds import load_feeds


def profile(path: str, feeds: dict, runs: int) -> tuple[float, dict]:
    """(kernel us per run, {op type: (nodes, us per run)}), op types by time, largest first."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        warm = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for _ in range(30):
            warm.run(None, feeds)
        so.enable_profiling = True  # session-creation events land in the file too: the Node filter below drops them
        so.profile_file_prefix = os.path.join(tmp, "p")
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, feeds)
        with open(s.end_profiling()) as f:
            events = json.load(f)
    us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            us[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    return sum(us.values()) / runs, {k: (calls[k] // runs, v / runs) for k, v in us.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--calib", required=True, help=".npz of model inputs, as quantize reads it; sample 1 is used")
    ap.add_argument("--runs", type=int, default=300)
    a = ap.parse_args()
    for path in a.models:
        feeds, _ = load_feeds(a.calib, path, 1)
        total, ops = profile(path, feeds, a.runs)
        print(f"\n{os.path.basename(path)}: {total:.0f} us kernel time per run\n")
        print("| op | nodes | us per run |\n|---|---|---|")
        for op, (n, t) in ops.items():
            print(f"| {op} | {n} | {t:.1f} |")


if __name__ == "__main__":
    main()
