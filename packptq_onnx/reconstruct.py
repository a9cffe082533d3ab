"""Reconstruction (docs/METHOD.md, step 4): AdaRound + LSQ + QDrop, unit by unit, one engine.

A unit is a contiguous piece of the fx graph: one layer (adaround), one block (block) or one
pack (pack); stem and head layers are units of their own in block/pack modes. For each unit:
inputs = the quantized model's values entering it, mixed element-wise with the float values
(QDrop); target = the float output of the unit. Learned jointly: AdaRound rounding variables of
its weights and LSQ step sizes of its activation quantizers. Weights end with hard rounding.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import fx

from . import lowrank, state
from .blocks import SHAPE_OPS
from .convert import module_name
from .estimate import node_seconds, remaining, unit_seconds
from .layers import is_join
from .memory import learning_heap, peak_rss_mb
from .progress import bar, fmt_seconds
from .quant import compile_failure, compiled
from .sensitivity import batch_size
from .unitcache import Cache, capture, layouts


@dataclass
class ReconOptions:
    iters: int = 500
    iters_total: int | None = None
    batch_size: int = 32
    lr_round: float | None = None  # Adam step on V; None: round_lr(iters), enough travel to harden
    lr_scale: float = 4e-5
    round_weight: float = 300.0  # regulariser weight against the reconstruction loss relative to RTN's
    drop_prob: float = 0.5
    warmup: float = 0.2
    beta: tuple = (20.0, 2.0)
    eval_samples: int = 256
    cache_bytes: int | None = None  # above this, unit caches go to disk (memory-mapped)
    compile: bool = True  # compiled fake-quant kernels while learning (quant._Fused); --no-compile: eager
    lowrank: int | str | None = None  # low-rank compensation of MatMul/Gemm weights: a rank or "auto" (lowrank.py)
    lr_lowrank: float = 1e-2  # its Adam step (B·A is in weight steps)
    lowrank_share: float = 0.5  # merged: B·A learns in this first share of a unit's iterations, AdaRound after
    lowrank_form: str = "merged"  # "branch": B·A stays a float side branch, learned with AdaRound throughout
    channels_last: bool = True  # 4-D unit inputs and targets in channels_last on CPU (unitcache.channels_last)
    keep_heap: bool = True  # while a unit learns, freed memory stays in the heap (memory.learning_heap)


@dataclass
class Unit:
    name: str
    layers: list[str]       # ONNX names of the QuantLayers it learns
    nodes: list[int]        # ONNX node indices it spans
    output: str             # tensor name of its output
    size: int = 0           # weight elements
    macs: int = 0           # multiply-accumulates of one sample's forward pass through its layers
    layer_iters: float = 0.0  # iterations under --iters-total (split_iters)


@dataclass
class UnitResult:
    name: str
    iters: int
    loss_before: float
    loss_after: float
    seconds: float
    kept_rtn: bool = False      # learning made the unit worse on calibration data: RTN state kept
    no_gradient: bool = False   # its output does not depend differentiably on what it learns
    gmacs: float = 0.0          # forward compute spent: iterations x batch x unit MACs / 1e9
    nonfinite_steps: int = 0    # steps whose loss or gradients held NaN/inf (those entries were not applied)
    cache_mb: float = 0.0       # its inputs and targets over the calibration set (unitcache.Cache)
    cache_on_disk: bool = False  # memory-mapped on disk (above ReconOptions.cache_bytes)
    peak_rss_mb: float = 0.0    # the process's peak resident memory when the unit had finished
    lowrank_layers: int = 0     # layers that kept a low-rank compensation (--lowrank)
    loss_learned: float | None = None  # the loss learning reached (kept_rtn: worse than loss_before)
    loss_soft: float | None = None  # the same before hardening (soft rounding): the gap is what rounding cost


@dataclass
class Reconstruction:
    method: str
    units: list[UnitResult]
    seconds: float
    scoring_seconds: float | None = None  # block scores and packing, when packs were made for it


def make_units(method: str, units_struct, packs, layers) -> list[Unit]:
    """stem layers, then layers / blocks / packs, then head layers."""
    by_name = {l.name: l for l in layers}

    def layer_unit(name):
        return Unit(name, [name], [by_name[name].index], by_name[name].output)

    if method == "adaround":  # layer-wise: a join has no weight to round, it keeps its RTN ranges
        return [layer_unit(l.name) for l in layers if not is_join(l)]
    units = [layer_unit(n) for n in units_struct.stem]
    blocks = units_struct.blocks
    if method == "block":
        groups = [(b.name, [b]) for b in blocks]
    else:
        groups = [(f"pack{p.id}", [blocks[i] for i in p.blocks]) for p in packs]
    for name, bl in groups:
        units.append(Unit(name, [n for b in bl for n in b.layers], [i for b in bl for i in b.nodes], bl[-1].output))
    units += [layer_unit(n) for n in units_struct.head]
    return units


# ---- fx plumbing ---------------------------------------------------------------------------
def _producer_node(gm, model, tensor: str) -> fx.Node:
    for i, node in enumerate(model.graph.node):
        if tensor in node.output:
            pos = list(node.output).index(tensor)
            target = module_name(i)
            for n in gm.graph.nodes:
                if n.op == "call_module" and n.target == target:
                    if len(node.output) == 1:
                        return n
                    return next(u for u in n.users if u.op == "call_function" and u.args[1] == pos)
    raise KeyError(tensor)


def _shape_only(gm, model) -> set:
    """fx nodes whose value depends only on tensor shapes and constants (Shape -> Gather -> Concat ...)."""
    shape_ops = {module_name(i) for i, n in enumerate(model.graph.node) if n.op_type in SHAPE_OPS}
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in shape_ops:
            out.add(n)
        elif n.op in ("call_module", "call_function", "call_method") and n.all_input_nodes and all(
                a in out or a.op == "get_attr" for a in n.all_input_nodes):
            out.add(n)
    return out


def subgraph(gm, model, unit: Unit):
    """A GraphModule computing the unit's output from the values that enter it (shared modules).
    Shape arithmetic made before the unit (e.g. the batch size read off the network input for a
    Reshape inside it) is recomputed inside, from the tensor it measures, so it follows the batch."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    targets = {module_name(i) for i in unit.nodes}
    first = min(pos[n] for n in nodes if n.op == "call_module" and n.target in targets)
    out = _producer_node(gm, model, unit.output)
    shape_only = _shape_only(gm, model)
    g, env, inputs = fx.Graph(), {}, []

    def arg(n):
        if n not in env:
            if n.op == "get_attr":
                env[n] = g.get_attr(n.target)
            elif n in shape_only:
                env[n] = g.node_copy(n, arg)
            else:
                env[n] = g.placeholder(f"in{len(inputs)}")
                inputs.append(n)
        return env[n]

    for n in nodes[first: pos[out] + 1]:
        if n.op in ("call_module", "call_function", "call_method"):
            env[n] = g.node_copy(n, arg)
    g.output(env[out])
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    used = [n for n in sub.graph.nodes if n.op == "placeholder" and n.users]
    for n in list(sub.graph.nodes):
        if n.op == "placeholder" and not n.users:
            sub.graph.erase_node(n)
    sub.recompile()
    names = {n.name for n in used}
    return sub, [n for n in inputs if env[n].name in names], out


