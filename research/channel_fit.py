"""How well does one per-tensor 8-bit quantizer hold each channel? Per quantizer of a calibrated model:
the layer's output with only its input quantized (float weights) vs float, error per output channel
relative to that channel's energy; and the output quantizer's own per-channel error.

    python research/channel_fit.py MODEL.onnx --calib C.npz [--bits 8] [--samples 4] [--top 20]

A probe for the rule in layers / calibrate that keeps such inputs float (docs/METHOD.md, "Output quantizers").
"""
import numpy as np
import torch
from probe import parser, prepare_rtn

from packptq_onnx import data


def per_channel_db(ref, got, axis):
    d = (ref - got).double().transpose(0, axis).reshape(ref.shape[axis], -1)
    r = ref.double().transpose(0, axis).reshape(ref.shape[axis], -1)
    e, s = (d ** 2).sum(1), (r ** 2).sum(1)
    live = s > 1e-12 * s.max()
    return 10 * torch.log10(s[live] / e[live].clamp_min(1e-30))


def main():
    a = parser(__doc__, samples=4, top=20).parse_args()
    p = prepare_rtn(a)
    rows = []
    hooks = []
    for q in p.qls:
        def hook(mod, args, q=q):
            x = args[0]
            axis = x.dim() - 1 if isinstance(q.inner, torch.nn.Linear) or q.layer.op in ("MatMul", "Gemm") else 1
            with torch.no_grad():
                if q.param_path is None:
                    return
                y = q.inner(x, *args[1:])
                if q.aq is not None:
                    yq = q.inner(q.aq(x), *args[1:])
                    db = per_channel_db(y, yq, axis)
                    rows.append((float(db.median()), float(db.min()), q.layer.name, "input"))
                if q.oq is not None:
                    db = per_channel_db(y, q.oq(y), axis)
                    rows.append((float(db.median()), float(db.min()), q.layer.name, "output"))
        hooks.append(q.register_forward_pre_hook(hook))
    with torch.no_grad():
        batch = p.plan.run_batch or a.samples
        for args in data.batches(data.take(p.calib, a.samples), p.names, batch):
            p.gm(*args)
            break
    for h in hooks:
        h.remove()
    for med, worst, name, part in sorted(rows)[:a.top]:
        print(f"{name:<28}{part:<8} per-channel SQNR median {med:6.1f} dB, worst {worst:6.1f} dB")
    meds = np.array([r[0] for r in rows])
    print(f"{len(rows)} quantizers; median over them {np.median(meds):.1f} dB")


if __name__ == "__main__":
    main()
