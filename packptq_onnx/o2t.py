"""onnx2torch, imported safely and extended through its own converter registry.

onnx2torch 1.5.15 imports torchvision at import time (for NMS / RoiAlign only); PyPI's
torchvision fails to import beside a CPU torch build. We import onnx2torch with a minimal
stand-in for torchvision when the real one cannot be imported, then fill converter gaps for
newer opset versions. Every converter added here has a parity test against onnxruntime.
"""
from __future__ import annotations

import sys
import types
import warnings

from torch import nn

from .ops import (
    AveragePoolPadded,
    BatchNormAnyRank,
    Clamp,
    CumSum,
    DropoutInference,
    Flatten,
    GlobalAveragePool,
    GlobalMaxPool,
    Reduce18,
    ReshapeAllowZero,
    Split18,
)


def _forget(*packages: str) -> None:
    """Drop these packages and their submodules from sys.modules (a half-finished import)."""
    for key in [k for k in sys.modules if k in packages or k.split(".")[0] in packages]:
        del sys.modules[key]


def _import_onnx2torch():
    try:
        import onnx2torch  # noqa: F401
        return sys.modules["onnx2torch"]
    except Exception:  # torchvision present but broken (or absent): retry with a stand-in
        pass
    _forget("torchvision", "onnx2torch")

    def _unavailable(*_a, **_k):
        raise NotImplementedError("this op needs a working torchvision install")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.roi_align = ops.nms = ops.box_convert = _unavailable
    tv.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        import onnx2torch  # noqa: F401
    finally:  # the stand-in is only for onnx2torch's own import
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return sys.modules["onnx2torch"]


def hide_broken_torchvision() -> None:
    """The same problem for transformers, which imports torchvision when it is installed: mark a
    torchvision that does not import as absent (BERT-style models do not need it)."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        _forget("torchvision")
        sys.modules["torchvision"] = None  # find_spec -> None: transformers sees it as absent


onnx2torch = _import_onnx2torch()
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription  # noqa: E402
from onnx2torch.utils.common import (  # noqa: E402
    OnnxMapping,
    OperationConverterResult,
    onnx_mapping_from_node,  # noqa: E402
)


def _register(op: str, version: int, fn, replace: bool = False) -> None:
    key = OperationDescription(domain="", operation_type=op, version=version)
    if key in _CONVERTER_REGISTRY and not replace:
        return
    _CONVERTER_REGISTRY[key] = fn


def _alias(op: str, new: int, old: int, check=None) -> None:
    """New op version whose semantics equal `old` (types added only), optionally guarded."""
    base = _CONVERTER_REGISTRY[OperationDescription("", op, old)]

    def conv(node, graph):
        if check is not None:
            check(node)
        return base(node, graph)

    _register(op, new, conv)


def _result(module: nn.Module, node, inputs=None) -> OperationConverterResult:
    if inputs is None:
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))


def _const(name: str, graph):
    """Constant value of a graph input (initializer or Constant node), or None if empty/absent."""
    if not name:
        return None
    if name in graph.initializers:
        return graph.initializers[name].to_torch()
    try:
        node, _ = graph.value_as_node_output(name)
    except KeyError:
        raise NotImplementedError(f"input {name!r} must be constant") from None
    if node.operation_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].to_torch()
    raise NotImplementedError(f"input {name!r} must be constant")


# ---- converters ----------------------------------------------------------------------------
def _reduce18(node, graph):
    a = node.attributes
    mod = Reduce18(node.operation_type, bool(a.get("keepdims", 1)), bool(a.get("noop_with_empty_axes", 0)))
    return _result(mod, node, [v for v in node.input_values if v])


def _split18(node, graph):
    split = node.input_values[1] if len(node.input_values) > 1 and node.input_values[1] else None
    mod = Split18(node.attributes.get("axis", 0), node.attributes.get("num_outputs", len(node.output_values)),
                  node.attributes.get("split"))
    return _result(mod, node, [node.input_values[0]] + ([split] if split else []))


def _gelu20(node, graph):
    approx = node.attributes.get("approximate", "none")
    return _result(nn.GELU(approximate="tanh" if approx == "tanh" else "none"), node)


def _global_max_pool(node, graph):
    return _result(GlobalMaxPool(), node)


def _global_average_pool(node, graph):
    return _result(GlobalAveragePool(), node)


_reshape_base = _CONVERTER_REGISTRY[OperationDescription("", "Reshape", 14)]


def _reshape(node, graph):
    if node.attributes.get("allowzero", 0) == 1:
        return _result(ReshapeAllowZero(), node)
    return _reshape_base(node, graph)


def _clip(node, graph):
    names = list(node.input_values) + ["", ""]
    lo, hi = _const(names[1], graph), _const(names[2], graph)
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo == 0.0 and hi is None:
        mod = nn.ReLU()
    elif lo == 0.0 and hi == 6.0:
        mod = nn.ReLU6()
    else:
        mod = Clamp(lo, hi)
    return _result(mod, node, [node.input_values[0]])


def _flatten(node, graph):
    return _result(Flatten(node.attributes.get("axis", 1)), node)


def _batch_norm(node, graph):
    if len(node.output_values) != 1 or node.attributes.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode is not supported")
    return _result(BatchNormAnyRank(node.attributes.get("epsilon", 1e-5)), node)


def _dropout(node, graph):
    names = list(node.input_values) + ["", ""]
    training = _const(names[2], graph)
    if training is not None and bool(training):
        raise NotImplementedError("Dropout in training mode is not supported")
    outputs = [o for o in node.output_values if o]
    return _result(DropoutInference(len(outputs) > 1), node, [node.input_values[0]])


def _cumsum(node, graph):
    a = node.attributes
    return _result(CumSum(bool(a.get("exclusive", 0)), bool(a.get("reverse", 0))), node)


def _no_dilation(node):
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        raise NotImplementedError("AveragePool with dilations is not supported")


_average_pool_base = _CONVERTER_REGISTRY[OperationDescription("", "AveragePool", 11)]


def _average_pool(node, graph):
    """onnx2torch's AveragePool, or ours where the pads differ at the two ends of an axis."""
    a = node.attributes
    pads, n = list(a.get("pads", [])), len(a["kernel_shape"])
    if a.get("auto_pad", "NOTSET") != "NOTSET" or not pads or pads[:n] == pads[n:]:
        return _average_pool_base(node, graph)
    if a.get("ceil_mode", 0):
        raise NotImplementedError("AveragePool with ceil_mode and pads that differ at the two ends")
    strides, include = list(a.get("strides", [1] * n)), bool(a.get("count_include_pad", 0))
    return _result(AveragePoolPadded(a["kernel_shape"], strides, pads, include), node)


