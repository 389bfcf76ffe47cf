"""Rendering of `merge analyze` results: a rich terminal summary, JSON, and a self-contained HTML
page whose heatmaps (layer x pair cosine, layer x model norm, sign conflict by layer) are PNGs
drawn with matplotlib (Agg, imported lazily) and embedded as data: URIs, readable offline."""
from __future__ import annotations

import base64
import html
import io
import json
import math

GENERATOR = "mergekit-ortho merge analyze"


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def terminal(result: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    models = result["models"]
    o = result["overall"]
    console.print(Text(f"models: {', '.join(models)}   tensors analysed: {o['tensors']}   TIES density: "
                       f"{result['density']}   top singular directions: {result['top_rank']}"))
    t = Table("model", "task-vector norm", "top-energy share", title="per model", title_justify="left")
    for m in models:
        t.add_row(Text(m), _f(o["norm"].get(m), ".4g"), _f(o["top_energy"].get(m)))
    console.print(t)
    if o["cosine"]:
        t = Table("pair", "cosine", "top-k mask overlap", title="per pair", title_justify="left")
        for k, v in o["cosine"].items():
            t.add_row(Text(k.replace("|", " / ")), _f(v), _f(o["mask_overlap"].get(k)))
        console.print(t)
    console.print(Text(f"TIES sign conflict: {_f(o['sign_conflict'])} of kept entries; mass against the "
                       f"elected sign: {_f(o['dropped_mass'])}"))
    t = Table("layer", "mean cosine", "sign conflict", "norm (mean over models)", title="per layer",
              title_justify="left")
    for k, s in result["by_layer"].items():
        cs = [v for v in s["cosine"].values() if v is not None]
        ns = list(s["norm"].values())
        t.add_row(Text(k), _f(sum(cs) / len(cs) if cs else None), _f(s["sign_conflict"]),
                  _f(sum(ns) / len(ns) if ns else None, ".4g"))
    console.print(t)
    for label, f in result.get("loras", {}).items():
        console.print(Text(f"LoRA {label}: {f['modules']} modules, ranks {f['ranks']}, scales {f['scales']}, "
                           f"delta norm {_f(f['norm'], '.4g')}, top-1 energy share {_f(f['mean_top1_energy'])}"))
    for c in result["findings"]:
        console.print(Text(f"{c['level']}: {c['what']}: {c['detail']}"))
    console.print(Text("recommendations (measured on these inputs; evidence from our benchmarks):"))
    if not result["recommendations"]:
        console.print(Text("  no rule applies"))
    for r in result["recommendations"]:
        console.print(Text(f"  - {r['advice']} [{r['when']}, measured {r['measured']:.3g}; evidence: "
                           f"{r['evidence']}; strength: {r['strength']}]"))


def to_json(result: dict) -> str:
    return json.dumps(_clean_nan({"generator": GENERATOR, **result}), indent=2, allow_nan=False, default=_none)


def _none(v):
    return None


def _clean_nan(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_nan(v) for v in obj]
    return obj


def matrices(result: dict) -> dict:
    """The heatmaps' data: rows = layers, columns = pairs / models; None where undefined."""
    layers = list(result["by_layer"])
    pairs = list(result["overall"]["cosine"])
    models = result["models"]
    L = result["by_layer"]
    return {
        "layers": layers, "pairs": pairs, "models": models,
        "cosine": [[L[k]["cosine"].get(p) for p in pairs] for k in layers],
        "norm": [[L[k]["norm"].get(m) for m in models] for k in layers],
        "conflict": [[L[k]["sign_conflict"]] for k in layers],
    }


def _png(data, rows, cols, title, cmap, vmin=None, vmax=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float).reshape(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(max(3.0, 1.0 + 0.9 * len(cols)), max(2.5, 0.8 + 0.28 * len(rows))), dpi=90)
    im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(cols)), [c.replace("|", " / ") for c in cols], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_html(result: dict) -> str:
    m = matrices(result)
    figs = []
    if m["pairs"]:
        figs.append(("layer x pair cosine", _png(m["cosine"], m["layers"], m["pairs"], "cosine", "coolwarm", -1, 1)))
    figs.append(("layer x model norm", _png(m["norm"], m["layers"], m["models"], "task-vector norm", "viridis")))
    figs.append(("sign conflict by layer",
                 _png(m["conflict"], m["layers"], ["sign conflict"], "TIES sign conflict", "magma", 0, 1)))
    e = html.escape
    o = result["overall"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='generator' content='{GENERATOR}'>"
             "<title>merge analyze</title><style>body{font-family:sans-serif;margin:2em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
             "<h1>merge analyze</h1>",
             f"<p>models: {e(', '.join(result['models']))}; tensors analysed: {o['tensors']}; TIES density: "
             f"{e(str(result['density']))}; sign conflict {_f(o['sign_conflict'])}; mass against the elected "
             f"sign {_f(o['dropped_mass'])}</p>",
             "<h2>Per model</h2><table><tr><th>model</th><th>norm</th><th>top-energy share</th></tr>"]
    for mod in result["models"]:
        parts.append(f"<tr><td>{e(mod)}</td><td>{_f(o['norm'].get(mod), '.4g')}</td>"
                     f"<td>{_f(o['top_energy'].get(mod))}</td></tr>")
    parts.append("</table><h2>Per pair</h2><table><tr><th>pair</th><th>cosine</th><th>mask overlap</th></tr>")
    for k, v in o["cosine"].items():
        parts.append(f"<tr><td>{e(k.replace('|', ' / '))}</td><td>{_f(v)}</td>"
                     f"<td>{_f(o['mask_overlap'].get(k))}</td></tr>")
    parts.append("</table><h2>Figures</h2>")
    for title, b64 in figs:
        parts.append(f"<figure><img alt='{e(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{e(title)}</figcaption></figure>")
    parts.append("<h2>Findings</h2><ul>")
    parts += [f"<li><b>{e(c['level'])}</b> {e(c['what'])}: {e(c['detail'])}</li>" for c in result["findings"]]
    parts.append("</ul><h2>Recommendations</h2><ul>")
    parts += [f"<li>{e(r['advice'])} <i>({e(r['when'])}, measured {r['measured']:.3g}; evidence: {e(r['evidence'])}; "
              f"strength: {e(r['strength'])})</i></li>" for r in result["recommendations"]]
    if not result["recommendations"]:
        parts.append("<li>no rule applies</li>")
    parts.append("</ul></body></html>")
    return "\n".join(parts)
