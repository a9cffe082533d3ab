"""Every converter we add to onnx2torch: torch output equals onnxruntime on a one-node graph."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packptq_onnx import convert, onnx_import, runtime
from packptq_onnx.errors import UsageError
from packptq_onnx.ops import AveragePoolPadded

R = np.random.RandomState(0)


def _check(tmp_path, node, x, opset, inits=(), atol=1e-5):
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          outs, initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m = onnx.shape_inference.infer_shapes(m)
    for o in m.graph.output:  # give outputs their inferred types so the checker is satisfied
        vi = next((v for v in m.graph.value_info if v.name == o.name), None)
        if vi is not None:
            o.CopyFrom(vi)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    imp = onnx_import.load(path)
    ref = runtime.run(runtime.session(imp.original), {"x": x})
    got = convert.torch_run(convert.to_torch(imp), {"x": x}, ["x"])
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a.astype(np.float32), atol=atol, rtol=1e-5)


X4 = R.randn(2, 3, 5, 6).astype(np.float32)
X3 = R.randn(2, 7, 5).astype(np.float32)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2",
                                "ReduceLogSumExp", "ReduceSumSquare", "ReduceProd", "ReduceL1"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_18_axes_input(tmp_path, op, keepdims):
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    _check(tmp_path, node, X4, 18, [("axes", np.array([1, -1], np.int64))])


def test_reduce_18_no_axes_reduces_all(tmp_path):
    _check(tmp_path, helper.make_node("ReduceMean", ["x"], ["y"], keepdims=1), X4, 18)


def test_split_18_num_outputs_uneven(tmp_path):
    _check(tmp_path, helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), X3, 18)


def test_split_18_sizes_input(tmp_path):
    node = helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1)
    _check(tmp_path, node, X3, 18, [("s", np.array([2, 5], np.int64))])


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_gelu_20(tmp_path, approx):
    _check(tmp_path, helper.make_node("Gelu", ["x"], ["y"], approximate=approx), X4, 20)


@pytest.mark.parametrize("opset,outputs", [(13, ["y", "mask"]), (13, ["y"]), (7, ["y"])])
def test_dropout_keeps_the_batch(tmp_path, opset, outputs):  # the onnx wheel's light_squeezenet: (1000, ...)
    _check(tmp_path, helper.make_node("Dropout", ["x"], outputs), X4, opset)


def test_global_max_pool(tmp_path):
    _check(tmp_path, helper.make_node("GlobalMaxPool", ["x"], ["y"]), X4, 17)


@pytest.mark.parametrize("x", [X3, X4], ids=["rank3", "rank4"])
def test_global_average_pool_of_a_tensor_of_unknown_rank(tmp_path, x):
    """Reshape to a shape of data-dependent length: the pool's input has a type but no shape (so it
    was in a BERT from a wheel). onnx2torch's converter then averaged over every axis, batch included."""
    keep = numpy_helper.from_array(np.ones(x.ndim, bool), "keep")
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Compress", ["shape", "keep"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["t"]), helper.make_node("GlobalAveragePool", ["t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(x.ndim)])],
                          initializer=[keep])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    imp = onnx_import.load(path)
    ref = runtime.run(runtime.session(imp.original), {"x": x})[0]
    got = convert.torch_run(convert.to_torch(imp), {"x": x}, ["x"])[0]
    assert ref.shape == x.shape[:2] + (1,) * (x.ndim - 2) and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_greater_or_equal_16(tmp_path):
    node = helper.make_node("GreaterOrEqual", ["x", "t"], ["y"])
    _check(tmp_path, node, X4, 16, [("t", np.array(0.1, np.float32))])


def test_conv_22(tmp_path):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 1])
    _check(tmp_path, node, X4, 22, [("w", R.randn(4, 3, 3, 3).astype(np.float32)),
                                     ("b", R.randn(4).astype(np.float32))], atol=1e-4)


def test_reshape_allowzero(tmp_path):
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
    _check(tmp_path, node, X3, 14, [("s", np.array([5, 14], np.int64))])


@pytest.mark.parametrize("inputs", [["x", "", "hi"], ["x", "lo", ""], ["x", "lo"], ["x", "lo", "hi"]])
def test_clip_optional_inputs(tmp_path, inputs):
    inits = [(n, np.array(v, np.float32)) for n, v in (("lo", -0.3), ("hi", 0.5)) if n in inputs]
    _check(tmp_path, helper.make_node("Clip", inputs, ["y"]), X4, 13, inits)