def _plain_pad(node):
    if len(node.input_values) > 3 and node.input_values[3]:
        raise NotImplementedError("Pad with an axes input is not supported")
    if node.attributes.get("mode", "constant") == "wrap":
        raise NotImplementedError("Pad mode 'wrap' is not supported")


def _plain_resize(node):
    a = node.attributes
    if a.get("antialias", 0) or a.get("axes") or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with antialias/axes/keep_aspect_ratio_policy is not supported")
    if a.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise NotImplementedError("Resize coordinate mode 'half_pixel_symmetric' is not supported")


def _recurrent(node, graph):
    from . import rnn

    r = node.input_values[2]
    hidden = graph.initializers[r].to_torch().shape[-1] if r in graph.initializers else None
    return _result(rnn.module_for(node, hidden), node)


def install() -> None:
    """Fill onnx2torch's registry; idempotent."""
    # onnx2torch's Slice indexes with a list; torch warns on every call (same result today)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning,
                            module="onnx2torch")
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"):
        _register(op, 18, _reduce18)
    for op in ("ReduceMax", "ReduceMin"):
        _register(op, 20, _reduce18)
    for v in (2, 11, 13, 18):
        _register("Split", v, _split18, replace=True)
    _register("Gelu", 20, _gelu20)
    _register("GlobalMaxPool", 1, _global_max_pool)
    _register("GlobalMaxPool", 22, _global_max_pool)
    _register("GlobalAveragePool", 1, _global_average_pool, replace=True)
    for v in (5, 13, 14, 19, 21):
        _register("Reshape", v, _reshape, replace=True)
    for v in (11, 12, 13):
        _register("Clip", v, _clip, replace=True)
    for v in (9, 14, 15):
        _register("BatchNormalization", v, _batch_norm, replace=True)
    for v in (1, 9, 11, 13, 21):  # onnx2torch's fails for axis = rank (and axis 0 / < 0)
        _register("Flatten", v, _flatten, replace=True)
    for v in (11, 14):
        _register("CumSum", v, _cumsum, replace=True)
    for v in (7, 10, 11):  # before the aliases below, which take version 11's converter
        _register("AveragePool", v, _average_pool, replace=True)
    for v in (1, 6, 7, 10, 12, 13, 22):
        _register("Dropout", v, _dropout, replace=True)
    for op, versions in (("LSTM", (7, 14, 22)), ("GRU", (7, 14, 22)), ("RNN", (7, 14, 22))):
        for v in versions:
            _register(op, v, _recurrent)
    # newer versions that only add element types
    for op in ("Conv", "ConvTranspose"):
        _alias(op, 22, 11)
    for op, old in (("Acos", 7), ("Asin", 7), ("Atan", 7), ("Cos", 7), ("Sin", 7), ("Tan", 7),
                    ("Elu", 6), ("EyeLike", 9), ("GlobalAveragePool", 1),
                    ("HardSigmoid", 6), ("HardSwish", 14), ("InstanceNormalization", 6),
                    ("MaxPool", 12), ("Round", 11), ("Selu", 6), ("Softplus", 1), ("Softsign", 1)):
        _alias(op, 22, old)
    for op in ("Cast", "Constant", "Identity", "Shape", "Equal"):
        last = 16 if op == "Identity" else (15 if op == "Shape" else 13)
        _alias(op, 19, last)
        if op != "Equal":
            _alias(op, 21, last)
    for op in ("Transpose", "Unsqueeze"):
        _alias(op, 21, 13)
    _alias("ConstantOfShape", 20, 9)
    _alias("ConstantOfShape", 21, 9)
    _alias("GreaterOrEqual", 16, 12)
    _alias("LessOrEqual", 16, 12)
    _alias("IsNaN", 20, 13)
    _alias("IsInf", 20, 10)
    _alias("AveragePool", 19, 11, _no_dilation)
    _alias("AveragePool", 22, 11, _no_dilation)
    for v in (18, 19, 21):
        _alias("Pad", v, 13, _plain_pad)
    for v in (18, 19):
        _alias("Resize", v, 13, _plain_resize)


install()
convert = onnx2torch.convert
