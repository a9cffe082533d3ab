"""What the exporter receives: per layer, the exact integers and scales the simulation uses."""
from __future__ import annotations

import numpy as np
import torch

from .kernels import FLOAT_FORM, runs_float
from .layers import LayerQuant
from .qlayer import QuantLayer, bias_integer


@torch.no_grad()
def export_records(qls: list[QuantLayer], packs: dict | None = None):
    """The exact integers and scales the simulation uses, per layer, for the QDQ writer."""
    out = []
    for q in qls:
        if q.wq is None:  # activation x activation MatMul or join: no weight; or a layer fallen back to float
            rec = LayerQuant(q.layer, 0, np.zeros(0, np.int8), np.zeros(0, np.float32),
                             pack=(packs or {}).get(q.layer.name),
                             float_weights=q.weight.numel() if q.layer.has_weight else 0)
            if q.aq2 is not None:
                rec.a2_scale, rec.a2_zero = float(q.aq2.scale), int(q.aq2.zero)
                rec.input2_from = shared_input(q, second=True)
        else:
            assert not q.wq.soft, "export needs hard rounding"
            w_int = q.wq.integer(q.weight).to(torch.int8).cpu().numpy()
            rec = LayerQuant(q.layer, q.wq.bits, w_int, q.wq.scale.float().cpu().numpy().copy(),
                             pack=(packs or {}).get(q.layer.name))
            # a conv or Gemm no integer kernel can run (its input float, or nothing quantizes its
            # output) is written as a float kernel: its weight folded at load, not dequantized on
            # every call (which also cost a conv onnxruntime's blocked float kernel)
            rec.float_kernel = q.float_kernel or (q.layer.op in FLOAT_FORM and runs_float(q))
            if q.wq.branch and q.wq.lr_a is not None:
                rec.branch = tuple(t.float().cpu().numpy().copy() for t in q.wq.branch_factors())
        if q.oq is not None:
            rec.o_scale, rec.o_zero, rec.o_bits = float(q.oq.scale), int(q.oq.zero), q.oq.bits
        bs = q.bias_scale()
        if q.aq is not None:
            rec.abits, rec.a_scale, rec.a_zero = q.aq.bits, float(q.aq.scale), int(q.aq.zero)
            rec.input_from = shared_input(q)
        elif q.aq2 is not None:  # the guard left a join's first input float, not its second
            rec.abits = q.aq2.bits
        if q.bias_path is not None and q.wq is not None:
            b = q.corrected_bias()
            if bs is not None:
                rec.bias_int = bias_integer(b, bs).to(torch.int32).numpy()
                rec.bias_scale = bs.float().numpy().copy()
            elif q.in_mean is not None:  # float bias (input not quantized), corrected
                rec.bias_float = b.detach().float().numpy().copy()
        out.append(rec)
    return out


def shared_input(q: QuantLayer, second: bool = False) -> str | None:
    """The producer's output tensor when `q` can read it as it is: q's input quantizer is the
    producer's output quantizer and the Relu / Clip between them (if any) cannot change a value of
    that quantizer's grid. Then the writer drops q's own Q/DQ and the Relu / Clip, and the chain
    runs as integer kernels in onnxruntime at any bit width. second: a join's second input."""
    p, aq, tensor = ((q.links.fed_by2, q.aq2, q.layer.act_input2) if second
                     else (q.links.fed_by, q.aq, q.layer.act_input))
    if p is None or p.oq is None or aq is not p.oq:
        return None
    act = p.links.post_act
    if act is not None and tensor == act[2]:
        s, z = np.float32(float(p.oq.scale)), float(p.oq.zero)
        lo_g, hi_g = s * np.float32(p.oq.qmin - z), s * np.float32(p.oq.qmax - z)
        if not (act[0] <= lo_g and hi_g <= act[1]):
            return None
    elif tensor != p.layer.output:
        return None
    return p.layer.output
