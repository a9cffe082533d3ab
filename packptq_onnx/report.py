"""What `quantize` returns and writes as JSON: one typed report (docs/METHOD.md, "Report").

Version 2 keeps the keys of version 1 but for packs: they are listed once, at the top level, each
with the scores S_t of its blocks (the Hessian-guided importance that placed the pack's bounds),
their mean estimated sensitivity Omega_t, and the sensitivity Omega measured at the chosen bits
(mixed precision only); `mixed_precision` and `reconstruction` no longer carry pack lists.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import __version__
from .mixed import MixedResult
from .reconstruct import Reconstruction

REPORT_VERSION = 2


@dataclass
class PackInfo:
    id: int
    blocks: list[str]             # block names, in graph order
    nodes: list[str]              # the ONNX nodes of its layers
    wbits: list[int]
    abits: list[int]
    bytes: float                  # weight bytes at the stored bits
    scores: list[float]           # S_t of its blocks: the packing cuts before each block's minimum
    omega_estimated: float        # mean Omega_t of its blocks (sensitivity.score_blocks)
    omega_measured: float | None  # Omega with only this pack quantized at the chosen bits (mixed precision)


def pack_infos(analysis, records, mixed: MixedResult | None) -> list[PackInfo]:
    """analysis: pipeline.Analysis (blocks, their scores, packs); records: records.export_records."""
    """Per pack, from the packing analysis and the export records (the bits as written)."""
    if analysis is None:
        return []
    by_pack: dict = {}
    for r in records:
        by_pack.setdefault(r.pack, []).append(r)
    out = []
    for pk in analysis.packs:
        recs = by_pack.get(pk.id, [])
        out.append(PackInfo(pk.id, [analysis.units.blocks[b].name for b in pk.blocks],
                            [r.layer.name for r in recs], sorted({r.wbits for r in recs if r.wbits}),
                            sorted({r.abits for r in recs if r.abits}),
                            sum(r.w_int.size * r.wbits / 8 + 4 * r.float_weights for r in recs),
                            [analysis.scores[b].score for b in pk.blocks], pk.omega,
                            None if mixed is None else mixed.chosen(pk.id)[2]))
    return out


@dataclass
class QuantizeReport:
    input: str
    output: str
    options: dict
    file_bytes: int
    weight_range: str
    shapes: dict
    output_quantizers: dict
    imported: dict                # JSON key "import": conversion notes, faithfulness, float nodes
    layers: list[dict]
    weight_bytes: dict
    parity: list[dict]            # per output, onnxruntime vs the simulation
    parity_layers: dict           # layer by layer, fed onnxruntime's own inputs
    parity_graph: list[dict]      # per output, onnxruntime with graph optimizations off vs the simulation
    seconds: dict
    peak_rss_mb: float
    packs: list[PackInfo] = field(default_factory=list)
    reconstruction: Reconstruction | None = None
    mixed_precision: MixedResult | None = None
    evaluation: dict | None = None        # --eval: validation, task, other shapes, second size
    evaluation_error: dict | None = None  # --eval failed after the model was written
    tool: dict = field(default_factory=lambda: {"name": "packptq-onnx", "version": __version__})
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict:
        """The JSON object: dataclasses as dicts, `imported` as "import", the evaluation's keys at the
        top level, absent parts left out."""
        d = asdict(self)
        d["import"] = d.pop("imported")
        d.update(d.pop("evaluation") or {})
        return {k: v for k, v in d.items() if v is not None}
