"""Import: load and check an ONNX model, normalise it, convert it to torch, prove the conversion.

Normalisation (the graph every later step sees, and the one the exporter writes QDQ into):
Constant nodes become initializers, opset < 13 is upgraded, node names are made unique and
non-empty, shapes are inferred and BatchNormalization after a Conv is folded into it.
"""
from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UsageError
from .folding import consumers, fold_constants, fuse_hard_swish, fuse_pad_into_conv, remove_nodes

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@dataclass
class InputSpec:
    name: str
    shape: list  # int for static dims, str/None for dynamic ones
    dtype: np.dtype
    scalar: bool = False  # declared rank 0 (a sample rate): one value for every sample
    batch_axis: int = 0   # where the data holds the samples (packptq_onnx.layout)


@dataclass
class ImportedModel:
    path: str
    original: onnx.ModelProto
    model: onnx.ModelProto  # normalised
    inputs: list[InputSpec]
    outputs: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def opset(self) -> int:
        return default_opset(self.model)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def parse_input_shape(text: str) -> tuple[str, list]:
    """'x:N,3,48,320' (or 'x:Nx3x48x320') -> ('x', [None, 3, 48, 320]); N, ? or -1 = dynamic."""
    name, sep, dims = text.rpartition(":")
    parts = dims.replace("x", ",").split(",") if sep else []
    try:
        shape = [None if d.strip() in ("N", "n", "?", "-1") else int(d) for d in parts]
    except ValueError:
        shape = []
    if not name or not shape or any(d is not None and d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r}: expected NAME:DIMS such as x:N,3,48,320 "
                         "(N keeps the batch dynamic)")
    return name, shape


def set_input_shapes(model: onnx.ModelProto, shapes: dict) -> None:
    """Fix the dims of graph inputs (in place); the batch axis stays dynamic unless given."""
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    for name, shape in shapes.items():
        if name not in graph_inputs:
            raise UsageError(f"--input-shape: the model has no input {name!r} (inputs: "
                             f"{', '.join(graph_inputs)})")
        t = graph_inputs[name].type.tensor_type
        old = [d if not isinstance(d, int) or d > 0 else None for d in _shape(graph_inputs[name])]
        if old and len(old) != len(shape):
            raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the model's input has rank "
                             f"{len(old)} {old}")
        t.shape.Clear()
        for i, d in enumerate(shape):
            dim = t.shape.dim.add()
            if d is None:
                dim.dim_param = (old[i] if old and isinstance(old[i], str) else None) or ("N" if i == 0 else f"d{i}")
            else:
                dim.dim_value = d
    del model.graph.value_info[:]  # re-inferred from the new input shapes


def check_static(inputs: list) -> None:
    """Only the first (batch) axis may be dynamic: packs, caches and the export need fixed shapes."""
    for spec in inputs:
        dyn = [f"axis {i} ({d or '?'})" for i, d in enumerate(spec.shape) if i > 0 and not _static(d)]
        if dyn:
            example = ",".join(["N"] + [str(d) if _static(d) else "?" for d in spec.shape[1:]])
            raise UsageError(f"input '{spec.name}' has dynamic {', '.join(dyn)}: fix them with "
                             f"--input-shape {spec.name}:{example} (replace ? by sizes)")
        if not spec.shape and not spec.scalar:
            raise UsageError(f"input '{spec.name}' has no known shape: give it with --input-shape "
                             f"{spec.name}:N,...")


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def load(path: str, input_shapes: dict | None = None) -> ImportedModel:
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise UsageError(f"{path} is not a readable ONNX model (corrupt or truncated?): "
                         f"{str(exc).splitlines()[0][:200]}") from None
    try:
        _decode_strings(copy.deepcopy(model))
    except UnicodeError:
        raise UsageError(f"{path} is not a readable ONNX model (corrupt: a name or string is not valid "
                         "UTF-8)") from None
    if not model.graph.node:
        raise UsageError(f"{path} is not a readable ONNX model: it has no graph nodes")
    try:
        if model.ByteSize() > 2_000_000_000:
            onnx.checker.check_model(path)
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        raise UsageError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from None
    return reshaped(ImportedModel(path, model, model, [], []), input_shapes or {})


