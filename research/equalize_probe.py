"""Probe: does scale equalization rescue 4-bit activations? (a measurement, not a pipeline step)

    python research/equalize_probe.py --model REC.onnx --calib calib.npz --eval eval.npz \
        [--input-shape x:N,3,48,320] [--alpha 1.0] [--shift] [--all-but L1,L2] [--samples 32]

prints: the equalized tensors, the float output difference (the pass is exact), how even the
channel ranges became, and the cosine / argmax agreement to float of rtn 4-bit activations (float
weights, then W4) before and after, with a diagnostic that is not exportable as it stands:
per-channel min-max 4-bit inputs at every conv, or at the depthwise convs only (which could take
them exactly: each output channel reads one input channel). README ("Results so far") quotes it
on the PP-OCRv4 recognizer.

The pass: low-bit activations share one scale per tensor; a tensor whose channels span very
different ranges loses its small channels at 4 bits. A positive per-channel factor s divides a
tensor where it is made (a Mul / Add by per-channel constants, or the output channels of a Conv /
MatMul / Gemm) and multiplies the input channels of every layer that reads it: directly, or
through ops that commute with a positive per-channel scale (Relu, pooling, Identity, a channel
Concat, a Mul by an unscaled gate such as squeeze-excite's). The float function is unchanged; the
quantizer sees even ranges. s follows SmoothQuant: s_c = r_c^alpha / w_c^(1 - alpha), r_c the
channel's largest magnitude at the layers' inputs on calibration data, w_c the largest weight that
reads it relative to its layer's largest (depthwise readers scale each channel on their own).
--shift also centres each channel, x' = (x - m) / s with m the channel's mid-range and s its
half-width, where that is exact: the factor made by an Add or a layer's bias, carried only through
Identity, Concat and pooling that ignores padding, into layers without zero padding that have a
bias to take W m (Conv, Gemm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from packptq_onnx.folding import consumers, drop_unused_initializers

POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
SHIFT_THROUGH = ("Identity", "Concat", "GlobalAveragePool", "GlobalMaxPool")  # f(x - m) = f(x) - m
# also MaxPool (pads read -inf) and AveragePool unless it counts zero padding
TRANSPARENT = ("Relu", "LeakyRelu", "Identity", "Mul", "Concat") + POOLS
LAYERS = ("Conv", "MatMul", "Gemm")
FLOOR = 1e-3  # channels below FLOOR x the largest range count as FLOOR (dead channels)


@dataclass
class Site:
    """One tensor divided where it is made, and the layers that multiply the factor back."""
    tensor: str
    axis: int                  # channel axis: 1 (NCHW) or -1 (last)
    channels: int
    producers: list            # nodes whose constants are divided; producers[0] makes `tensor`
    readers: dict = field(default_factory=dict)   # (node name, channel offset) -> node
    scaled: set = field(default_factory=set)      # tensors that carry the factor
    shiftable: bool = True     # a per-channel shift can go with the factor exactly (see _explore)
    factor: np.ndarray | None = None
    shift: np.ndarray | None = None


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class Graph:
    """A normalised ONNX graph with the lookups the pass needs; edits collect in `new`."""

    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.made_by = {o: n for n in self.g.node for o in n.output}
        self.read_by = consumers(self.g)
        self.outputs = {o.name for o in self.g.output}
        self.shape = {}
        for vi in list(self.g.value_info) + list(self.g.input) + list(self.g.output):
            if vi.type.tensor_type.HasField("shape"):
                self.shape[vi.name] = [d.dim_value or None for d in vi.type.tensor_type.shape.dim]
        self.new: dict[str, np.ndarray] = {}

    def const(self, name: str):
        if name in self.new:
            return self.new[name]
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def channels(self, t: str, axis: int):
        s = self.shape.get(t)
        return s[axis] if s and len(s) > (axis if axis >= 0 else -axis - 1) else None

    def set(self, node, i: int, arr: np.ndarray) -> None:
        """Give input i of `node` its own new initializer (the old one may be shared)."""
        old = node.input[i] if i < len(node.input) else ""
        if old in self.new and sum(list(n.input).count(old) for n in self.read_by.get(old, [])) == 1:
            self.new[old] = arr.astype(np.float32)
            return
        name = f"{old}_eq" if old else f"{node.name}_eq{i}"
        while name in self.inits:
            name += "_"
        self.new[name] = arr.astype(np.float32)
        self.inits[name] = None
        self.read_by.setdefault(name, []).append(node)
        if i < len(node.input):
            node.input[i] = name
        else:
            node.input.append(name)

    def commit(self) -> None:
        """Write the new initializers (their names are new: see set) and drop the replaced ones."""
        self.g.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.new.items())
        drop_unused_initializers(self.g)


def _weight_reader(G: Graph, node, t: str):
    """The channel axis when `node` is a layer with a constant weight reading `t` as input 0."""
    if node.op_type not in LAYERS or len(node.input) < 2 or node.input[0] != t or list(node.input).count(t) != 1:
        return None
    w = G.const(node.input[1])
    if w is None:
        return None
    if node.op_type == "Conv":
        return 1 if w.ndim >= 3 else None
    if w.ndim != 2 or (node.op_type == "Gemm" and _attr(node, "transA", 0)):
        return None
    return -1


def _per_channel(c: np.ndarray, axis: int, ch: int, rank: int) -> bool:
    """The constant c broadcasts along the channel axis only (or is a scalar)."""
    if c.size == 1:
        return c.ndim <= rank
    pos = c.ndim - 1 if axis == -1 else c.ndim - rank + 1
    return pos >= 0 and c.shape[pos] == ch and all(d == 1 for i, d in enumerate(c.shape) if i != pos)


def _producer(G: Graph, t: str):
    """(axis, channels, nodes) when the tensor t can be divided per channel where it is made."""
    node = G.made_by.get(t)
    if node is None or t in G.outputs or node.output[0] != t:
        return None
    op = node.op_type
    if op in LAYERS and len(node.input) >= 2 and G.const(node.input[0]) is None:
        w = G.const(node.input[1])
        if w is None:
            return None
        if op == "Conv":
            return (1, w.shape[0], [node]) if w.ndim >= 3 else None
        bias = G.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        if w.ndim != 2 or bias is None or bias.ndim > 1 or (op == "Gemm" and _attr(node, "transA", 0)):
            return None
        return -1, (w.shape[0] if op == "Gemm" and _attr(node, "transB", 0) else w.shape[1]), [node]
    if op not in ("Mul", "Add") or len(node.input) != 2:
        return None
    ci = [i for i, x in enumerate(node.input) if G.const(x) is not None]
    rank = len(G.shape.get(t) or [])
    if len(ci) != 1 or rank < 2:
        return None
    c, u = G.const(node.input[ci[0]]), node.input[1 - ci[0]]
    if op == "Add":  # (u made by a divisible Mul / layer, read only here) + c: both divided
        inner = _producer(G, u) if len(G.read_by.get(u, [])) == 1 else None
        if inner is None or inner[2][0].op_type == "Add" or not _per_channel(c, inner[0], inner[1], rank):
            return None
        return inner[0], inner[1], [node] + inner[2]
    for axis in ((1, -1) if rank >= 3 else (-1,)):
        ch = G.channels(t, axis)
        if ch and ch > 1 and _per_channel(c, axis, ch, rank):
            return axis, ch, [node]
    return None


def _explore(G: Graph, site: Site, t: str, offset: int, depth: int = 0) -> bool:
    """Follow t to the layers that read it; False when some reader cannot take the factor back."""
    nodes = G.read_by.get(t, [])
    if not nodes or t in G.outputs or depth > 16:
        return False
    site.scaled.add(t)
    rank = len(G.shape.get(t) or [])
    for n in nodes:
        axis = _weight_reader(G, n, t)
        if axis is not None:
            if axis != site.axis and not (rank == 2 and {axis, site.axis} == {1, -1}):
                return False
            site.readers[(n.name, offset)] = n
            padded = any(_attr(n, "pads", [0]) or [0]) or _attr(n, "auto_pad", b"NOTSET") != b"NOTSET"
            if n.op_type == "MatMul" or padded:
                site.shiftable = False  # zero padding would read m, and MatMul has no bias to take it
            continue
        if n.op_type not in TRANSPARENT or list(n.input).count(t) != 1 or not rank:
            return False
        if n.op_type in POOLS and site.axis != 1:
            return False
        off = offset
        site.shiftable &= n.op_type in SHIFT_THROUGH or n.op_type == "MaxPool" or (
            n.op_type == "AveragePool" and not (any(_attr(n, "pads", [0])) and _attr(n, "count_include_pad", 0)))
        if n.op_type == "Concat":
            if _attr(n, "axis") % rank != site.axis % rank:
                return False
            for x in n.input[:list(n.input).index(t)]:
                c = G.channels(x, site.axis)
                if c is None:
                    return False
                off += c
        elif n.op_type == "Mul":  # x * g keeps x's layout only when g does not broadcast x up
            g_shape = G.shape.get(n.input[1 - list(n.input).index(t)])
            if g_shape is None or len(g_shape) > rank or G.shape.get(n.output[0]) != G.shape.get(t):
                return False
        if not _explore(G, site, n.output[0], off, depth + 1):
            return False
    return True


def find_sites(model: onnx.ModelProto, G: Graph | None = None) -> list[Site]:
    """Tensors that can be divided where they are made and whose every reader takes it back."""
    G = G or Graph(model)
    sites = []
    for node in G.g.node:
        if not node.output:
            continue
        made = _producer(G, node.output[0])
        if made is None:
            continue
        site = Site(node.output[0], *made)
        site.shiftable = made[2][0].op_type != "Mul"  # Add (its constant) or a layer (its bias)
        if _explore(G, site, site.tensor, 0) and _gates_ok(G, site):
            sites.append(site)
    return sites


def _gates_ok(G: Graph, site: Site) -> bool:
    """A Mul on the way must have exactly one scaled input (x * x would carry the factor twice)."""
    return all(sum(x in site.scaled for x in n.input) == 1
               for t in site.scaled for n in G.read_by.get(t, []) if n.op_type == "Mul")


def _reader_weight(G: Graph, node, offset: int, n_site: int):
    """(|W| per site channel relative to the layer's largest or None for depthwise, multiplier
    setter): how the reader's weight sees channels offset .. offset + n_site of its input."""
    w = G.const(node.input[1])
    if node.op_type == "Conv":
        groups = _attr(node, "group", 1)
        cpg, out_pg = w.shape[1], w.shape[0] // groups
        cin = np.arange(w.shape[0])[:, None] // out_pg * cpg + np.arange(cpg)[None, :]  # (Cout, cpg)
        depthwise = cpg == 1 and groups > 1
        mag = np.abs(w).reshape(w.shape[0], cpg, -1).max(-1)
        per = None
        if not depthwise:
            per = np.zeros(n_site)
            m = (cin >= offset) & (cin < offset + n_site)
            np.maximum.at(per, cin[m] - offset, mag[m])
            per = per / max(mag.max(), 1e-12)

        def scale(s, m=None):
            full, shift = np.ones(groups * cpg), np.zeros(groups * cpg)
            full[offset:offset + n_site] = s
            cur = G.const(node.input[1])
            if m is not None:  # conv(x' * s + m) = conv_{W s}(x') + sum W m: into the bias
                shift[offset:offset + n_site] = m
                add = (cur.reshape(cur.shape[0], cpg, -1).sum(-1) * shift[cin]).sum(1)
                _add_bias(G, node, 2, cur.shape[0], add)
            G.set(node, 1, cur * full[cin].reshape(cur.shape[:2] + (1,) * (cur.ndim - 2)))
        return per, scale
    trans = node.op_type == "Gemm" and _attr(node, "transB", 0)
    rows = w.T if trans else w  # (in, out)
    per = np.abs(rows[offset:offset + n_site]).max(1) / max(np.abs(rows).max(), 1e-12)

    def scale(s, m=None):
        cur = G.const(node.input[1])
        f = np.ones(cur.shape[1] if trans else cur.shape[0])
        f[offset:offset + n_site] = s
        if m is not None:  # Gemm only (_explore): (x' s + m) B = x' (s B) + m B
            shift = np.zeros_like(f)
            shift[offset:offset + n_site] = m
            _add_bias(G, node, 2, cur.shape[0] if trans else cur.shape[1], shift @ (cur.T if trans else cur))
        G.set(node, 1, cur * (f[None, :] if trans else f[:, None]))
    return per, scale


