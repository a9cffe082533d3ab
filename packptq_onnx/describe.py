"""packptq inspect: what a model holds (inputs, outputs, quantizable layers, packptq annotations)
and, given calibration data, its blocks, their scores S_t and sensitivities Omega_t, and packs."""
from __future__ import annotations

import json

from .cli import _axes, _image_opts, _shapes, pack_cap, spread_of
from .errors import UsageError


def cmd_inspect(a) -> int:
    from .exporters.qdq import read_meta
    from .layers import find_layers, layer_count
    from .onnx_import import load

    a.max_pack_blocks = pack_cap(a.max_pack_blocks)
    imp = load(a.model, _shapes(a))
    layers = find_layers(imp.model)
    info = {"model": a.model, "opset": imp.opset, "nodes": len(imp.original.graph.node),
            "inputs": [{"name": i.name, "shape": i.shape, "dtype": str(i.dtype)} for i in imp.inputs],
            "outputs": imp.outputs, "quantizable_layers": [l.name for l in layers],
            "packptq": read_meta(imp.original)}
    if a.sensitivity and not a.calib:
        raise UsageError("--sensitivity measures on calibration data: give --calib")
    if a.sensitivity:
        from .options import check_bit_options
        check_bit_options(a.wbits_options, a.abits_options)  # before the long work
    if spread_of(a) is not None and not a.sensitivity:
        raise UsageError("--workers / --address spread the --sensitivity measurement: give --sensitivity")
    if a.calib:
        info.update(_packs(a, print if not a.json else (lambda *_: None)))
    if a.runtime:
        info["runtime"] = _runtime(a.model)
    if a.json:
        info.pop("_sensitivity", None)
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{a.model}: opset {info['opset']}, {info['nodes']} nodes, {layer_count(layers)}")
    for i in info["inputs"]:
        print(f"  input  {i['name']}: {i['shape']} {i['dtype']}")
    for o in info["outputs"]:
        print(f"  output {o}")
    meta = info["packptq"]
    if meta:
        print(_annotation_table(meta))
    if a.calib:
        print(_pack_table(info))
    if a.sensitivity:
        from .ranking import table
        print(table(info.pop("_sensitivity")))
    if a.runtime:
        from .ortview import table
        print(table(info["runtime"]))
    return 0


def _runtime(path: str) -> dict:
    from .ortview import summary

    try:
        return summary(path)
    except Exception as exc:  # onnxruntime refuses the file: say why in one line
        raise UsageError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}") from None


def _annotation_table(meta: dict) -> str:
    lines = [f"packptq {meta.get('version')} annotations: {len(meta.get('layers', []))} quantized layers"
             + (f", budget {meta['budget']:,.0f} bytes" if meta.get("budget") else "")]
    packs = meta.get("packs") or []
    if packs:
        lines.append(f"  {'pack':<5}{'blocks':<22}{'layers':>7}{'W bits':>8}{'A bits':>8}{'bytes':>10}"
                     f"{'Omega est':>11}{'Omega meas':>11}")
        for p in packs:
            blocks = ",".join(p["blocks"])
            est = p.get("omega_estimated", p.get("sensitivity"))  # annotations before report version 2
            meas = p.get("omega_measured")
            lines.append(f"  {p['id']:<5}{blocks[:21]:<22}{len(p['nodes']):>7}{'/'.join(map(str, p['wbits'])):>8}"
                         f"{'/'.join(map(str, p['abits'])) or '-':>8}{p['bytes']:>10,.0f}"
                         f"{'-' if est is None else f'{est:.4g}':>11}{'-' if meas is None else f'{meas:.4g}':>11}")
    in_pack = {n for p in packs for n in p["nodes"]}
    label = "stem/head" if packs else "layer"
    for l in meta.get("layers", []):
        if l["node"] not in in_pack:
            w = f"W{l['wbits']} " if l["wbits"] else ""  # joins and activation MatMuls have no weight
            lines.append(f"  {label:<27}{l['node'][:30]:<31} {w}A{l['abits'] or '-'}")
    return "\n".join(lines)


def _packs(a, log) -> dict:
    from .pipeline import Options, analyse, prepare

    opts = Options(wbits=a.wbits, abits=a.abits, seed=a.seed, device=a.device, batch_size=a.batch_size,
                   calib_samples=a.calib_samples, image=_image_opts(a), input_shapes=_shapes(a),
                   batch_axes=_axes(a))
    p = prepare(a.model, a.calib, opts, log)
    res = analyse(p, opts, a.max_pack_blocks)
    pack_of = {b: pk.id for pk in res.packs for b in pk.blocks}
    blocks = [{"name": b.name, "kind": b.kind, "layers": b.layers, "score": s.score,
               "sensitivity": s.sensitivity, "pack": pack_of[b.id]} for b, s in zip(res.units.blocks, res.scores)]
    out = {"stem": res.units.stem, "head": res.units.head, "blocks": blocks,
           "packs": [{"id": pk.id, "blocks": [res.units.blocks[i].name for i in pk.blocks], "omega": pk.omega}
                     for pk in res.packs],
           "scoring": {"wbits": a.wbits, "abits": a.abits, "samples": p.n_samples,
                       "seconds": round(res.seconds, 3)}}
    if a.sensitivity:
        rep = _sensitivity(a, p, opts, res)
        out["sensitivity"], out["_sensitivity"] = rep.to_dict(), rep
    if a.plot and a.sensitivity:
        from .exporters.plots import plot_sensitivity
        plot_sensitivity(a.plot, out["_sensitivity"])
    elif a.plot:
        from .exporters.plots import plot_packs
        plot_packs(a.plot, [b["name"] for b in blocks], [b["score"] for b in blocks],
                   [b["sensitivity"] for b in blocks], res.packs)
    return out


def _sensitivity(a, p, opts, res):
    import itertools
    import os

    from .progress import bar
    from .ranking import measure_report

    options = list(itertools.product(a.wbits_options, a.abits_options))
    pack_layers = [[n for b in pk.blocks for n in res.units.blocks[b].layers] for pk in res.packs]
    fp = f"{os.path.abspath(a.model)}:{os.path.getsize(a.model)}:{os.path.abspath(a.calib)}:{p.n_samples}:{a.seed}"
    return measure_report(p.gm, p.qls, pack_layers, options, lambda: p.batches(opts), p.n_samples,
                          a.sensitivity_cache, fp, progress=lambda it: bar(it, "sensitivity", len(it)),
                          spread=spread_of(a))


def _pack_table(info: dict) -> str:
    lines = [f"stem: {len(info['stem'])} layer(s); head: {len(info['head'])} layer(s); scored at "
             f"W{info['scoring']['wbits']}A{info['scoring']['abits']} on {info['scoring']['samples']} samples "
             f"in {info['scoring']['seconds']:.1f} s",
             f"{'block':<10}{'kind':<10}{'layers':>7}{'S':>12}{'Omega':>12}{'pack':>6}  first layer"]
    for b in info["blocks"]:
        lines.append(f"{b['name']:<10}{b['kind']:<10}{len(b['layers']):>7}{b['score']:>12.4g}"
                     f"{b['sensitivity']:>12.4g}{b['pack']:>6}  {b['layers'][0]}")
    lines.append("packs: " + "; ".join(f"{p['id']}: {'+'.join(p['blocks'])} (Omega {p['omega']:.3g})"
                                       for p in info["packs"]))
    return "\n".join(lines)