def recon_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (axis 1 for NC..., last axis for tokens), averaged over the rest."""
    d = (pred.float() - target.float()).pow(2)  # an integer unit output: no gradient, the unit keeps RTN
    if d.dim() == 4 or d.dim() == 2:
        return d.sum(1).mean()
    return d.sum(-1).mean() if d.dim() >= 2 else d.mean()


def _beta(t: int, total: int, o: ReconOptions) -> float | None:
    warm = int(o.warmup * total)
    if t < warm:
        return None
    rel = (t - warm) / max(1, total - warm)
    return o.beta[1] + (o.beta[0] - o.beta[1]) * max(0.0, 1 - rel)


def reconstruct_unit(gm, model, qls, unit: Unit, calib_batches, n: int, iters: int, o: ReconOptions,
                     seed: int, device: str, cache_dir: str | None) -> UnitResult:
    t0 = time.time()
    sub, in_nodes, out_node = subgraph(gm, model, unit)
    own = [q for q in qls if q.layer.name in set(unit.layers)]
    wanted = in_nodes + [out_node]
    with state.quantized(qls, only=[]):
        lays = layouts(gm, next(iter(calib_batches())), wanted)
        fp = capture(gm, calib_batches(), wanted, lays)
    qin = capture(gm, calib_batches(), in_nodes, lays and lays[:-1])
    if lays is not None and (fp is None or qin is None):  # a value that is not the same in every batch
        lays = None
        with state.quantized(qls, only=[]):
            fp = capture(gm, calib_batches(), wanted, None)
        qin = capture(gm, calib_batches(), in_nodes, None)
    arrays, fp, qin = fp + qin, None, None  # the cache owns them (and may relayout them in place)
    cache = Cache(arrays, lays and lays + lays[:-1], o.cache_bytes, cache_dir, device, o.channels_last)
    del arrays
    k = len(in_nodes)
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = cache.n_items
    if cache.per_batch:  # whole calibration batches, as they ran
        ev_batches = [np.array([i]) for i in range(min(items, max(1, -(-o.eval_samples * items // n))))]

        def draw():
            return np.array([rng.integers(items)])
    else:
        ev = np.arange(min(items, o.eval_samples))
        ev_batches = [ev[i:i + o.batch_size] for i in range(0, len(ev), o.batch_size)]

        def draw():
            return np.sort(rng.choice(items, size=min(o.batch_size, items), replace=False))

    def evaluate():
        with torch.no_grad():
            tot = 0.0
            for idx in ev_batches:
                arr = cache.batch(idx, device)
                tot += float(recon_loss(sub(*arr[k + 1:]), arr[k])) * len(idx)
            return tot / sum(len(i) for i in ev_batches)

    try:
        before = evaluate()
    except RuntimeError:  # an op of this unit that needs row-major tensors (a view): learn row-major
        if not cache.channels_last or cache.rowmajor:
            raise
        cache.row_major()
        before = evaluate()
    weighted = [q for q in own if q.wq is not None]
    # a shared quantizer once
    act_qs = list({id(x): x for q in own for x in (q.aq, q.aq2, q.oq) if x is not None}.values())
    rtn_scales = [x.scale.detach().clone() for x in act_qs]
    for q in weighted:
        q.wq.init_adaround(q.weight)
    branch = o.lowrank_form == "branch"
    comp = [q for q in weighted if lowrank.eligible(q, o.lowrank_form)] if o.lowrank is not None else []
    gen_cpu = torch.Generator().manual_seed(seed)
    for q in comp:
        q.wq.init_lowrank(q.weight, lowrank.rank_for(q, o.lowrank), gen_cpu, branch=branch)
    params_v = [q.wq.alpha for q in weighted]
    params_l = [p for q in comp for p in (q.wq.lr_a, q.wq.lr_b)]
    params_s = [x.scale for x in act_qs]
    # scale-free objective: the loss relative to round-to-nearest's, the regulariser per weight
    ref = before if np.isfinite(before) and before > 0 else 1.0
    n_round = sum(q.wq.alpha.numel() for q in weighted) or 1
    lr_v = round_lr(iters) if o.lr_round is None else o.lr_round
    opt_v = _adam(params_v, lr_v) if params_v else None
    opt_l = _adam(params_l, o.lr_lowrank) if params_l else None
    late = set() if branch else set(comp)  # merged: their AdaRound runs after the low-rank phase
    fix_at = int(o.lowrank_share * iters)
    opt_s = _adam(params_s, o.lr_scale) if params_s else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=max(iters, 1), eta_min=0) if opt_s else None
    it = bar(range(iters), unit.name, iters)
    no_grad = False
    nonfinite = 0
    # fused fake-quant kernels while learning (quant._Fused); freed tensors kept for the next step
    with compiled(o.compile), learning_heap(o.keep_heap):
        for t in it:
            arr = cache.batch(draw(), device)
            xs = []
            for j in range(k):
                x_fp, x_q = arr[j], arr[k + 1 + j]
                if x_q.is_floating_point() and o.drop_prob > 0:
                    x_q = torch.where(_drop_mask(x_q, o.drop_prob, gen), x_q, x_fp)
                xs.append(x_q)
            rec = recon_loss(sub(*xs), arr[k])
            if not rec.requires_grad:  # e.g. everything it learns feeds an op that runs in onnxruntime
                no_grad = True
                break
            if late and t == fix_at:  # the curriculum's second half: B·A fixed, AdaRound rounds w/s + B·A
                for q in late:
                    q.wq.fix_lowrank(q.weight)
                opt_l, params_l = None, []
            b = _beta(t, iters, o)
            # merged low-rank layers start AdaRound at fix_at: their warm-up and beta schedule start there
            b_late = _beta(t - fix_at, iters - fix_at, o) if late and t >= fix_at else None
            reg = 0.0
            for q in weighted:
                bq = b_late if q in late else b
                if bq is not None:
                    reg = reg + q.wq.round_reg(bq)
            loss = rec / ref + (o.round_weight / n_round) * reg
            for opt in (opt_v, opt_l, opt_s):
                if opt:
                    opt.zero_grad()
            if not torch.isfinite(loss):  # skip the step: nothing is learned from a diverged batch
                nonfinite += 1
                continue
            loss.backward()
            if _zero_nonfinite(params_v + params_l + params_s):
                nonfinite += 1
            for opt in (opt_v, opt_l):
                if opt:
                    opt.step()
            if opt_s:
                opt_s.step()
                sched.step()
                for p in params_s:
                    p.data.clamp_(min=1e-8)
            if t % 10 == 0 and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{float(rec.detach()):.4g}")
    for q in late:
        if q.wq.lr_a is not None:  # fewer iterations than the curriculum's first half
            q.wq.fix_lowrank(q.weight)
    soft = evaluate() if weighted and not no_grad else None
    for q in weighted:
        q.wq.harden()
    after = learned = evaluate()
    kept_rtn = no_grad or not after <= before  # a NaN loss (learning diverged) counts as worse
    if kept_rtn:  # never leave a unit worse than round-to-nearest on the data it was judged on
        for q in weighted:
            q.wq.round_to_nearest()
        for x, s0 in zip(act_qs, rtn_scales):
            x.scale.data.copy_(s0)
        after = evaluate()
    cache.close()
    return UnitResult(unit.name, 0 if no_grad else iters, before, after, time.time() - t0, kept_rtn=kept_rtn,
                      no_gradient=no_grad, nonfinite_steps=nonfinite, cache_mb=round(cache.bytes / 2**20, 1),
                      cache_on_disk=cache.on_disk, peak_rss_mb=peak_rss_mb(),
                      lowrank_layers=sum(q.wq.rank > 0 for q in comp), loss_learned=learned,
                      loss_soft=soft)


ROUND_TRAVEL = 20.0  # Adam's lr x iterations on V in the references (1e-3 x 20000)


def round_lr(iters: int) -> float:
    """AdaRound's step on V for a unit of `iters` iterations: V must travel some 2.4 from 0 for
    h(V) to reach 0 or 1, and the references give it 20 (lr 1e-3 over 20,000 iterations). At our
    budgets (500-800 per unit) the fixed 3e-3 gave 1.5-2.4: V stayed fractional and hard rounding
    undid what soft rounding learned (docs/METHOD.md, "Step 4")"""
    return min(0.05, max(3e-3, ROUND_TRAVEL / max(iters, 1)))


def _adam(params: list, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass over each parameter and its two moments) where the
    device has one: MiniLM's 10.6 M AdaRound variables took 27 -> 17 ms per step."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def _drop_mask(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """QDrop's element-wise choice, True with probability p (in steps of 1/256), laid out like x
    when x is dense (the elementwise mix then keeps x's layout): one random byte per element, seven
    from each 64-bit draw (torch fills int64 with 63 random bits), some 3x cheaper than a float
    uniform per element on CPU."""
    n, level = x.numel(), round(p * 256)
    if level >= 256:
        return torch.ones_like(x, dtype=torch.bool)
    words = torch.empty(-(-n // 7), dtype=torch.int64, device=x.device).random_(generator=gen)
    keep = (words.view(torch.uint8).reshape(-1, 8)[:, :7] < level).reshape(-1)[:n]
    if x.is_contiguous() or not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return keep.reshape(x.shape)
    return keep.as_strided(x.shape, x.stride())


def _zero_nonfinite(params) -> bool:
    """Set NaN/inf gradient entries to zero; True when there were any. A float op the unit keeps can
    have an infinite derivative where quantization makes its input exactly zero (sqrt(x) or x**0.5 of a
    quantized magnitude: 0 x inf = NaN in backward) while the forward pass stays finite; one such entry
    made Adam's state NaN and every later step NaN (basic-pitch's note model: NaN gradients at step 0).
    Zero is a subgradient there, and the entries that are finite still learn."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one sync per step
        return False
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return True


