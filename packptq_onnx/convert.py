"""ONNX -> torch.fx through onnx2torch, and the proof that the conversion is faithful."""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

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


def to_torch(imp: ImportedModel, strict: bool = False, force: dict | None = None) -> torch.fx.GraphModule:
    """Convert; ops with no converter, nodes whose converter refuses them, and nodes in `force`
    (name -> reason: they failed when run) run through onnxruntime (float) unless `strict`.

    The names of such nodes are in `gm.float_nodes` and in imp.notes."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    from . import ortnode

    force = dict(force or {})
    m = copy.deepcopy(imp.model)
    folding.explicit_auto_pad(m)  # onnx2torch lacks SAME padding; the export keeps auto_pad
    for i, node in enumerate(m.graph.node):
        node.name = module_name(i)
    # onnx2torch names a module "domain/name"; a dot in a domain (com.microsoft) is refused as a
    # module name, so the converted copy spells domains without dots (OrtNode restores them)
    safe = {o.domain: o.domain.replace(".", "_") for o in m.opset_import if "." in o.domain}
    for node in m.graph.node:
        node.domain = safe.get(node.domain, node.domain)
    for o in m.opset_import:
        o.domain = safe.get(o.domain, o.domain)
    spelled = {v: k for k, v in safe.items()}
    opsets = {o.domain or "": o.version for o in m.opset_import}
    missing, float_nodes, refused = {}, [], {}
    keys, original = set(), {module_name(i): n.name for i, n in enumerate(imp.model.graph.node)}
    for node in imp.model.graph.node:
        domain = safe.get(node.domain, node.domain) or ""
        key = _key(node.op_type, domain, opsets.get(domain, 1))
        keys.add(key)
        if key not in _CONVERTER_REGISTRY or key in _FALLBACK:
            missing[key] = f"{node.op_type} (domain '{node.domain}', opset {opsets.get(domain, '?')})"
            float_nodes.append(node.name)
    if missing and strict:
        raise UsageError(f"no torch converter for: {', '.join(sorted(set(missing.values())))} "
                         "(without --strict these nodes run in onnxruntime and stay float)")
    for key in missing:
        _CONVERTER_REGISTRY[key] = ortnode.converter(opsets, spelled)
        _FALLBACK.add(key)
    fallback = ortnode.converter(opsets, spelled)

    def guarded(orig):
        def conv(node, graph):
            if node.name in force:
                refused[node.name] = f"{node.operation_type} ({force[node.name]})"
                return fallback(node, graph)
            try:
                return orig(node, graph)
            except Exception as exc:  # the converter refuses this node's attributes or inputs
                if strict:
                    raise
                why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                refused[node.name] = f"{node.operation_type} ({why})"
                return fallback(node, graph)
        return conv

    saved = {k: _CONVERTER_REGISTRY[k] for k in keys}
    for k, conv in saved.items():
        _CONVERTER_REGISTRY[k] = guarded(conv)
    try:
        gm = o2t.convert(m)
    except NotImplementedError as exc:
        raise UsageError(f"cannot convert the model to torch: {exc}") from None
    except Exception as exc:  # a damaged or inconsistent graph (e.g. a tensor with no inferred shape)
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"cannot convert the model to torch ({type(exc).__name__}: {msg}); "
                         "check the model with onnx.checker or run with --debug") from exc
    finally:
        _CONVERTER_REGISTRY.update(saved)
    if float_nodes:
        imp.notes.append(f"{len(float_nodes)} node(s) with no torch converter stay float and run in "
                         f"onnxruntime: {', '.join(sorted(set(missing.values())))}")
    if refused:
        imp.notes.append(f"{len(refused)} node(s) whose conversion fails stay float and run in onnxruntime: "
                         + "; ".join(sorted(set(refused.values()))))
        float_nodes += [original[k] for k in sorted(refused)]
    for n in gm.graph.nodes:  # "com_microsoft/n20" -> "n20": every module is named by its node index
        if n.op == "call_module" and "/" in n.target:
            mod = getattr(gm, n.target)
            delattr(gm, n.target)
            n.target = n.target.rsplit("/", 1)[-1]
            setattr(gm, n.target, mod)
    _graph_outputs(gm, m)
    gm.float_nodes = float_nodes
    return gm.eval()


def _graph_outputs(gm, model) -> None:
    """One fx output per ONNX graph output, in order. onnx2torch returns the whole tuple of a
    multi-output node (an LSTM's Y_h, a fallback op's second output) and merges duplicates."""
    producer = {o: (i, k, len(n.output)) for i, n in enumerate(model.graph.node) for k, o in enumerate(n.output)}
    mods = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    vals = []
    with gm.graph.inserting_before(out_node):
        for o in model.graph.output:
            if o.name not in producer or module_name(producer[o.name][0]) not in mods:
                return  # an output that no node makes (an input passed through): leave as converted
            i, k, n_out = producer[o.name]
            node = mods[module_name(i)]
            vals.append(gm.graph.call_function(operator.getitem, (node, k)) if n_out > 1 else node)
    out_node.args = (vals[0] if len(vals) == 1 else tuple(vals),)
    gm.graph.eliminate_dead_code()
    gm.recompile()


class _FirstFailure(fx.Interpreter):
    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception as exc:
            from .ortnode import OrtNode

            if n.op == "call_module" and n.target.startswith("n") and \
                    not isinstance(self.fetch_attr(n.target), OrtNode):
                why = str(exc).splitlines()[0][:120] if str(exc) else ""
                raise _NodeFailed(n.target, f"{type(exc).__name__}: {why}") from exc
            raise


class _NodeFailed(Exception):
    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


@torch.no_grad()
def failing_node(gm, feeds: dict, names: list[str], batch_size: int) -> tuple[str, str] | None:
    """(node, reason) of the first converted node that raises on a batch of `feeds`, else None."""
    args = [torch.from_numpy(np.ascontiguousarray(data.rows(feeds[k], 0, batch_size))) for k in names]
    try:
        _FirstFailure(gm).run(*args)
    except _NodeFailed as exc:
        return exc.node, exc.reason
    except Exception:  # not a node of ours: left to the faithfulness check to report
        return None
    return None


def to_torch_running(imp: ImportedModel, feeds: dict, batch_size: int, strict: bool = False):
    """to_torch, then nodes whose torch module fails on real data run in onnxruntime instead."""
    n_notes = len(imp.notes)
    gm, force = to_torch(imp, strict), {}
    for _ in range(len(imp.model.graph.node)):
        bad = failing_node(gm, feeds, [i.name for i in imp.inputs], batch_size)
        if bad is None or bad[0] in force:
            return gm
        if strict:
            raise UsageError(f"node {bad[0]} fails in torch ({bad[1]}); without --strict it runs in onnxruntime")
        force[bad[0]] = bad[1]
        del imp.notes[n_notes:]
        gm = to_torch(imp, strict, force)
    return gm


@torch.no_grad()
def torch_run(gm, feeds: dict, names: list[str], batch_size: int = 64, device: str = "cpu",
              fixed: bool = False) -> list:
    """The torch graph over feeds in batches (smaller for large samples unless the batch is fixed)."""
    n = data.n_samples(feeds)
    if not fixed:
        batch_size = data.run_batch(feeds, batch_size)
    outs, counts = None, []
    for i in range(0, n, batch_size):
        counts.append(min(batch_size, n - i))
        args = [torch.from_numpy(np.ascontiguousarray(data.rows(feeds[k], i, i + batch_size))).to(device)
                for k in names]
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


def prove_faithful(imp: ImportedModel, gm, feeds: dict, rtol: float = 1e-3, batch_size: int = 64,
                   fixed: bool = False) -> list[Agreement]:
    """torch (normalised graph) vs onnxruntime (the input file as given), same input."""
    names = [i.name for i in imp.inputs]
    sess = runtime.session(imp.original if default_opset(imp.original) else imp.model)
    try:
        ref = runtime.run(sess, feeds, batch_size)
    except Exception as exc:  # the float model itself does not take this data
        msg = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).split("Status Message:")[-1].strip()
        raise UsageError(f"onnxruntime cannot run the float model on the calibration data: {msg[:300]}") from None
    got = torch_run(gm, feeds, names, batch_size, fixed=fixed)
    for name, a, b in zip(imp.outputs, ref, got):
        if np.shape(a) != np.shape(b):  # a converter that computes another shape: no values to compare
            raise UsageError(f"torch conversion is not faithful on output '{name}': shape {tuple(np.shape(b))} "
                             f"against onnxruntime's {tuple(np.shape(a))}; please report the model")
    res = compare(imp.outputs, ref, got)
    for r in res:
        if not r.max_abs_diff <= 1e-4 + rtol * max(1.0, r.ref_absmax):
            raise UsageError(f"torch conversion is not faithful on output '{r.output}': max abs diff "
                             f"{r.max_abs_diff:.3g} (cosine {r.cosine:.5f}); please report the model")
    return res
