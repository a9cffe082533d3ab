"""Which axis of each input holds the samples, and the samples-first graph the steps work on."""
import fuzzgraphs
import numpy as np
import onnx
import pytest

from packptq_onnx import layout, runtime
from packptq_onnx.errors import UsageError
from packptq_onnx.onnx_import import InputSpec


def _spec(name, shape, scalar=False):
    return InputSpec(name, shape, np.dtype(np.float32), scalar)


def test_batch_axes_from_names_dynamic_dims_and_fixed_sizes():
    ins = [_spec("x", ["batch", 512]), _spec("h", [2, "batch", 64]), _spec("sr", [], True)]
    assert layout.batch_axes(ins) == {"h": 1}
    assert layout.batch_axes([_spec("x", [None, None]), _spec("state", [2, None, 128])]) == {"state": 1}
    fixed = [_spec("mix", [1, 257, 1, 2]), _spec("cache", [2, 1, 33, 16]), _spec("c2", [1, 64, 4])]
    assert layout.batch_axes(fixed) == {"cache": 1}
    with pytest.raises(UsageError, match="--batch-axis tra:K"):
        layout.batch_axes(fixed + [_spec("tra", [2, 3, 1, 1, 16])])
    assert layout.batch_axes(fixed + [_spec("tra", [2, 3, 1, 1, 16])], {"tra": 2}) == {"cache": 1, "tra": 2}
    with pytest.raises(UsageError, match="not inputs"):
        layout.batch_axes(fixed, {"nope": 1})


def test_samples_first_runs_like_the_model_and_undo_restores_it():
    m = fuzzgraphs.build_state("bidirectional")
    r = np.random.RandomState(0)
    x, h0 = r.randn(3, 6, 5).astype(np.float32), r.randn(2, 3, 6).astype(np.float32)
    ref = runtime.session(m).run(None, {"x": x, "h0": h0})
    inner = layout.samples_first(m, {"h0": 1})
    got = runtime.session(inner).run(None, {"x": x, "h0": np.moveaxis(h0, 1, 0).copy()})
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    layout.undo(inner)
    inner.graph.input[1].type.CopyFrom(m.graph.input[1].type)
    onnx.checker.check_model(inner)
    for a, b in zip(ref, runtime.session(inner).run(None, {"x": x, "h0": h0})):
        np.testing.assert_array_equal(a, b)


def test_fixed_batch_with_a_dynamic_width_keeps_samples_on_axis_0():  # a CRNN: [1, 1, 64, W]
    assert layout.batch_axes([_spec("input1", [1, 1, 64, "image_width"])]) == {}
    assert layout.batch_axes([_spec("x", [1, 3, 800, 608])]) == {}
    assert layout.batch_axes([_spec("a", [1, 16, 96]), _spec("b", [1, 2, 128, 2])]) == {}