def reshaped(imp: ImportedModel, shapes: dict, source: onnx.ModelProto | None = None) -> ImportedModel:
    """The file normalised again with these input shapes fixed (name -> dims, None = dynamic);
    `source` (default: the file as given) is the graph whose shapes are set."""
    model = source if source is not None else imp.original
    if shapes:
        model = copy.deepcopy(model)
        set_input_shapes(model, shapes)
    return ImportedModel(imp.path, imp.original, *normalise(model))


def _decode_strings(msg) -> None:
    """Check every string field is valid UTF-8 (on a copy): protobuf reads corrupt text
    leniently and would fail later, anywhere, when a name is rewritten."""
    for fd, value in msg.ListFields():
        values = value if _repeated(fd) else [value]
        if fd.type == fd.TYPE_MESSAGE:
            for v in values:
                _decode_strings(v)
        elif fd.type == fd.TYPE_STRING:  # rewrite it: that is where invalid UTF-8 fails
            if _repeated(fd):
                vals = list(value)
                del value[:]
                value.extend(vals)
            else:
                setattr(msg, fd.name, value)


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # newer protobuf; `label` on older ones
    return flag if isinstance(flag, bool) else field.label == field.LABEL_REPEATED


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QGemm",
                 "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QAttention", "MatMulIntegerToFloat",
                 "MatMulNBits"}


def check_float(model: onnx.ModelProto) -> None:
    """A model to quantize must not be quantized already (validate and inspect read such files)."""
    done = Counter(n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS)
    if done:
        raise UsageError("the model is already quantized (" + ", ".join(f"{k} x{v}" for k, v in done.most_common(4))
                         + (", ..." if len(done) > 4 else "") + "): give packptq the float model")


def normalise(model: onnx.ModelProto):
    m = copy.deepcopy(model)
    notes = []
    n_const = constants_to_initializers(m.graph)
    if n_const:
        notes.append(f"{n_const} Constant (or Identity-of-initializer) nodes moved to initializers")
    opset = default_opset(m)
    if m.graph.node and not any(n.domain in ("", "ai.onnx") for n in m.graph.node):
        ops = sorted({f"{n.domain}:{n.op_type}" for n in m.graph.node})
        raise UsageError(f"the model has no standard ONNX operators, only {', '.join(ops[:4])}"
                         f"{', ...' if len(ops) > 4 else ''}: no Conv / ConvTranspose / Gemm / MatMul to quantize")
    if opset < MIN_OPSET:
        try:
            m = onnx.version_converter.convert_version(m, MIN_OPSET)
        except Exception as exc:
            raise UsageError(f"cannot upgrade opset {opset} to {MIN_OPSET}: {str(exc).splitlines()[0][:200]}") from None
        notes.append(f"opset {opset} upgraded to {MIN_OPSET}")
    _unique_names(m.graph)
    n_fold = fold_constants(m)
    n_pad = fuse_pad_into_conv(m.graph)
    if n_fold or n_pad:
        notes.append(f"{n_fold} constant nodes folded, {n_pad} zero Pads fused into Conv")
    n_add = fold_bias_add(m.graph)
    n_bn = fold_batchnorm(m.graph)
    n_add += fold_bias_add(m.graph)  # Conv -> BatchNormalization -> Add
    if n_bn:
        notes.append(f"{n_bn} BatchNormalization folded into Conv")
    if n_add:
        notes.append(f"{n_add} per-channel constant Adds folded into Conv bias")
    n_hs = fuse_hard_swish(m)
    if n_hs:
        notes.append(f"{n_hs} hard-swish chains fused into HardSwish")
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:
        notes.append("shape inference failed; shapes unknown")
    inits = {i.name for i in m.graph.initializer}
    inputs = [InputSpec(i.name, _shape(i), helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                        i.type.tensor_type.HasField("shape") and not i.type.tensor_type.shape.dim)
              for i in m.graph.input if i.name not in inits]
    return m, inputs, [o.name for o in m.graph.output], notes


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def _constant_value(a) -> np.ndarray | None:
    """The value a Constant node's single attribute holds (None for a sparse or string one)."""
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    kinds = {"value_float": (a.f, np.float32), "value_floats": (a.floats, np.float32),
             "value_int": (a.i, np.int64), "value_ints": (a.ints, np.int64)}
    if a.name not in kinds:
        return None
    v, dtype = kinds[a.name]
    return np.array(v, dtype)


