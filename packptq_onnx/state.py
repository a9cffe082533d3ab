"""The one owner of the simulation's quantizer state.

A QuantLayer holds up to four quantizer objects (wq, aq, aq2, oq; an input quantizer may be the
very object its producer uses as output quantizer) and two switches (quant_w, quant_a). Only the
functions here write them: calibration builds the quantizers through set_bits / set_output_bits
and ties shared tensors; a measurement that needs another mode or other bits runs inside
`quantized(...)` or `snapshot(...)`, which put everything back as it was on the way out, whatever
happens inside. `capture` is the one way to watch (or replace) tensors during a forward pass.
QDrop's quantization/state.py and BRECQ's set_quant_state keep the same discipline
(docs/METHOD.md, "Code layout and quantizer state").
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import quant
from .qlayer import QuantLayer, fit_bias
from .quant import ActQuantizer, WeightQuantizer


def set_quant(qls, weights: bool, acts: bool) -> None:
    for q in qls:
        q.quant_w, q.quant_a = weights, acts


@contextmanager
def quantized(qls, only=None, weights: bool = True, acts: bool = True):
    """Inside: the layers in `only` (every layer when None) quantized as asked, all others float.
    On exit every switch is as it was."""
    saved = [(q, q.quant_w, q.quant_a) for q in qls]
    chosen = None if only is None else {id(q) for q in only}
    try:
        for q in qls:
            on = chosen is None or id(q) in chosen
            q.quant_w, q.quant_a = weights and on, acts and on
        yield
    finally:
        for q, w, a in saved:
            q.quant_w, q.quant_a = w, a


@contextmanager
def snapshot(qls):
    """On exit, every layer's switches and quantizer objects are those of the entry (the sharing
    between layers with them): a measurement may re-bit or drop quantizers inside."""
    saved = [(q, q.quant_w, q.quant_a, q.wq, q.aq, q.aq2, q.oq, q.float_fallback) for q in qls]
    try:
        yield
    finally:
        for q, w, a, wq, aq, aq2, oq, ff in saved:
            q.quant_w, q.quant_a, q.wq, q.aq, q.aq2, q.oq, q.float_fallback = w, a, wq, aq, aq2, oq, ff


@contextmanager
def capture(pre=(), post=(), with_kwargs: bool = False):
    """Forward hooks for the length of a `with`. pre: (module, fn(module, args[, kwargs])), post:
    (module, fn(module, args, output)); as in torch, a hook that returns a value replaces the
    module's input or output. Every hook is removed on exit."""
    handles = []
    try:
        for m, fn in pre:
            handles.append(m.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        for m, fn in post:
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def clear(q: QuantLayer) -> None:
    """No quantizer at all, switched off (the start of calibration)."""
    q.wq = q.aq = q.aq2 = q.oq = None
    q.quant_w = q.quant_a = False


def set_bits(q: QuantLayer, wbits: int | None, abits: int | None) -> None:
    """Re-initialise (round to nearest) the weight and/or input quantizer of a layer at new bits
    (a layer with fixed input bits, a join, keeps them whatever `abits` asks; a layer fallen back
    to float stays float)."""
    if q.float_fallback:
        return
    if abits is not None and q.layer.fixed_abits is not None:
        abits = q.layer.fixed_abits
    if wbits is not None and q.layer.has_weight:
        key = ("w", wbits)
        q.wq = WeightQuantizer(q.weight, q.layer.axis, wbits, q.reduce_range, q.initial.get(key)).to(q.weight.device)
        q.initial[key] = q.wq.scale.detach().clone()
    for attr, stats, tag in (("aq", q.act_stats, "a"), ("aq2", q.act_stats2, "a2")):
        if abits is None or stats is None:
            continue
        key = (tag, abits)
        if key not in q.initial:
            q.initial[key] = quant.search_act_params(stats.sample, stats.lo, stats.hi, *quant.act_qrange(abits))
            if attr == "aq" and q.focus is not None:  # attention probabilities: judged on probs @ v
                q.initial[key] = quant.search_focus(*q.focus, stats.hi, *quant.act_qrange(abits),
                                                    extra=[q.initial[key]])
        setattr(q, attr, ActQuantizer(abits, *q.initial[key]).to(q.weight.device))
    fit_bias(q)


def set_output_bits(q: QuantLayer, bits: int) -> None:
    """(Re)build the output quantizer at `bits`, round to nearest, from its calibration statistics."""
    key = ("o", bits)
    if key not in q.initial:
        st = q.links.out_stats
        q.initial[key] = quant.search_act_params(st.sample, st.lo, st.hi, *quant.act_qrange(bits))
    q.oq = ActQuantizer(bits, *q.initial[key]).to(q.weight.device)


def match_output_bits(qls: list[QuantLayer]) -> None:
    """An output quantizer read by quantized layers only takes their input bits when they all agree,
    else the calibrated output bits (8 by default)."""
    for p in qls:
        readers = p.links.readers
        if p.oq is None or not readers:
            continue
        bits = {r.aq.bits if r.aq is not None else None for r in readers}
        want = bits.pop() if len(bits) == 1 and None not in bits else p.links.out_bits
        if p.oq.bits != want:
            set_output_bits(p, want)


def tie_inputs(qls: list[QuantLayer]) -> None:
    """A layer whose input is another layer's output (directly or through its Relu / Clip) uses that
    layer's output quantizer when the bits agree: one quantizer per tensor, so onnxruntime removes
    the second Q/DQ pair and the Clip and runs the chain as fused integer kernels. First, an output
    quantizer whose tensor only quantized layers read takes their bits when they agree."""
    match_output_bits(qls)
    for q in qls:
        p = q.links.fed_by
        if p is not None and p.oq is not None and q.aq is not None and q.aq.bits == p.oq.bits:
            q.aq = p.oq
            fit_bias(q)  # the bias steps follow the input scale, which just changed
        p = q.links.fed_by2  # a join's second input
        if p is not None and p.oq is not None and q.aq2 is not None and q.aq2.bits == p.oq.bits:
            q.aq2 = p.oq


def fall_back(q: QuantLayer) -> None:
    """The last resort of an accuracy target: the layer computes in float, from a float input to a
    float output (float weight and bias). Its input's producers drop their output quantizers, and
    it drops its own; a quantized layer that shared one keeps the quantizer object as its own input
    quantizer (so it computes exactly as before, and the writer gives it its own Q/DQ). No later
    re-bitting brings these quantizers back."""
    q.float_fallback = True
    q.wq = q.aq = q.aq2 = q.oq = None
    for p in (q.links.fed_by, q.links.fed_by2):
        if p is not None:
            p.oq = None


# a guard site's part -> the QuantLayer attribute holding its quantizer
SITE_ATTR = {"input": "aq", "input2": "aq2", "output": "oq"}


def keep_float(qls, keys) -> None:
    """Remove these activation quantizers ((layer name, "input" | "input2" | "output")), and every
    quantizer object shared with them (a tied producer output), so that no later re-bitting brings
    them back."""
    by = {q.layer.name: q for q in qls}
    gone = {id(getattr(by[name], SITE_ATTR[part])) for name, part in keys}
    for q in qls:
        if q.aq is not None and id(q.aq) in gone:
            q.aq, q.act_stats = None, None
        if q.aq2 is not None and id(q.aq2) in gone:
            q.aq2, q.act_stats2 = None, None
        if q.oq is not None and id(q.oq) in gone:
            q.oq, q.links.out_stats = None, None


def replace_quantizer(qls, old, new, initial: bool = False) -> None:
    """Every input or output of these layers that uses the quantizer object `old` uses `new`.
    initial: `new` also becomes the round-to-nearest start at its bits, so a layer re-bitted to
    those bits later (mixed precision, tie_inputs) rebuilds `new`'s range, not the old one."""
    tags = {"aq": "a", "aq2": "a2", "oq": "o"}
    for q in qls:
        for attr in ("aq", "aq2", "oq"):
            if getattr(q, attr) is old:
                setattr(q, attr, new)
                if initial:
                    q.initial[(tags[attr], new.bits)] = (float(new.scale.detach()), float(new.zero))


def use(q: QuantLayer, attr: str, quantizer) -> None:
    """q's quantizer `attr` ("wq", "aq", "aq2" or "oq") becomes `quantizer` (a probe's own kind)."""
    assert attr in ("wq", "aq", "aq2", "oq"), attr
    setattr(q, attr, quantizer)


def isolate(q: QuantLayer, part: str) -> None:
    """Keep only one of q's quantizers: its "weight", its "input" (both inputs of an activation
    MatMul) or its "output"; the others are dropped (restore them with `snapshot`)."""
    keep = {"weight": ("wq",), "input": ("aq", "aq2"), "output": ("oq",)}[part]
    for attr in ("wq", "aq", "aq2", "oq"):
        if attr not in keep:
            setattr(q, attr, None)


def learned(qls) -> dict:
    """What reconstruction learned, per layer (AdaRound's V, the fixed low-rank shift, the LSQ
    scales), for a checkpoint."""
    st = {}
    for q in qls:
        st[q.layer.name] = {"alpha": None if q.wq is None or q.wq.alpha is None else q.wq.alpha.detach().cpu(),
                            "shift": None if q.wq is None or q.wq.shift is None else (q.wq.shift.cpu(), q.wq.rank),
                            "branch": None if q.wq is None or not q.wq.branch else (q.wq.lr_a.detach().cpu(),
                                                                                   q.wq.lr_b.detach().cpu()),
                            "a2scale": None if q.aq2 is None else q.aq2.scale.detach().cpu(),
                            "ascale": None if q.aq is None else q.aq.scale.detach().cpu(),
                            "oscale": None if q.oq is None else q.oq.scale.detach().cpu()}
    return st


def load_learned(qls, st: dict) -> None:
    """Put back what `learned` saved (rounding made hard)."""
    for q in qls:
        s = st[q.layer.name]
        if s["alpha"] is not None:
            q.wq.alpha = torch.nn.Parameter(s["alpha"].to(q.weight.device))
            q.wq.harden()
        if s.get("shift") is not None:
            q.wq.shift, q.wq.rank = s["shift"][0].to(q.weight.device), s["shift"][1]
        if s.get("branch") is not None:
            q.wq.lr_a, q.wq.lr_b = (torch.nn.Parameter(t.to(q.weight.device)) for t in s["branch"])
            q.wq.rank, q.wq.branch = q.wq.lr_a.shape[0], True
        if s["ascale"] is not None:
            q.aq.scale.data.copy_(s["ascale"])
        if s["oscale"] is not None:
            q.oq.scale.data.copy_(s["oscale"])
        if s["a2scale"] is not None:
            q.aq2.scale.data.copy_(s["a2scale"])
