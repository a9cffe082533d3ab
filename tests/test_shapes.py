"""Shapes from the data: dynamic height/width settled by the calibration data, the export keeping the
file's dynamic axes, fixed-batch graphs (freed where exact, else run at their batch size)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from packptq_onnx import shapes
from packptq_onnx.cli import main
from packptq_onnx.onnx_import import InputSpec


class ConcatHead(nn.Module):
    """A tiny detector: conv trunk, per-anchor boxes (pixels) concatenated with class scores."""

    def __init__(self, reshape_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.box, self.cls = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 3, 1)
        self.reshape_batch = reshape_batch

    def forward(self, x):
        f = self.trunk(x)
        n, hw = (self.reshape_batch, -1) if self.reshape_batch is not None else (-1, f.shape[2] * f.shape[3])
        box = (self.box(f) * 16.0).reshape(n, 4, hw)
        cls = torch.sigmoid(self.cls(f)).reshape(n, 3, hw)
        return torch.cat([box, cls], 1).transpose(1, 2)


class ConvNet(nn.Module):
    """Fully convolutional, with a skip joined after a stride-2 branch is upsampled: odd sizes fail."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        up = nn.functional.interpolate(torch.relu(self.b(x)), scale_factor=2.0, mode="nearest")
        return self.c(torch.relu(self.a(x)) + up)


def _export(net, path, shape, dynamic):
    torch.onnx.export(net, torch.randn(*shape), path, input_names=["images"], output_names=["out"],
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return str(path)


def _photos(n, h, w, seed):
    g = np.random.default_rng(seed)
    base = g.random((n, 3, h // 4, w // 4), dtype=np.float32)
    return np.repeat(np.repeat(base, 4, 2), 4, 3) + 0.05 * g.standard_normal((n, 3, h, w)).astype(np.float32)


def test_dynamic_hw_taken_from_data_and_kept_in_export(tmp_path, capsys):
    model = _export(ConcatHead(), tmp_path / "det.onnx", (1, 3, 64, 64),
                    {"images": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 1: "anchors"}})
    np.savez(tmp_path / "calib.npz", images=_photos(32, 64, 96, 0))
    np.savez(tmp_path / "eval.npz", images=_photos(16, 64, 96, 1))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "-o", str(out), "--report", str(rep), "--method", "rtn"]) == 0
    log = capsys.readouterr().out
    assert "input 'images' shape Nx3x64x96 taken from the calibration data" in log
    r = json.loads(rep.read_text())
    assert r["shapes"]["from_data"] == {"images": [None, 3, 64, 96]}
    dims = [d.dim_param or d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # the file's symbolic names, not the calibration size
    assert r["validation"][0]["cosine"] > 0.99
    # the head convs feed only the decode (scale, Sigmoid, Concat): no output quantizer, rule named
    heads = r["output_quantizers"]["per_output"]["out"]
    assert [h["rule"] for h in heads] == ["tail", "tail"] and len(r["output_quantizers"]["skipped"]) == 2
    assert {h["layer"] for h in heads} == set(r["output_quantizers"]["skipped"])
    second = r["validation_second_size"]
    assert second["inputs"] == {"images": [3, 32, 64]}  # 3/4 of 64x96, down to multiples of 32
    assert second["metrics"][0]["cosine"] > 0.99
    sess = ort.InferenceSession(str(out))
    for h, w in ((32, 32), (128, 64)):  # the export runs at sizes it never saw
        assert sess.run(None, {"images": _photos(2, h, w, 2)})[0].shape == (2, h * w // 16, 7)


def test_fixed_batch_that_is_free_is_freed(tmp_path, capsys):
    model = _export(ConcatHead(), tmp_path / "b1.onnx", (1, 3, 32, 32), None)
    np.savez(tmp_path / "calib.npz", images=_photos(32, 32, 32, 0))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                 "--report", str(rep), "--method", "rtn"]) == 0
    r = json.loads(rep.read_text())
    assert r["shapes"]["fixed_batch"] == 1 and r["shapes"]["batch_freed"] and r["shapes"]["run_batch"] is None
    assert "batch fixed at 1 in the graph: freed" in capsys.readouterr().out
    assert all(p["ok"] for p in r["parity"])
    assert onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # as declared


