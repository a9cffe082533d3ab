"""Blocks from graph structure alone (no node naming): single-tensor cuts of the data flow.

A cut is a point in the (topologically sorted) graph where exactly one data tensor is live.
Segments between cuts that hold a join (a node merging data paths that run through different
quantizable layers: residual Add, Concat of branches, squeeze-excite gate) are residual blocks. A
plain segment (no join) is the stem when it is the first segment, the head when it is the last,
and otherwise a one-layer block, or with the segment after it a depthwise-separable block when
its layer is a depthwise conv. Shape arithmetic (Shape, Size and what is computed only from them
and constants) and side inputs that no quantizable layer produced (e.g. an attention mask) do not
count as live.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .layers import Layer

SHAPE_OPS = ("Shape", "Size")


@dataclass
class Block:
    id: int
    name: str
    kind: str                 # "residual" (has a join), "layer" (one quantizable layer) or
                              # "separable" (a depthwise conv and the layer after it)
    nodes: list[int]          # node indices in the normalised graph
    layers: list[str]         # ONNX names of its quantizable layers, graph order
    output: str               # tensor at the cut after the block


@dataclass
class Units:
    stem: list[str]           # quantizable layer names before the first block
    blocks: list[Block]
    head: list[str] = field(default_factory=list)

    def block_of(self) -> dict[str, int]:
        return {name: b.id for b in self.blocks for name in b.layers}


def _data_tensors(graph) -> set[str]:
    inits = {i.name for i in graph.initializer}
    data = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        if any(t in data for t in node.input):
            data.update(o for o in node.output if o)
    return data


def _downstream(graph, sources: set[str]) -> set[str]:
    reach = set(sources)
    for node in graph.node:
        if node.op_type not in SHAPE_OPS and any(t in reach for t in node.input):
            reach.update(o for o in node.output if o)
    return reach


def find_blocks(model, layers: list[Layer]) -> Units:
    g = model.graph
    nodes = list(g.node)
    by_index = {l.index: l for l in layers}
    data = _data_tensors(g)
    main = _downstream(g, {nodes[l.index].output[0] for l in layers}) | {
        l.act_input for l in layers if l.act_input}
    live_tensors = data & main
    last_use = {}
    for i, node in enumerate(nodes):
        if node.op_type in SHAPE_OPS:
            continue
        for t in node.input:
            if t in live_tensors:
                last_use[t] = i
    for o in g.output:
        last_use[o.name] = len(nodes)
    produced_at = {o: i for i, n in enumerate(nodes) for o in n.output}

    # live set after each node, by sweeping births and deaths
    segments, start, live = [], 0, set()
    for i, node in enumerate(nodes):
        for o in node.output:
            if o in live_tensors and last_use.get(o, -1) > i:
                live.add(o)
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1 and i < len(nodes) - 1:
            (t,) = live
            if produced_at.get(t) == i:  # cut right after the producer of the single live tensor
                segments.append((list(range(start, i + 1)), t))
                start = i + 1
    segments.append((list(range(start, len(nodes))), g.output[0].name if g.output else ""))

    # attach segments without quantizable layers to the previous one (or the next, at the start)
    merged: list[tuple[list[int], str]] = []
    pending: list[int] = []
    for idx, out in segments:
        if not any(i in by_index for i in idx):
            if merged:
                merged[-1] = (merged[-1][0] + idx, out)
            else:
                pending += idx
            continue
        merged.append((pending + idx, out))
        pending = []
    if pending and merged:
        merged[-1] = (merged[-1][0] + pending, merged[-1][1])

    # a join merges paths through different quantizable layers (residual Add, SE gate, attention);
    # x * f(x) with no layer in f (hardswish, gating by an activation) is not one
    last_layer: dict[str, int] = {}
    joins = set()
    for i, node in enumerate(nodes):
        tags = {last_layer.get(t, -1) for t in node.input if t in live_tensors}
        if len(tags) >= 2:
            joins.add(i)
        out_tag = i if i in by_index else max(tags, default=-1)
        for o in node.output:
            last_layer[o] = out_tag

    def has_join(idx):
        return any(i in joins for i in idx)

    kinds = ["residual" if has_join(idx) else "layer" for idx, _ in merged]
    # stem: the first segment, head: the last, when plain (the layer reading the network input, the
    # classifier), as BRECQ / QDrop keep them; every other segment is a block, so a plain chain
    # (LCNet, MobileNetV1) is reconstructed and packed like residual blocks
    count = len(merged)
    lo = 1 if count > 2 and kinds[0] == "layer" else 0
    hi = count - 1 if count > 2 and kinds[-1] == "layer" else count
    dims = {i.name: i.dims for i in g.initializer}
    groups, pos = [], lo
    while pos < hi:  # a depthwise conv and the layer after it: one depthwise-separable block
        if (kinds[pos] == "layer" and pos + 1 < hi and kinds[pos + 1] == "layer"
                and _depthwise(g, merged[pos][0], by_index, dims)):
            groups.append(([pos, pos + 1], "separable"))
            pos += 2
        else:
            groups.append(([pos], kinds[pos]))
            pos += 1

    def names_of(idx):
        return [by_index[i].name for i in sorted(idx) if i in by_index]

    units = Units(stem=[n for idx, _ in merged[:lo] for n in names_of(idx)], blocks=[],
                  head=[n for idx, _ in merged[hi:] for n in names_of(idx)])
    for members, kind in groups:
        idx = sorted(i for m in members for i in merged[m][0])
        bid = len(units.blocks)
        units.blocks.append(Block(bid, f"block{bid}", kind, idx, names_of(idx), merged[members[-1]][1]))
    return units


def _depthwise(graph, idx: list[int], by_index: dict, dims: dict) -> bool:
    """The segment's quantizable layers are one depthwise Conv (one input channel per group).
    dims: initializer name -> its dims, built once per graph."""
    convs = [i for i in idx if i in by_index]
    if len(convs) != 1 or by_index[convs[0]].op != "Conv":
        return False
    group = next((a.i for a in graph.node[convs[0]].attribute if a.name == "group"), 1)
    w = dims.get(by_index[convs[0]].weight, ())
    return group > 1 and len(w) > 1 and w[1] == 1
