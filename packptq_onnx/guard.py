"""8-bit activations that the model cannot take: measured one at a time, left float.

Per-tensor 8-bit activations lose some models: a BN-folded conv whose output spreads its channels
from 0.1 to 126 (one outlier channel) and feeds a depthwise conv leaves most channels a handful
of steps. On the PicoDet-style layout detector of bench/COVERAGE.md one such quantizer alone
takes a score map's cosine to 0.87, all of them to 0.61, and 8 bits is the most an integer
kernel takes.

Each 8-bit activation quantizer is applied alone, the rest of the model float, on GUARD_SAMPLES
calibration samples (`measure`: one forward pass each). Each output is scored per channel along
its shortest non-batch axis, each channel scaled to unit energy, so box coordinates in pixels
cannot hide class scores in [0, 1] (YOLOv8's [N, 4 + nc, A]); a quantizer's noise-to-signal ratio
is the sum of its ratios on each output, averaged over batches. Quantizers whose own ratio
exceeds the threshold stay float, the worst first, at most MAX_SHARE of them.

A first-order estimate (`estimate`) once chose them without measuring: the noise d_t = Q(x_t) - x_t
of every quantizer carried to the outputs by the Jacobian, in one backward pass per random output
probe v (E[(v . J_t d_t)^2] = ||J_t d_t||^2). On the layout detector its ten worst of 199 match
measurement; on the PP-OCR recognizers it is off by 10-100x both ways (`choose`), so it now serves
only the range choice below, a comparison of two ranges of the same tensor.

The same backward passes also weigh each quantizer's range. The Lp-searched range clips a
tensor's tails to gain resolution; that is right for most tensors and wrong for a few (a
recognizer's CTC logits, a detector's score maps), and only the outputs can tell which. So the
min-max range of every 8-bit quantizer is carried to the outputs beside the searched one, and a
quantizer (summed over the places that share it) takes min-max where that predicts less output
noise. Measured on the ten models of bench/COVERAGE.md at W8A8 (512 evaluation samples each):
NudeNet keeps 0.953 of its detections (0.946 before), the YOLOX-style captcha detector 0.980
(0.968), ddddocr's recognizer reads 0.984 of its strings (0.973; onnxruntime 0.984), the layout
detector's worst output cosine reaches 0.992 (0.988); ONet and magika lose two samples of 512
(those figures are from the estimate-only guard). GUARD_SAMPLES = 8 (was 2): with 2 samples the
choice followed noise (NudeNet 0.923).
docs/METHOD.md, "Guard for 8-bit activations".
"""
from __future__ import annotations

import time

import torch

from . import data, memory, quant, state
from .layers import is_join
from .progress import bar

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
    n = 0
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
            n += 1
    return {k: v / n for k, v in total.items()}  # a mean over batches: the ratio per batch of samples


def measure(gm, qls, batches: list, keys: list) -> dict:
    """{site: measured output noise-to-signal ratio} with that one activation quantizer applied and
    everything else float: one forward pass per site over `batches`, weighed as `estimate` weighs."""
    by = {q.layer.name: q for q in qls}

    def run(key=None):
        pre, post = [], []
        if key is not None:
            q = by[key[0]]
            quantizer = getattr(q, state.SITE_ATTR[key[1]])
            if key[1] == "output":
                post.append((q, lambda mod, args, out: quantizer(out)))
            else:
                i = 0 if key[1] == "input" else 1
                pre.append((q, lambda mod, args: tuple(quantizer(a) if j == i else a for j, a in enumerate(args))))
        outs = []
        with torch.no_grad(), state.quantized(qls, only=[]), state.capture(pre=pre, post=post):
            for args in batches:
                o = gm(*args)
                outs += [t.double() for t in (o if isinstance(o, (list, tuple)) else [o])
                         if torch.is_tensor(t) and t.is_floating_point()]
        return outs
    ref = run()
    weights = [_weights(o) for o in ref]  # per batch, as in `estimate`, and a mean over batches
    return {k: float(sum(((g - r) * w).pow(2).sum() for g, r, w in zip(run(k), ref, weights))) / len(batches)
            for k in bar(keys, "guard: each 8-bit activation quantizer alone")}


def choose(measured: dict, threshold: float) -> list:
    """Quantizers to leave float: measured ratio over the threshold, worst first, at most MAX_SHARE
    of all. Measured, not estimated: on the PP-OCR recognizers the first-order estimate is off by
    10-100x both ways. Too high where the outputs saturate (PP-OCRv4: a quantizer estimated at 0.21
    measures 0.0026; a tenth of its noise gives 10x, not 100x, less output noise); too low elsewhere
    (PP-OCRv5: estimated 1e-4, measured 5e-3)."""
    over = sorted((k for k, v in measured.items() if v > threshold), key=lambda k: -measured[k])
    return over[:int(MAX_SHARE * len(measured))]


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
    batches = list(data.batches(feeds, p.names, p.plan.run_batch or 1, opts.device))
    est = estimate(p.gm, p.qls, batches, opts.seed, candidates=candidates)
    est, moved = choose_ranges(p.qls, est, candidates)
    if moved:
        log(f"note: {len(moved)} of {len(est)} 8-bit activation quantizers take their min-max range: the "
            "searched (clipped) range predicts more output noise")
    got = measure(p.gm, p.qls, batches, list(est))
    keys = choose(got, opts.guard)
    state.keep_float(p.qls, keys)
    kept = [{"layer": n, "part": part, "predicted_nsr": round(est[(n, part)], 6),
             "measured_nsr": round(got[(n, part)], 6)} for n, part in keys]
    if kept:
        names = ", ".join(f"{k['layer']} {k['part']}" for k in kept[:4]) + (", ..." if len(kept) > 4 else "")
        log(f"note: {len(kept)} of {len(est)} 8-bit activation quantizers stay float: alone each costs "
            f"more than {opts.guard:g} of the outputs' energy, each measured alone ({names}; "
            f"{time.time() - t0:.0f} s)")
    return [{"layer": n, "part": part} for n, part in moved], kept
