"""Round-to-nearest initialisation from float calibration data (docs/METHOD.md, "Quantizers").

One float pass over the calibration batches records, per activation tensor a quantizer will
read, its range and a bounded random sample of its values (the Lp range search runs on the
sample), and each correctable layer's mean input (bias correction, packptq_onnx.qlayer). Then
every quantizer is built at its bits and tensors that two layers share get one quantizer. Which
tensors get output quantizers, which Relu / Clip an output quantizer may absorb, and which tensors
only quantized layers read are worked out here from the graph, so every caller wires it the same.
"""
from __future__ import annotations

import torch

from . import memory, state
from .layers import after_softmax, is_join, output_rules, post_activations, read_only_by_layers
from .qlayer import Links, Stats, is_depthwise

SAMPLE_PER_BATCH = 1 << 14  # activation values kept per batch for the range search
SAMPLE_TOTAL = 1 << 16      # and in all: 80 Lp candidates over 65k values, ~0.1 s per quantizer
FOCUS_SAMPLES = 32          # samples of (probabilities, v) kept per attention MatMul for the focus search,
FOCUS_ELEMENTS = 1 << 22    # and at most this many probabilities (16 MB): BERT at 512 tokens keeps 1 sample
SOFTMAX_QUANT = ("uniform", "focus")


