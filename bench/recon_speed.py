"""What one reconstruction iteration costs against the unit's own float forward + backward pass.

    python bench/recon_speed.py MODEL.onnx --calib CALIB.npz [--method pack|block|adaround]
                                [--wbits 4] [--abits 4] [--iters 20] [--batch-size 32] [--samples 64]

For every unit: the time of `--iters` reconstruction iterations (AdaRound + LSQ + QDrop, the loss,
backward, the optimiser steps, batches drawn from the unit cache) less the time of the same unit
reconstructed with 0 iterations (the captures and the before/after evaluations), per iteration;
beside it, the float unit's forward + backward on a batch of the same size (inputs requiring
gradient, quantizers off), median of 5, without and with its weights' gradients (AdaRound learns
per weight, so an iteration computes them; a float training step does too). The ratio is what the
engine adds over the work itself; issue 24 asks to cut it. Prints a markdown table and the median
ratio per unit kind. --compile: the compiled fake-quant kernels (ReconOptions.compile), timed on a
second run of each unit, so that compiling is not counted. --row-major: units learn in row-major
layout (ReconOptions.channels_last off, the engine before channels_last); the last column pair
times the float unit in channels_last, the layout reconstruction uses on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from packptq_onnx import data, state, unitcache
from packptq_onnx.onnx_import import parse_input_shape
from packptq_onnx.pipeline import Options, ReconOptions, analyse, find_units, prepare
from packptq_onnx.reconstruct import make_units, reconstruct_unit, subgraph
from packptq_onnx.unitcache import capture


def kind(name: str) -> str:
    return "pack" if name.startswith("pack") else "block" if name.startswith("block") else "layer"


def float_pass(p, unit, batch, repeats: int = 5, weight_grads: bool = False, channels_last: bool = False) -> float:
    """Median seconds of the float unit's forward + backward on `batch` samples; with weight_grads,
    the gradients of its layers' weights too (a float training step's backward); with channels_last,
    4-D inputs in that layout (what reconstruction runs on CPU)."""
    sub, in_nodes, _ = subgraph(p.gm, p.imp.model, unit)
    own = [q.weight for q in p.qls if q.layer.name in set(unit.layers) and q.layer.has_weight]
    for w in own:
        w.requires_grad_(weight_grads)
    feeds = data.take(p.calib, batch)
    with state.quantized(p.qls, only=[]):
        arrays = capture(p.gm, data.batches(feeds, p.names, batch), in_nodes, None)
        xs = [torch.from_numpy(np.ascontiguousarray(a[0])) if isinstance(a, list) else torch.from_numpy(a)
              for a in arrays]
        if channels_last:
            xs = [unitcache.channels_last(x) for x in xs]
        times = []
        for _ in range(repeats):
            inp = [x.clone().requires_grad_() if x.is_floating_point() else x for x in xs]
            t0 = time.perf_counter()
            y = sub(*inp)
            loss = (y if torch.is_tensor(y) else y[0]).float().pow(2).mean()
            if loss.requires_grad:
                loss.backward()
            times.append(time.perf_counter() - t0)
    for w in own:
        w.requires_grad_(False)
        w.grad = None
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", default="pack", choices=["adaround", "block", "pack"])
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--input-shape", action="append", default=[])
    ap.add_argument("--compile", action="store_true", help="compiled fake-quant kernels (ReconOptions.compile)")
    ap.add_argument("--row-major", action="store_true", help="units learn row-major (ReconOptions.channels_last off)")
    ap.add_argument("--no-keep-heap", action="store_true", help="glibc's default heap while learning "
                    "(ReconOptions.keep_heap off)")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # once, before any work
    shapes = dict(parse_input_shape(s) for s in a.input_shape)
    o = Options(wbits=a.wbits, abits=a.abits, method=a.method, calib_samples=a.samples, batch_size=a.batch_size,
                recon=ReconOptions(batch_size=a.batch_size, compile=a.compile, channels_last=not a.row_major,
                                   keep_heap=not a.no_keep_heap),
                input_shapes=shapes, guard=0.0)
    p = prepare(a.model, a.calib, o, log=lambda *_: None)
    layers = [q.layer for q in p.qls]
    units_struct, packs = (find_units(p), None) if a.method != "adaround" else (None, None)
    if a.method == "pack":
        packs = analyse(p, o, units=units_struct).packs
    units = make_units(a.method, units_struct, packs, layers)
    batches = lambda: p.batches(o)  # noqa: E731
    rows = []
    for i, u in enumerate(units):
        runs = {}
        for iters in (0, a.iters) + ((a.iters,) if a.compile else ()):  # compiled: the second run, compiled
            with state.snapshot(p.qls):
                t0 = time.perf_counter()
                reconstruct_unit(p.gm, p.imp.model, p.qls, u, batches, p.n_samples, iters, o.recon, i, "cpu", None)
                runs[iters] = time.perf_counter() - t0
        per_iter = max(runs[a.iters] - runs[0], 0.0) / a.iters
        bs = min(a.batch_size, p.n_samples)
        fl, flw = float_pass(p, u, bs), float_pass(p, u, bs, weight_grads=True)
        flc = float_pass(p, u, bs, weight_grads=True, channels_last=True)
        rows.append((u.name, kind(u.name), len(u.layers), per_iter, fl, per_iter / fl if fl > 0 else float("nan"),
                     flw, per_iter / flw if flw > 0 else float("nan"), flc))
    print(f"{a.model}: {a.method} W{a.wbits}A{a.abits}, batch {a.batch_size}, {a.iters} iterations per unit, "
          f"{torch.get_num_threads()} threads" + (", compiled fake-quant" if a.compile else "")
          + (", row-major" if a.row_major else ", channels_last") + (", glibc heap" if a.no_keep_heap else ""))
    print("| unit | kind | layers | iteration ms | float fwd+bwd ms | ratio | with weight grads ms | ratio "
          "| same, channels_last ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, k, n, it, fl, r, flw, rw, flc in rows:
        print(f"| {name} | {k} | {n} | {1e3 * it:.1f} | {1e3 * fl:.1f} | {r:.1f} | {1e3 * flw:.1f} | {rw:.1f} "
              f"| {1e3 * flc:.1f} | {it / flc if flc > 0 else float('nan'):.1f} |")
    for k in ("layer", "block", "pack"):
        rs = [r[5] for r in rows if r[1] == k]
        if rs:
            print(f"median ratio, {k} units: {statistics.median(rs):.1f} ({len(rs)} units)")
    it_sum, fl_sum, flw_sum, flc_sum = (sum(r[i] for r in rows) for i in (3, 4, 6, 8))
    print(f"all units, one iteration each: {1e3 * it_sum:.0f} ms against {1e3 * fl_sum:.0f} ms float "
          f"fwd+bwd, ratio {it_sum / fl_sum:.2f}; against {1e3 * flw_sum:.0f} ms with weight gradients, "
          f"ratio {it_sum / flw_sum:.2f}; against {1e3 * flc_sum:.0f} ms with weight gradients in channels_last, "
          f"ratio {it_sum / flc_sum:.2f}")


if __name__ == "__main__":
    main()
