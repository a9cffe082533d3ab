"""`If` nodes whose condition the inputs the user fixes decide are replaced by the branch taken.

Voice-activity models branch on a sample-rate scalar (`sr == 16000`) and on input lengths, with
every convolution inside the branches, where no quantizer can reach them. A condition qualifies
when it is computed from constants, scalar (rank-0) inputs and tensor shapes only, never from the
values of a batched input (a wake-word model that runs a verifier when its score passes a
threshold keeps its If), and has one value on calibration batches of 1 and 2 samples and on a
second batch. The node is then replaced by the nodes of that branch (its initializers join the graph,
Identity nodes carry its outputs to the If's output names); nested Ifs that become top-level are
tried in turn. The exported model then serves that value only: the unused input stays declared,
and the report says which branch was kept. A condition that varies stays an If; its layers stay
float (`blocked` names them).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from . import runtime
from .data import n_samples, rows
from .folding import reads
from .shapes import specs


def _conditions(model: onnx.ModelProto, feeds: dict, names: list[str]) -> dict:
    """Value of each named condition tensor, or None where it varies, over a few runs."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.BOOL, None))
    sess = runtime.session(m)
    outs = [o.name for o in sess.get_outputs()]
    n = n_samples(feeds)
    runs = [(0, 1), (0, 2), (n // 2, n // 2 + 2)]
    seen: dict = {}
    for i, j in runs:
        try:
            res = sess.run(None, {k: rows(v, i, j) for k, v in feeds.items()})
        except Exception:  # the graph does not take this batch size: judge on the runs that worked
            continue
        for n in names:
            v = np.asarray(res[outs.index(n)])
            if v.size != 1:
                seen[n] = None
            elif n not in seen:
                seen[n] = bool(v.reshape(-1)[0])
            elif seen[n] is not None and seen[n] != bool(v.reshape(-1)[0]):
                seen[n] = None
    return {n: seen.get(n) for n in names}


def _decided_by_fixed_inputs(model: onnx.ModelProto, tensor: str) -> bool:
    """tensor depends on constants, rank-0 inputs and shapes only (Shape/Size read no values)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    scalar_inputs = {s.name for s in specs(model) if s.scalar}
    todo, seen = [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen or not t or t in inits or t in scalar_inputs:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None:
            return False  # a batched graph input (or an outer value)
        if n.op_type in ("Shape", "Size"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return False
        todo.extend(n.input)
    return True


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes no graph output depends on (the branch condition, once inlined) are removed."""
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        used = set(reads(n))
        if any(o in live for o in n.output):
            keep.append(n)
            live |= used
    del g.node[:]
    g.node.extend(reversed(keep))


def _inline(model: onnx.ModelProto, index: int, branch: bool) -> None:
    g = model.graph
    node = g.node[index]
    sub = next(helper.get_attribute_value(a) for a in node.attribute
               if a.name == ("then_branch" if branch else "else_branch"))
    new = list(sub.node) + [helper.make_node("Identity", [so.name], [o], name=f"{node.name or 'if'}_{k}")
                            for k, (so, o) in enumerate(zip(sub.output, node.output))]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:index] + new + nodes[index + 1:])
    g.initializer.extend(sub.initializer)
    g.value_info.extend(sub.value_info)


def inline_constant_ifs(model: onnx.ModelProto, feeds: dict) -> tuple[onnx.ModelProto, list[str]]:
    """-> (model with constant Ifs inlined, one note per inlined If)."""
    notes = []
    for _ in range(64):  # nested Ifs surface one level per round
        ifs = [i for i, n in enumerate(model.graph.node) if n.op_type == "If"]
        if not ifs:
            break
        ifs = [i for i in ifs if _decided_by_fixed_inputs(model, model.graph.node[i].input[0])]
        if not ifs:
            break
        conds = _conditions(model, feeds, [model.graph.node[i].input[0] for i in ifs])
        fixed = [(i, conds[model.graph.node[i].input[0]]) for i in ifs
                 if conds[model.graph.node[i].input[0]] is not None]
        if not fixed:
            break
        model = copy.deepcopy(model)
        for i, val in sorted(fixed, reverse=True):  # from the back: earlier indices stay valid
            name = model.graph.node[i].name or f"If #{i}"
            notes.append(f"{name}: condition is {val} on all calibration data; its "
                         f"{'then' if val else 'else'} branch is inlined")
            _inline(model, i, val)
        _drop_dead(model)
    return model, notes


def layers_in_control_flow(model) -> int:
    """Conv/ConvTranspose/Gemm/MatMul nodes inside subgraphs (If branches, Loop/Scan bodies)."""
    from onnx import AttributeProto, helper

    def count(graph, top):
        k = 0
        for n in graph.node:
            if not top and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                k += 1
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    k += count(helper.get_attribute_value(a), False)
        return k
    return count(model.graph, True)
