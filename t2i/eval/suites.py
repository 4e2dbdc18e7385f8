"""Prompt suites (DrawBench, PartiPrompts) and the body of `t2i eval suite`.

The files are the user's, read as published:
- DrawBench (Saharia et al. 2022, Imagen): a CSV with header `Prompts,Category`, 200 prompts
  in 11 categories (the Google Sheet's CSV export; quoted fields with commas are fine).
- PartiPrompts (Yu et al. 2022, Parti): `PartiPrompts.tsv` with header
  `Prompt<TAB>Category<TAB>Challenge<TAB>Note`, 1600 prompts.
`read_suite` tells them apart by the header; a file with neither header is one prompt a line
(category "all"). Those papers judge suites by human raters; here each image gets automatic
scores (CLIP score with a CLIP the user has, the shapes judge when every prompt is a shapes
prompt, FID against reference statistics), per category and overall, plus grids to look at.
"""

from __future__ import annotations

import csv
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# images per prompt -> one score per image
Scorer = Callable[[Sequence[Image.Image], Sequence[str]], list[float]]
# all images of a run -> one number (e.g. FID against reference statistics)
SetMetric = Callable[[Sequence[Image.Image]], float]
# (prompts, settings overrides) -> images_per_prompt images for each prompt
Generate = Callable[[list[str], dict], list[list[Image.Image]]]


@dataclass
class SuitePrompt:
    """One prompt of a suite. challenge/note: PartiPrompts' extra columns ("" for DrawBench)."""

    text: str
    category: str
    challenge: str = ""
    note: str = ""


def _require(fields: Sequence[str], header: Sequence[str] | None, path: str | Path, what: str) -> None:
    missing = [c for c in fields if c not in (header or [])]
    if missing:
        raise ValueError(f"{path}: not a {what} file: header {list(header or [])} lacks {missing}")


def read_drawbench(path: str | Path) -> list[SuitePrompt]:
    """DrawBench CSV (`Prompts,Category`) -> prompts, in file order; blank rows skipped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        _require(("Prompts", "Category"), reader.fieldnames, path, "DrawBench CSV")
        rows = list(reader)
    return [SuitePrompt(r["Prompts"].strip(), (r["Category"] or "").strip() or "uncategorized")
            for r in rows if (r.get("Prompts") or "").strip()]


def read_partiprompts(path: str | Path) -> list[SuitePrompt]:
    """PartiPrompts TSV (`Prompt  Category  Challenge  Note`) -> prompts, in file order."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        # Prompts contain quotes ("a sign that says 'x'"); the TSV does not quote fields.
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        _require(("Prompt", "Category", "Challenge"), reader.fieldnames, path, "PartiPrompts TSV")
        rows = list(reader)
    return [SuitePrompt(r["Prompt"].strip(), (r["Category"] or "").strip() or "uncategorized",
                        (r.get("Challenge") or "").strip(), (r.get("Note") or "").strip())
            for r in rows if (r.get("Prompt") or "").strip()]


def read_suite(path: str | Path) -> list[SuitePrompt]:
    """DrawBench, PartiPrompts (told apart by the first line) or a plain one-prompt-a-line file."""
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().strip()
    if first.split("\t")[:2] == ["Prompt", "Category"]:
        return read_partiprompts(path)
    if first.replace('"', "").split(",")[:2] == ["Prompts", "Category"]:
        return read_drawbench(path)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [SuitePrompt(t.strip(), "all") for t in lines if t.strip() and not t.startswith("#")]


def shapes_suite() -> list[SuitePrompt]:
    """The shapes judge's held-out prompts as a suite, one category per caption family."""
    from t2i.data.shapes.heldout import heldout_prompts

    return [SuitePrompt(text, family) for family, text in heldout_prompts()]


def by_category(prompts: Sequence[SuitePrompt], limit: int | None = None) -> dict[str, list[SuitePrompt]]:
    """Prompts grouped by category in order of first appearance; at most `limit` per category."""
    groups: dict[str, list[SuitePrompt]] = {}
    for p in prompts:
        group = groups.setdefault(p.category, [])
        if limit is None or len(group) < limit:
            group.append(p)
    return groups