def constants_to_initializers(graph) -> int:
    """Constant nodes, and Identity nodes of an initializer (torch's export of tied / equal
    parameters), become initializers: weights must be initializers to be found and quantized."""
    keep, moved = [], 0
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            graph.initializer.append(t)
            inits[t.name] = t
            moved += 1
            continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            value = _constant_value(node.attribute[0])
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                inits[node.output[0]] = graph.initializer[-1]
                moved += 1
                continue
        keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _unique_names(graph) -> None:
    seen = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _sole_conv(tensor, g) -> tuple | None:
    """(conv, weight, bias as float64) when `tensor` is a Conv's output that nothing else reads and is
    no graph output, and the Conv's weight and bias (if any) are initializers; else None.
    g: (initializers, producer by output, consumers, graph outputs)."""
    inits, producer, users, outputs = g
    conv = producer.get(tensor)
    if (conv is None or conv.op_type != "Conv" or len(users.get(tensor, [])) != 1 or tensor in outputs
            or conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)):
        return None
    w = numpy_helper.to_array(inits[conv.input[1]])
    has_b = len(conv.input) > 2 and conv.input[2]
    b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_b else np.zeros(w.shape[0])
    return conv, w, b


def _maps(graph) -> tuple:
    return ({i.name: i for i in graph.initializer}, {o: n for n in graph.node for o in n.output},
            consumers(graph), {o.name for o in graph.output})


def fold_bias_add(graph) -> int:
    """Fold an Add of a per-output-channel constant into the Conv that alone feeds it (its bias).

    paddle2onnx writes a conv's bias as a bias-free Conv and an Add of a [1, C, 1, 1] constant
    (PP-OCRv5 / v6). onnxruntime folds it into the float conv, but in a quantized graph the Add sits
    between the conv and its output quantizer, so the conv could not be fused into an integer
    kernel, and the Add ran on its own: 231 us of Adds against 63 us in float on the PP-OCRv6 tiny
    recognizer's W8A8 export, batch 1."""
    g = _maps(graph)
    drop = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for x, c in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            found = _sole_conv(x, g) if c in g[0] else None
            if found is None:
                continue
            conv, w, b = found
            k = numpy_helper.to_array(g[0][c])
            shape = [1] * (w.ndim - k.ndim) + list(k.shape)
            if (k.dtype != w.dtype or k.ndim > w.ndim or shape[0] != 1 or shape[1] not in (1, w.shape[0])
                    or any(d != 1 for d in shape[2:])):
                continue
            bname = f"{conv.name}.bias_add"
            graph.initializer.append(numpy_helper.from_array((b + k.reshape(-1)).astype(w.dtype), bname))
            del conv.input[2:]
            conv.input.append(bname)
            conv.output[0] = add.output[0]
            g[1][add.output[0]] = conv  # a second Add after this one folds too
            drop.append(add)
            break
    return remove_nodes(graph, drop)


def fold_batchnorm(graph) -> int:
    """Fold BatchNormalization into the Conv that alone feeds it (weights rewritten, new names)."""
    g = _maps(graph)
    inits = g[0]
    drop = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        found = _sole_conv(bn.input[0], g)
        if found is None or any(n not in inits for n in bn.input[1:5]):
            continue
        conv, w, b = found
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        k = scale / np.sqrt(var + eps)
        w2 = (w.astype(np.float64) * k.reshape([-1] + [1] * (w.ndim - 1))).astype(w.dtype)
        b2 = ((b - mean) * k + beta).astype(w.dtype)
        wn, bname = f"{conv.name}.folded_weight", f"{conv.name}.folded_bias"
        graph.initializer.extend([numpy_helper.from_array(w2, wn), numpy_helper.from_array(b2, bname)])
        del conv.input[1:]
        conv.input.extend([wn, bname])
        conv.output[0] = bn.output[0]
        drop.append(bn)
    return remove_nodes(graph, drop)
