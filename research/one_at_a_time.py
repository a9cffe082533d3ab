"""Which quantizers lose the task? Quantize one layer's weights, input or output alone (torch simulation,
RTN at the given bits) and score the model against float with the task metric and the output cosine.

    python research/one_at_a_time.py MODEL.onnx --calib C.npz --eval E.npz --task segment [--bits 8] [--top 12]

A probe, not a pipeline step: it reads the same calibration the product uses (pipeline.prepare) and
prints the worst quantizers first. The rule changes it motivated are measured in bench/COVERAGE.md.
"""
import numpy as np
import torch
from probe import parser, prepare_rtn

from packptq_onnx import convert, data, shapes, state, tasks
from packptq_onnx.validate import cosine, input_hw


def main():
    ap = parser(__doc__, samples=8, top=12)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--task", choices=tasks.TASKS)
    a = ap.parse_args()
    p = prepare_rtn(a)
    feeds, _ = data.load(a.eval, shapes.specs(p.imp.original))
    feeds = data.take(feeds, a.samples)
    qls, hw = p.qls, input_hw(feeds)
    def run(active=None):  # active: (layer index, part) quantized alone; None: nothing; "all": everything
        with state.snapshot(qls), torch.no_grad():
            if active is None or active == "all":
                state.set_quant(qls, active == "all", active == "all")
            else:
                state.set_quant(qls, False, False)
                state.isolate(qls[active[0]], active[1])
                state.set_quant([qls[active[0]]], True, True)
            return convert.torch_run(p.gm, feeds, p.names, batch_size=p.run_batch)

    def score(ref, got):  # samples on their own axis: a CTC recognizer's [T, N, C] has them on axis 1
        axis = data.sample_axis([ref[0].shape], [len(next(iter(feeds.values())))])
        s = tasks.score(a.task, ref, got, hw, batch_axis=axis)["task_agreement"] if a.task else float("nan")
        return s, min(cosine(r, g) for r, g in zip(ref, got))

    ref = run(None)
    print(f"all quantized: task {score(ref, run('all'))[0]:.4f}, cosine {score(ref, run('all'))[1]:.5f}")
    rows = []
    for i, q in enumerate(qls):
        for part, present in (("weight", q.wq), ("input", q.aq), ("output", q.oq)):
            if present is not None:
                rows.append((*score(ref, run((i, part))), q.layer.name, q.layer.op, part))
    for s, c, name, op, part in sorted(rows, key=lambda r: (r[0] if a.task else r[1], r[1]))[:a.top]:
        print(f"{name:<28}{op:<14}{part:<8} task {s:.4f}  cosine {c:.5f}")
    run("all")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
