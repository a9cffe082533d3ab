"""Graphs shaped like real recurrent models go through rtn and pack to a model that runs.

32 graphs from tests/fuzzgraphs.py: LSTM/GRU/bidirectional LSTM inside blocks, samples on axis 1
of intermediate tensors and outputs, outputs of rank 0 to 4, an op with no torch converter at a
graph output, an RNN's state (second output of a multi-output node) as a graph output.
"""
import fuzzgraphs
import numpy as np
import onnx
import pytest

from packptq_onnx import pipeline, runtime

CASES = fuzzgraphs.cases()


def _cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(p) for p in c) for c in CASES])
def test_graph_goes_through_rtn_and_pack(tmp_path, case):
    m, name, shape = fuzzgraphs.build(*case)
    path, calib = str(tmp_path / "m.onnx"), str(tmp_path / "c.npz")
    onnx.save(m, path)
    x = np.random.RandomState(len(str(case))).randn(24, *shape).astype(np.float32)
    np.savez(calib, **{name: x})
    ref = runtime.run(runtime.session(m), {name: x[:8]})
    for method, wbits in (("rtn", 8), ("pack", 4)):
        out = str(tmp_path / f"{method}.onnx")
        o = pipeline.Options(wbits=wbits, abits=8, method=method, batch_size=8, calib_samples=24,
                             recon=pipeline.ReconOptions(iters_total=12, batch_size=8))
        report = pipeline.quantize(path, calib, out, o, eval_path=calib, log=lambda *a: None).to_dict()
        got = runtime.run(runtime.session(onnx.load(out)), {name: x[:8]})
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert report["layers"] and all("wbits" in q for q in report["layers"])
        if method == "rtn":  # 8-bit keeps every output close; a one-hot (Hardmax) output flips near ties
            for r, g in zip(ref, got):
                assert _cos(r, g) > (0.85 if set(np.unique(r)) <= {0.0, 1.0} else 0.98)


@pytest.mark.parametrize("decided_by", ["scalar", "shape", "values"])
def test_if_inlined_when_fixed_inputs_decide_it(tmp_path, decided_by):
    m = fuzzgraphs.build_if(decided_by)
    path, calib = str(tmp_path / "m.onnx"), str(tmp_path / "c.npz")
    onnx.save(m, path)
    x = np.random.RandomState(0).randn(32, 6).astype(np.float32)
    feeds = {"x": x, **({"sr": np.array(16000, np.int64)} if decided_by == "scalar" else {})}
    np.savez(calib, **feeds)
    logs = []
    o = pipeline.Options(wbits=8, abits=8, method="rtn", batch_size=8, calib_samples=32)
    report = pipeline.quantize(path, calib, str(tmp_path / "q.onnx"), o, log=logs.append).to_dict()
    q = onnx.load(str(tmp_path / "q.onnx"))
    o = pipeline.Options(wbits=4, abits=8, method="pack", batch_size=8, calib_samples=32,
                         recon=pipeline.ReconOptions(iters_total=12, batch_size=8))
    packed = pipeline.quantize(path, calib, str(tmp_path / "p.onnx"), o, log=lambda *a: None).to_dict()
    assert len(packed["layers"]) == len(report["layers"])
    assert runtime.run(runtime.session(onnx.load(str(tmp_path / "p.onnx"))), feeds)[0].shape == (32, 3)
    if decided_by == "values":  # the branch depends on the data: the If stays, its layers stay float
        assert any(n.op_type == "If" for n in q.graph.node) and len(report["layers"]) == 1
        assert any("inside If/Loop/Scan branches stay float" in line for line in logs)
        return
    assert not any(n.op_type == "If" for n in q.graph.node) and len(report["layers"]) == 3  # 1 + then's 2
    assert any("If node(s) inlined" in line for line in logs)
    assert [i.name for i in q.graph.input] == [i.name for i in m.graph.input]  # sr stays declared
    ref = runtime.run(runtime.session(m), feeds)[0]
    got = runtime.run(runtime.session(q), feeds)[0]
    assert _cos(ref, got) > 0.99


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_state_input_with_samples_on_axis_1(tmp_path, direction):
    m = fuzzgraphs.build_state(direction)
    path, calib = str(tmp_path / "m.onnx"), str(tmp_path / "c.npz")
    onnx.save(m, path)
    r = np.random.RandomState(0)
    d = 2 if direction == "bidirectional" else 1
    feeds = {"x": r.randn(24, 6, 5).astype(np.float32), "h0": r.randn(d, 24, 6).astype(np.float32)}  # model layout
    np.savez(calib, **feeds)
    for method in ("rtn", "pack"):
        out = str(tmp_path / f"{method}.onnx")
        o = pipeline.Options(wbits=8, abits=8, method=method, batch_size=8, calib_samples=24,
                             recon=pipeline.ReconOptions(iters_total=12, batch_size=8))
        pipeline.quantize(path, calib, out, o, eval_path=calib, log=lambda *a: None)
        q = onnx.load(out)
        assert [(i.name, i.type) for i in q.graph.input] == [(i.name, i.type) for i in m.graph.input]
        for a, b in zip(runtime.session(m).run(None, feeds), runtime.session(q).run(None, feeds)):
            assert a.shape == b.shape and _cos(a, b) > 0.98
