import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLES

from packptq_onnx.cli import main

MODEL = os.path.join(SAMPLES, "digits_resnet.onnx")
CALIB = os.path.join(SAMPLES, "calib.npz")
EVAL = os.path.join(SAMPLES, "eval.npz")


def test_quantize_sample_w8a8_end_to_end(tmp_path, capsys):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    before = open(MODEL, "rb").read()
    assert main(["quantize", MODEL, "--calib", CALIB, "--eval", EVAL, "-o", str(out), "--report", str(rep)]) == 0
    assert open(MODEL, "rb").read() == before  # input untouched
    r = json.loads(rep.read_text())
    v = r["validation"][0]
    assert v["acc_float"] > 0.97
    assert v["acc_float"] - v["acc_quant"] <= 0.005  # within 0.5 point of float
    assert all(p["ok"] for p in r["parity"])
    assert r["parity_layers"]["exact"] and r["parity_layers"]["layers"] == len(r["layers"])
    assert r["weight_bytes"]["quantized"] * 4 == pytest.approx(r["weight_bytes"]["float32"], rel=0.01)
    assert "logits" in capsys.readouterr().out  # the validation table is printed
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ops = [l["op"] for l in info["packptq"]["layers"]]
    assert len(ops) - ops.count("Add") == 9 and ops.count("Add") == 3  # 9 convs/gemm, 3 integer residual adds


