"""Quantizable layers of a normalised ONNX graph: Conv, ConvTranspose, Gemm, MatMul with a constant weight."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .folding import consumers

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    index: int               # node index in the normalised graph (torch module n{index})
    name: str                # ONNX node name, kept for export
    op: str
    weight: str              # initializer name
    bias: str | None         # 1-D bias initializer (Conv, Gemm), else None
    axis: int                # output-channel axis of the weight in ONNX layout
    act_input: str | None    # tensor quantized at the layer input; None = raw network input
    output: str = ""         # the layer's output tensor
    act_input2: str | None = None  # activation x activation MatMul / join: its second input (no weight)
    fixed_abits: int | None = None  # input bits that no bit choice changes (joins: 8)

    @property
    def has_weight(self) -> bool:
        return bool(self.weight)


JOINS = ("Add",)  # joins of two activations that onnxruntime runs as integer kernels (QLinearAdd)
JOIN_BITS = 8     # their inputs: onnxruntime's QLinearAdd is an 8-bit kernel; a residual stream at
                  # 4 bits would also cost far more accuracy than the convs' 4-bit inputs


def find_layers(model, act_matmul: bool = True, joins: bool = True) -> list[Layer]:
    """Weighted layers, (act_matmul) MatMuls of two activations such as q.k^T and attn.v, and
    (joins) residual Adds of two float activations, kept where `useful_joins` finds them worth it
    (docs/METHOD.md, "Integer joins")."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input if i.name not in inits}
    floats = {v.name for v in (*g.value_info, *g.input, *g.output)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    layers = []
    for idx, node in enumerate(g.node):
        if (joins and node.op_type in JOINS and node.domain in ("", "ai.onnx") and len(node.input) == 2
                and node.input[0] != node.input[1]
                and all(t in floats and t not in inits and t not in graph_inputs for t in node.input)):
            layers.append(Layer(idx, node.name, node.op_type, "", None, -1, node.input[0], node.output[0],
                                node.input[1], fixed_abits=JOIN_BITS))
            continue
        if node.op_type not in QUANTIZABLE or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if (act_matmul and node.op_type == "MatMul" and x not in inits and w not in inits
                and x not in graph_inputs and w not in graph_inputs):
            layers.append(Layer(idx, node.name, "MatMul", "", None, -1, x, node.output[0], w))
            continue
        if w not in inits or x in inits:
            continue
        rank = len(inits[w].dims)
        attrs = {a.name: a for a in node.attribute}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            if attrs.get("transA") and attrs["transA"].i:
                continue
            axis = 0 if attrs.get("transB") and attrs["transB"].i else 1
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            if bias is not None and (len(inits[bias].dims) != 1 or alpha != 1.0 or beta != 1.0):
                bias = None
        else:  # MatMul: y = x @ W, W [.., K, N]
            if rank < 2:
                continue
            axis = rank - 1
        if node.op_type in ("Conv", "ConvTranspose") and bias is not None and len(inits[bias].dims) != 1:
            bias = None
        layers.append(Layer(idx, node.name, node.op_type, w, bias, axis, None if x in graph_inputs else x,
                            node.output[0]))
    return useful_joins(model, layers)


def useful_joins(model, layers: list[Layer]) -> list[Layer]:
    """Keep the joins that make the graph more integer: both inputs made by quantized layers
    (their output, or a Relu / Clip right after one, or another join), and an output that an
    output quantizer may take (not leading to LayerNorm / Softmax, not a model output or decode
    tail). A join fed by float work (YOLOv8's SiLU, a Split, an SE gate's Mul) saves no conversion:
    the float op stays between a DequantizeLinear and a QuantizeLinear either way, and the join
    would only quantize a residual stream that was float (NudeNet's W8A8 F1 fell from 0.953 to
    0.947 with such joins). Dropping one can expose another, so this repeats until nothing
    changes."""
    while True:
        made = {l.output for l in layers} | {t for _, _, t in post_activations(model, layers).values()}
        rules = output_rules(model, layers, JOIN_BITS)
        keep = [l for l in layers if l.fixed_abits is None
                or (l.output not in rules and l.act_input in made and l.act_input2 in made)]
        if len(keep) == len(layers):
            return layers
        layers = keep


def is_join(layer: Layer) -> bool:
    return layer.op in JOINS


def layer_count(layers: list[Layer]) -> str:
    """'9 quantizable layers, 3 integer joins (Add)' for logs."""
    joins = sum(is_join(l) for l in layers)
    text = f"{len(layers) - joins} quantizable layers"
    return text + (f", {joins} integer joins (Add)" if joins else "")


def weight_array(model, name: str):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@dataclass
class LayerQuant:
    """Everything the exporter needs to write one quantized layer (ONNX layout, numpy)."""
    layer: Layer
    wbits: int
    w_int: np.ndarray                 # int8 container, values in the wbits range
    w_scale: np.ndarray               # float32, one per output channel
    abits: int | None = None            # None: input not quantized
    a_scale: float | None = None
    a_zero: int | None = None
    bias_int: np.ndarray | None = None   # int32
    bias_scale: np.ndarray | None = None  # float32, a_scale * w_scale
    bias_float: np.ndarray | None = None  # float32 bias replacing the model's (input not quantized)
    o_scale: float | None = None            # output quantizer (for kernel fusion), if any
    a2_scale: float | None = None           # second input of an activation x activation MatMul
    a2_zero: int | None = None
    o_zero: int | None = None
    o_bits: int = 8
    input_from: str | None = None  # read this tensor (the producer's quantized output) as it is
    input2_from: str | None = None  # the same for a join's second input
    pack: int | None = None
    float_weights: int = 0  # weight elements left float (a layer fallen back to float)
    float_kernel: bool = False  # run by onnxruntime's float conv on its b-bit weights (kernels.py)
    branch: tuple | None = None  # low-rank side branch (first, second): output += (input @ first) @ second


# transformer float ops that an 8-bit output quantizer in front of them only hurts: normalisation,
# softmax, GELU, attention scaling and masking; onnxruntime fuses none of them into integer
# kernels. (CNN ops such as pooling, ReLU, Sigmoid are deliberately not listed.)
# Div is not here: CNN hard-swish is x * clip(x + 3, 0, 6) / 6 and its convs must keep their output
# quantizers to run as QLinearConv; the transformer Divs (attention scale, LayerNorm, GELU's x / √2)
# lead to Softmax, Sqrt/Pow or Erf, which are.
FLOAT_SENSITIVE = ("LayerNormalization", "Softmax", "Erf", "Gelu", "Sqrt", "Pow", "Where",
                   "SimplifiedLayerNormalization", "RMSNormalization")


def outputs_before_float_ops(model, layers: list[Layer], max_nodes: int = 64) -> set[str]:
    """Layer outputs whose data reaches a FLOAT_SENSITIVE op before the next quantized input.

    Such outputs get no 8-bit output quantizer: it would not let onnxruntime fuse anything and it
    coarsens exactly the tensors transformers are sensitive to (outlier-heavy residual streams
    into LayerNorm, attention scores into Softmax, GELU inputs). Paths through data movement,
    bias / residual Add, ReLU and pooling, as in CNNs, keep their output quantizers."""
    g = model.graph
    users: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        for t in node.input:
            users.setdefault(t, []).append(i)
    quant_inputs = {i: {l.act_input, l.act_input2} - {None} for l in layers for i in [l.index]}
    out = set()
    for l in layers:
        seen, frontier, hit = set(), [l.output], False
        while frontier and not hit and len(seen) < max_nodes:
            t = frontier.pop()
            for i in users.get(t, []):
                if i in seen:
                    continue
                seen.add(i)
                if t in quant_inputs.get(i, ()):
                    continue  # reaches a quantized input: the quantizer there takes over
                node = g.node[i]
                if node.op_type in FLOAT_SENSITIVE:
                    hit = True
                    break
                frontier.extend(o for o in node.output if o)
        if hit:
            out.add(l.output)
    return out


def tail_outputs(model, layers: list[Layer]) -> dict[str, list[str]]:
    """Layer outputs from which no quantized layer input can be reached -> the graph outputs they
    feed. This is the decode / post-processing after a network's last layers (box offsets times
    strides, DFL softmax, score Sigmoid, Concat of boxes in pixels with scores in [0, 1], the
    Resize / ConvTranspose tail of a segmentation map). An 8-bit output quantizer there makes
    nothing faster (no integer kernel follows) but rounds what the task reads: the PicoDet-style
    layout detector of the coverage bench reads output cosine 0.57-0.88 with them (docs/METHOD.md,
    "Output quantizers")."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    feeds_quant, stack = set(), [t for l in layers for t in (l.act_input, l.act_input2) if t]
    while stack:  # backward closure: every tensor some quantized input is computed from
        t = stack.pop()
        if t in feeds_quant:
            continue
        feeds_quant.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i and i not in feeds_quant)
    users: dict[str, list] = {}
    for node in g.node:
        for t in node.input:
            users.setdefault(t, []).append(node)
    graph_out = [o.name for o in g.output]
    out = {}
    for l in layers:
        if not l.output or l.output in feeds_quant:
            continue
        seen, stack = set(), [l.output]
        while stack:  # forward: which graph outputs it reaches
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            stack.extend(o for n in users.get(t, []) for o in n.output if o)
        out[l.output] = [o for o in graph_out if o in seen]
    return out


MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split", "Slice", "Gather")


def decode_layers(model, layers: list[Layer]) -> dict[str, str]:
    """Layers that are decode arithmetic, not network: fed by a Softmax (through data movement only)
    and with no quantized layer after them, e.g. YOLOv8's DFL conv, whose fixed weights 0..15
    turn each box side's softmax into an expected distance. Quantized, its weights round (15 / 63
    per step in the 7-bit range) and every box moves. They are left float: name -> reason."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    tails = tail_outputs(model, layers)
    out = {}
    for l in layers:
        if not l.has_weight or l.act_input is None or l.output not in tails:
            continue
        node = softmax_source(producer, l.act_input)
        if node is not None:
            out[l.name] = f"decode: reads a Softmax ({node.name}) and feeds only the model outputs"
    return out


