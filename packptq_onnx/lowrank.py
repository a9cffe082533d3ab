"""Which layers get low-rank compensation, and at which rank (docs/METHOD.md, "Low-rank compensation").

Merged form: WeightQuantizer adds a learnable B·A (in weight steps) to w / s before rounding, and
reconstruction learns it first, then AdaRound rounds around it; the exported integers hold it, so the
deployed model is unchanged in shape and speed. Side-branch form: B·A stays float beside the rounded
weight and the export adds two small float MatMuls and an Add per layer. Only 2-D weights (MatMul,
Gemm) take it.
"""
from __future__ import annotations

AUTO = "auto"
AUTO_FRACTION = 32  # auto: rank = ceil(min(d_in, d_out) / 32), at least 4, at most 64


FORMS = ("merged", "branch")


def eligible(q, form: str = "merged") -> bool:
    """A 2-D MatMul / Gemm weight being quantized. The side branch also needs the layer to compute
    exactly x @ W (+ b): MatMul, or a Gemm whose weight is the module's own (alpha = 1)."""
    ok = q.layer.op in ("MatMul", "Gemm") and q.layer.has_weight and q.weight.dim() == 2 and q.wq is not None
    if form == "branch" and q.layer.op == "Gemm":
        ok = ok and q.param_path is not None
    return ok


def rank_for(q, spec) -> int:
    """spec: an int (every eligible layer) or "auto" (from the layer's shape: a fixed share of its
    smaller side, so the compensation grows with the layer and stays low rank)."""
    if spec == AUTO:
        return max(4, min(64, -(-min(q.weight.shape) // AUTO_FRACTION)))
    return int(spec)


def parse(text: str | None):
    """--lowrank value: None (off), a positive int, or "auto"; ValueError otherwise."""
    if text is None or text == "0":
        return None
    if text == AUTO:
        return AUTO
    r = int(text)
    if r < 1:
        raise ValueError(text)
    return r