def test_batchnorm_rank3(tmp_path):
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)
    c = X3.shape[1]
    inits = [("s", R.rand(c).astype(np.float32) + 0.5), ("b", R.randn(c).astype(np.float32)),
             ("m", R.randn(c).astype(np.float32)), ("v", R.rand(c).astype(np.float32) + 0.5)]
    _check(tmp_path, node, X3, 15, inits)


@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumsum(tmp_path, exclusive, reverse):
    node = helper.make_node("CumSum", ["x", "a"], ["y"], exclusive=exclusive, reverse=reverse)
    _check(tmp_path, node, X3, 14, [("a", np.array(1, np.int64))])


def test_average_pool_19(tmp_path):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    _check(tmp_path, node, X4, 19)


@pytest.mark.parametrize("opset", [11, 19])
@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("x,kernel,stride,pads", [
    (X4, [3, 3], [1, 1], [0, 0, 1, 1]),  # light_inception_v1's 7x7 pool, pads [0, 0, 1, 1], made small
    (X4, [2, 3], [2, 1], [1, 0, 0, 2]),
    (X3, [2], [2], [0, 1]),
], ids=["end", "mixed", "1d"])
def test_average_pool_with_pads_that_differ_at_the_two_ends(tmp_path, opset, include, x, kernel, stride, pads):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, strides=stride, pads=pads,
                            count_include_pad=include)
    _check(tmp_path, node, x, opset)
    gm = convert.to_torch(onnx_import.load(str(tmp_path / "m.onnx")))
    assert not gm.float_nodes and any(isinstance(m, AveragePoolPadded) for m in gm.modules())  # torch, not onnxruntime


def test_pad_18(tmp_path):
    node = helper.make_node("Pad", ["x", "p"], ["y"], "pad", mode="reflect")
    _check(tmp_path, node, X4, 18, [("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))])


@pytest.mark.parametrize("axis", [0, 2, 3, -1])
def test_flatten_any_axis(tmp_path, axis):  # onnx2torch's fails for axis = rank (BERT's mask) and 0
    _check(tmp_path, helper.make_node("Flatten", ["x"], ["y"], axis=axis), X3, 13)


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_normalization_17(tmp_path, axis):  # transformers' LayerNorm (stays float)
    shape = X3.shape[axis:] if axis > 0 else X3.shape[-1:]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=1e-12)
    _check(tmp_path, node, X3, 17, [("s", R.rand(*shape).astype(np.float32) + 0.5),
                                     ("b", R.randn(*shape).astype(np.float32))], atol=1e-4)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("op,stride,kernel", [("Conv", 2, 3), ("Conv", 1, 4), ("Conv", 3, 2),
                                              ("MaxPool", 2, 3), ("AveragePool", 1, 3)])
def test_same_auto_pad(tmp_path, mode, op, stride, kernel):
    """Keras / TF exports pad with auto_pad=SAME_*: odd sizes (5 x 6), strides 1-3, odd extra first or last."""
    w = R.randn(4, 3, kernel, kernel).astype(np.float32)
    node = helper.make_node(op, ["x", "w"] if op == "Conv" else ["x"], ["y"], auto_pad=mode,
                            strides=[stride, stride], **({} if op == "Conv" else {"kernel_shape": [kernel, kernel]}))
    _check(tmp_path, node, X4, 13, [("w", w)] if op == "Conv" else [])


def test_same_auto_pad_export_keeps_it_and_runs_at_other_sizes(tmp_path):
    """Converted with explicit pads at the calibration size; the export keeps auto_pad, so it pads
    right at sizes where the explicit pads would differ (stride 2: 9 vs 10 columns)."""
    from packptq_onnx.cli import main

    w = R.randn(6, 3, 3, 3).astype(np.float32) * 0.3
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, "oh", "ow"])],
                          initializer=[numpy_helper.from_array(w, "w")])
    model = str(tmp_path / "same.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), model)
    np.savez(tmp_path / "c.npz", x=R.randn(32, 3, 9, 9).astype(np.float32))
    out = str(tmp_path / "q.onnx")
    assert main(["quantize", model, "--calib", str(tmp_path / "c.npz"), "-o", out, "--method", "rtn"]) == 0
    conv = next(n for n in onnx.load(out).graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "auto_pad")) == b"SAME_UPPER"
    x = R.randn(2, 3, 10, 10).astype(np.float32)
    ref = runtime.run(runtime.session(model), {"x": x})[0]
    got = runtime.run(runtime.session(out), {"x": x})[0]
    assert ref.shape == got.shape == (2, 6, 5, 5) and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def _rnn_inits(op, d, H, I, N, peep=False, lens=None):
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    r = np.random.RandomState(1)
    inits = [("W", (r.randn(d, G * H, I) * 0.4).astype(np.float32)),
             ("R", (r.randn(d, G * H, H) * 0.4).astype(np.float32)),
             ("B", (r.randn(d, 2 * G * H) * 0.2).astype(np.float32))]
    names = ["x", "W", "R", "B", "", "h0"]
    inits.append(("h0", (r.randn(d, N, H) * 0.5).astype(np.float32)))
    if lens is not None:
        names[4] = "L"
        inits.append(("L", np.array(lens, np.int32)))
    if op == "LSTM":
        names.append("c0")
        inits.append(("c0", (r.randn(d, N, H) * 0.5).astype(np.float32)))
        if peep:
            names.append("P")
            inits.append(("P", (r.randn(d, 3 * H) * 0.3).astype(np.float32)))
    return names, inits


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_ops_match_onnxruntime(tmp_path, op, direction):
    d, H, T, N, I = (2 if direction == "bidirectional" else 1), 6, 7, 3, 5
    names, inits = _rnn_inits(op, d, H, I, N, peep=True)
    outs = ["y", "yh", "yc"] if op == "LSTM" else ["y", "yh"]
    node = helper.make_node(op, names, outs, hidden_size=H, direction=direction)
    _check(tmp_path, node, R.randn(T, N, I).astype(np.float32), 14, inits)


