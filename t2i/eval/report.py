"""Evaluation reports: one JSON file and an HTML page rendered from the same dict.

The report dict (what `t2i.eval.suites.run_suite` builds; every number is a float or int):

    {"title": str, "model": str, "settings": {name: value},
     "metrics": {metric: value},                               # all prompts, the base settings
     "categories": {name: {"n": int, "metrics": {metric: value}, "grid": "grids/x.png"}},
     "sweeps": {parameter: {"x": [values], "metrics": {metric: [one value per x]},
                            "plot": "plots/parameter.png" (added here)}},
     "notes": [str]}

Plots (matplotlib, imported only here and only when a report has sweeps): each metric
against each swept parameter (e.g. CLIP score against guidance weight or sampler steps),
and where a sweep has both FID and CLIP score, the FID / CLIP-score trade-off curve that
classifier-free guidance traces (GLIDE, Imagen, seed 000 section 6.2).

Every number in the HTML carries `data-key` (its JSON path, itself JSON) so a test can
check the page against the JSON.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

MATPLOTLIB_HINT = "plots need matplotlib, which is not installed: pip install matplotlib"


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or ImportError with the install hint."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MATPLOTLIB_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_number(value: float | int) -> str:
    """How numbers appear on the page: ints as is, floats to 6 significant digits."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.6g}"


def _num(path: list, value: float | int) -> str:
    key = html.escape(json.dumps(path), quote=True)
    return f'<td class="num" data-key="{key}">{format_number(value)}</td>'


# ---------------------------------------------------------------------------- plots


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """Draw one PNG per sweep into out_dir/plots, record its path in the sweep. Returns the paths."""
    sweeps = {name: sw for name, sw in (report.get("sweeps") or {}).items() if sw["metrics"]}
    if not sweeps:  # nothing measured: nothing to draw
        return []
    plt = require_matplotlib()
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    for name, sweep in sweeps.items():
        metrics = sweep["metrics"]
        tradeoff = "fid" in metrics and "clip_score" in metrics
        n = len(metrics) + tradeoff
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
        for ax, (metric, ys) in zip(axes[0], metrics.items(), strict=False):
            ax.plot(sweep["x"], ys, marker="o")
            ax.set_xlabel(name)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        if tradeoff:  # FID against CLIP score, each point labelled with its parameter value
            ax = axes[0][-1]
            ax.plot(metrics["clip_score"], metrics["fid"], marker="o")
            for x, cs, f in zip(sweep["x"], metrics["clip_score"], metrics["fid"], strict=True):
                ax.annotate(format_number(x), (cs, f), fontsize=8)
            ax.set_xlabel("clip_score")
            ax.set_ylabel("fid")
            ax.set_title(f"trade-off over {name}")
        fig.suptitle(f"{report.get('title', '')}: {name}")
        fig.tight_layout()
        rel = f"plots/{name}.png"
        fig.savefig(out_dir / rel, dpi=80)
        plt.close(fig)
        sweep["plot"] = rel
        written.append(rel)
    return written


# ---------------------------------------------------------------------------- html


def _metric_table(path: list, metrics: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(m)}</th>{_num([*path, m], v)}</tr>" for m, v in metrics.items())
    return f"<table>{rows}</table>"


def render_html(report: dict) -> str:
    """The page: settings, overall metrics, per-category table and grids, sweeps with plots."""
    title = html.escape(str(report.get("title", "t2i evaluation")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px}td.num{text-align:right}"
             "img{max-width:100%;border:1px solid #ddd}</style></head><body>",
             f"<h1>{title}</h1><p>model: <code>{html.escape(str(report.get('model', '')))}</code></p>"]
    if report.get("settings"):
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                       for k, v in report["settings"].items())
        parts.append(f"<h2>Settings</h2><table>{rows}</table>")
    for note in report.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Metrics</h2>" + _metric_table(["metrics"], report.get("metrics", {})))
    categories = report.get("categories") or {}
    if categories:
        names = sorted({m for c in categories.values() for m in c["metrics"]})
        head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
        rows = []
        for cat, c in categories.items():
            cells = "".join(_num(["categories", cat, "metrics", m], c["metrics"][m]) if m in c["metrics"]
                            else "<td></td>" for m in names)
            rows.append(f"<tr><th>{html.escape(cat)}</th>{_num(['categories', cat, 'n'], c['n'])}{cells}</tr>")
        parts.append(f"<h2>Categories</h2><table><tr><th>category</th><th>n</th>{head}</tr>{''.join(rows)}</table>")
    for name, sweep in (report.get("sweeps") or {}).items():
        parts.append(f"<h2>Sweep: {html.escape(name)}</h2>")
        head = "".join(f"<th>{html.escape(m)}</th>" for m in sweep["metrics"])
        rows = []
        for i, x in enumerate(sweep["x"]):
            cells = "".join(_num(["sweeps", name, "metrics", m, i], ys[i]) for m, ys in sweep["metrics"].items())
            rows.append(f"<tr>{_num(['sweeps', name, 'x', i], x)}{cells}</tr>")
        parts.append(f"<table><tr><th>{html.escape(name)}</th>{head}</tr>{''.join(rows)}</table>")
        if sweep.get("plot"):
            parts.append(f"<img src='{html.escape(sweep['plot'])}' alt='{html.escape(name)} plot'>")
    for cat, c in categories.items():
        if c.get("grid"):
            parts.append(f"<h3>{html.escape(cat)}</h3><img src='{html.escape(c['grid'])}' alt='{html.escape(cat)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Draw the plots, then write out_dir/report.json and out_dir/report.html from one dict.

    Without matplotlib the report is still written, with the install hint in its notes.
    Returns (json path, html path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_plots(report, out_dir)
    except ImportError as e:
        report.setdefault("notes", []).append(str(e))
        print(f"warning: {e}", file=sys.stderr)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path
