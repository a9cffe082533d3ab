"""Fallback for ONNX ops onnx2torch cannot convert: the node runs in onnxruntime, stays float.

It runs on the CPU. Gradients pass straight through to the first input when its shape equals the
output's, and are zero otherwise: an approximation that lets scoring and reconstruction go on
around the node. Listed in the report; `--strict` makes an unconvertible op an error instead.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from .folding import outer_names


class OrtNode(nn.Module):
    def __init__(self, node_proto: bytes, opsets: dict, n_inputs: int):
        super().__init__()
        self.node_proto, self.opsets, self.n_inputs = node_proto, opsets, n_inputs
        self._sess = None

    def _session(self, arrays):
        from . import runtime

        node = onnx.NodeProto()
        node.ParseFromString(self.node_proto)
        names = [n for n in node.input if n] + outer_names(node)
        ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
               for n, a in zip(names, arrays)]
        outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
        g = helper.make_graph([node], "fallback", ins, outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()])
        m = onnx.shape_inference.infer_shapes(m)
        for o in m.graph.output:  # a contrib op inference does not know: the type of its first input
            if o.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED and ins:
                o.type.tensor_type.elem_type = ins[0].type.tensor_type.elem_type
        return runtime.session(m, optimize=False), names

    def run(self, *args) -> list:
        arrays = [a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a) for a in args]
        if self._sess is None:
            self._sess = self._session(arrays)
        sess, names = self._sess
        res = sess.run(None, dict(zip(names, arrays)))
        device = next((a.device for a in args if torch.is_tensor(a)), "cpu")
        return [torch.from_numpy(np.ascontiguousarray(r)).to(device) for r in res]

    def forward(self, *args):
        x = args[0]
        if torch.is_tensor(x) and x.requires_grad and x.is_floating_point():
            out = list(_StraightThrough.apply(self, *args))
        else:
            out = self.run(*args)
        return out[0] if len(out) == 1 else tuple(out)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, *args):
        out = module.run(*args)
        ctx.in_shape, ctx.n = args[0].shape, len(args)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = grads[0]
        first = g if g is not None and g.shape == ctx.in_shape else None
        return (None, first) + (None,) * (ctx.n - 1)


def converter(opsets: dict, domains: dict | None = None):
    """domains: the converted copy's domain spelling -> the model's (convert.to_torch writes
    com_microsoft for com.microsoft); onnxruntime gets the model's."""
    domains = domains or {}

    def real(d: str) -> str:
        return domains.get(d, d)

    def convert(node, graph) -> OperationConverterResult:
        inputs = [v for v in node.input_values if v] + outer_names(node._proto)  # noqa: SLF001
        proto = onnx.NodeProto()
        proto.CopyFrom(node._proto)  # noqa: SLF001
        proto.domain = real(proto.domain)
        mod = OrtNode(proto.SerializeToString(), {real(d): v for d, v in opsets.items()}, len(inputs))
        return OperationConverterResult(torch_module=mod,
                                        onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))
    return convert
