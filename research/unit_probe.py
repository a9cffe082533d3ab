"""Probe: reconstruct one unit of a model alone under several reconstruction settings and print the
loss before learning, the loss learning reached, and whether round-to-nearest was kept.

    python research/unit_probe.py MODEL --calib CALIB --unit pack0 --iters 200 [--bits W4A8]
        [--variants "base;drop_prob=0;lr_scale=0"] [--calib-samples 256] [--batch-size 16] [--learn-first 800]

Units before the probed one stay at round to nearest, or with --learn-first N each learns N iterations
first (under the variant's options), as in a full run. Per layer of a learned unit it prints the share of
rounding variables still undecided (0 < h(V) < 1) when learning stopped. Not a pipeline step: it answers "why did
this unit keep round-to-nearest?" (issue 24).
"""
from __future__ import annotations

import argparse
import copy
import time

from packptq_onnx import reconstruct, state
from packptq_onnx.pipeline import Options, analyse, prepare
from packptq_onnx.reconstruct import ReconOptions, make_units, reconstruct_unit


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--unit", default="pack0")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--bits", default="W4A8")
    ap.add_argument("--variants", default="base;drop_prob=0;lr_scale=0")
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learn-first", type=int, default=0, help="iterations for each unit before the probed one")
    a = ap.parse_args()
    w, ab = (int(x) for x in a.bits[1:].split("A"))
    opts = Options(wbits=w, abits=ab, method="pack", calib_samples=a.calib_samples, batch_size=a.batch_size,
                   recon=ReconOptions(batch_size=a.batch_size))
    p = prepare(a.model, a.calib, opts, log=lambda *_: None)
    an = analyse(p, opts, opts.max_pack_blocks, log=lambda *_: None)
    units = make_units("pack", an.units, an.packs, [q.layer for q in p.qls])
    unit = next(u for u in units if u.name == a.unit)
    print(f"{a.unit}: {len(unit.layers)} layers {unit.layers}")
    saved = state.learned(p.qls)
    for v in a.variants.split(";"):
        o = copy.deepcopy(opts.recon)
        for kv in v.split(","):
            if "=" in kv:
                k, val = kv.split("=")
                setattr(o, k, type(getattr(o, k) or 0.0)(val))
        state.load_learned(p.qls, saved)
        for q in p.qls:
            if q.wq is not None:
                q.wq.round_to_nearest()
        for i, u in enumerate(units[:units.index(unit)] if a.learn_first else []):
            r = reconstruct_unit(p.gm, p.imp.model, p.qls, u, lambda: p.batches(opts), p.n_samples, a.learn_first,
                                 o, reconstruct.unit_seed(0, i), "cpu", None)
            print(f"{v:<24} first {u.name}: before {r.loss_before:.5g}  soft {r.loss_soft}  "
                  f"learned {r.loss_learned:.5g}  kept_rtn {r.kept_rtn}", flush=True)
        t0 = time.time()
        r = reconstruct_unit(p.gm, p.imp.model, p.qls, unit, lambda: p.batches(opts), p.n_samples, a.iters, o,
                             reconstruct.unit_seed(0, units.index(unit)), "cpu", None)
        print(f"{v:<24} before {r.loss_before:.5g}  soft {r.loss_soft:.5g}  learned {r.loss_learned:.5g}  "
              f"kept_rtn {r.kept_rtn}  nonfinite {r.nonfinite_steps}  {time.time() - t0:.0f} s", flush=True)
        if not r.kept_rtn:  # how much of the rounding was still undecided when learning stopped
            for q in p.qls:
                if q.layer.name in unit.layers and q.wq is not None and q.wq.alpha is not None:
                    h = q.wq.h().detach()
                    print(f"    {q.layer.name:<40} {h.numel():>8} weights  h(V) strictly inside (0, 1): "
                          f"{float(((h > 0) & (h < 1)).float().mean()):.3f}  within 0.1 of 0.5: "
                          f"{float(((h - 0.5).abs() < 0.1).float().mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