def softmax_source(producer: dict, tensor: str):
    """The Softmax node `tensor` comes from through data movement only (MOVES), or None."""
    node = producer.get(tensor)
    while node is not None and node.op_type in MOVES:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "Softmax" else None


def post_activations(model, layers: list[Layer]) -> dict[str, tuple[float, float, str]]:
    """Layer name -> (lo, hi, tensor) where the layer's output has one consumer, a Relu or a Clip with
    constant bounds, writing `tensor`.

    Such a layer's output quantizer is calibrated on the clipped values and kept inside [lo, hi]:
    then quantizing before or after the activation is the same, onnxruntime drops the Clip / Relu
    (ClipQuantFusion) and the 8-bit step covers [0, 6] rather than the much wider pre-activation."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    users = consumers(g)
    graph_out = {o.name for o in g.output}
    out = {}
    for l in layers:
        us = users.get(l.output, [])
        if len(us) != 1 or l.output in graph_out:
            continue
        n = us[0]
        if n.op_type == "Relu":
            out[l.name] = (0.0, float("inf"), n.output[0])
        elif n.op_type == "Clip" and n.input[0] == l.output:
            bounds = [float("-inf"), float("inf")]
            ok = True
            for k, t in enumerate(list(n.input[1:3])):
                if not t:
                    continue
                if t not in inits or inits[t].size != 1:
                    ok = False
                    break
                bounds[k] = float(inits[t].reshape(-1)[0])
            if ok:
                out[l.name] = (bounds[0], bounds[1], n.output[0])
    return out


def read_only_by_layers(model, layers: list[Layer]) -> set[str]:
    """Tensors whose every reader is a quantized layer taking it as its (first) activation input
    (or either input of a join), and that are not graph outputs: their producer's output quantizer
    may take the readers' bits."""
    g = model.graph
    by_node = {l.name: l for l in layers}
    graph_out = {o.name for o in g.output}
    out = set()
    for t, nodes in consumers(g).items():
        if t in graph_out or not t:
            continue
        if all(n.name in by_node and list(n.input).count(t) == 1
               and (by_node[n.name].act_input == t
                    or (is_join(by_node[n.name]) and by_node[n.name].act_input2 == t)) for n in nodes):
            out.add(t)
    return out


