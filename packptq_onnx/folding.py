"""Graph clean-ups before quantizing: fold constant subgraphs, fuse zero Pad into the Conv after it.

Exporters write TF-style "same" padding as a Pad whose pads are computed from constants
(ConstantOfShape / Concat / Reshape / Slice / Transpose / Cast: torch's F.pad, EfficientNet-Lite).
Left in place, the Pad sits between a layer's activation and the next conv's input quantizer, so
onnxruntime can neither drop the ReLU6 nor fuse the convs into integer kernels.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
           "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct"}
MAX_FOLD_BYTES = 1 << 24  # do not bloat the model by materialising large computed tensors


def fold_constants(model: onnx.ModelProto) -> int:
    """Nodes whose inputs are all initializers become initializers (evaluated with onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_out = {o.name for o in g.output}
    opsets = list(model.opset_import)
    keep, folded = [], 0
    for node in g.node:
        ins = [t for t in node.input if t]
        if (node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD or not ins
                or any(t not in inits for t in ins) or any(o in graph_out for o in node.output)):
            keep.append(node)
            continue
        try:
            sub = helper.make_model(
                helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
                                  [inits[t] for t in dict.fromkeys(ins)]), opset_imports=opsets)
            values = ReferenceEvaluator(sub).run(None, {})
        except Exception:
            keep.append(node)
            continue
        if sum(np.asarray(v).nbytes for v in values) > MAX_FOLD_BYTES:
            keep.append(node)
            continue
        for name, v in zip(node.output, values):
            t = numpy_helper.from_array(np.asarray(v), name)
            g.initializer.append(t)
            inits[name] = t
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
        drop_unused_initializers(g)
    return folded


