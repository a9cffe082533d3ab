"""Does a quantized model clip some inputs more than its calibration data? For every activation
QuantizeLinear of an exported QDQ model, the share of the values it reads that lie outside the range
it can write, measured on several data sets side by side (calibration data, then groups of the eval
data). A group whose shares sit far above calibration's would point at ranges learned on data unlike it.

    python research/clip_share.py OUT.onnx --data calib=calib.npz:0:256:4 --data flower=eval.npz:358:429

Outside means above the top of the range, or below its bottom where the bottom is below zero: a range
that starts at zero stands for a Relu the export folded into the quantizer, and the negatives it cuts
are the Relu's. Runs onnxruntime on the exported model itself, so the values are the deployed ones."""
import argparse

import numpy as np
import onnx
from onnx import numpy_helper

from packptq_onnx import data, runtime, shapes


def quantizers(model: onnx.ModelProto) -> list[tuple[str, float, float, int]]:
    """(tensor read, lowest value, highest value, levels) for each activation QuantizeLinear."""
    g = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    const.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    clip_of = {n.input[0]: n for n in g.node if n.op_type == "Clip" and len(n.input) == 3
               and n.input[1] in const and n.input[2] in const}
    out = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in const:
            continue
        scale = float(np.asarray(const[n.input[1]]).reshape(-1)[0])
        zp = np.asarray(const[n.input[2]]) if len(n.input) > 2 else np.zeros(1, np.uint8)
        info = np.iinfo(zp.dtype)
        lo, hi = int(info.min), int(info.max)
        clip = clip_of.get(n.output[0])
        if clip is not None:  # the b-bit range below 8 bits (exporters/qdq.py)
            lo, hi = int(const[clip.input[1]]), int(const[clip.input[2]])
        z = int(zp.reshape(-1)[0])
        out.append((n.input[0], scale * (lo - z), scale * (hi - z), hi - lo + 1))
    return out


def shares(model: onnx.ModelProto, qs: list, feeds: dict, batch: int = 16) -> dict:
    """tensor -> share of its values outside its quantizer's range, over the feeds."""
    tensors = list(dict.fromkeys(q[0] for q in qs))
    sess = runtime.session(runtime.with_outputs(model, tensors))
    count = dict.fromkeys(tensors, 0)
    size = dict.fromkeys(tensors, 0)
    n = data.n_samples(feeds)
    for i in range(0, n, batch):
        got = dict(zip(tensors, sess.run(tensors, {k: v[i:i + batch] for k, v in feeds.items()})))
        for t, lo, hi, _ in qs:
            v = got[t]
            count[t] += int(np.count_nonzero((v > hi) | ((v < lo) & (lo < 0))))
            size[t] += v.size
    return {t: count[t] / size[t] for t in tensors}


def load_group(spec: str, model: onnx.ModelProto) -> tuple[str, dict]:
    """'label=path[:start:stop[:step]]' -> (label, feeds of those samples)."""
    label, _, rest = spec.partition("=")
    path, *span = rest.split(":")
    feeds, _ = data.load(path, shapes.specs(model))
    if span:
        cut = slice(*(int(v) if v else None for v in span[:3]))
        feeds = {k: v[cut] for k, v in feeds.items()}
    return label, feeds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", action="append", required=True, help="label=file.npz[:start:stop[:step]]; repeat")
    ap.add_argument("--samples", type=int, default=64, help="at most this many samples per group")
    a = ap.parse_args()
    model = onnx.load(a.model)
    qs = quantizers(model)
    cols = {}
    for spec in a.data:
        label, feeds = load_group(spec, model)
        cols[label] = shares(model, qs, {k: v[:a.samples] for k, v in feeds.items()})
    print(f"{'tensor (% outside the range)':56s} levels " + " ".join(f"{c[:9]:>9s}" for c in cols))
    for t, _, _, levels in qs:
        print(f"{t[-56:]:56s} {levels:6d} " + " ".join(f"{100 * cols[c][t]:9.3f}" for c in cols))
    print(f"{'mean over quantizers':56s} {'':6s} "
          + " ".join(f"{100 * np.mean([cols[c][q[0]] for q in qs]):9.3f}" for c in cols))


if __name__ == "__main__":
    main()
