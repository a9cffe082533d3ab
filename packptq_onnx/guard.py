"""8-bit activations that the model cannot take: found by a first-order estimate, left float.

Per-tensor 8-bit activations lose some models: a BN-folded conv whose output spreads its channels
from 0.1 to 126 (one outlier channel) and feeds a depthwise conv leaves most channels a handful
of steps. On the PicoDet-style layout detector of bench/COVERAGE.md one such quantizer alone
takes a score map's cosine to 0.87, all of them to 0.61, and 8 bits is the most an integer
kernel takes. Measuring each quantizer alone costs one forward pass per quantizer; instead, with
the model float, the noise d_t = Q(x_t) - x_t of every quantizer is carried to the outputs by
the Jacobian in one backward pass per random output probe v: E[(v . J_t d_t)^2] = ||J_t d_t||^2.
On that detector the ten worst of 199 quantizers come out the same as when measured one at a time.

Each output is scored per channel along its shortest non-batch axis, each channel scaled to unit
energy, so box coordinates in pixels cannot hide class scores in [0, 1] (YOLOv8's [N, 4 + nc, A]);
one probe covers all outputs, so a quantizer's predicted noise-to-signal ratio is the sum of its
ratios on each output. Quantizers whose own ratio exceeds the threshold stay float, the worst
first, at most MAX_SHARE of them.

The same backward passes also weigh each quantizer's range. The Lp-searched range clips a
tensor's tails to gain resolution; that is right for most tensors and wrong for a few (a
recognizer's CTC logits, a detector's score maps), and only the outputs can tell which. So the
min-max range of every 8-bit quantizer is carried to the outputs beside the searched one, and a
quantizer (summed over the places that share it) takes min-max where that predicts less output
noise. Measured on the ten models of bench/COVERAGE.md at W8A8 (512 evaluation samples each):
NudeNet keeps 0.953 of its detections (0.946 before), the YOLOX-style captcha detector 0.980
(0.968), ddddocr's recognizer reads 0.984 of its strings (0.973; onnxruntime 0.984), the layout
detector's worst output cosine reaches 0.992 (0.988); ONet and magika lose two samples of 512.
GUARD_SAMPLES = 8 (was 2): with 2 samples the choice follows noise (NudeNet 0.923).
docs/METHOD.md, "Guard for 8-bit activations".
"""
from __future__ import annotations

import time

import torch

from . import data, memory, quant, state
from .layers import is_join

PROBES = 4
MAX_SHARE = 0.25


def _channel_axis(o: torch.Tensor, batch_axis: int = 0) -> int | None:
    """The axis whose entries are weighed apart: the shortest of two or more non-batch axes. A
    vector per sample (logits [N, 1000], a box [N, 4]) is weighed as one: scaling each of its
    entries to unit energy over a handful of samples let near-zero logits of EfficientNet-Lite0
    dominate (predicted noise 40x the output energy for quantizers that cost it nothing)."""
    dims = [(s, a) for a, s in enumerate(o.shape) if a != batch_axis and s > 1]
    return min(dims)[1] if len(dims) >= 2 else None


def _weights(o: torch.Tensor) -> torch.Tensor:
    """1 / (per-channel norm * sqrt(channels)): every channel of the output weighs the same."""
    o = o.detach().double()
    axis = _channel_axis(o)
    if axis is None:
        return torch.full_like(o, 1.0 / float(o.norm().clamp_min(1e-30)))
    dims = [d for d in range(o.dim()) if d != axis]
    norm = o.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-30 * float(o.abs().max()) + 1e-30)
    return (1.0 / (norm * o.shape[axis] ** 0.5)).expand_as(o)


def _tracked(x: torch.Tensor) -> torch.Tensor:
    """x, in the graph; a tensor no gradient reaches (after an embedding of integer inputs) becomes
    a leaf, so every quantizer downstream of it is measured too."""
    return x if x.requires_grad else x.detach().requires_grad_()