RULES = {"model output": "the layer's output is a model output",
         "float-sensitive": "reaches LayerNorm / Softmax / GELU / Sqrt / Pow / Where before a quantized input",
         "tail": "no quantized layer reads it: decode / post-processing up to the model outputs"}


def output_rules(model, layers, output_bits) -> dict:
    """Layer output left without an output quantizer -> (rule, model outputs it feeds)."""
    graph_out = [o.name for o in model.graph.output]
    rules = {l.output: ("model output", [l.output]) for l in layers if l.output in graph_out}
    if output_bits is None:
        return rules
    for t in outputs_before_float_ops(model, layers):
        rules.setdefault(t, ("float-sensitive", []))
    for t, outs in tail_outputs(model, layers).items():
        rules.setdefault(t, ("tail", outs))
    return rules


def per_output_rules(model, qls, rules) -> dict:
    """Per model output: the layers in front of it whose output quantizer a rule skipped."""
    res = {o.name: [] for o in model.graph.output}
    for q in qls:
        rule, outs = rules.get(q.layer.output, ("", []))
        for o in outs:
            res[o].append({"layer": q.layer.name, "rule": rule})
    return res


def after_softmax(model, layers: list[Layer]) -> set[str]:
    """Activation x activation MatMuls whose first input is a Softmax output (through data movement
    only): attention's probabilities @ v, where the focus quantizer may choose the input range."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {l.name for l in layers if not l.has_weight and l.op == "MatMul" and l.act_input2 is not None
            and softmax_source(producer, l.act_input) is not None}
