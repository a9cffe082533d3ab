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
