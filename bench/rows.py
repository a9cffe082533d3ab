"""Benchmark rows: one quantization method at one bit width (float, onnxruntime's quantize_static
variants, our rtn / adaround / block / pack, pack + mixed precision), and --rows selection."""
from __future__ import annotations

import fnmatch
import itertools
import os
import re
from dataclasses import dataclass, fields

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROWS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rows.toml")


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
    fixed_bits: int | None = None     # ours, uniform: --fixed-bits (stem and head bits, the papers' 8-bit ends)

    @property
    def bits(self) -> str:
        if self.kind == "float":
            return "fp32"
        fine = f", packs ≤{self.max_pack_blocks} blocks" if self.max_pack_blocks else \
            ", packs uncapped" if self.max_pack_blocks == 0 else ""
        fine += f", stem/head W{self.fixed_bits}A{self.fixed_bits}" if self.fixed_bits else ""
        return (f"≤W{self.wbits} budget, A≤{self.abits}" if self.mixed else f"W{self.wbits}A{self.abits}") + fine


def all_rows(path: str = ROWS_FILE) -> list[Row]:
    """bench/rows.toml expanded: each [[row]] is one row or a grid (see the file's header)."""
    with open(path, "rb") as f:
        entries = tomllib.load(f)["row"]
    known = {f.name for f in fields(Row)} | {"bits"}
    rows = []
    for e in entries:
        skip = set(e.pop("skip", ()))
        variants = e.pop("variants", [{}])
        grid = {k: v for k, v in e.items() if isinstance(v, list)}
        for values in itertools.product(*grid.values()):
            for var in variants:
                d = {**e, **dict(zip(grid, values)), **var}
                bad = set(d) - known
                if bad:
                    raise ValueError(f"{path}: unknown row field(s) {sorted(bad)}")
                if "bits" in d:
                    m = re.fullmatch(r"W(\d+)A(\d+)", d["bits"])
                    d["wbits"], d["abits"] = int(m[1]), int(m[2])
                d["method"] = d["method"].format(**d)
                d["name"] = d["name"].format(**d)
                d.pop("bits", None)
                d.setdefault("kind", "ours")
                if d["name"] not in skip:
                    rows.append(Row(**d))
    return rows


ROWS = {r.name: r for r in all_rows()}
OURS = ("rtn", "adaround", "block", "pack")  # the four methods at uniform bits (report.py compares them)
BITS = tuple(dict.fromkeys((r.wbits, r.abits) for r in ROWS.values() if r.method == "pack" and not r.mixed))
CAPS = tuple(sorted({r.max_pack_blocks for r in ROWS.values() if r.method.startswith("pack-cap")}))


def select_rows(patterns: str | None, allowed) -> list[Row]:
    names = [n for n in ROWS if allowed is None or n in allowed]
    if not patterns:
        return [ROWS[n] for n in names]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n in ROWS):
            raise SystemExit(f"--rows: {p!r} matches no row (see --list)")
    return [ROWS[n] for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