def slug(name: str) -> str:
    """A category name as a file name: 'Food & Beverage' -> 'food-beverage'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "category"


# ---------------------------------------------------------------------------- scorers


def clip_scorer(embedder) -> Scorer:
    """CLIP score per image with any `ImageTextEmbedder` (a released CLIP, a shapes CLIP)."""
    from t2i.eval.clip_score import clip_scores

    return lambda images, texts: clip_scores(embedder, images, texts).tolist()


def shapes_judge_scorer(prompts: Sequence[str]) -> Scorer | None:
    """1.0 / 0.0 per image from the shapes judge, or None if some prompt is not a shapes prompt."""
    from t2i.data.shapes.prompts import PromptError, parse_prompt
    from t2i.eval.shapes_judge import judge

    try:
        for p in prompts:
            parse_prompt(p)
    except PromptError:
        return None
    return lambda images, texts: [float(judge(im, t).ok) for im, t in zip(images, texts, strict=True)]


# ---------------------------------------------------------------------------- grids


def save_prompt_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], path: str | Path, cell: int = 128,
                     text_width: int = 200) -> None:
    """A PNG with one row per prompt: the wrapped prompt on the left, its images beside it."""
    font = ImageFont.load_default()
    cols = max(len(images) for _, images in rows)
    pad = 4
    grid = Image.new("RGB", (text_width + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(rows):
        y = pad + r * (cell + pad)
        lines = textwrap.wrap(prompt, max(12, text_width // 7))[: cell // 12]
        draw.multiline_text((pad, y), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        for c, image in enumerate(images):
            tile = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
            grid.paste(tile, (text_width + pad + c * (cell + pad), y))
    grid.save(path)


# ---------------------------------------------------------------------------- the run


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _score(images: list[list[Image.Image]], texts: list[str], scorers: dict[str, Scorer],
           set_metrics: dict[str, SetMetric]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-image scores (flattened, prompt-major) and the set metrics of one run."""
    flat = [im for ims in images for im in ims]
    flat_texts = [t for t, ims in zip(texts, images, strict=True) for _ in ims]
    per_image = {name: [float(s) for s in scorer(flat, flat_texts)] for name, scorer in scorers.items()}
    return per_image, {name: float(metric(flat)) for name, metric in set_metrics.items()}


def run_suite(generate: Generate, prompts: Sequence[SuitePrompt], out_dir: str | Path,
              scorers: dict[str, Scorer] | None = None, set_metrics: dict[str, SetMetric] | None = None,
              sweeps: dict[str, Sequence[float]] | None = None, limit_per_category: int | None = None,
              title: str = "t2i prompt suite", model: str = "", settings: dict | None = None) -> dict:
    """Generate every prompt, score, grid per category, sweep settings, write the report.

    generate(texts, overrides) returns a list of images per text; overrides is {} for the
    base run and e.g. {"guidance": 7.5} in a sweep. Writes out_dir/grids/<category>.png,
    out_dir/report.json and out_dir/report.html; returns the report dict.
    """
    from t2i.eval.report import write_report

    out_dir = Path(out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    scorers, set_metrics = scorers or {}, set_metrics or {}
    groups = by_category(prompts, limit_per_category)
    chosen = [p for group in groups.values() for p in group]
    texts = [p.text for p in chosen]
    images = generate(texts, {})
    per_image, set_values = _score(images, texts, scorers, set_metrics)

    categories, start = {}, 0
    for cat, group in groups.items():
        n_img = sum(len(ims) for ims in images[start : start + len(group)])
        offset = sum(len(ims) for ims in images[:start])
        grid = f"grids/{slug(cat)}.png"
        save_prompt_grid([(p.text, images[start + i]) for i, p in enumerate(group)], out_dir / grid)
        metrics = {m: _mean(v[offset : offset + n_img]) for m, v in per_image.items()}
        categories[cat] = {"n": len(group), "metrics": metrics, "grid": grid}
        start += len(group)

    report = {"title": title, "model": model, "settings": dict(settings or {}),
              "metrics": {**{m: _mean(v) for m, v in per_image.items()}, **set_values},
              "categories": categories, "sweeps": {}, "notes": []}
    for name, values in (sweeps or {}).items():
        series: dict[str, list[float]] = {}
        for value in values:
            per, sets = _score(generate(texts, {name: value}), texts, scorers, set_metrics)
            for m, v in {**{m: _mean(v) for m, v in per.items()}, **sets}.items():
                series.setdefault(m, []).append(v)
        report["sweeps"][name] = {"x": list(values), "metrics": series}
    if not scorers and not set_metrics:
        report["notes"].append("no metric applies: give --clip FOLDER for CLIP score (the shapes judge "
                               "needs shapes prompts; FID needs --inception and --fid-ref)")
    write_report(report, out_dir)
    return report
