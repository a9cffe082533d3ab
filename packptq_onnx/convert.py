"""ONNX -> torch.fx through onnx2torch, and the proof that the conversion is faithful."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from . import o2t, runtime
from .errors import UsageError
from .onnx_import import ImportedModel, default_opset


def module_name(index: int) -> str:
    """Name of the torch module made from node `index` of the normalised graph."""
    return f"n{index}"


def to_torch(imp: ImportedModel) -> torch.fx.GraphModule:
    m = copy.deepcopy(imp.model)
    for i, node in enumerate(m.graph.node):
        node.name = module_name(i)
    opsets = {o.domain or "": o.version for o in m.opset_import}
    missing = []
    from onnx2torch.node_converters.registry import get_converter
    for node in imp.model.graph.node:
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(node.domain or "", 1),
                          domain=node.domain or "")
        except NotImplementedError:
            missing.append(f"{node.op_type} (domain '{node.domain}', opset {opsets.get(node.domain or '', '?')})")
    if missing:
        raise UsageError(f"no torch converter for: {', '.join(sorted(set(missing)))}")
    try:
        gm = o2t.convert(m)
    except NotImplementedError as exc:
        raise UsageError(f"cannot convert the model to torch: {exc}") from None
    return gm.eval()


@torch.no_grad()
def torch_run(gm, feeds: dict, names: list[str], batch_size: int = 64, device: str = "cpu") -> list:
    n = len(feeds[names[0]])
    outs = None
    for i in range(0, n, batch_size):
        args = [torch.from_numpy(np.ascontiguousarray(feeds[k][i:i + batch_size])).to(device) for k in names]
        res = gm(*args)
        res = list(res) if isinstance(res, (list, tuple)) else [res]
        res = [r.detach().float().cpu().numpy() for r in res]
        outs = [[r] for r in res] if outs is None else [o + [r] for o, r in zip(outs, res)]
    return [np.concatenate(o) for o in outs]


@dataclass
class Agreement:
    output: str
    max_abs_diff: float
    cosine: float
    ref_absmax: float


def compare(names, ref: list, got: list) -> list[Agreement]:
    res = []
    for name, a, b in zip(names, ref, got):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        den = np.linalg.norm(a) * np.linalg.norm(b)
        cos = float(a @ b / den) if den > 0 else float(np.allclose(a, b))
        res.append(Agreement(name, float(np.abs(a - b).max()), cos, float(np.abs(a).max())))
    return res


def prove_faithful(imp: ImportedModel, gm, feeds: dict, rtol: float = 1e-3) -> list[Agreement]:
    """torch (normalised graph) vs onnxruntime (the input file as given), same input."""
    names = [i.name for i in imp.inputs]
    sess = runtime.session(imp.original if default_opset(imp.original) else imp.model)
    ref = runtime.run(sess, feeds)
    got = torch_run(gm, feeds, names)
    res = compare(imp.outputs, ref, got)
    for r in res:
        if not r.max_abs_diff <= 1e-4 + rtol * max(1.0, r.ref_absmax):
            raise UsageError(f"torch conversion is not faithful on output '{r.output}': max abs diff "
                             f"{r.max_abs_diff:.3g} (cosine {r.cosine:.5f}); please report the model")
    return res
