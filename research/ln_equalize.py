"""Probe: do a transformer's 4-bit LayerNorm outputs gain from per-channel equalisation folded into the
graph? (a measurement, not a pipeline step)

    python research/ln_equalize.py MODEL.onnx --calib C.npz -o OUT.onnx [--alpha 1.0] [--check E.npz]

Writes OUT.onnx, a float model equal to MODEL.onnx (the largest output difference on --check is
printed), in which every LayerNormalization that feeds MatMuls with constant weights and a constant
bias Add gives those MatMuls a centred, evenly scaled copy of its output: per channel c,
x'_c = (x_c - m_c) / r_c with m_c the mid-range and h_c the half-range on the calibration data, and
r_c = (h_c / mean(h)) ** alpha. The copy is a second LayerNormalization with gamma / r and
(beta - m) / r; each MatMul weight row c is multiplied by r_c and its bias gains m @ W. Other readers
of the LayerNorm (a post-LN model's residual Add) keep the original output, so the float function is
unchanged. Quantize OUT.onnx like any model to see what one per-tensor scale on the even copy gives.

Why: on all-MiniLM-L6-v2 (bench/minilm.py) 4-bit activations are the whole W4A4 loss (rtn W4A8 keeps
WordSim 0.734, W8A4 reads 0.476), and quantizing one layer's input at a time ranks the LayerNorm
outputs that feed the FFN worst, then the GELU outputs and the Q/K/V inputs, also LayerNorm outputs
(research/one_at_a_time.py --bits 4).
Results: research/README.md.
"""
import argparse

import numpy as np
import onnx
import onnxruntime as ort
from equalize_probe import channel_ranges
from onnx import helper
from onnx import numpy_helper as nh

from packptq_onnx.folding import consumers, drop_unused_initializers


def sites(g, inits):
    """(LayerNormalization node, [(MatMul, bias Add)]) for every LN whose MatMul readers can take the copy."""
    readers = consumers(g)
    out = []
    for n in g.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3 or not {n.input[1], n.input[2]} <= set(inits):
            continue
        mms = []
        for c in readers.get(n.output[0], []):
            if c.op_type != "MatMul" or c.input[0] != n.output[0] or c.input[1] not in inits:
                continue
            after = readers.get(c.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add" and any(x in inits for x in after[0].input):
                mms.append((c, after[0]))
        if mms:
            out.append((n, mms))
    return out


def equalize(model, feeds, alpha: float):
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    found = sites(g, inits)
    ranges = channel_ranges(model, {n.output[0]: -1 for n, _ in found}, feeds, batch=64)
    for n, mms in found:
        k = n.output[0]
        lo, hi = ranges[k]
        mid, half = (hi + lo) / 2, np.maximum((hi - lo) / 2, 1e-6)
        r = (half / half.mean()) ** alpha
        print(f"{n.name}: {len(mms)} MatMul readers, "
              f"channel half-range max / median {half.max() / np.median(half):.1f}")
        gamma, beta = nh.to_array(inits[n.input[1]]), nh.to_array(inits[n.input[2]])
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        copy = helper.make_node("LayerNormalization", [n.input[0], k + "_eq_scale", k + "_eq_bias"], [k + "_eq"],
                                name=n.name + "_eq", **attrs)
        g.initializer.extend([nh.from_array((gamma / r).astype(np.float32), k + "_eq_scale"),
                              nh.from_array(((beta - mid) / r).astype(np.float32), k + "_eq_bias")])
        g.node.insert(list(g.node).index(n) + 1, copy)
        for mm, add in mms:
            w = nh.to_array(inits[mm.input[1]])
            bias = next(x for x in add.input if x in inits)
            b = nh.to_array(inits[bias])
            # names per reader: a weight or bias shared by two readers (tied weights) gets one copy each
            wn, bn = f"{mm.input[1]}_eq_{mm.name}", f"{bias}_eq_{mm.name}"
            g.initializer.extend([nh.from_array((r[:, None] * w).astype(np.float32), wn),
                                  nh.from_array((b + mid @ w).astype(np.float32), bn)])
            mm.input[0], mm.input[1] = k + "_eq", wn
            add.input[list(add.input).index(bias)] = bn
    drop_unused_initializers(g)
    return model, len(found)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="npz with one array per model input")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--check", help="npz to compare float outputs on (default: the calibration file)")
    a = ap.parse_args()
    model = onnx.load(a.model)
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    with np.load(a.calib) as z:
        feeds = {k: z[k] for k in names}
    model, n = equalize(model, feeds, a.alpha)
    onnx.save(model, a.output)
    with np.load(a.check or a.calib) as z:
        check = {k: z[k][:256] for k in names}
    ref = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"]).run(None, check)
    got = ort.InferenceSession(a.output, providers=["CPUExecutionProvider"]).run(None, check)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(ref, got))
    print(f"{n} LayerNorms equalised; float outputs differ by at most {diff:.2e} "
          f"(largest output magnitude {max(float(np.abs(x).max()) for x in ref):.3g})")


if __name__ == "__main__":
    main()
