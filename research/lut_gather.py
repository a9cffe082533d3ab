"""Can a float activation between two quantizers run as an integer lookup table in plain ONNX?

A hard-swish read through a DequantizeLinear and written through QuantizeLinear -> Clip maps each of
the 256 input codes to one output code, so Cast(int32) -> Gather(table) computes the same codes
(onnxruntime's own QLinearSigmoid / QLinearLeakyRelu are such tables, but it has none for hard-swish).

    python research/lut_gather.py [--runs 200]

The table is built by running the float form on all 256 codes, both forms are checked equal on
random codes, then timed alone (one thread, median of --runs calls) at three tensor shapes.
"""
import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ([1, 16, 24, 96], [1, 64, 12, 80], [8, 64, 12, 80])


def model(shape: list, table: np.ndarray | None) -> bytes:
    """table None: DequantizeLinear -> HardSigmoid -> Mul -> QuantizeLinear -> Clip(0, 15)."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, shape)
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, shape)
    if table is None:
        inits = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in
                 (("s", 0.05, np.float32), ("z", 128, np.uint8), ("s2", 0.1, np.float32), ("z2", 3, np.uint8),
                  ("lo", 0, np.uint8), ("hi", 15, np.uint8))]
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"]),
                 helper.make_node("HardSigmoid", ["f"], ["g"], alpha=1 / 6, beta=0.5),
                 helper.make_node("Mul", ["f", "g"], ["h"]),
                 helper.make_node("QuantizeLinear", ["h", "s2", "z2"], ["q"]),
                 helper.make_node("Clip", ["q", "lo", "hi"], ["y"])]
    else:
        inits = [numpy_helper.from_array(table, "T")]
        nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
                 helper.make_node("Gather", ["T", "i"], ["y"], axis=0)]
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    codes = np.arange(256, dtype=np.uint8)
    table = ort.InferenceSession(model([256], None), so).run(None, {"x": codes})[0]
    print("| shape | float form us | lookup table us |\n|---|---|---|")
    for shape in SHAPES:
        x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
        sess = {k: ort.InferenceSession(model(shape, t), so) for k, t in (("float", None), ("table", table))}
        outs = {k: s.run(None, {"x": x})[0] for k, s in sess.items()}
        assert np.array_equal(outs["float"], outs["table"])
        times = {k: [] for k in sess}
        for _ in range(a.runs):
            for k, s in sess.items():
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append(time.perf_counter() - t0)
        f, t = (np.median(times[k]) * 1e6 for k in ("float", "table"))
        print(f"| {'x'.join(map(str, shape))} | {f:.1f} | {t:.1f} |")


if __name__ == "__main__":
    main()
