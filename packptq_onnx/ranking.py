"""Which packs and layers cost the accuracy: the ranked sensitivity report (docs/METHOD.md,
"Sensitivity report").

Each pack (on every calibration sample) and each quantized layer on its own (on the first 64,
since there are many) is quantized alone, everything else float, at every (wbits, abits) option,
and the calibration outputs are compared with float: Omega (KL for classifier outputs, MSE
otherwise; the quantity the bit allocation minimises) and the output cosine. Layers are ranked by
Omega at the cheapest option. The table is cached in a JSON file, so a second look costs nothing.
`quantize` with mixed precision adds the one-at-a-time ranking of every layer at the bits it was
given.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from . import mixed, state
from .layers import is_join
from .sensitivity import batch_size

RANK_SAMPLES = 64  # samples for quantize's one-at-a-time ranking (a forward pass per layer)


@dataclass
class Item:
    name: str
    pack: int | None       # the pack holding the layer (None: stem or head)
    layers: list           # the layers quantized together
    omega: list            # per option
    cosine: list           # per option: output cosine to float


@dataclass
class SensitivityReport:
    options: list          # (wbits, abits)
    samples: int
    packs: list            # Item per pack
    layers: list           # Item per quantized layer (joins excluded: their bits are fixed)
    seconds: float
    layer_samples: int = 0  # layers are measured on the first RANK_SAMPLES calibration samples

    @property
    def cheapest(self) -> int:
        """The index of the cheapest option (least wbits x abits)."""
        return min(range(len(self.options)), key=lambda i: self.options[i][0] * self.options[i][1])

    def ranked(self) -> list:
        """Layers, the costliest first, by Omega at the cheapest option."""
        k = self.cheapest
        return sorted(self.layers, key=lambda it: -it.omega[k])

    def to_dict(self) -> dict:
        return {**asdict(self), "ranked": [it.name for it in self.ranked()]}


def measure_report(gm, qls, pack_layers: list, opts: list, batches, n_samples: int, cache: str | None = None,
                   fingerprint: str = "", progress=None, spread=None) -> SensitivityReport:
    key = json.dumps([fingerprint, pack_layers, [list(o) for o in opts]])
    if cache and os.path.exists(cache):
        try:
            with open(cache) as f:
                d = json.load(f)
            if d.get("key") == key:
                r = d["report"]
                return SensitivityReport([tuple(o) for o in r["options"]], r["samples"],
                                         [Item(**x) for x in r["packs"]], [Item(**x) for x in r["layers"]],
                                         r["seconds"], r.get("layer_samples", 0))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    t0 = time.time()
    pack_of = {n: i for i, names in enumerate(pack_layers) for n in names}
    names = [q.layer.name for q in qls if not is_join(q.layer)]
    cos_p: list = []
    cos_l: list = []
    omega_p = mixed.measure(gm, qls, [list(x) for x in pack_layers], opts, batches, cosine=cos_p, progress=progress,
                            spread=spread)
    omega_l = mixed.measure(gm, qls, [[n] for n in names], opts, lambda: first(batches, RANK_SAMPLES), cosine=cos_l,
                            progress=progress, spread=spread)
    rep = SensitivityReport(list(opts), n_samples,
                            [Item(f"pack{i}", i, list(g), o, c)
                             for i, (g, o, c) in enumerate(zip(pack_layers, omega_p, cos_p))],
                            [Item(n, pack_of.get(n), [n], o, c) for n, o, c in zip(names, omega_l, cos_l)],
                            round(time.time() - t0, 3), min(n_samples, RANK_SAMPLES))
    if cache:
        from .exporters.files import save_json
        save_json({"key": key, "report": asdict(rep)}, cache)
    return rep


def first(batches, samples: int):
    """The batches that hold the first `samples` samples."""
    n = 0
    for args in batches():
        yield args
        n += batch_size(args)
        if n >= samples:
            return


@torch.no_grad()
def at_current_bits(gm, qls, batches, samples: int = RANK_SAMPLES) -> list[dict]:
    """Every quantized layer alone at the bits it holds now (the rest float), on the first
    `samples` calibration samples: Omega and output cosine, the costliest first."""
    data = list(first(batches, samples))
    n = sum(batch_size(args) for args in data)
    ref = mixed.float_outputs(gm, qls, data)
    out = []
    for q in qls:
        loss, cos = mixed.output_cost(gm, qls, [q], data, ref)
        out.append({"layer": q.layer.name, "op": q.layer.op, "wbits": None if q.wq is None else q.wq.bits,
                    "abits": None if q.aq is None else q.aq.bits, "omega": loss / max(n, 1), "cosine": cos})
    return sorted(out, key=lambda d: -d["omega"])


@torch.no_grad()
def float_gains(gm, qls, batches, samples: int = RANK_SAMPLES, score=None, change=state.fall_back) -> list[dict]:
    """With every layer quantized as it is now: what reverting one layer alone to float
    (state.fall_back; or what `change(layer)` does to it) buys on the first `samples` calibration
    samples, the largest gain first.
    score(float outputs, quantized outputs) -> a number, higher better (the accuracy target's own
    metric): its gain ranks first, the fall in output loss breaks ties. The loss alone is a poor
    guide where the metric reads an argmax: on the recognizer (MSE of softmax outputs) the layer
    whose reverting took line agreement from 0.986 to 0.998 ranked 47th of 51. This ranks by what
    reverting buys in the whole quantized model, where interactions count (NNCF's accuracy control
    reverts quantizer groups the same way); the one-at-a-time Omega ranks by what quantizing a
    layer costs in an otherwise float model."""
    data = list(first(batches, samples))
    ref = mixed.float_outputs(gm, qls, data)
    join = lambda outs: [torch.cat([o[i] for o in outs]).cpu().numpy() for i in range(len(outs[0]))]  # noqa: E731
    ref_np = join(ref) if score is not None else None

    def measured():
        if score is None:  # the loss alone: no outputs to keep
            return mixed.output_cost(gm, qls, None, data, ref)[0], 0.0
        got: list = []
        loss, _ = mixed.output_cost(gm, qls, None, data, ref, keep=got)
        return loss, float(score(ref_np, join(got)))
    base_loss, base_score = measured()
    n = max(sum(batch_size(args) for args in data), 1)
    out = []
    for q in qls:
        if q.float_fallback:
            continue
        with state.snapshot(qls):
            change(q)
            loss, sc = measured()
        out.append({"layer": q.layer.name, "gain": (base_loss - loss) / n, "score_gain": sc - base_score})
    return sorted(out, key=lambda d: (-d["score_gain"], -d["gain"]))


def table(rep: SensitivityReport, top: int = 15) -> str:
    opts = [f"W{w}A{a}" for w, a in rep.options]
    head = f"{'':<28}" + "".join(f"{o:>11}" for o in opts)
    lines = [f"sensitivity: Omega with one pack (or one layer) quantized alone, on {rep.samples} samples "
             f"(layers: the first {rep.layer_samples}; {rep.seconds:.1f} s)", head]
    for it in rep.packs:
        lines.append(f"{it.name + f' ({len(it.layers)} layers)':<28}" + "".join(f"{v:>11.3g}" for v in it.omega))
    ranked = rep.ranked()
    lines.append(f"layers, costliest first (by Omega at the cheapest option; cosine to float there), top "
                 f"{min(top, len(ranked))} of {len(ranked)}:")
    k = rep.cheapest
    for it in ranked[:top]:
        where = "stem/head" if it.pack is None else f"pack{it.pack}"
        lines.append(f"{it.name[:27]:<28}" + "".join(f"{v:>11.3g}" for v in it.omega)
                     + f"  {where}, cosine {it.cosine[k]:.4f}")
    return "\n".join(lines)