def split_iters(units: list[Unit], o: ReconOptions) -> list[int]:
    """Iterations per unit. --iters: the same for every unit. --iters-total T: T / L for every unit
    that learns weights (L: the layers that have weights), so every layer runs T / L forward and
    backward passes in every mode and layer, block and pack modes spend the same multiply-accumulates
    (counting T per unit instead gave pack mode 2-3x block mode's time, as a pack iteration runs all
    its blocks). Splitting T by weight count, as before, starved the layers with few weights and most
    compute: EfficientNet-Lite0's first blocks got 1-7 of T = 10000 (docs/METHOD.md, "Step 4")."""
    if o.iters_total is None:
        return [o.iters] * len(units)
    return [max(1, int(round(u.layer_iters))) for u in units]


def unit_costs(units: list[Unit], qls, gm, args, iters_total: int | None) -> None:
    """Each unit's weight elements, MACs per sample (counted by hooks on one forward pass) and,
    under --iters-total, its iterations (split_iters)."""
    sizes = {q.layer.name: q.weight.numel() for q in qls}
    macs = layer_macs(gm, qls, args)
    learning = sum(1 for v in sizes.values() if v) or 1
    for u in units:
        u.size = sum(sizes[n] for n in u.layers)
        u.macs = int(sum(macs.get(n, 0) for n in u.layers))
        if iters_total is not None:
            u.layer_iters = iters_total / learning if u.size else 0.0


