"""Benchmark rows: one quantization method at one bit width (float, onnxruntime's quantize_static
variants, our rtn / adaround / block / pack, pack + mixed precision), and --rows selection."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

BITS = ((8, 8), (4, 8), (4, 4), (3, 4), (3, 3))
OURS = ("rtn", "adaround", "block", "pack")
CAPS = (2, 4, 8)


@dataclass
class Row:
    name: str
    kind: str                  # float | ort | ours
    method: str                # plot series: float, ort-minmax-u8, rtn, pack, pack-mixed, ...
    wbits: int = 32
    abits: int = 32
    calibrate: str = "MinMax"  # ort: MinMax | Percentile | Entropy
    act: str = "u8"            # ort: u8 | s8
    reduce_range: bool = False  # ort
    mixed: bool = False        # ours: pack + mixed precision at the weight bytes of uniform W{wbits}
    full_range: bool = False   # ours: --full-range-weights (8-bit weights in [-128, 127], as onnxruntime's)
    max_pack_blocks: int | None = None  # ours: --max-pack-blocks (finer packs give the allocation room)
    lowrank: int | str | None = None  # ours: --lowrank (low-rank compensation, issue 27)
    lowrank_form: str = "merged"      # ours: --lowrank-form
    softmax_quant: str = "uniform"    # ours: --softmax-quant (focus: post-Softmax range for probs @ v)

    @property
    def bits(self) -> str:
        if self.kind == "float":
            return "fp32"
        fine = f", packs ≤{self.max_pack_blocks} blocks" if self.max_pack_blocks else ""
        return (f"≤W{self.wbits} budget, A≤{self.abits}" if self.mixed else f"W{self.wbits}A{self.abits}") + fine


def all_rows() -> list[Row]:
    rows = [Row("float", "float", "float")]
    for cal, act, rr in (("MinMax", "u8", False), ("MinMax", "s8", False), ("MinMax", "u8", True),
                         ("Percentile", "u8", False), ("Entropy", "u8", False)):
        m = f"ort-{cal.lower()}-{act}" + ("-rr" if rr else "")
        rows.append(Row(f"{m}-W8A8", "ort", m, 8, 8, cal, act, rr))
    for w, a in ((4, 8), (4, 4)):
        rows.append(Row(f"ort-minmax-u8-W{w}A{a}", "ort", "ort-minmax-u8", w, a, "MinMax", "u8"))
    for m in OURS:
        for w, a in BITS:
            rows.append(Row(f"{m}-W{w}A{a}", "ours", m, w, a))
    for m in ("rtn", "pack"):  # 8-bit weights in the full range: exact on CPUs with VNNI, as onnxruntime's rows
        rows.append(Row(f"{m}-fullrange-W8A8", "ours", f"{m}-fullrange", 8, 8, full_range=True))
    for w in (4, 3):  # the weight bytes of uniform W4 / W3, activations at A4 (as pack-W4A4 / pack-W3A4)
        rows.append(Row(f"pack-mixed-W{w}", "ours", "pack-mixed", w, 4, mixed=True))
        rows.append(Row(f"pack-mixed-fine-W{w}", "ours", "pack-mixed-fine", w, 4, mixed=True, max_pack_blocks=3))
        rows.append(Row(f"pack-fine-W{w}A4", "ours", "pack-fine", w, 4, max_pack_blocks=3))
    for k in CAPS:  # packs of at most k blocks (issue 24, item 5: bench/pack_cap.py)
        for w, a in ((4, 8), (4, 4)):
            rows.append(Row(f"pack-cap{k}-W{w}A{a}", "ours", f"pack-cap{k}", w, a, max_pack_blocks=k))
    for w, a in ((8, 8), (4, 4), (3, 3)):  # transformers (issue 27): each component alone and both
        for tag, lr, sq in (("lrauto", "auto", "uniform"), ("focus", None, "focus"),
                            ("lrauto-focus", "auto", "focus"), ("lr8", 8, "uniform"), ("lr32", 32, "uniform"),
                            ("lrbranch", "auto", "uniform"), ("lrbranch-focus", "auto", "focus")):
            if w == 8 and tag in ("lr8", "lr32"):
                continue
            form = "branch" if tag.startswith("lrbranch") else "merged"
            rows.append(Row(f"pack-{tag}-W{w}A{a}", "ours", f"pack-{tag}", w, a, lowrank=lr, lowrank_form=form,
                            softmax_quant=sq))
    return rows


ROWS = {r.name: r for r in all_rows()}


def select_rows(patterns: str | None, allowed) -> list[Row]:
    names = [n for n in ROWS if allowed is None or n in allowed]
    if not patterns:
        return [ROWS[n] for n in names]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n in ROWS):
            raise SystemExit(f"--rows: {p!r} matches no row (see --list)")
    return [ROWS[n] for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
