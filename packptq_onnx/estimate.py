"""Time estimate for reconstruction, printed before it starts and refined after each unit.

One forward pass of the quantized torch model on one calibration batch is timed node by node.
A unit's iteration is costed at FWD_BWD times the forward time of the nodes it spans (forward,
backward and the optimiser step), scaled from the calibration batch to the batch an iteration
draws (the reconstruction batch, or every sample when there are fewer);
its two caching passes at the forward time of every node up to its end, over all batches.
After each unit the estimate of what is left is scaled by measured / estimated time so far.
"""
from __future__ import annotations

import time

import torch
from torch import fx

from .convert import module_name

FWD_BWD = 4.0  # iteration time / unit forward time, order of magnitude on CPU (bench/recon_speed)


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