def test_fixed_batch_that_is_not_free_runs_in_batches_of_one(tmp_path, capsys):
    # the graph reshapes with a constant batch of 1: a batch of 2 cannot pass, so it runs one at a time
    model = _export(ConcatHead(reshape_batch=1), tmp_path / "b1.onnx", (1, 3, 32, 32), None)
    np.savez(tmp_path / "calib.npz", images=_photos(16, 32, 32, 0))
    np.savez(tmp_path / "eval.npz", images=_photos(8, 32, 32, 1))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "-o", str(out), "--report", str(rep), "--method", "block", "--iters", "4"]) == 0
    assert "not free (outputs change when batched): every run in batches of 1" in capsys.readouterr().out
    r = json.loads(rep.read_text())
    assert r["shapes"]["run_batch"] == 1 and not r["shapes"]["batch_freed"]
    assert all(p["ok"] for p in r["parity"]) and r["parity_layers"]["exact"]
    assert r["validation"][0]["cosine"] > 0.99


def test_second_size_shares_symbols_and_crops_sequences():
    specs = [InputSpec("ids", [None, "seq"], np.int64), InputSpec("mask", [None, "seq"], np.int64)]
    feeds = {"ids": np.arange(2 * 16).reshape(2, 16), "mask": np.ones((2, 16), np.int64)}
    other = shapes.second_size(specs, feeds)
    assert other["ids"].shape == other["mask"].shape == (2, 12)
    assert np.array_equal(other["ids"], feeds["ids"][:, :12])
    assert shapes.second_size([InputSpec("x", [None, 3, 8, 8], np.float32)],
                              {"x": np.zeros((1, 3, 8, 8), np.float32)}) is None


def test_single_array_under_another_name_is_said(tmp_path, capsys):
    model = _export(ConcatHead(), tmp_path / "det.onnx", (1, 3, 32, 32), {"images": {0: "batch"}})
    np.savez(tmp_path / "calib.npz", x=_photos(32, 32, 32, 0))
    assert main(["quantize", model, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "q.onnx"),
                 "--method", "rtn"]) == 0
    assert "calib.npz: array 'x' feeds input 'images' (names differ)" in capsys.readouterr().out


