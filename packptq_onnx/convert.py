"""ONNX -> torch.fx through onnx2torch, and the proof that the conversion is faithful."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from . import data, folding, o2t, runtime
from .errors import UsageError
from .onnx_import import ImportedModel, default_opset
from .validate import cosine


def module_name(index: int) -> str:
    """Name of the torch module made from node `index` of the normalised graph."""
    return f"n{index}"


_FALLBACK: set = set()  # registry keys filled with the onnxruntime fallback


def _key(op: str, domain: str, version: int):
    from onnx import defs
    from onnx2torch.node_converters.registry import OperationDescription

    try:
        version = defs.get_schema(op, domain=domain, max_inclusive_version=version).since_version
    except Exception:
        pass
    return OperationDescription(domain=domain, operation_type=op, version=version)


def to_torch(imp: ImportedModel, strict: bool = False) -> torch.fx.GraphModule:
    """Convert; ops with no converter run through onnxruntime (float) unless `strict`.

    The names of such nodes are in `gm.float_nodes` and in imp.notes."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    from . import ortnode

    m = copy.deepcopy(imp.model)
    folding.explicit_auto_pad(m)  # onnx2torch lacks SAME padding; the export keeps auto_pad
    for i, node in enumerate(m.graph.node):
        node.name = module_name(i)
    opsets = {o.domain or "": o.version for o in m.opset_import}
    missing, float_nodes = {}, []
    for node in imp.model.graph.node:
        domain = node.domain or ""
        key = _key(node.op_type, domain, opsets.get(domain, 1))
        if key not in _CONVERTER_REGISTRY or key in _FALLBACK:
            missing[key] = f"{node.op_type} (domain '{domain}', opset {opsets.get(domain, '?')})"
            float_nodes.append(node.name)
    if missing and strict:
        raise UsageError(f"no torch converter for: {', '.join(sorted(set(missing.values())))} "
                         "(without --strict these nodes run in onnxruntime and stay float)")
    for key in missing:
        _CONVERTER_REGISTRY[key] = ortnode.converter(opsets)
        _FALLBACK.add(key)
    if float_nodes:
        imp.notes.append(f"{len(float_nodes)} node(s) with no torch converter stay float and run in "
                         f"onnxruntime: {', '.join(sorted(set(missing.values())))}")
    try:
        gm = o2t.convert(m)
    except NotImplementedError as exc:
        raise UsageError(f"cannot convert the model to torch: {exc}") from None
    except Exception as exc:  # a damaged or inconsistent graph (e.g. a tensor with no inferred shape)
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"cannot convert the model to torch ({type(exc).__name__}: {msg}); "
                         "check the model with onnx.checker or run with --debug") from exc
    gm.float_nodes = float_nodes
    return gm.eval()


@torch.no_grad()
def torch_run(gm, feeds: dict, names: list[str], batch_size: int = 64, device: str = "cpu") -> list:
    n = len(feeds[names[0]])
    outs, counts = None, []
    for i in range(0, n, batch_size):
        counts.append(min(batch_size, n - i))
        args = [torch.from_numpy(np.ascontiguousarray(feeds[k][i:i + batch_size])).to(device) for k in names]
        res = gm(*args)
        res = list(res) if isinstance(res, (list, tuple)) else [res]
        res = [r.detach().float().cpu().numpy() for r in res]
        outs = [[r] for r in res] if outs is None else [o + [r] for o, r in zip(outs, res)]
    return [data.concat_samples(o, counts) for o in outs]


@dataclass
class Agreement:
    output: str
    max_abs_diff: float
    cosine: float
    ref_absmax: float


def compare(names, ref: list, got: list) -> list[Agreement]:
    res = []
    for name, a, b in zip(names, ref, got):
        a, b = a.astype(np.float64), b.astype(np.float64)
        res.append(Agreement(name, float(np.abs(a - b).max()), cosine(a, b), float(np.abs(a).max())))
    return res


def prove_faithful(imp: ImportedModel, gm, feeds: dict, rtol: float = 1e-3, batch_size: int = 64) -> list[Agreement]:
    """torch (normalised graph) vs onnxruntime (the input file as given), same input."""
    names = [i.name for i in imp.inputs]
    sess = runtime.session(imp.original if default_opset(imp.original) else imp.model)
    ref = runtime.run(sess, feeds, batch_size)
    got = torch_run(gm, feeds, names, batch_size)
    res = compare(imp.outputs, ref, got)
    for r in res:
        if not r.max_abs_diff <= 1e-4 + rtol * max(1.0, r.ref_absmax):
            raise UsageError(f"torch conversion is not faithful on output '{r.output}': max abs diff "
                             f"{r.max_abs_diff:.3g} (cosine {r.cosine:.5f}); please report the model")
    return res
