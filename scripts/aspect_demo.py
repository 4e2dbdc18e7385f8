"""SDXL-style training on the shapes world, judged on non-square canvases (issue 21).

For each model file: the shapes judge's accuracy on the held-out prompts that name no size word
(the judge reads sizes in units of the canvas width, which v1 of the contract defines for square
canvases only) at several canvases, and the share of images with an object cut by the canvas
edge (a detection whose box touches the border). A micro-conditioned model is also sampled with
a crop conditioning (top, left) = (h/4, w/4) (`--crop`): SDXL's paper (fig. 5) shows such models draw
cropped-looking objects when asked for a crop and centred ones at (0, 0).

    python scripts/aspect_demo.py runs/buckets_micro/model.safetensors runs/center_crop/model.safetensors \
        --out runs/aspect_demo.json --grid docs/images/aspect_demo.png

`--paired A B --reports R.json [R2.json]` compares two conditions image by image instead (`paired`):

    python scripts/aspect_demo.py --reports R.json --paired "zoom/.* crop 0,0" "zoom/.* crop [1-9]"

--grid writes one row per model, canvas and crop: the images of one prompt of each caption family, at
their own aspect ratio (2x, nearest), so that cut and centred objects can be seen, not just counted.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from t2i.data.shapes.heldout import heldout_prompts
from t2i.eval.paired import mcnemar_p
from t2i.eval.shapes_judge import detect, evaluate
from t2i.systems.shapes_ldm import ShapesLDM

CANVASES = [(64, 64), (80, 48), (48, 80), (96, 40), (40, 96)]  # (width, height)


def cut_sides(images) -> list[tuple[bool, bool]]:
    """Per image: (an object cut at the top or left edge, one cut at the bottom or right edge), from the
    judge's detections (64-unit boxes)."""
    def sides(image) -> tuple[bool, bool]:
        boxes = [d.box for d in detect(image)]
        return any(min(b[:2]) < 0.5 for b in boxes), any(max(b[2:]) > 63.5 for b in boxes)
    return [sides(im) for im in images]


def cut_shares(images) -> dict[str, float | str]:
    """Shares of images with a detected object whose box reaches the canvas edge: any edge ("cut"), the top
    or left edge ("cut_top_left"), the bottom or right edge ("cut_bottom_right"); and each image's
    top/left flag as a string of 0s and 1s ("top_left_flags", for `paired`).

    The sides tell the crop conditioning apart: a crop at (top, left) = (0, 0) keeps an image's top and
    left edges, so a model that reads its crop ids should cut objects at the top or left only when asked
    for a crop there, while a model trained on the same random crops without the ids cuts them anyway."""
    found = cut_sides(images)
    n = max(len(images), 1)
    return {"cut": sum(a or b for a, b in found) / n, "cut_top_left": sum(a for a, _ in found) / n,
            "cut_bottom_right": sum(b for _, b in found) / n,
            "top_left_flags": "".join("1" if a else "0" for a, _ in found)}


def paired(reports: list[str], key_a: str, key_b: str) -> None:
    """Per canvas and pooled over the canvases: images with an object cut at the top/left edge under
    condition A only and under B only (same prompts and seeds, so image i of A pairs with image i of B),
    with the McNemar p of the two counts. key_a / key_b: regular expressions that each pick one row per
    canvas of the reports, e.g. "asp_zoom_nomc/.* crop 0,0" and "asp_zoom/.* crop 0,0"."""
    rows = {k: v for r in reports for k, v in json.load(open(r)).items() if "top_left_flags" in v}
    total_b = total_c = compared = 0
    for w, h in CANVASES:
        a = [v for k, v in rows.items() if re.search(key_a, k) and f" {w}x{h} " in k]
        b = [v for k, v in rows.items() if re.search(key_b, k) and f" {w}x{h} " in k]
        if len(a) > 1 or len(b) > 1:
            raise SystemExit(f"{w}x{h}: {len(a)} rows match {key_a!r} and {len(b)} match {key_b!r}; each must pick one")
        if not a or not b:
            continue
        compared += 1
        fa, fb = a[0]["top_left_flags"], b[0]["top_left_flags"]
        only_a = sum(x == "1" and y == "0" for x, y in zip(fa, fb, strict=True))
        only_b = sum(x == "0" and y == "1" for x, y in zip(fa, fb, strict=True))
        total_b, total_c = total_b + only_a, total_c + only_b
        print(f"{w}x{h}: top/left cut by A only {only_a}, by B only {only_b} of {len(fa)}; "
              f"McNemar p = {mcnemar_p(only_a, only_b):.2g}")
    if not compared:
        raise SystemExit(f"no canvas has a row matching {key_a!r} and one matching {key_b!r} (rows with flags: "
                         f"{len(rows)})")
    print(f"pooled: A only {total_b}, B only {total_c}; McNemar p = {mcnemar_p(total_b, total_c):.2g}")


def sharpness(images) -> float:
    """Mean over images of the variance of the grey image's discrete Laplacian (grey in [0, 1]): what an
    upscaled small original lacks. SDXL's size conditioning (fig. 3) draws blurrier images when told the
    original was small."""
    grey = torch.stack([torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32)) for im in images])
    grey = grey / 255.0  # (N, H, W)
    lap = (grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] - 4 * grey[:, 1:-1, 1:-1])
    return lap.flatten(1).var(dim=1).mean().item()


