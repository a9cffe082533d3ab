"""Time estimate for reconstruction, printed before it starts and refined after each unit.

One forward pass of the quantized torch model on one calibration batch is timed node by node.
A unit's iteration is costed at FWD_BWD times the forward time of the nodes it spans (forward,
backward and the optimiser step), scaled from the calibration batch to the batch an iteration
draws (the reconstruction batch, or every sample when there are fewer);
its two caching passes at the forward time of every node up to its end, over all batches.
After each unit the estimate of what is left is scaled by measured / estimated time so far, with
PRIOR of the whole estimate counted as work done at the estimated pace (`remaining`): one small
first unit no longer sets the scale for the rest.
"""
from __future__ import annotations

import time

import torch
from torch import fx

from .convert import module_name

# iteration time / unit forward time. 4.0 overestimated the default run 3.8x on EfficientNet-Lite0
# (60 min for 15.8 min) and 2.5x on a 6.7 MB orientation classifier (20 min for 8 min), 2 CPU cores
FWD_BWD = 2.0
# share of the first estimate counted as done at the estimated pace when rescaling. With the raw
# ratio the estimate after EfficientNet-Lite0's stem (45.6 s for 24.9 s estimated) read 1h49m for
# 15 min actually left, and after the digits sample's first unit (26 s for 0.8 s: kernel compiling)
# 14m53s for 3 min. Replaying those logs with the prior (and FWD_BWD 2): 35 min and 3.5 min
PRIOR = 0.1


class _Timer(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.seconds: dict = {}

    def run_node(self, n):
        t0 = time.perf_counter()
        res = super().run_node(n)
        if n.op == "call_module":
            self.seconds[n.target] = self.seconds.get(n.target, 0.0) + time.perf_counter() - t0
        return res


@torch.no_grad()
def node_seconds(gm, args) -> dict:
    """Seconds per call_module target for one forward pass on `args` (a second pass, warm)."""
    _Timer(gm).run(*args)
    t = _Timer(gm)
    t.run(*args)
    return t.seconds


def unit_seconds(seconds: dict, units, iters: list[int], calib_batch: int, recon_batch: int,
                 n_batches: int) -> list[float]:
    """Estimated seconds per unit (caching passes + iterations)."""
    order = list(seconds)  # execution order of the timed forward pass
    pos = {k: i for i, k in enumerate(order)}
    prefix, acc = {}, 0.0
    for k in order:
        acc += seconds[k]
        prefix[k] = acc
    scale = recon_batch / max(calib_batch, 1)
    out = []
    for u, it in zip(units, iters):
        names = [module_name(i) for i in u.nodes if module_name(i) in seconds]
        own = sum(seconds[k] for k in names)
        last = max(names, key=pos.get) if names else None
        caching = 2 * n_batches * (prefix[last] if last else 0.0)
        out.append(caching + it * FWD_BWD * own * scale)
    return out


def remaining(est: list[float], done: int, spent: float) -> float:
    """Seconds left after the first `done` units took `spent` seconds: the estimate of the rest scaled
    by (spent + prior) / (estimated + prior), prior = PRIOR x the whole estimate."""
    prior = PRIOR * sum(est)
    return sum(est[done:]) * (spent + prior) / max(sum(est[:done]) + prior, 1e-9)
