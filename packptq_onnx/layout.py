"""Inputs whose samples are not on axis 0 (an RNN state [layers, N, hidden]).

Which axis holds the samples is read from the graph: the axis that carries the same symbolic
name as the other inputs' batch axis ('batch' in [2, batch, 64]); else the one dynamic axis
([2, ?, 128]); else, in a graph with every dim fixed, the one axis whose size is the other
inputs' fixed batch ([2, 1, 16] beside [1, 257]). `--batch-axis NAME:K` says it where the graph
cannot (fixed-shape exports almost always fix the batch at 1). The data gives such an input in the
model's own layout (samples on axis K).

Inside, every step sees samples first: the data is moved to axis 0 when loaded, and the graph
gets a Transpose after each such input that restores the model's layout. The export drops those
Transposes again (only per-tensor Quantize/Dequantize can sit between an input and its Transpose,
and they do not care about the layout), so the file keeps the inputs the original declares.
"""
from __future__ import annotations

import copy
from collections import Counter

import onnx
from onnx import helper

from .errors import UsageError
from .folding import outer_names

TAG = "packptq_samples_first"


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def batch_axes(inputs: list, given: dict | None = None) -> dict[str, int]:
    """name -> sample axis, for the inputs whose samples are not on axis 0."""
    given = dict(given or {})
    unknown = set(given) - {s.name for s in inputs}
    if unknown:
        raise UsageError(f"--batch-axis names {sorted(unknown)}, not inputs of the model "
                         f"({[s.name for s in inputs]})")
    shaped = [s for s in inputs if s.shape and not s.scalar]
    names = Counter(s.shape[0] for s in shaped if isinstance(s.shape[0], str))
    batch_name = names.most_common(1)[0][0] if names else None
    sizes = Counter(s.shape[0] for s in shaped if _static(s.shape[0]))
    dynamic_batch = any(not _static(s.shape[0]) for s in shaped)
    batch = 1 if 1 in sizes else min(sizes, key=lambda b: (-sizes[b], b)) if sizes else None
    out = {}
    for s in shaped:
        dyn = [i for i, d in enumerate(s.shape) if not _static(d)]
        if s.name in given:
            k = given[s.name]
            if not 0 <= k < len(s.shape):
                raise UsageError(f"--batch-axis {s.name}:{k}: the input has rank {len(s.shape)}")
        elif not _static(s.shape[0]):
            k = 0
        elif batch_name is not None and batch_name in s.shape:
            k = s.shape.index(batch_name)
        elif dynamic_batch:  # the others' batch is dynamic: here it is the one dynamic axis, if any
            k = dyn[0] if len(dyn) == 1 else 0
        elif s.shape[0] == batch:  # every batch fixed (at 1 in fixed exports): axis 0 where it fits
            k = 0
        else:  # axis 0 is not the batch size: the one dynamic axis, else the one axis of that size
            fits = dyn if len(dyn) == 1 else [i for i, d in enumerate(s.shape) if d == batch]
            if len(fits) > 1:
                raise UsageError(f"cannot tell which axis of input '{s.name}' {s.shape} holds the samples "
                                 f"(axes {fits} have the batch size {batch}): give --batch-axis {s.name}:K")
            k = fits[0] if fits else 0
        if k:
            out[s.name] = k
    return out


def _rename_uses(graph, old: str, new: str) -> None:
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH and old in outer_names(n):
                _rename_uses(a.g, old, new)


def samples_first(model: onnx.ModelProto, axes: dict[str, int]) -> onnx.ModelProto:
    """The model taking each input in `axes` with its samples on axis 0."""
    if not axes:
        return model
    m = copy.deepcopy(model)
    front = []
    for vi in m.graph.input:
        k = axes.get(vi.name)
        if k is None:
            continue
        inner = f"{vi.name}__{TAG}"
        _rename_uses(m.graph, vi.name, inner)
        rank = len(vi.type.tensor_type.shape.dim)
        perm = list(range(1, k + 1)) + [0] + list(range(k + 1, rank))
        front.append(helper.make_node("Transpose", [vi.name], [inner], name=f"{TAG}_{vi.name}", perm=perm))
        dims = list(vi.type.tensor_type.shape.dim)
        moved = [dims[k]] + dims[:k] + dims[k + 1:]
        new = [copy.deepcopy(d) for d in moved]
        del vi.type.tensor_type.shape.dim[:]
        vi.type.tensor_type.shape.dim.extend(new)
    nodes = front + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def undo(model: onnx.ModelProto) -> None:
    """Drop the Transposes samples_first added (in place); the caller restores the declared types."""
    g = model.graph
    ours = [n for n in g.node if n.op_type == "Transpose" and n.name.startswith(TAG)]
    for n in ours:
        g.node.remove(n)
        _rename_uses(g, n.output[0], n.input[0])