class TimeMajorCTC(nn.Module):
    """A CTC recognizer exported with its batch fixed at 1 and time first: [T, 1, C] (as CRNN exports)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, (2, 1), 1), nn.ReLU(), nn.Conv2d(16, 12, (4, 1)))

    def forward(self, x):
        f = self.conv(x)                       # [1, 12, 1, W]
        f = f.reshape(1, 12, f.shape[3])       # a constant batch of 1: not free
        return torch.softmax(f.permute(2, 0, 1), -1)  # [T, 1, C]


def test_time_major_outputs_join_samples_on_their_own_axis(tmp_path):
    from packptq_onnx import runtime, tasks
    from packptq_onnx.validate import task_scores

    model = _export(TimeMajorCTC(), tmp_path / "ctc.onnx", (1, 1, 8, 20), None)
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 20)).astype(np.float32)
    out = runtime.run(runtime.session(model), {"images": x})[0]
    assert out.shape == (20, 6, 12)  # six samples side by side on axis 1, not 120 rows on axis 0
    one = [runtime.session(model).run(None, {"images": x[i:i + 1]})[0][:, 0] for i in range(6)]
    assert np.allclose(out, np.stack(one, 1))
    noisy = out.copy()
    noisy[:, 2] = noisy[:, 2, ::-1]  # sample 2 reads differently, the others the same
    got = task_scores("ocr-ctc", None, [out], [noisy], {"images": x})
    want = np.mean([a == b for a, b in zip(tasks.ctc_greedy(out.transpose(1, 0, 2)),
                                            tasks.ctc_greedy(noisy.transpose(1, 0, 2)))])
    assert got["task_agreement"] == want == 5 / 6


def test_calibration_folder_of_two_shapes(tmp_path, capsys):
    """A folder of .npz files in two image sizes: the larger group sets the shape, the other joins the
    activation statistics where the converted graph runs it faithfully (this fully convolutional
    net does), and the export runs at both sizes."""
    model = _export(ConvNet(), tmp_path / "fcn.onnx", (1, 3, 32, 32),
                    {"images": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "h", 3: "w"}})
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", images=_photos(24, 64, 96, 0))
    np.savez(folder / "b.npz", images=_photos(8, 96, 64, 1))
    np.savez(folder / "c.npz", images=_photos(8, 64, 96, 2))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", str(folder), "-o", str(out), "--report", str(rep),
                 "--method", "rtn", "--eval", str(folder)]) == 0
    log = capsys.readouterr().out
    assert "samples in 2 shapes: 3x64x96 (32 samples, 2 files), 3x96x64 (8 samples, 1 files)" in log
    assert "calibration shape 3x96x64 (8 samples): in the activation statistics" in log
    r = json.loads(rep.read_text())
    assert r["shapes"]["from_data"] == {"images": [None, 3, 64, 96]}
    assert [g["calibrated"] for g in r["shapes"]["other_calibration_shapes"]] == [True]
    [other] = r["validation_other_shapes"]  # --eval with a folder validates every shape in it
    assert other["shape"] == "3x96x64" and other["metrics"][0]["cosine"] > 0.99
    sess_f, sess_q = ort.InferenceSession(model), ort.InferenceSession(str(out))
    for h, w in ((64, 96), (96, 64)):
        x = _photos(4, h, w, 3)
        a, b = sess_f.run(None, {"images": x})[0], sess_q.run(None, {"images": x})[0]
        assert a.shape == b.shape and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_calibration_shape_the_model_cannot_take_is_one_line(tmp_path, capsys):
    model = _export(ConvNet(), tmp_path / "fcn.onnx", (1, 3, 32, 32),
                    {"images": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "h", 3: "w"}})
    out = tmp_path / "q.onnx"
    for name, bad, says in (("odd", np.zeros((4, 3, 31, 31), np.float32), "the model cannot take them"),
                            ("five", np.zeros((4, 5, 32, 32), np.float32), "axis 1: 5 != 3")):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "a.npz", images=_photos(32, 32, 32, 0))
        np.savez(folder / "b.npz", images=bad)
        code = main(["quantize", model, "--calib", str(folder), "-o", str(out), "--method", "rtn"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and "b.npz" in err and says in err, err
        assert not out.exists()


class DFLHead(nn.Module):
    """YOLOv8's head: box sides as softmax distributions over 16 bins, read out by a fixed 1x1 conv
    with weights 0..15 (DFL), concatenated with Sigmoid class scores: [N, 4 + 3, A]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.box, self.cls = nn.Conv2d(16, 64, 1), nn.Conv2d(16, 3, 1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False)
        self.dfl.weight.data[:] = torch.arange(16.0).view(1, 16, 1, 1)

    def forward(self, x):
        f = self.trunk(x)
        n, a = f.shape[0], f.shape[2] * f.shape[3]
        dist = self.box(f).reshape(n, 4, 16, a).transpose(2, 1).softmax(1)  # [N, 16, 4, A]
        box = self.dfl(dist).reshape(n, 4, a) * 4.0
        return torch.cat([box, torch.sigmoid(self.cls(f)).reshape(n, 3, a)], 1)


def test_dfl_readout_stays_float(tmp_path, capsys):
    model = _export(DFLHead(), tmp_path / "v8.onnx", (1, 3, 32, 32), {"images": {0: "batch"}})
    np.savez(tmp_path / "calib.npz", images=_photos(32, 32, 32, 0))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                 "--report", str(rep), "--method", "rtn"]) == 0
    assert "stays float (decode: reads a Softmax" in capsys.readouterr().out
    r = json.loads(rep.read_text())
    [dfl] = r["output_quantizers"]["float_layers"]
    assert dfl not in {layer["node"] for layer in r["layers"]}
    conv = next(n for n in onnx.load(out).graph.node if n.name == dfl)
    w = next(i for i in onnx.load(out).graph.initializer if i.name == conv.input[1])
    assert np.array_equal(onnx.numpy_helper.to_array(w).ravel(), np.arange(16.0))  # its weights as they were