def _add_bias(G: Graph, node, i: int, n: int, add: np.ndarray) -> None:
    b = G.const(node.input[i]) if len(node.input) > i and node.input[i] else np.zeros(n, np.float32)
    G.set(node, i, np.broadcast_to(b, (n,)) + add)


def _divide(G: Graph, node, s: np.ndarray, axis: int, rank: int, m=None) -> None:
    """Make `node`'s output (y - m) / s along the channel axis (m: only for the node making the
    site's tensor, an Add or a layer with a bias)."""
    shape = (len(s),) + (1,) * (rank - 2) if axis == 1 else (len(s),)
    m = np.zeros_like(s) if m is None else m
    if node.op_type in ("Mul", "Add"):
        i = next(i for i, x in enumerate(node.input) if G.const(x) is not None)
        c = G.const(node.input[i])
        c = c.reshape(c.shape[-len(shape):]) if c.size > 1 else c.reshape(())  # per-channel (_per_channel)
        c = np.broadcast_to(c, shape) - (m.reshape(shape) if node.op_type == "Add" else 0)
        G.set(node, i, c / s.reshape(shape))
        return
    w = G.const(node.input[1])
    if node.op_type == "Conv":
        G.set(node, 1, w / s.reshape((-1,) + (1,) * (w.ndim - 1)))
    elif node.op_type == "Gemm" and _attr(node, "transB", 0):
        G.set(node, 1, w / s[:, None])
    else:
        G.set(node, 1, w / s[None, :])
    if (len(node.input) > 2 and node.input[2]) or m.any():
        b = G.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(len(s), np.float32)
        G.set(node, 2, (np.broadcast_to(b, s.shape) - m) / s)


