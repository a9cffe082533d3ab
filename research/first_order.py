"""Which quantizers hurt the output most? A first-order estimate for every activation quantizer at
once: with the model float, each quantizer's noise d_t = Q(x_t) - x_t is pushed to the outputs by
the Jacobian J_t, and ||J_t d_t||^2 is estimated with random output probes v (E[(v.J_t d_t)^2] =
||J_t d_t||^2): one forward and K backward passes instead of one forward per quantizer.

    python research/first_order.py MODEL.onnx --calib C.npz [--bits 8] [--samples 4] [--probes 8] [--top 20]

Prints, per quantizer, the predicted output noise-to-signal ratio (outputs normalised to unit
energy each); compare with research/one_at_a_time.py, which measures the same thing exactly.
"""
import argparse

import torch

from packptq_onnx import data
from packptq_onnx.pipeline import Options, prepare


def estimate(p, feeds, probes, seed=0):
    """{(layer name, 'input'|'output'): predicted NSR} for every activation quantizer."""
    sites, hooks = {}, []
    for q in p.qls:
        q.quant_w = q.quant_a = False

        def pre(mod, args, q=q):
            if q.aq is not None and args[0].requires_grad:
                args[0].retain_grad()
                sites[(q.layer.name, "input")] = (args[0], (q.aq(args[0]) - args[0]).detach())

        def post(mod, args, out, q=q):
            if q.oq is not None and out.requires_grad:
                out.retain_grad()
                sites[(q.layer.name, "output")] = (out, (q.oq(out) - out).detach())
        hooks += [q.register_forward_pre_hook(pre), q.register_forward_hook(post)]
    gen = torch.Generator().manual_seed(seed)
    total = {}
    try:
        for args in data.batches(feeds, p.names, p.run_batch if p.plan.run_batch else len(feeds[p.names[0]])):
            args = [a.float().requires_grad_() if a.is_floating_point() else a for a in args]
            outs = p.gm(*args)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            for k in range(probes):
                loss = sum((torch.randn(o.shape, generator=gen) * o).sum() / o.detach().norm().clamp_min(1e-12)
                           for o in outs if o.is_floating_point())
                for x, _ in sites.values():
                    x.grad = None
                loss.backward(retain_graph=k < probes - 1)
                for key, (x, d) in sites.items():
                    if x.grad is not None:
                        total[key] = total.get(key, 0.0) + float((x.grad * d).sum() ** 2) / probes
            sites.clear()
    finally:
        for h in hooks:
            h.remove()
        for q in p.qls:
            q.quant_w = q.quant_a = True
    n_out = len(outs)
    batches = -(-len(feeds[p.names[0]]) // (p.run_batch if p.plan.run_batch else len(feeds[p.names[0]])))
    return {k: v / (n_out * batches) for k, v in total.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    p = prepare(a.model, a.calib, Options(wbits=a.bits, abits=a.bits, method="rtn", calib_samples=32))
    est = estimate(p, data.take(p.calib, a.samples), a.probes)
    for (name, part), v in sorted(est.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{name:<28}{part:<8} predicted NSR {v:.5f}  (cosine ~ {1 - v / 2:.4f})")
    print(f"sum over {len(est)} quantizers: {sum(est.values()):.4f}")


if __name__ == "__main__":
    main()
