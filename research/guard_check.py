"""Does the guard's first-order estimate match measurement? For the activation quantizers the
estimate ranks worst, the output noise-to-signal ratio each causes alone is measured (guard.measure:
one forward pass each, the guard's own output weighting) and printed beside the estimate.

    python research/guard_check.py MODEL.onnx --calib C.npz [--bits 8] [--samples 8] [--top 30]

On the PP-OCRv4 recognizer the estimate is 10-1000x too high (docs/METHOD.md, "Guard for 8-bit
activations"), which is why the guard measures its candidates.
"""
from probe import parser, prepare_rtn

from packptq_onnx import data, guard


def main():
    a = parser(__doc__, samples=8, top=30).parse_args()
    p = prepare_rtn(a, guard=0.0)
    batches = list(data.batches(data.take(p.calib, a.samples), p.names, p.plan.run_batch or 1))
    est = guard.estimate(p.gm, p.qls, batches)
    worst = sorted(est, key=lambda k: -est[k])[:a.top]
    got = guard.measure(p.gm, p.qls, batches, worst)
    for key in worst:
        print(f"{key[0]:<24}{key[1]:<8} predicted {est[key]:.3e}  measured {got[key]:.3e}")


if __name__ == "__main__":
    main()