def ranges(model: onnx.ModelProto, sites: list[Site], feeds: dict, batch: int = 16) -> dict:
    """(lowest, highest) per channel of every reader's input, on the calibration feeds."""
    return channel_ranges(model, {n.input[0]: s.axis for s in sites for n in s.readers.values()}, feeds, batch)


def channel_ranges(model: onnx.ModelProto, axes: dict, feeds: dict, batch: int = 16) -> dict:
    """tensor -> (lowest, highest) per channel along axes[tensor], over the feeds in onnxruntime."""
    from packptq_onnx import runtime

    tensors = sorted(axes)
    sess = runtime.session(runtime.with_outputs(model, tensors), optimize=False)
    out = {}
    n = len(next(iter(feeds.values())))
    for i in range(0, n, batch):
        res = sess.run(tensors, {k: v[i:i + batch] for k, v in feeds.items()})
        for t, r in zip(tensors, res):
            r = np.moveaxis(r, axes[t], 0).reshape(r.shape[axes[t]], -1)
            lo, hi = r.min(1), r.max(1)
            out[t] = (lo, hi) if t not in out else (np.minimum(out[t][0], lo), np.maximum(out[t][1], hi))
    return out


def magnitude(lo_hi) -> np.ndarray:
    return np.maximum(np.abs(lo_hi[0]), np.abs(lo_hi[1]))