def fuse_pad_into_conv(graph) -> int:
    """Pad (constant mode, value 0, spatial pads only, constant pads) feeding only Convs: the pads
    move into the Convs' `pads` attribute and the Pad disappears (as onnxruntime's PadFusion)."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users = consumers(graph)
    graph_out = {o.name for o in graph.output}
    drop = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits or pad.output[0] in graph_out:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            if pad.input[2] not in inits or np.any(inits[pad.input[2]] != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes input: keep it simple
        pads = inits[pad.input[1]].astype(np.int64).reshape(-1)
        r = len(pads) // 2
        if r < 3 or np.any(pads < 0) or np.any(pads[[0, 1, r, r + 1]] != 0):
            continue
        convs = users.get(pad.output[0], [])
        if not convs or any(c.op_type != "Conv" or c.input[0] != pad.output[0] for c in convs):
            continue
        if any(node_attr(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for c in convs):
            continue
        begin, end = pads[2:r], pads[r + 2:]
        for c in convs:
            old = list(node_attr(c, "pads", [0] * (2 * (r - 2))))
            new = [int(a + b) for a, b in zip(old, list(begin) + list(end))]
            for a in list(c.attribute):
                if a.name == "pads":
                    c.attribute.remove(a)
            c.attribute.append(helper.make_attribute("pads", new))
            c.input[0] = pad.input[0]
        drop.append(pad)
    return remove_nodes(graph, drop)


def node_attr(node, name, default):
    """A node's attribute value, or `default` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def outer_names(node) -> list[str]:
    """Values a control-flow node's subgraphs read from the enclosing graph (in first-use order),
    other than its own inputs."""
    out: list = []

    def walk(g, bound: set):
        bound = bound | {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            for x in n.input:
                if x and x not in bound and x not in out:
                    out.append(x)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(helper.get_attribute_value(a), bound)
            bound |= set(n.output)

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            walk(helper.get_attribute_value(a), set())
    return [x for x in out if x not in node.input]


def reads(node) -> list[str]:
    """What a node reads: its inputs and what its subgraphs read from the enclosing graph."""
    return list(node.input) + (outer_names(node) if node.op_type in ("If", "Loop", "Scan") else [])


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it (a control-flow node reads what its branches read)."""
    out: dict[str, list] = {}
    for node in graph.node:
        for name in reads(node):
            out.setdefault(name, []).append(node)
    return out


def remove_nodes(graph, nodes: list) -> int:
    """Remove `nodes` (already bypassed) and the initializers only they read; returns how many."""
    for node in nodes:
        graph.node.remove(node)
    if nodes:
        drop_unused_initializers(graph)
    return len(nodes)


def drop_unused_initializers(graph) -> None:
    """Remove initializers that no node reads and that are not graph outputs, and the graph inputs
    that only declared them (IR < 4 files list every initializer as an input too; left behind, the
    name would look like an input the data must feed)."""
    used = {n for node in graph.node for n in reads(node)} | {o.name for o in graph.output}
    dropped = {i.name for i in graph.initializer if i.name not in used}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


SAME_PAD_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def explicit_auto_pad(model: onnx.ModelProto) -> int:
    """auto_pad SAME_UPPER / SAME_LOWER (Keras / TF exports) rewritten as explicit pads where the
    node's input size is known, in place; returns how many. onnx2torch does not implement SAME;
    the conversion uses this on its own copy at the settled input size, while the exported graph
    keeps auto_pad so that it still pads right at every other size. ONNX Conv spec: out = ceil(in /
    stride), total = max((out - 1) * stride + (k - 1) * dilation + 1 - in, 0), the odd extra at the
    end for SAME_UPPER and at the start for SAME_LOWER."""
    g = model.graph
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
            for vi in list(g.input) + list(g.value_info)}
    inits = {i.name: list(i.dims) for i in g.initializer}
    done = 0
    for node in g.node:
        mode = node_attr(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if node.op_type not in SAME_PAD_OPS or mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        shape = dims.get(node.input[0], [])
        kernel = list(node_attr(node, "kernel_shape", []))
        if not kernel and node.op_type == "Conv" and node.input[1] in inits:
            kernel = inits[node.input[1]][2:]
        spatial = shape[2:]
        if not kernel or len(spatial) != len(kernel) or not all(spatial):
            continue
        strides = list(node_attr(node, "strides", [])) or [1] * len(kernel)
        dil = list(node_attr(node, "dilations", [])) or [1] * len(kernel)
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dil):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if mode == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("pads", begin + end)])
        done += 1
    return done


def fuse_hard_swish(model: onnx.ModelProto) -> int:
    """x * clip(x + 3, 0, 6) / 6 (PaddlePaddle's and TensorFlow's hard-swish: Add, Clip, Mul, Div or
    a Mul by 1/6) and x * HardSigmoid(x; 1/6, 0.5) (torch below opset 14) become one HardSwish
    (opset 14; the model is upgraded from 13 when needed). onnxruntime fuses neither form, so each
    ran as three or four passes over the tensor; in a quantized model they sit between a
    DequantizeLinear and a QuantizeLinear. The direction classifier's 18 chains: 1012 -> 696 us
    float at batch 1, one thread. Returns how many were fused."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    users = consumers(g)
    graph_out = {o.name for o in g.output}

    def value(name, want):
        v = inits.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - want) <= 1e-6 * max(1, abs(want))

    def only_user(node, op):
        u = users.get(node.output[0], [])
        ok = len(u) == 1 and u[0].op_type == op and node.output[0] not in graph_out
        return u[0] if ok else None

    found = []
    for first in g.node:
        if first.op_type == "Add" and len(first.input) == 2:
            x = next((a for a, b in (first.input, first.input[::-1]) if value(b, 3.0)), None)
            clip = only_user(first, "Clip")
            if x is None or clip is None or len(clip.input) < 3 or not (value(clip.input[1], 0.0)
                                                                      and value(clip.input[2], 6.0)):
                continue
            gate = clip
        elif first.op_type == "HardSigmoid":
            attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
            if abs(attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(attrs.get("beta", 0.5) - 0.5) > 1e-6:
                continue
            x, gate = first.input[0], first
        else:
            continue
        mul = only_user(gate, "Mul")
        if mul is None or sorted(mul.input) != sorted([x, gate.output[0]]):
            continue
        if gate is first:
            found.append(([first, mul], mul.output[0], x))
            continue
        last = only_user(mul, "Div") or only_user(mul, "Mul")
        if last is None:
            continue
        if last.op_type == "Div":
            ok = last.input[0] == mul.output[0] and value(last.input[1], 6.0)
        else:
            ok = any(a == mul.output[0] and value(b, 1 / 6) for a, b in (last.input, last.input[::-1]))
        if not ok:
            continue
        found.append(([first, clip, mul, last], last.output[0], x))
    if not found:
        return 0
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset.version < 13:
        return 0
    if opset.version == 13:  # 13 -> 14 changes no default behaviour of any operator (types, new attributes)
        opset.version = 14
    for chain, y, x in found:
        at = list(g.node).index(chain[-1])
        g.node.insert(at, helper.make_node("HardSwish", [x], [y], name=chain[-1].name + "_hardswish"))
    remove_nodes(g, [n for chain, _, _ in found for n in chain])
    return len(found)
