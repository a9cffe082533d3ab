"""Sensitivity measurement spread over Ray workers (--workers N, or --address of a cluster).

The (group, bit option) items of mixed precision, of the accuracy target's search and of
`inspect --sensitivity` are independent: each is one pass over the calibration batches with one
group quantized. The groups are cut into contiguous chunks, one Ray task per chunk; every task gets
the converted model, its quantizers, the batches and the float outputs through Ray's object store
(put once) and measures its chunk exactly as the sequential loop would (mixed.measure_groups,
replaying the state the earlier groups leave). The table is the sequential one, number for number,
when the sequential run uses the workers' thread count (tested on the sample; on EfficientNet-Lite0
equal at 1 thread, 1e-4 relative apart at 2: reductions split over threads). docs/METHOD.md, "Sweeps and
parallel sensitivity".
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

from . import o2t  # noqa: F401  (a worker imports onnx2torch the package's way before unpickling the model)
from .engine import Call, Engine


@dataclass
class Spread:
    workers: int | None = None   # CPUs of a local Ray cluster started for the measurement
    address: str | None = None   # an existing Ray cluster: auto or HOST:PORT

    @property
    def enabled(self) -> bool:
        return self.workers is not None or self.address is not None


def chunks(n: int, k: int) -> list[range]:
    """n items in k contiguous, nearly equal chunks (none empty)."""
    k = max(1, min(k, n))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)  # progress, as the bars: stdout stays the command's output (inspect --json)


def measure(spread: Spread, gm, qls, groups: list, opts: list, data: list, ref: list, n: int, log=_stderr):
    """(table, cosine rows) of every group, measured as Ray tasks."""
    with Engine("ray", spread.workers, spread.address, retries=1, log=log) as eng, \
            tempfile.TemporaryDirectory(prefix="packptq-spread-") as tmp:
        parts = chunks(len(groups), eng.cpus())
        log(f"sensitivity: {len(groups)} groups x {len(opts)} options in {len(parts)} Ray tasks")
        calls = [Call(f"chunk{i}", "packptq_onnx.spread:measure_chunk",
                      {"groups": [groups[j] for j in r], "before": groups[:r.start], "opts": opts, "n": n},
                      os.path.join(tmp, f"chunk{i}.json"), os.path.join(tmp, f"chunk{i}.log"))
                 for i, r in enumerate(parts)]
        res = eng.run(calls, shared=(gm, qls, data, ref))
    table, cos = [], []
    for c in calls:
        r = res[c.id]
        if r.get("status") != "ok":
            raise RuntimeError(f"sensitivity task {c.id} failed: {r.get('error')}")
        table += r["table"]
        cos += r["cosine"]
    return table, cos


def measure_chunk(payload: dict, shared) -> dict:
    """A Ray task: one chunk of groups, as the sequential loop measures them."""
    from .mixed import measure_groups

    gm, qls, data, ref = shared
    table, cos = measure_groups(gm, qls, payload["groups"], [tuple(o) for o in payload["opts"]], data, ref,
                                payload["n"], before=payload["before"])
    return {"table": table, "cosine": cos}