def equalize(model: onnx.ModelProto, feeds: dict, alpha: float = 0.5, shift: bool = False) -> list[Site]:
    """Equalize `model` in place; returns the sites with their factors. shift: where it is exact
    (Site.shiftable), also move each channel's mid-range to 0 and equalize half-widths."""
    G = Graph(model)
    sites = find_sites(model, G)
    if not sites:
        return []
    r_all = ranges(model, sites, feeds)
    for site in sites:
        lo, hi = np.full(site.channels, np.inf), np.full(site.channels, -np.inf)
        weights = []
        for (_, off), node in site.readers.items():
            lo = np.minimum(lo, r_all[node.input[0]][0][off:off + site.channels])
            hi = np.maximum(hi, r_all[node.input[0]][1][off:off + site.channels])
        m = (lo + hi) / 2 if shift and site.shiftable else None
        r = (hi - lo) / 2 if m is not None else np.maximum(np.abs(lo), np.abs(hi))
        r = np.maximum(r, FLOOR * r.max()) if r.max() > 0 else np.ones_like(r)
        setters = []
        for (_, off), node in site.readers.items():
            per, setter = _reader_weight(G, node, off, site.channels)
            setters.append(setter)
            if per is not None:
                weights.append(per)
        if weights:
            w = np.maximum(np.max(weights, 0), FLOOR)
            s = r ** alpha / w ** (1 - alpha)
        else:
            s = r.copy()
        s = s / s.max()
        s = np.maximum(s, FLOOR)
        rank = len(G.shape.get(site.tensor) or [2])
        for k, p in enumerate(site.producers):
            _divide(G, p, s, site.axis, rank, m if k == 0 else None)
        for setter in setters:
            setter(s, m)
        site.factor, site.shift = s, m
    G.commit()
    return sites


