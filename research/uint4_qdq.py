"""Is a 4-bit activation cheaper in onnxruntime as QuantizeLinear -> DequantizeLinear on UINT4 (opset 21,
saturation at 0..15 built in) than as our uint8 QuantizeLinear -> Clip(0, 15) -> DequantizeLinear?

    python research/uint4_qdq.py [--shape 1,16,24,96] [--runs 2000]

Both forms are checked equal, then timed alone (one thread, mean of --runs calls).
"""
import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(shape: list, uint4: bool):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    if uint4:
        inits.append(helper.make_tensor("z", TensorProto.UINT4, [], [3]))
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    else:
        inits += [numpy_helper.from_array(np.array(v, np.uint8), n) for n, v in (("z", 3), ("lo", 0), ("hi", 15))]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
                 helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,16,24,96")
    ap.add_argument("--runs", type=int, default=2000)
    a = ap.parse_args()
    shape = [int(v) for v in a.shape.split(",")]
    x = {"x": np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    out = {}
    for name, uint4 in (("uint4 Q -> DQ", True), ("uint8 Q -> Clip -> DQ", False)):
        s = ort.InferenceSession(model(shape, uint4), so, providers=["CPUExecutionProvider"])
        out[name] = s.run(None, x)[0]
        for _ in range(50):
            s.run(None, x)
        t = time.perf_counter()
        for _ in range(a.runs):
            s.run(None, x)
        print(f"{name}: {(time.perf_counter() - t) / a.runs * 1e6:.1f} us")
    a_, b_ = out.values()
    print("equal:", bool(np.array_equal(a_, b_)))


if __name__ == "__main__":
    main()