class _Recorder:
    """Range and a bounded uniform sample of every tensor it is shown, per key."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.seen: dict = {}  # key -> (lo, hi, [sample chunks])
        self.rate: dict = {}

    def __call__(self, key, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi, samples = self.seen.get(key, (float("inf"), float("-inf"), []))
        per = self.rate.get(key, SAMPLE_PER_BATCH)
        flat = x.reshape(-1)
        if flat.numel() > per:
            flat = flat[torch.randint(flat.numel(), (per,), generator=self.gen)]
        samples.append(flat.cpu())
        if sum(len(s) for s in samples) > 2 * SAMPLE_TOTAL:  # many small batches: halve every
            samples[:] = [s[torch.randperm(len(s), generator=self.gen)[:len(s) // 2]] for s in samples]
            self.rate[key] = max(per // 2, 1)  # batch's share, so each still weighs the same
        self.seen[key] = (min(lo, float(x.min())), max(hi, float(x.max())), samples)

    def stats(self, key) -> Stats | None:
        if key not in self.seen:
            return None
        lo, hi, samples = self.seen[key]
        sample = torch.cat(samples)
        if sample.numel() > SAMPLE_TOTAL:
            sample = sample[torch.randint(sample.numel(), (SAMPLE_TOTAL,), generator=self.gen)]
        return Stats(lo, hi, sample)


@torch.no_grad()
def calibrate(gm, qls: list, model, batches, wbits, abits, reduce_range: bool, seed: int,
              progress=None, output_bits: int | None = 8, bias_correction: bool = True,
              softmax_quant: str = "uniform") -> None:
    """RTN initialisation: weight scales by Lp search, activation ranges from float calibration data.

    wbits / abits: an int for all layers or a dict layer-name -> bits. output_bits: an output
    quantizer on every layer whose output no rule of layers.output_rules keeps float (graph
    outputs, tensors that reach LayerNorm / Softmax / GELU first, decode tails); None: no output
    quantizers. A Relu / Clip right after a layer (layers.post_activations): its output quantizer is
    calibrated on the clipped values, and a layer reading that tensor (or the output itself) at the
    same bits shares the quantizer (state.tie_inputs). A tensor read by quantized layers only
    (layers.read_only_by_layers) takes its readers' bits when they agree, so a W4A4 chain is
    quantized once per tensor, at 4 bits. bias_correction: keep each correctable layer's mean input.
    softmax_quant "focus": the probabilities entering attention's probs @ v MatMuls get the range
    that minimises the error of their product (quant.search_focus) instead of the Lp search."""
    layers = [q.layer for q in qls]
    float_outputs = set(output_rules(model, layers, output_bits))
    post_act = post_activations(model, layers)
    layer_only = read_only_by_layers(model, layers)

    def bits(b, name):
        return b[name] if isinstance(b, dict) else b

    record = _Recorder(seed)
    sums: dict = {}
    focus = after_softmax(model, layers) if softmax_quant == "focus" else set()
    pairs: dict = {}  # focus layer name -> [(probs, v) batches]

    def keep_pair(q, args):
        kept = pairs.setdefault(q.layer.name, [])
        per = max(1, args[0][:1].numel())
        left = min(FOCUS_SAMPLES, max(1, FOCUS_ELEMENTS // per)) - sum(len(p) for p, _ in kept)
        same = not kept or (kept[0][0].shape[1:] == args[0].shape[1:] and kept[0][1].shape[1:] == args[1].shape[1:])
        if left > 0 and same and args[0].dim() >= 3 and args[0].shape[0] == args[1].shape[0]:
            kept.append((args[0][:left].detach().float().cpu(), args[1][:left].detach().float().cpu()))

    def mean_input(q, x):
        s, n = sums.get(q.layer.name, (0.0, 0))
        if torch.is_tensor(s) and s.shape[1:] != x.shape[1:]:
            return  # calibration samples of another shape: the mean input is taken at the first
        sums[q.layer.name] = (s + x.detach().float().sum(0, keepdim=True), n + x.shape[0])

    def inputs(q):
        def hook(_m, args):
            if q.layer.act_input is not None:
                record(q.layer.name, args[0])
            if bias_correction and q.correctable:
                mean_input(q, args[0])
            if q.layer.act_input2 is not None:
                record(("in2", q.layer.name), args[1])
            if q.layer.name in focus:
                keep_pair(q, args)
        return hook

    def output(q):
        lo, hi, _ = post_act.get(q.layer.name, (None, None, None))

        def hook(_m, _args, y):
            record(("out", q.layer.name), y if lo is None else torch.clamp(y, lo, hi))
        return hook

    for q in qls:
        state.clear(q)
        q.reduce_range, q.initial, q.in_mean = reduce_range and not is_depthwise(q), {}, None
        q.act_stats = q.act_stats2 = q.focus = None
        state.set_bits(q, bits(wbits, q.layer.name), None)
    watched = [q for q in qls if output_bits is not None and q.layer.output not in float_outputs]
    with state.capture(pre=[(q, inputs(q)) for q in qls], post=[(q, output(q)) for q in watched]):
        for args in (progress(batches) if progress else batches):
            gm(*args)
            memory.trim()

    for q in qls:
        if q.layer.name in sums:
            q.in_mean = sums[q.layer.name][0] / sums[q.layer.name][1]
        q.act_stats = record.stats(q.layer.name)
        q.act_stats2 = record.stats(("in2", q.layer.name))
        got = pairs.get(q.layer.name)
        q.focus = (torch.cat([p for p, _ in got]), torch.cat([v for _, v in got])) if got else None
        state.set_bits(q, None, bits(abits, q.layer.name))
        q.links = Links()
        out = record.stats(("out", q.layer.name))
        if out is not None:
            q.links.out_stats, q.links.out_bits = out, output_bits
            state.set_output_bits(q, output_bits)
    producers = {}
    for q in qls:
        q.links.post_act = post_act.get(q.layer.name)
        if q.oq is not None:
            producers[q.layer.output] = q
            if q.layer.name in post_act:
                producers[post_act[q.layer.name][2]] = q
    for q in qls:
        p = producers.get(q.layer.act_input)
        q.links.fed_by = p
        if p is not None and q.layer.act_input in layer_only:
            p.links.readers.append(q)
        if is_join(q.layer):
            p = producers.get(q.layer.act_input2)
            q.links.fed_by2 = p
            if p is not None and q.layer.act_input2 in layer_only:
                p.links.readers.append(q)
    state.tie_inputs(qls)
    state.set_quant(qls, True, True)
