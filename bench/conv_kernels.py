"""onnxruntime's integer conv kernel against its float one, per conv shape, on this machine.

    python bench/conv_kernels.py [--runs 200]

Each case is one Conv, run alone at batch 1 on 1 thread: float (weights constant) and QDQ
(QuantizeLinear -> DequantizeLinear on the input, int8 per-channel weights through
DequantizeLinear, QuantizeLinear -> DequantizeLinear on the output), which onnxruntime fuses into
QLinearConv. The shapes are those of the bench models' slow layers (bench/LATENCY.md): tiny channel
counts at high resolution (the residual CNN's first stage), depthwise 3x3 and 5x5 (MobileNet-style
blocks, the direction classifier), a 1x1 squeeze-excite conv, and a wide 1x1 conv for contrast.
"""
import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (label, cin, cout, (h, w), kernel, groups)
CASES = [("3x3 conv, 4 -> 4 channels, 128x128 (residual CNN stage 1)", 4, 4, (128, 128), 3, 1),
         ("3x3 conv, 8 -> 8 channels, 64x64 (residual CNN stage 2)", 8, 8, (64, 64), 3, 1),
         ("3x3 conv, 32 -> 32 channels, 16x16 (residual CNN stage 4)", 32, 32, (16, 16), 3, 1),
         ("3x3 depthwise, 16 channels, 24x96", 16, 16, (24, 96), 3, 16),
         ("3x3 depthwise, 96 channels, 56x56 (EfficientNet-Lite0)", 96, 96, (56, 56), 3, 96),
         ("5x5 depthwise, 200 channels, 2x96 (direction classifier)", 200, 200, (2, 96), 5, 200),
         ("1x1 conv, 200 -> 50 channels, 1x1 (squeeze-excite)", 200, 50, (1, 1), 1, 1),
         ("1x1 conv, 200 -> 200 channels, 2x96", 200, 200, (2, 96), 1, 1),
         ("1x1 conv, 96 -> 24 channels, 56x56 (EfficientNet-Lite0)", 96, 24, (56, 56), 1, 1)]


def conv_model(cin, cout, hw, k, groups, qdq: bool):
    rng = np.random.RandomState(0)
    w = rng.randint(-60, 60, (cout, cin // groups, k, k)).astype(np.int8)
    attrs = dict(pads=[k // 2] * 4, group=groups)
    if qdq:
        inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
                 helper.make_node("Conv", ["xd", "w"], ["y0"], **attrs),
                 helper.make_node("QuantizeLinear", ["y0", "s", "z"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    else:
        inits = [numpy_helper.from_array(w.astype(np.float32) * 0.01, "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def median_us(model, x, runs: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        s.run(None, {"x": x})
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, batch 1, 1 thread, median of {a.runs} runs\n")
    print("| conv | float us | QLinearConv us | integer / float |")
    print("|---|---|---|---|")
    for label, cin, cout, hw, k, g in CASES:
        x = np.random.RandomState(1).rand(1, cin, *hw).astype(np.float32)
        f, q = (median_us(conv_model(cin, cout, hw, k, g, qdq), x, a.runs) for qdq in (False, True))
        print(f"| {label} | {f:.1f} | {q:.1f} | {q / f:.2f} |")


if __name__ == "__main__":
    main()