@torch.no_grad()
def layer_macs(gm, qls, args) -> dict[str, float]:
    """Multiply-accumulates per sample of each quantized layer: output elements x weights per
    output channel (Conv, Gemm, MatMul; an upper bound for strided ConvTranspose), output elements
    x the shared axis for a MatMul of two activations, output elements for a join."""
    out = {}
    n = max(batch_size(args), 1)

    def hook(q):
        def fn(_m, inputs, y):
            y0 = y[0] if isinstance(y, (tuple, list)) else y
            if q.layer.has_weight:
                per = q.weight.numel() / max(q.weight.shape[q.layer.axis], 1)
            elif q.layer.act_input2 is not None and q.layer.op == "MatMul":
                per = inputs[0].shape[-1]
            else:
                per = 1
            out[q.layer.name] = out.get(q.layer.name, 0) + y0.numel() * per / n
        return fn
    with state.capture(post=[(q, hook(q)) for q in qls]):
        gm(*args)
    return out


def unit_seed(seed: int, i: int) -> int:
    return (seed * 1000003 + i * 7919) % (2 ** 31)


def run(gm, model, qls, units: list[Unit], calib_batches, n: int, o: ReconOptions, seed: int, device: str,
        ckpt: str, resume: bool, log=print) -> list[UnitResult]:
    """Reconstruct every unit in order; checkpoint after each; resume skips finished units."""
    first = next(iter(calib_batches()))
    unit_costs(units, qls, gm, first, o.iters_total)
    iters = split_iters(units, o)
    fingerprint = json.dumps({"units": [u.name for u in units], "iters": iters, "seed": seed,
                              "lowrank": [o.lowrank, o.lowrank_form],
                              "layers": [q.layer.name for q in qls],
                              "bits": [(q.wq.bits if q.wq else None, q.aq.bits if q.aq else None) for q in qls],
                              "bias_correction": [q.in_mean is not None for q in qls]})
    done: list[UnitResult] = []
    if resume and os.path.exists(ckpt):
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            from .errors import UsageError
            raise UsageError(f"checkpoint {ckpt} was made with other options or another model; "
                             "delete it or rerun with the same options")
        state.load_learned(qls, saved["state"])
        done = [UnitResult(**r) for r in saved["done"]]
        log(f"resuming after {len(done)} of {len(units)} finished units")
    calib_bs = batch_size(first)
    # an iteration draws min(batch_size, n) samples: with fewer samples than the batch the estimate
    # scaled by batch_size charged 32 / 7 = 4.6x the work on 7 calibration images at the default batch
    drawn = min(o.batch_size, n)
    est = unit_seconds(node_seconds(gm, first), units, iters, calib_bs, drawn, -(-n // calib_bs))
    todo = est[len(done):]
    log(f"estimated time: ~{fmt_seconds(sum(todo))} for {len(todo)} units (from one timed forward pass)")
    spent, start = 0.0, len(done)
    noted = False
    for i, u in enumerate(units):
        if i < len(done):
            continue
        r = reconstruct_unit(gm, model, qls, u, calib_batches, n, iters[i], o, unit_seed(seed, i), device,
                             os.path.dirname(os.path.abspath(ckpt)))
        r.gmacs = r.iters * drawn * u.macs / 1e9
        done.append(r)
        kept = f"  (kept round-to-nearest: learning reached {r.loss_learned:.4g})" if r.kept_rtn else ""
        if r.no_gradient:
            kept = "  (skipped: no gradient reaches its output; kept round-to-nearest)"
        if r.nonfinite_steps:
            kept += f"  ({r.nonfinite_steps} steps with NaN/inf gradients: those entries set to 0)"
        if r.lowrank_layers:
            kept += f"  low-rank {r.lowrank_layers} layers"
        spent += r.seconds
        left = remaining(todo, i + 1 - start, spent)
        eta = f"  ~{fmt_seconds(left)} left" if i + 1 < len(units) else ""
        log(f"  {u.name:<28} {len(u.layers):>3} layers {r.iters:>6} it {r.gmacs:>8.3g} GMAC  "
            f"loss {r.loss_before:.4g} -> {r.loss_after:.4g}  {r.seconds:.1f} s  cache {r.cache_mb:.0f} MB"
            f"{' on disk' if r.cache_on_disk else ''}{kept}{eta}")
        if o.compile and compile_failure() and not noted:
            noted = True
            log(f"note: compiled fake-quant kernels off ({compile_failure()}); eager kernels give the same values, "
                "slower (--no-compile skips trying)")
        tmp = ckpt + ".tmp"
        torch.save({"fingerprint": fingerprint, "done": [asdict(x) for x in done],
                    "state": state.learned(qls)}, tmp)
        os.replace(tmp, ckpt)
    return done
