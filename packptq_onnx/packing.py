"""Adaptive packing (docs/METHOD.md, step 2): consecutive blocks grouped by their importance scores.

Scan from the last block to the first: in the unassigned range [0, e], t_min = argmin S_t
(first occurrence); blocks t_min..e form a pack; e = t_min - 1. An optional cap splits a pack
so it holds at most `max_pack_blocks` blocks (taken from its end).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Pack:
    id: int
    blocks: list[int]
    omega: float  # mean estimated sensitivity Omega_t of its blocks (not a score S)


def pack_ranges(scores, max_pack_blocks: int | None = None) -> list[list[int]]:
    s = np.asarray(scores, dtype=np.float64)
    if max_pack_blocks is not None and max_pack_blocks < 1:
        raise ValueError("max_pack_blocks must be >= 1")
    packs, e = [], len(s) - 1
    while e >= 0:
        start = int(np.argmin(s[: e + 1]))
        if max_pack_blocks is not None:
            start = max(start, e - max_pack_blocks + 1)
        packs.append(list(range(start, e + 1)))
        e = start - 1
    return packs[::-1]


def make_packs(scores, sensitivities, max_pack_blocks: int | None = None) -> list[Pack]:
    return [Pack(i, r, float(np.mean([sensitivities[b] for b in r])))
            for i, r in enumerate(pack_ranges(scores, max_pack_blocks))]
