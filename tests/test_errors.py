"""Bad input and faults: exit 2 with one line naming the cause, never a traceback; inputs untouched."""
import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from packptq_onnx.exporters import files, qdq

from packptq_onnx import convert, data, layers, onnx_import, options, pipeline, qlayer, runtime, validate
from packptq_onnx.calibrate import calibrate
from packptq_onnx.cli import main
from packptq_onnx.errors import UsageError
from packptq_onnx.records import export_records

MODEL, CALIB = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")
R = np.random.RandomState(0)


def _cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def _save(model, path):
    onnx.save(model, str(path))
    return str(path)


def _graph(nodes, inits, in_shape=("N", 2, 6, 6), out="y", opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info(out, TensorProto.UNDEFINED, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return onnx.shape_inference.infer_shapes(m)
    except Exception:  # a deliberately broken graph
        return m


def _shrink_model():
    w1 = numpy_helper.from_array(R.randn(4, 2, 3, 3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(R.randn(3, 4, 3, 3).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Shrink", ["a"], ["s"], lambd=0.1),  # onnx2torch has no converter
             helper.make_node("Conv", ["s", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return _graph(nodes, [w1, w2])


def test_checker_failure(tmp_path, capsys):
    m = _graph([helper.make_node("Relu", ["nowhere"], ["y"])], [])
    code, err = _cli(["quantize", _save(m, tmp_path / "m.onnx"), "--calib", CALIB, "-o", str(tmp_path / "o.onnx")],
                     capsys)
    assert code == 2 and "fails the ONNX checker" in err and len(err.splitlines()) == 1


def test_unconvertible_op_stays_float_or_strict_error(tmp_path, capsys):
    path = _save(_shrink_model(), tmp_path / "s.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=R.randn(64, 2, 6, 6).astype(np.float32))
    code, err = _cli(["quantize", path, "--calib", str(calib), "-o", str(tmp_path / "o.onnx"), "--strict"], capsys)
    assert code == 2 and "no torch converter for: Shrink" in err
    r = pipeline.quantize(path, str(calib), str(tmp_path / "o.onnx"),
                          pipeline.Options(wbits=4, abits=4, method="block",
                                           recon=pipeline.ReconOptions(iters=20)), log=lambda *_: None).to_dict()
    assert r["import"]["float_nodes"] == ["Shrink_1"]
    assert all(p["ok"] for p in r["parity"]) and len(r["layers"]) == 2


def test_no_quantizable_layer(tmp_path, capsys):
    m = _graph([helper.make_node("Relu", ["x"], ["y"])], [])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((40, 2, 6, 6), np.float32))
    code, err = _cli(["quantize", _save(m, tmp_path / "m.onnx"), "--calib", str(calib), "-o",
                      str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "no quantizable layer" in err


def test_classical_ml_model_is_a_clear_error(tmp_path, capsys):
    """A scikit-learn style model (ai.onnx.ml operators only, no default-domain opset) used to fail with
    "cannot upgrade opset 1 to 13"."""
    node = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((40, 4), np.float32))
    code, err = _cli(["quantize", _save(m, tmp_path / "m.onnx"), "--calib", str(calib), "-o",
                      str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "only ai.onnx.ml:Normalizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_fewer_samples_than_batch(tmp_path, capsys):
    calib = tmp_path / "c.npz"
    np.savez(calib, image=np.zeros((5, 1, 8, 8), np.float32))
    code, err = _cli(["quantize", MODEL, "--calib", str(calib), "-o", str(tmp_path / "o.onnx"), "--batch-size", "8"],
                     capsys)
    assert code == 2 and "5 samples, fewer than --batch-size 8" in err


def test_few_samples_default_batch(tmp_path, capsys):
    """Without --batch-size, 5 samples make batches of 5 (the default of 32 is for larger sets)."""
    calib = tmp_path / "c.npz"
    with np.load(CALIB) as z:
        np.savez(calib, **{k: v[:5] for k, v in z.items()})
    out = tmp_path / "o.onnx"
    code = main(["quantize", MODEL, "--calib", str(calib), "-o", str(out), "--method", "rtn"])
    cap = capsys.readouterr()
    assert code == 0 and out.exists(), cap.err
    assert "5 calibration samples, so batches of 5" in cap.out


@pytest.mark.parametrize("dtype_case", ["strings", "int_for_float_ok", "empty"])
def test_calibration_dtypes(tmp_path, capsys, dtype_case):
    calib = tmp_path / "c.npz"
    arr = {"strings": np.array([["a"] * 64] * 4), "int_for_float_ok": np.zeros((40, 1, 8, 8), np.int32),
           "empty": np.zeros((0, 1, 8, 8), np.float32)}[dtype_case]
    np.savez(calib, image=arr)
    code, err = _cli(["quantize", MODEL, "--calib", str(calib), "-o", str(tmp_path / "o.onnx"), "--method", "rtn"],
                     capsys)
    if dtype_case == "int_for_float_ok":
        assert code == 0
    else:
        assert code == 2 and ("dtype" in err or "empty" in err or "shape" in err)


@pytest.mark.parametrize("where", ["missing_dir", "read_only"])
def test_output_folder_checked_before_work(tmp_path, capsys, monkeypatch, where):
    out = str(tmp_path / "nope" / "o.onnx") if where == "missing_dir" else "/proc/o.onnx"
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("work started"))
    code, err = _cli(["quantize", MODEL, "--calib", CALIB, "-o", out], capsys)
    assert code == 2 and ("does not exist" in err or "not writable" in err)


def test_memory_refused_before_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(options, "available_memory", lambda: 10_000)
    code, err = _cli(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "not enough memory" in err


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "big.onnx"
    files.save_model(onnx.load(MODEL), str(out))
    assert (tmp_path / "big.onnx.data").stat().st_size > 100_000 and out.stat().st_size < 50_000
    feeds = {"image": np.load(CALIB)["image"][:4]}
    a = runtime.run(runtime.session(str(out)), feeds)[0]
    b = runtime.run(runtime.session(MODEL), feeds)[0]
    np.testing.assert_array_equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".packptq-")]  # no temporary left behind


SAMPLE_BYTES = open(MODEL, "rb").read()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=20),
       st.booleans())
def test_mutated_onnx_files_give_clean_errors(tmp_path, edits, truncate):
    b = bytearray(SAMPLE_BYTES)
    for pos, val in edits:
        b[pos] = val
    if truncate:
        b = b[: edits[0][0]]
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(b))
    digest = hashlib.sha256(bytes(b)).hexdigest()
    try:
        imp = onnx_import.load(str(path))
        gm = convert.to_torch(imp)
        convert.prove_faithful(imp, gm, {"image": np.load(CALIB)["image"][:4]})
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # never modified


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["Conv", "DepthwiseConv", "Gemm"]), st.integers(1, 6), st.integers(1, 6),
       st.integers(2, 8), st.integers(2, 8), st.integers(0, 1000))
def test_random_graphs_export_equals_simulation(op, cin, cout, wbits, abits, seed):
    r = np.random.RandomState(seed)
    if op == "Gemm":
        x_shape, w = ["N", cin * 4], r.randn(cout, cin * 4)
        layer = helper.make_node("Gemm", ["h", "w", "b"], ["y"], transB=1)
    else:
        groups = cin if op == "DepthwiseConv" else 1
        cout = cin if op == "DepthwiseConv" else cout
        x_shape, w = ["N", cin, 5, 5], r.randn(cout, cin // groups, 3, 3)
        layer = helper.make_node("Conv", ["h", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=groups)
    nodes = [helper.make_node("Sigmoid", ["x"], ["h"]), layer]
    if op != "Gemm":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(r.randn(cout).astype(np.float32), "b")]
    m = _graph(nodes, inits, x_shape)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = _save(m, os.path.join(d, "m.onnx"))
        imp = onnx_import.load(path)
    gm = convert.to_torch(imp)
    qls = qlayer.wrap(gm, imp.model, layers.find_layers(imp.model))
    feeds = {"x": (r.randn(16, *x_shape[1:]) * 3).astype(np.float32)}
    calibrate(gm, qls, imp.model, data.batches(feeds, ["x"], 8), wbits, abits, True, seed)
    out = qdq.write_qdq(imp.model, export_records(qls))
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds),
                              convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.exact, par


def test_dynamic_dims_are_taken_from_the_data_and_input_shape_overrides(tmp_path, capsys):
    m = onnx.load(MODEL)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # a fully convolutional export
    del m.graph.value_info[:]
    src = _save(m, tmp_path / "dyn.onnx")
    out = str(tmp_path / "q.onnx")
    base = ["quantize", src, "--calib", CALIB, "-o", out, "--method", "rtn", "--calib-samples", "64"]
    for bad, says in (("image:N,1,8", "rank 3 given"), ("pixels:N,1,8,8", "no input 'pixels'"),
                      ("image:N,1,x,8", "expected NAME:DIMS")):
        code, err = _cli(base + ["--input-shape", bad], capsys)
        assert code == 2 and says in err, err
    code, err = _cli(base + ["--input-shape", "image:N,1,9,8"], capsys)  # the override must fit the data
    assert code == 2 and "axis 2: 8 != 9" in err, err
    assert main(base) == 0  # no flag: the data's 8x8 is used
    assert "input 'image' shape Nx1x8x8 taken from the calibration data" in capsys.readouterr().out
    q = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in q] == [q[0].dim_param, 1, "height", "width"] and not q[0].dim_value
    feeds = {"image": np.load(CALIB)["image"][:5]}
    a = runtime.run(runtime.session(out), feeds)[0]
    assert a.shape == (5, 10) and np.isfinite(a).all()


def test_target_sets_the_eight_bit_weight_range(tmp_path, capsys):
    """any (default): 8-bit weights in [-64, 63]; a target whose kernels add into 32 bits: [-128, 127]."""
    from packptq_onnx import targets

    base = ["quantize", MODEL, "--calib", CALIB, "--method", "rtn", "--calib-samples", "64"]
    widest = {}
    for target in ("any", "x86-vnni"):
        out, rep = str(tmp_path / f"{target}.onnx"), str(tmp_path / f"{target}.json")
        assert main(base + ["-o", out, "--report", rep, "--target", target]) == 0
        ints = [numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer if i.data_type == TensorProto.INT8]
        widest[target] = max(int(np.abs(a.astype(np.int32)).max()) for a in ints)
        want = ("reduced" if target == "any" else "full") + " for target"
        assert json.load(open(rep))["weight_range"].startswith(want)
    assert widest["any"] <= 64 < widest["x86-vnni"]
    code, err = _cli(base + ["-o", str(tmp_path / "x.onnx"), "--target", "sparc"], capsys)
    assert code == 2 and "unknown --target 'sparc'" in err and not os.path.exists(tmp_path / "x.onnx")
    assert targets.this_machine() in targets.TARGETS


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_flag_anywhere_on_the_line(tmp_path, capsys, where):
    """`packptq --debug quantize ...` and `packptq quantize ... --debug` both show the traceback."""
    args = ["quantize", str(tmp_path / "missing.onnx"), "--calib", CALIB, "-o", str(tmp_path / "o.onnx")]
    code = main(["--debug", *args] if where == "first" else [*args, "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "packptq: error:" in err
    assert main(args) == 2 and "Traceback" not in capsys.readouterr().err


def test_already_quantized_model_is_named(tmp_path, capsys):
    """A model onnxruntime's quantize_dynamic wrote (MatMulInteger) used to fail in the torch
    conversion with "module name can't contain '.'"."""
    w = numpy_helper.from_array(R.randint(-8, 8, (4, 3)).astype(np.int8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["yi"]),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((40, 4), np.float32))
    code, err = _cli(["quantize", _save(m, tmp_path / "m.onnx"), "--calib", str(calib), "-o",
                      str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "already quantized (DynamicQuantizeLinear x1, MatMulInteger x1)" in err
    assert not (tmp_path / "o.onnx").exists()