# ---- the probe --------------------------------------------------------------------------------
class ChannelQuant(torch.nn.Module):
    """Diagnostic 4-bit activation quantizer with its own min-max range per channel."""

    def __init__(self, x, bits: int):
        from packptq_onnx import quant
        super().__init__()
        self.qmin, self.qmax = quant.act_qrange(bits)
        xc = x.movedim(1, 0).reshape(x.shape[1], -1)
        lo, hi = xc.min(1).values.clamp(max=0), xc.max(1).values.clamp(min=0)
        view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        self.s = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=1e-8).view(view)
        self.z = torch.round(self.qmin - lo.view(view) / self.s)

    @property
    def scale(self):  # read by QuantLayer.bias_scale, which the diagnostics (float weights) never use
        return self.s.reshape(-1, 1, 1, 1)

    def forward(self, x):
        from packptq_onnx import quant
        return quant.fake_quant(x, self.s, self.z, self.qmin, self.qmax)


def score(path: str, a, diagnostics=()) -> None:
    """rtn cosine / argmax agreement to float: A4 with float weights, W4A4, then each diagnostic
    (which): per-channel min-max inputs (ChannelQuant) to 'all' convs, the 'depthwise' ones, or
    'all but A,B' (layer names)."""
    from packptq_onnx import convert, data, pipeline, qlayer, state
    from packptq_onnx.validate import cosine
    o = pipeline.Options(wbits=4, abits=4, method="rtn", calib_samples=a.calib_samples, batch_size=16,
                         input_shapes=a.shapes)
    p = pipeline.prepare(path, a.calib, o, log=lambda *_: None)
    ev, _ = data.load(a.eval, p.imp.inputs)
    ev = data.take(ev, a.samples)
    state.set_quant(p.qls, False, False)
    ref = convert.torch_run(p.gm, ev, p.names)[0]

    def show(tag):
        out = convert.torch_run(p.gm, ev, p.names)[0]
        agree = (out.argmax(-1) == ref.argmax(-1)).mean()
        print(f"  {tag:58s} cosine {cosine(out, ref):.4f}  argmax agreement {agree:.4f}", flush=True)

    state.set_quant(p.qls, False, True)
    show("A4, float weights")
    state.set_quant(p.qls, True, True)
    show("W4A4")
    if not diagnostics:
        return
    convs = [q for q in p.qls if isinstance(q.inner, torch.nn.Conv2d) and q.layer.act_input is not None]
    seen = {}
    def keep(n):
        return lambda m, x: seen.setdefault(n, []).append(x[0])
    state.set_quant(p.qls, False, False)
    with state.capture(pre=[(q.inner, keep(q.layer.name)) for q in convs]):
        convert.torch_run(p.gm, data.take(p.calib, a.samples), p.names)
    for which in diagnostics:
        with state.snapshot(p.qls):
            chosen = [q for q in convs if which == "all" or (which == "depthwise" and qlayer.is_depthwise(q))
                      or (which.startswith("all but ") and q.layer.name not in which[8:].split(","))]
            names = {q.layer.name for q in chosen}
            for q in chosen:
                cq = ChannelQuant(torch.cat(seen[q.layer.name]), 4)
                state.use(q, "aq", cq)
                feeder = q.links.fed_by  # an output quantizer shared with this input is replaced too
                if feeder is not None and feeder.oq is not None and \
                        all(r.layer.name in names for r in feeder.links.readers):
                    state.use(feeder, "oq", cq)
            state.set_quant(p.qls, False, True)
            show(f"A4, float weights, diagnostic: per-channel min-max at {which} conv inputs")


