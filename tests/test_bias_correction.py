"""Bias correction: the quantized weight's mean output shift on the calibration data is taken out of
the bias, in the simulation and in the exported model alike."""
import os

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLES
from onnx import TensorProto, helper, numpy_helper
from packptq_onnx.exporters import qdq

from packptq_onnx import convert, data, layers, onnx_import, qlayer, runtime, state, validate
from packptq_onnx.calibrate import calibrate
from packptq_onnx.pipeline import Options, quantize
from packptq_onnx.records import export_records

R = np.random.RandomState(1)


def _single(tmp_path, op, first: bool):
    """x -> [Tanh ->] op(W, b) -> y, with inputs whose channels have a large mean (as after
    Hardswish / ReLU), where rounding errors of the weights add up to an output offset."""
    w = {"Conv": R.randn(6, 8, 3, 3), "Gemm": R.randn(6, 8)}[op].astype(np.float32)
    attrs = {"Conv": {"pads": [1, 1, 1, 1]}, "Gemm": {"transB": 1}}[op]
    shape = {"Conv": (8, 5, 5), "Gemm": (8,)}[op]
    x = "x" if first else "h"
    nodes = ([] if first else [helper.make_node("Tanh", ["x"], ["h"])]) + \
        [helper.make_node(op, [x, "w", "b"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
                          initializer=[numpy_helper.from_array(w, "w"),
                                       numpy_helper.from_array(R.randn(6).astype(np.float32), "b")])
    path = str(tmp_path / f"{op}_{first}.onnx")
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])),
              path)
    imp = onnx_import.load(path)
    gm = convert.to_torch(imp)
    qls = qlayer.wrap(gm, imp.model, layers.find_layers(imp.model))
    feeds = {"x": (0.5 + 0.3 * R.randn(32, *shape) + R.rand(1, *shape)).astype(np.float32)}
    return imp, gm, qls, feeds


def _mean_shift(gm, q, feeds) -> float:
    """Largest per-channel gap between the quantized-weight and the float output means (input float)."""
    axis = 1
    outs = []
    for weights in (False, True):
        state.set_quant([q], weights, False)
        y = torch.from_numpy(convert.torch_run(gm, feeds, ["x"])[0])
        outs.append(y.mean([d for d in range(y.dim()) if d != axis]))
    state.set_quant([q], True, True)
    return float((outs[1] - outs[0]).abs().max())


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_correction_removes_the_mean_shift(tmp_path, op):
    imp, gm, qls, feeds = _single(tmp_path, op, first=False)
    shifts = {}
    for bc in (False, True):
        calibrate(gm, qls, imp.model, data.batches(feeds, ["x"], 8), 3, 8, True, 0, bias_correction=bc)
        assert (qls[0].in_mean is not None) == bc
        shifts[bc] = _mean_shift(gm, qls[0], feeds)
    assert shifts[False] > 0.05, shifts            # 3-bit weights shift the output means
    assert shifts[True] < 1e-4 * max(1.0, shifts[False]), shifts  # the correction takes the shift out


def test_first_layer_exports_its_corrected_float_bias(tmp_path):
    """A layer reading the network input has no input quantizer, so its bias stays float: the
    exported model must carry the corrected float bias, or onnxruntime drifts from the simulation."""
    imp, gm, qls, feeds = _single(tmp_path, "Conv", first=True)
    calibrate(gm, qls, imp.model, data.batches(feeds, ["x"], 8), 3, 4, True, 0)
    recs = export_records(qls)
    assert recs[0].abits is None and recs[0].bias_int is None and recs[0].bias_float is not None
    original = numpy_helper.to_array(imp.model.graph.initializer[1])
    assert np.abs(recs[0].bias_float - original).max() > 1e-3  # the correction changed it
    out = qdq.write_qdq(imp.model, recs)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.max_abs_diff < 1e-4, par


def test_correction_helps_the_sample_at_w3(tmp_path):
    """Round to nearest, 3-bit weights, on the bundled digits model: the correction lifts the
    agreement with the float model on the evaluation set (measured: cosine 0.909 -> 0.977)."""
    cos = {}
    for bc in (False, True):
        o = Options(wbits=3, abits=8, method="rtn", calib_samples=256, bias_correction=bc)
        rep = quantize(os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz"),
                       str(tmp_path / f"d{bc}.onnx"), o, os.path.join(SAMPLES, "eval.npz"),
                       log=lambda *_: None).to_dict()
        cos[bc] = rep["validation"][0]["cosine"]
        assert rep["parity_layers"]["max_code_diff"] <= 1
    assert cos[True] > cos[False] + 0.03, cos