def test_validate_command(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--wbits", "4", "--abits", "4"]) == 0
    labels = tmp_path / "labels.npy"
    np.save(labels, np.load(EVAL)["labels"])
    rep = tmp_path / "v.json"
    assert main(["validate", MODEL, str(out), "--data", EVAL, "--labels", str(labels), "--report", str(rep)]) == 0
    v = json.loads(rep.read_text())["validation"][0]
    assert 0.5 < v["acc_quant"] <= v["acc_float"] + 0.01 and v["cosine"] < 0.9999  # W4A4 is lossy


def _err(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["missing_model", "corrupt_model", "wrong_shape", "missing_calib",
                                  "nan", "same_output", "bits", "wrong_name"])
def test_bad_input_exit_2_one_line(tmp_path, capsys, case):
    model, calib, out = MODEL, CALIB, str(tmp_path / "o.onnx")
    extra = []
    if case == "missing_model":
        model = str(tmp_path / "nope.onnx")
    elif case == "corrupt_model":
        model = str(tmp_path / "bad.onnx")
        data = open(MODEL, "rb").read()
        open(model, "wb").write(data[: len(data) // 3])
    elif case == "wrong_shape":
        calib = str(tmp_path / "c.npz")
        np.savez(calib, image=np.zeros((4, 1, 9, 9), np.float32))
    elif case == "missing_calib":
        calib = str(tmp_path / "none.npz")
    elif case == "nan":
        calib = str(tmp_path / "c.npz")
        x = np.zeros((4, 1, 8, 8), np.float32)
        x[2, 0, 1, 1] = np.nan
        np.savez(calib, image=x)
    elif case == "same_output":
        shutil.copy(MODEL, tmp_path / "m.onnx")
        model = out = str(tmp_path / "m.onnx")
    elif case == "bits":
        extra = ["--wbits", "9"]
    elif case == "wrong_name":
        calib = str(tmp_path / "c.npz")
        np.savez(calib, image=np.zeros((4, 1, 8, 8), np.float32), other=np.zeros(3))
    code, err = _err(["quantize", model, "--calib", calib, "-o", out, *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("packptq: error:"), err
    assert "Traceback" not in err
    assert not os.path.exists(out) or case == "same_output"
    expect = {"missing_model": "not found", "corrupt_model": "not a readable ONNX", "wrong_shape": "axis 2",
              "missing_calib": "not found", "nan": "sample 2", "same_output": "equals the input",
              "bits": "between 2 and 8", "wrong_name": "unexpected ['other']"}[case]
    assert expect in lines[0]


def test_console_script_runs():
    exe = shutil.which("packptq")
    cmd = [exe] if exe else [sys.executable, "-m", "packptq_onnx.cli"]
    r = subprocess.run(cmd + ["inspect", MODEL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "9 quantizable layers, 3 integer joins (Add)" in r.stdout


def test_packed_storage_annotations_and_inspect(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    png = tmp_path / "bits.png"
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--method", "rtn", "--abits", "4",
                 "--avg-wbits", "3.5", "--wbits-options", "2,3,4", "--storage", "packed", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    import onnx
    from packptq_onnx.exporters import qdq
    m = onnx.load(str(out))
    meta = qdq.read_meta(m)
    assert {p["id"] for p in meta["packs"]} and meta["budget"] > 0
    assert qdq.weight_bytes(m) <= meta["budget"]
    tags = [qdq.node_tag(n) for n in m.graph.node if qdq.node_tag(n)]
    assert len(tags) == 12 and {t["pack"] for t in tags} >= {p["id"] for p in meta["packs"]}
    assert sorted(t["abits"] for t in tags if not t["wbits"]) == [8, 8, 8]  # the joins stay 8-bit at A4
    assert any(i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT2) for i in m.graph.initializer)
    assert oct(out.stat().st_mode & 0o777) != "0o600"  # written with normal permissions
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "budget" in text and "Omega" in text and "block0" in text


def test_eval_failure_keeps_the_model_and_the_report(tmp_path, capsys):
    bad = tmp_path / "eval.npz"
    np.savez(bad, x=np.zeros((4, 3, 5, 5), np.float32))  # wrong spatial size for the model
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", MODEL, "--calib", CALIB, "--eval", str(bad), "-o", str(out), "--report", str(rep),
                 "--calib-samples", "64"])
    err = capsys.readouterr().err
    assert code == 2 and out.exists() and rep.exists()
    assert "in --eval (the model and the report are written)" in err and len(err.strip().splitlines()) == 1
    r = json.loads(rep.read_text())
    assert r["evaluation_error"]["usage"] and r["layers"]


def test_parity_notes_name_every_failing_output():
    from packptq_onnx.parity import LayerParity
    from packptq_onnx.parity import notes as parity_notes
    from packptq_onnx.validate import Parity

    outs = [Parity("boxes", 0.1, 0.01, 3, 0.0017, False, False), Parity("scores", 0.0, 0.01, 0, 0.0, True, True),
            Parity("masks", 0.9, 0.01, 40, 0.59, False, False)]
    exact = LayerParity(5, 1, "conv", True)
    (line,) = parity_notes(outs, exact)
    assert "boxes 0.17%" in line and "masks 59.00%" in line and "scores" not in line
    assert "On masks the simulation no longer predicts the exported model" in line
    assert parity_notes(outs[1:2], exact) == []
    (line,) = parity_notes(outs, exact, [outs[1], outs[1], outs[1]])  # unfused onnxruntime = simulation
    assert "with graph optimizations off onnxruntime computes the simulation's outputs" in line
    assert "boxes 0.17%" in line and "On masks" in line
    (line,) = parity_notes(outs, exact, outs)
    assert "graph optimizations" not in line
    (line,) = parity_notes(outs[1:2], LayerParity(5, 9, "conv", False))
    assert "does not predict the exported model: layer conv differs by 9 steps" in line


def test_inspect_runtime_shows_what_onnxruntime_left_in_float(tmp_path, capsys):
    """The sample's W8A8 export: onnxruntime fuses its convs into QLinearConv and its residual Adds
    into QLinearAdd, so no Add runs in float between DequantizeLinear and QuantizeLinear; the float
    model has nothing of either."""
    out = str(tmp_path / "q.onnx")
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", out, "--method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--runtime", "--json"]) == 0
    rt = json.loads(capsys.readouterr().out)["runtime"]
    ops = {(o["op"], o["kind"]): o["count"] for o in rt["ops"]}
    assert ops[("QLinearConv", "integer")] >= 6 and rt["by_kind"]["conversion"] > 0
    assert ops[("QLinearAdd", "integer")] == 3  # the sample's three residual blocks
    assert rt["float_between_qdq"]["by_op"].get("Add", 0) == 0
    # --no-joins: the Adds stay float, between DequantizeLinear and QuantizeLinear
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", out, "--method", "rtn", "--no-joins",
                 "--kernels", "integer"]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--runtime", "--json"]) == 0
    rt = json.loads(capsys.readouterr().out)["runtime"]
    assert rt["float_between_qdq"]["by_op"].get("Add", 0) == 3
    assert main(["inspect", MODEL, "--runtime"]) == 0
    text = capsys.readouterr().out
    assert "0 integer, 0 (de)quantize" in text and "nothing left in float between" in text
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["inspect", str(bad), "--runtime"]) == 2
