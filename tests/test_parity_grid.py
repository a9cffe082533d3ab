"""onnxruntime equals our simulation for every weight width 2..8 x activation width 2..8, on each
quantizable op, in both storage modes (int8 containers and packed INT4/INT2)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from packptq_onnx.exporters import qdq

from packptq_onnx import convert, data, layers, onnx_import, qlayer, runtime, validate
from packptq_onnx.calibrate import calibrate
from packptq_onnx.records import export_records

R = np.random.RandomState(0)
# op -> (input shape, weight, extra node attributes, extra initializers)
OPS = {
    "Conv": ((4, 3, 6, 6), R.randn(5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "DepthwiseConv": ((4, 4, 6, 6), R.randn(4, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}),
    "Gemm": ((4, 6), R.randn(5, 6), {"transB": 1}),
    "MatMul": ((4, 3, 6), R.randn(6, 5), {}),
    "ConvTranspose": ((4, 3, 5, 5), R.randn(3, 4, 3, 3), {"strides": [2, 2]}),
    # weight [C_in, C_out / groups, k, k]: 2 per-channel scales, a bias of 4 (GTCRN's deconvs)
    "GroupedConvTranspose": ((4, 4, 5, 5), R.randn(4, 2, 3, 3), {"strides": [2, 2], "group": 2}),
}


def _model(op, tmp_path):
    shape, w, attrs = OPS[op]
    onnx_op = {"DepthwiseConv": "Conv", "GroupedConvTranspose": "ConvTranspose"}.get(op, op)
    inputs = ["h", "w"] + (["b"] if op in ("Conv", "Gemm", "GroupedConvTranspose") else [])
    n_bias = w.shape[1] * attrs["group"] if op == "GroupedConvTranspose" else w.shape[0]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(R.randn(n_bias).astype(np.float32), "b")]
    nodes = [helper.make_node("Tanh", ["x"], ["h"]),  # so the layer's input is an activation
             helper.make_node(onnx_op, inputs, ["y"], **attrs)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
                          [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m = onnx.shape_inference.infer_shapes(m)
    path = str(tmp_path / f"{op}.onnx")
    onnx.save(m, path)
    return path, shape


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = {}

    def get(op):
        if op not in cache:
            path, shape = _model(op, tmp_path_factory.mktemp(op))
            imp = onnx_import.load(path)
            gm = convert.to_torch(imp)
            qls = qlayer.wrap(gm, imp.model, layers.find_layers(imp.model))
            feeds = {"x": (R.randn(16, *shape[1:]) * 2).astype(np.float32)}
            cache[op] = imp, gm, qls, feeds
        return cache[op]

    return get


@pytest.mark.parametrize("storage", ["int8", "packed"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_parity_grid(prepared, op, storage):
    imp, gm, qls, feeds = prepared(op)
    assert len(qls) == 1 and qls[0].layer.act_input == "h"
    for wbits in range(2, 9):
        for abits in (*range(2, 9), 16):  # 16: uint16 through com.microsoft Q/DQ
            calibrate(gm, qls, imp.model, data.batches(feeds, ["x"], 8), wbits, abits, True, 0)
            recs = export_records(qls)
            assert recs[0].w_int.min() >= -(2 ** (wbits - 1)) and recs[0].w_int.max() <= 2 ** (wbits - 1) - 1
            out = qdq.write_qdq(imp.model, recs, storage=storage)
            if storage == "packed" and wbits <= 4:
                kinds = {i.data_type for i in out.graph.initializer if ".w_int" in i.name}
                assert kinds == {TensorProto.INT2 if wbits == 2 else TensorProto.INT4}
                w = next(i for i in out.graph.initializer if ".w_int" in i.name)
                width = 2 if wbits == 2 else 4  # raw nibbles / crumbs, not one varint per value
                assert len(w.raw_data) == -(-int(np.prod(w.dims)) * width // 8)
            ort = runtime.run(runtime.session(out), feeds)
            sim = convert.torch_run(gm, feeds, ["x"])
            par = validate.sim_parity(["y"], ort, sim)[0]
            assert par.exact, (op, storage, wbits, abits, par)
            # sub-8-bit activations really are limited to 2^abits levels
            x_in = torch.tanh(torch.from_numpy(feeds["x"]))
            levels = torch.unique(qls[0].aq(x_in).detach()).numel()
            assert levels <= 2 ** abits
