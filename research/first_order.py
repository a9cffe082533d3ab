"""Which quantizers hurt the output most? A first-order estimate for every activation quantizer at
once: with the model float, each quantizer's noise d_t = Q(x_t) - x_t is pushed to the outputs by
the Jacobian J_t, and ||J_t d_t||^2 is estimated with random output probes v (E[(v.J_t d_t)^2] =
||J_t d_t||^2): one forward and K backward passes instead of one forward per quantizer.

    python research/first_order.py MODEL.onnx --calib C.npz [--bits 8] [--samples 4] [--top 20]

Prints, per quantizer, the predicted output noise-to-signal ratio as packptq_onnx.guard computes it
(the pipeline's --guard reads the same numbers); compare with research/one_at_a_time.py, which
measures the same thing exactly.
"""
from probe import parser, prepare_rtn

from packptq_onnx import data
from packptq_onnx.guard import estimate


def main():
    a = parser(__doc__, samples=4, top=20).parse_args()
    p = prepare_rtn(a, guard=0.0)
    batches = data.batches(data.take(p.calib, a.samples), p.names, p.plan.run_batch or 1)
    est = estimate(p.gm, p.qls, batches)
    for (name, part), v in sorted(est.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{name:<28}{part:<8} predicted NSR {v:.3e}  (cosine ~ {1 - v / 2:.4f})")
    print(f"sum over {len(est)} quantizers: {sum(est.values()):.4f}")


if __name__ == "__main__":
    main()