def sample(model: ShapesLDM, prompts: list[str], width: int, height: int, crop: tuple[int, int], steps: int,
           original: tuple[int, int] | None = None):
    """Images of `prompts` (seed 0 each) at width x height; a micro-conditioned U-Net gets
    (original h, w, top, left, h, w) as its time ids (original: the canvas itself unless given)."""
    pipe = model.pipeline()
    hook = None
    if model.unet.add_embedding is not None:
        oh, ow = original or (height, width)
        ids = torch.tensor([[oh, ow, *crop, height, width]], dtype=torch.float32)

        def with_ids(module, args, kwargs):
            return args, {**kwargs, "time_ids": ids.expand(args[0].shape[0], 6)}
        hook = model.unet.register_forward_pre_hook(with_ids, with_kwargs=True)
    try:
        return [pipe(p, seed=0, steps=steps, width=width, height=height)[0] for p in prompts]
    finally:
        if hook is not None:
            hook.remove()


def save_rows(rows: list[tuple[str, list[Image.Image]]], path: str, scale: int = 2, label_w: int = 190) -> None:
    """One row per (label, images): the label on the left, the images at `scale`x (nearest) beside it,
    each at its own size (a 96x40 canvas stays wide)."""
    pad, font = 4, ImageFont.load_default()
    row_h = max(im.height for _, ims in rows for im in ims) * scale
    width = label_w + max(sum(im.width * scale + pad for im in ims) for _, ims in rows) + pad
    grid = Image.new("RGB", (width, len(rows) * (row_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y, x = pad + r * (row_h + pad), label_w
        draw.multiline_text((pad, y + 2), label.replace(" | ", "\n"), fill=(0, 0, 0), font=font, spacing=2)
        for im in images:
            grid.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST), (x, y))
            x += im.width * scale + pad
    grid.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--paired", nargs=2, metavar=("A", "B"), help="instead of sampling: compare two conditions "
                    "of the --reports (regular expressions over their keys) image by image (`paired`)")
    ap.add_argument("--reports", nargs="+", default=[], help="the JSON files --out wrote, for --paired")
    ap.add_argument("--out", help="the JSON report (required unless --paired)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=0, help="at most N prompts (0: all)")
    ap.add_argument("--grid", help="a PNG of one prompt per caption family for every model, canvas and crop")
    ap.add_argument("--crop", default="0.25,0.25", help="the crop asked of a micro-conditioned model: top,left as "
                    "fractions of the canvas height,width (a centre-cropped wide original: 0,0.25)")
    ap.add_argument("--canvases", help="only these canvases, e.g. 64x64,48x80 (default: all five)")
    ap.add_argument("--original-scales", help="size conditioning instead: at each canvas (crop 0, 0), the original "
                    "size told to a micro-conditioned model as these multiples of the canvas, e.g. 0.5,1,1.25; "
                    "reports the images' sharpness (`sharpness`) beside the judge")
    args = ap.parse_args()
    if args.paired:
        return paired(args.reports, *args.paired)
    if not args.models or not args.out:
        ap.error("give the model files and --out (or --paired A B --reports R.json)")
    canvases = [tuple(int(v) for v in c.split("x")) for c in args.canvases.split(",")] if args.canvases else CANVASES
    chosen = [(f, p) for f, p in heldout_prompts() if not re.search(r"\b(small|medium|large)\b", p)]
    chosen = chosen[: args.limit or None]
    prompts = [p for _, p in chosen]
    first: dict[str, int] = {}  # caption family -> index of its first prompt (the grid shows these)
    for i, (family, _) in enumerate(chosen):
        first.setdefault(family, i)
    shown = list(first.values())
    report, rows = {}, []
    top, left = (float(v) for v in args.crop.split(","))
    for path in args.models:
        model = ShapesLDM.load(path)
        if args.original_scales:
            for w, h in canvases:
                for scale in (float(v) for v in args.original_scales.split(",")):
                    original = (round(h * scale), round(w * scale))
                    images = sample(model, prompts, w, h, (0, 0), args.steps, original)
                    key = f"{path} {w}x{h} original {original[0]}x{original[1]}"
                    report[key] = {"judge": evaluate(images, prompts)["overall"], "sharpness": sharpness(images)}
                    print(key, report[key], flush=True)
                    rows.append((f"{path} | {w}x{h}, original {original[1]}x{original[0]} | judge "
                                 f"{report[key]['judge']:.2f}, sharpness {report[key]['sharpness']:.4f}",
                                 [images[i] for i in shown]))
            continue
        crops = [(0, 0)] + ([None] if model.unet.add_embedding is not None else [])
        for w, h in canvases:
            for crop in crops:
                crop = crop or (int(h * top), int(w * left))
                images = sample(model, prompts, w, h, crop, args.steps)
                key = f"{path} {w}x{h} crop {crop[0]},{crop[1]}"
                report[key] = {"judge": evaluate(images, prompts)["overall"], **cut_shares(images)}
                print(key, report[key], flush=True)
                rows.append((f"{path} | {w}x{h}, crop ({crop[0]}, {crop[1]}) | judge {report[key]['judge']:.2f}, "
                             f"cut {report[key]['cut']:.2f}", [images[i] for i in shown]))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.grid:
        save_rows(rows, args.grid)


if __name__ == "__main__":
    main()