def estimate(gm, qls, batches, seed: int = 0, bits: int = 8, candidates: dict | None = None) -> dict:
    """{(layer name, "input" | "input2" | "output"): predicted output noise-to-signal ratio} for every
    `bits`-bit activation quantizer (inputs of weighted layers and joins, outputs); the model runs
    float meanwhile.
    candidates: id(quantizer) -> another quantizer for the same tensor; its ratio is reported
    under (layer name, part, "candidate")."""
    candidates = candidates or {}
    sites = {}
    dots: dict = {}  # (site, probe) -> v . J d, summed over the batch

    def _site(key, x, quantizer):
        """On each backward pass, add grad . (Q(x) - x) for this site; the noise is made then, from x,
        and no gradient is kept, so memory stays that of one forward pass with its graph."""
        sites[key] = x
        ref = x.detach()
        other = candidates.get(id(quantizer))

        def hook(g):
            if g is None:  # no gradient flows to it on this pass
                return
            with torch.no_grad():
                g = g.double()
                dots[key] = float((g * (quantizer(ref) - ref).double()).sum())
                if other is not None:
                    dots[(*key, "candidate")] = float((g * (other(ref) - ref).double()).sum())
        x.register_hook(hook)

    def pre(q):
        join = is_join(q.layer)

        def hook(mod, args):
            args = list(args)
            for i, part, quantizer in ((0, "input", q.aq), (1, "input2", q.aq2)):
                if quantizer is not None and (q.wq is not None or join) and quantizer.bits == bits:
                    args[i] = _tracked(args[i])
                    _site((q.layer.name, part), args[i], quantizer)
            return tuple(args)
        return hook

    def post(q):
        def hook(mod, args, out):
            if q.oq is not None and q.oq.bits == bits and torch.is_tensor(out):
                out = _tracked(out)
                _site((q.layer.name, "output"), out, q.oq)
                return out
        return hook
    gen = torch.Generator().manual_seed(seed)
    total: dict = {}
    with state.quantized(qls, only=[]), state.capture(pre=[(q, pre(q)) for q in qls],
                                                      post=[(q, post(q)) for q in qls]):
        for args in batches:
            args = [a.detach().float().requires_grad_() if a.is_floating_point() else a for a in args]
            outs = gm(*args)
            outs = [o for o in (outs if isinstance(outs, (list, tuple)) else [outs])
                    if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad]
            if not outs:
                sites.clear()
                continue
            weights = [_weights(o).float() for o in outs]
            for k in range(PROBES):
                probe = sum((torch.randn(o.shape, generator=gen).to(o.device) * w * o).sum()
                            for o, w in zip(outs, weights))
                dots.clear()
                probe.backward(retain_graph=k < PROBES - 1)
                for key, dot in dots.items():
                    total[key] = total.get(key, 0.0) + dot ** 2 / PROBES
            sites.clear()
            memory.trim()
    return total


def choose(est: dict, threshold: float) -> list:
    """Quantizers to leave float: own predicted ratio over the threshold, worst first, capped."""
    over = sorted((k for k, v in est.items() if v > threshold), key=lambda k: -est[k])
    return over[:int(MAX_SHARE * len(est))]


def min_max_candidates(qls, bits: int = 8) -> dict:
    """id(quantizer) -> a min-max ActQuantizer over the same calibration range, for every `bits`-bit
    activation quantizer (a shared one once, from the statistics of the layer that owns it)."""
    out = {}
    for q in qls:
        for quantizer, st in ((q.oq, q.links.out_stats), (q.aq, q.act_stats), (q.aq2, q.act_stats2)):
            if quantizer is not None and quantizer.bits == bits and st is not None and id(quantizer) not in out:
                scale, zero = quant.act_params(st.lo, st.hi, *quant.act_qrange(bits))
                out[id(quantizer)] = quant.ActQuantizer(bits, scale, zero).to(quantizer.scale.device)
    return out


def choose_ranges(qls, est: dict, candidates: dict) -> tuple[dict, list]:
    """Give each quantizer the range (searched or min-max) with the smaller predicted output ratio,
    summed over the sites that share it. Returns the estimates of what is now in place, and the
    sites whose quantizer took min-max."""
    by = {q.layer.name: q for q in qls}
    owner = {k: getattr(by[k[0]], state.SITE_ATTR[k[1]]) for k in est if len(k) == 2}
    now, other = {}, {}
    for k, quantizer in owner.items():
        o = id(quantizer)
        now[o] = now.get(o, 0.0) + est[k]
        other[o] = other.get(o, 0.0) + est.get((*k, "candidate"), float("inf"))
    switch = {o for o in now if o in candidates and other[o] < now[o]}
    for quantizer in {id(x): x for x in owner.values() if id(x) in switch}.values():
        state.replace_quantizer(qls, quantizer, candidates[id(quantizer)], initial=True)
    moved = [k for k, quantizer in owner.items() if id(quantizer) in switch]
    return {k: est[(*k, "candidate")] if id(quantizer) in switch else est[k] for k, quantizer in owner.items()}, moved


GUARD_SAMPLES = 8


def apply(p, opts, log=print) -> tuple[list[dict], list[dict]]:
    """Range choice, then the guard, on a prepared model (pipeline.Prepared): returns the sites that
    took min-max ranges and the quantizers left float, for the report."""
    t0 = time.time()
    feeds = data.take(p.calib, GUARD_SAMPLES)
    candidates = min_max_candidates(p.qls)
    est = estimate(p.gm, p.qls, data.batches(feeds, p.names, p.plan.run_batch or 1, opts.device),
                   opts.seed, candidates=candidates)
    est, moved = choose_ranges(p.qls, est, candidates)
    if moved:
        log(f"note: {len(moved)} of {len(est)} 8-bit activation quantizers take their min-max range: the "
            "searched (clipped) range predicts more output noise")
    keys = choose(est, opts.guard)
    state.keep_float(p.qls, keys)
    kept = [{"layer": n, "part": part, "predicted_nsr": round(est[(n, part)], 6)} for n, part in keys]
    if kept:
        names = ", ".join(f"{k['layer']} {k['part']}" for k in kept[:4]) + (", ..." if len(kept) > 4 else "")
        log(f"note: {len(kept)} of {len(est)} 8-bit activation quantizers stay float: alone each would cost "
            f"more than {opts.guard:g} of the outputs' energy ({names}; {time.time() - t0:.0f} s)")
    return [{"layer": n, "part": part} for n, part in moved], kept