def spread(maxima: np.ndarray) -> float:
    """Largest channel maximum over the median one, among channels that are not dead (all 0)."""
    live = maxima[maxima > FLOOR * maxima.max()]
    return float(live.max() / np.median(live)) if live.size else 1.0


def main(argv=None) -> None:
    import argparse
    import os
    import tempfile

    from packptq_onnx import data, runtime
    from packptq_onnx.onnx_import import load, parse_input_shape
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--input-shape", action="append", default=[])
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--shift", action="store_true", help="also centre channels where that is exact")
    ap.add_argument("--all-but", action="append", default=[], metavar="LAYERS",
                    help="also: per-channel inputs everywhere but these comma-separated layers")
    ap.add_argument("--samples", type=int, default=32, help="evaluation samples scored")
    ap.add_argument("--calib-samples", type=int, default=64)
    a = ap.parse_args(argv)
    a.shapes = dict(parse_input_shape(s) for s in a.input_shape)
    imp = load(a.model, a.shapes)
    cal, _ = data.load(a.calib, imp.inputs)
    cal = data.take(cal, a.calib_samples)
    before = onnx.ModelProto()
    before.CopyFrom(imp.model)
    sites = equalize(imp.model, cal, a.alpha, a.shift)
    print(f"{len(sites)} tensors equalized, read by {sum(len(s.readers) for s in sites)} layers:")
    r0, r1 = ranges(before, sites, cal), ranges(imp.model, sites, cal)
    r0, r1 = ({t: magnitude(v) for t, v in r.items()} for r in (r0, r1))
    for s in sites:
        for (name, _), node in s.readers.items():
            x0, x1 = r0[node.input[0]], r1[node.input[0]]
            print(f"  {s.tensor:24s} -> {name:20s} largest / median channel maximum "
                  f"{spread(x0):7.1f} -> {spread(x1):5.1f}")
    probe = data.take(cal, 8)
    y0 = runtime.run(runtime.session(before), probe)
    y1 = runtime.run(runtime.session(imp.model), probe)
    print("float output max |difference|:", max(float(np.abs(u - v).max()) for u, v in zip(y0, y1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "equalized.onnx")
        onnx.save(imp.model, path)
        print("original model:")
        score(a.model, a, diagnostics=["all"])
        print(f"equalized (alpha {a.alpha}{', with shifts' if a.shift else ''}):")
        score(path, a, diagnostics=["depthwise", "all"] + [f"all but {x}" for x in a.all_but])


if __name__ == "__main__":
    from packptq_onnx.errors import UsageError
    try:
        main()
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None
