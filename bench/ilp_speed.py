"""Bit-allocation solve time: N packs x K options, random sensitivities and sizes, budget at the
middle of the feasible range. Prints seconds per solver and the ratio to the 1 s target.
    python bench/ilp_speed.py [--packs 200] [--options 4] [--repeat 5]
"""
import argparse
import time

import numpy as np
from packptq_onnx.solvers import ilp


def instance(packs: int, options: int, seed: int):
    r = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 8][:options] if options <= 4 else range(2, 2 + options))
    elems = r.integers(1_000, 500_000, packs)
    size = (elems[:, None] * bits[None, :] / 8).tolist()
    cost = (r.lognormal(0, 1, packs)[:, None] * 2.0 ** (-bits[None, :])).tolist()
    budget = (ilp.min_size(size) + sum(max(s) for s in size)) / 2
    return cost, size, budget


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packs", type=int, default=200)
    ap.add_argument("--options", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    for solver in ("cbc", "highs"):
        times, objs = [], []
        for seed in range(a.repeat):
            cost, size, budget = instance(a.packs, a.options, seed)
            t0 = time.perf_counter()
            sol = ilp.solve(cost, size, budget, solver=solver)
            times.append(time.perf_counter() - t0)
            objs.append(sol.objective)
        print(f"{solver:>6}: {a.packs} packs x {a.options} options: median {np.median(times):.3f} s, "
              f"max {max(times):.3f} s (max/target 1 s = {max(times):.2f}); objectives {np.round(objs, 6).tolist()}")


if __name__ == "__main__":
    main()
