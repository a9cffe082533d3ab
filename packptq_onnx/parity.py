"""Layer-by-layer proof that onnxruntime computes what the torch simulation computes.

A whole-model comparison can fail on deep networks for a reason that is not a bug: a value that
lands on a rounding tie in one quantizer rounds one way in onnxruntime and the other way in torch
(float summation order differs), and LayerNorm / Softmax downstream make that one-code flip grow.
So each quantized layer is also checked on its own: it is fed the very input onnxruntime computed
for it, and its output must equal onnxruntime's output for that layer within one code.

The pipeline also runs the whole file with onnxruntime's graph optimizations off, op by op as
written. That separates the exported graph from onnxruntime's fused kernels (QLinearMatMul,
MatMulIntegerToFloat, BiasGelu, NCHWc Conv), which round in float in another order. Measured on
the test ViT at W3A4 (tests/test_lowrank_focus.py): unfused, onnxruntime equals the simulation
exactly (max |diff| 0). Fused, the first codes to differ are 3 of 65536 at the input of the last
MLP's second MatMul (2 of those values lie exactly on a tie); by the head's input 4 of 2048 codes
differ, and the 3-bit head turns them into 5% of the output values more than one step apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from . import runtime, state


@dataclass
class LayerParity:
    layers: int
    max_code_diff: int   # worst layer, in steps of its output quantizer (8-bit of its range if none)
    worst: str           # that layer's ONNX node name
    exact: bool          # every layer within one code everywhere


@torch.no_grad()
def layer_parity(qdq: onnx.ModelProto, gm, qls, feeds: dict, names: list) -> LayerParity:
    captured = {}
    def keep(q):
        return lambda m, a, k: captured.__setitem__(id(q), (a, k))
    with state.capture(pre=[(q, keep(q)) for q in qls], with_kwargs=True):
        gm(*[torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in names])
    have = {o.name for o in qdq.graph.output} | set(feeds)
    # a Relu / Clip bypassed by a shared input quantizer is gone: read what the layer reads now
    produced = {o for n in qdq.graph.node for o in n.output} | set(feeds)
    reads = {n.name: n.input[0] for n in qdq.graph.node if n.input}
    source = {q.layer.act_input: reads[q.layer.name] for q in qls
              if q.layer.act_input and q.layer.act_input not in produced and q.layer.name in reads}
    wanted = {source.get(t, t) for q in qls for t in (q.layer.act_input, q.layer.act_input2, q.layer.output) if t}
    wanted &= produced  # a tensor the export folded away (an inlined branch's last Identity) is not compared
    qls = [q for q in qls if all(source.get(t, t) in wanted for t in (q.layer.act_input, q.layer.act_input2,
                                                                       q.layer.output) if t)]
    sess = runtime.session(runtime.with_outputs(qdq, sorted(wanted - have)))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    values.update(feeds)
    values.update({t: values[src] for t, src in source.items()})
    worst, worst_name = 0, ""
    for q in qls:
        if id(q) not in captured:
            continue
        args, kwargs = captured[id(q)]
        args = list(args)
        for i, t in ((0, q.layer.act_input), (1, q.layer.act_input2)):
            if t is not None:
                args[i] = torch.from_numpy(np.ascontiguousarray(values[t])).to(args[i].dtype)
        y = q(*args, **kwargs).float().numpy().astype(np.float64)
        ref = values[q.layer.output].astype(np.float64)
        # no output quantizer: 1/255 of the output's range (its magnitude when a batch of 1 has one value)
        step = float(q.oq.scale) if q.oq is not None else max(float(np.ptp(y)), float(np.abs(y).max())) / 255.0 or 1e-12
        codes = int(np.abs(np.round(y / step) - np.round(ref / step)).max())
        if codes > worst or not worst_name:
            worst, worst_name = codes, q.layer.name
    return LayerParity(len(captured), worst, worst_name, worst <= 1)


FAR_FROM_SIMULATION = 0.05  # share of an output's values > 1 step from the simulation: it no longer predicts it


def notes(parity: list, per_layer: LayerParity, graph: list | None = None) -> list[str]:
    """What the end-of-run parity means, naming every output that fails (docs/METHOD.md, step 5).
    graph: the same comparison with onnxruntime's graph optimizations off; when it passes, the gap is
    the fused kernels' float rounding, not the exported graph."""
    bad = [x for x in parity if not x.ok]
    shares = ", ".join(f"{x.output} {100 * x.over_one:.2f}%" for x in bad)
    if not per_layer.exact:
        return [f"warning: the torch simulation that reconstruction optimises does not predict the exported "
                f"model: layer {per_layer.worst} differs by {per_layer.max_code_diff} steps fed with "
                f"onnxruntime's own input" + (f"; values more than one step apart: {shares}" if bad else "")]
    if not bad:
        return []
    why = (", and with graph optimizations off onnxruntime computes the simulation's outputs; its fused "
           "kernels round a few values on a rounding tie the other way and the flips grow through the network"
           if graph and all(x.ok for x in graph) else ", but rounding-tie flips grow through the network")
    line = f"note: each layer matches onnxruntime within one step{why}; values more than one step apart: {shares}"
    far = [x for x in bad if x.over_one > FAR_FROM_SIMULATION]
    if far:
        line += (f". On {', '.join(x.output for x in far)} the simulation no longer predicts the exported "
                 f"model (over {100 * FAR_FROM_SIMULATION:.0f}% of values)")
    return [line]