@pytest.mark.parametrize("attrs", [dict(clip=0.7), dict(linear_before_reset=1),
                                   dict(activations=["Relu", "Tanh"])])
def test_gru_attributes_match_onnxruntime(tmp_path, attrs):
    H, T, N, I = 4, 5, 3, 6
    names, inits = _rnn_inits("GRU", 1, H, I, N)
    x = R.randn(T, N, I).astype(np.float32)
    _check(tmp_path, helper.make_node("GRU", names, ["y", "yh"], hidden_size=H, **attrs), x, 14, inits)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_sequence_lens_and_single_output(tmp_path, direction):
    d, H, T, N, I = (2 if direction == "bidirectional" else 1), 4, 6, 3, 5
    names, inits = _rnn_inits("LSTM", d, H, I, N, lens=[6, 2, 4])
    node = helper.make_node("LSTM", names, ["y", "yh"], hidden_size=H, direction=direction)
    _check(tmp_path, node, R.randn(T, N, I).astype(np.float32), 14, inits)
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=H, direction=direction)
    _check(tmp_path, node, R.randn(T, N, I).astype(np.float32), 14, inits[:3])


def test_lstm_gradient_reaches_its_input(tmp_path):  # the reason for the converter: scoring upstream
    import torch
    names, inits = _rnn_inits("LSTM", 1, 4, 5, 2)
    node = helper.make_node("LSTM", names[:4], ["y"], hidden_size=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 2, 4])],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits[:3]])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), path)
    gm = convert.to_torch(onnx_import.load(path))
    x = torch.randn(3, 2, 5, requires_grad=True)
    gm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_recurrent_layout_1_is_layout_0_transposed():  # onnxruntime has no batch-major kernels
    import torch

    from packptq_onnx.rnn import Recurrent
    _, inits = _rnn_inits("LSTM", 2, 4, 5, 3)
    w, r, b, h0, c0 = (torch.from_numpy(v) for _, v in inits)
    x = torch.randn(6, 3, 5)
    seq = Recurrent("LSTM", 4, "bidirectional", 0, None, ["Sigmoid", "Tanh", "Tanh"] * 2, False, 3)
    bat = Recurrent("LSTM", 4, "bidirectional", 1, None, ["Sigmoid", "Tanh", "Tanh"] * 2, False, 3)
    y0, h_0, c_0 = seq(x, w, r, b, initial_h=h0, initial_c=c0)
    y1, h_1, c_1 = bat(x.transpose(0, 1), w, r, b, initial_h=h0.transpose(0, 1), initial_c=c0.transpose(0, 1))
    torch.testing.assert_close(y1, y0.permute(2, 0, 1, 3))
    torch.testing.assert_close(h_1, h_0.transpose(0, 1))
    torch.testing.assert_close(c_1, c_0.transpose(0, 1))


def _one_node_model(tmp_path, node, x, opset, inits=()):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    return onnx_import.load(path)


def test_converter_that_refuses_a_node_falls_back_to_onnxruntime(tmp_path):
    node = helper.make_node("Pad", ["x", "p", "", "axes"], ["y"], "pad", mode="constant")  # axes input: refused
    imp = _one_node_model(tmp_path, node, X3, 18, [("p", np.array([1, 2], np.int64)),
                                                   ("axes", np.array([2], np.int64))])
    gm = convert.to_torch(imp)
    assert gm.float_nodes == ["pad"] and "conversion fails" in imp.notes[-1]
    ref = runtime.run(runtime.session(imp.original), {"x": X3})
    np.testing.assert_allclose(convert.torch_run(gm, {"x": X3}, ["x"])[0], ref[0])
    with pytest.raises(UsageError, match="axes input is not supported"):
        convert.to_torch(imp, strict=True)


def test_node_that_fails_in_torch_falls_back_to_onnxruntime(tmp_path):
    x = R.randn(4, 9).astype(np.float32)  # torch pads 2-D input in reflect mode only on its last dim
    node = helper.make_node("Pad", ["x", "p"], ["y"], "pad", mode="reflect")
    imp = _one_node_model(tmp_path, node, x, 13, [("p", np.array([1, 2, 1, 2], np.int64))])
    gm = convert.to_torch_running(imp, {"x": x}, 2)
    assert gm.float_nodes == ["pad"] and "Pad" in imp.notes[-1]
    ref = runtime.run(runtime.session(imp.original), {"x": x})
    np.testing.assert_allclose(convert.torch_run(gm, {"x": x}, ["x"])[0], ref[0])


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_to_one_output_then_squeeze(tmp_path, opset):  # TF's unstack: the reader gets a tensor
    x = R.randn(1, 3, 4).astype(np.float32)
    split = helper.make_node("Split", ["x"], ["s"], axis=0, **({"num_outputs": 1} if opset >= 18 else {}))
    axes = numpy_helper.from_array(np.array([0], np.int64), "ax")
    sq = helper.make_node("Squeeze", ["s", "ax"] if opset >= 13 else ["s"], ["y"],
                          **({} if opset >= 13 else {"axes": [0]}))
    g = helper.make_graph([split, sq], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                          initializer=[axes] if opset >= 13 else [])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), path)
    imp = onnx_import.load(path)
    gm = convert.to_torch(imp)
    assert gm.float_nodes == []
    np.testing.assert_allclose(convert.torch_run(gm, {"x": x}, ["x"])[0], x[0])


@pytest.mark.parametrize("opset", [11, 13])
def test_split_sizes_attribute_and_input(tmp_path, opset):
    if opset == 11:
        node = helper.make_node("Split", ["x"], ["a", "b"], axis=2, split=[2, 3])
        _check(tmp_path, node, X3, 11)
    else:
        node = helper.make_node("Split", ["x", "s"], ["a", "b"], axis=2)
        _check(tmp_path, node, X3, 13, [("s", np.array([1, 4], np.int64))])


def test_contrib_domain_op_falls_back_to_onnxruntime(tmp_path):  # a dot in the domain, no inferred type
    x = R.randn(4, 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Gelu", ["h"], ["y"], "gelu", domain="com.microsoft")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
                          initializer=[numpy_helper.from_array(R.randn(6, 5).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    imp = onnx_import.load(path)
    gm = convert.to_torch(imp)
    assert gm.float_nodes == ["gelu"] and hasattr(gm, "n1")
    ref = runtime.run(runtime.session(imp.original), {"x": x})
    np.testing.assert_allclose(convert.torch_run(gm, {"x": x}, ["x"])[0], ref[0], rtol=1e-5, atol=1e-6)
