"""`t2i eval`: shapes (the shapes judge on held-out prompts), fid (FID/IS/KID/precision-recall
with the FID Inception), clip-score (a CLIP the user has), shapes-fid (Frechet distance in
the shipped shapes CLIP's feature space), suite (DrawBench / PartiPrompts
files: grids per category, metrics, sweeps, JSON + HTML report)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a model")
    kinds = p.add_subparsers(dest="kind", required=True)
    s = kinds.add_parser("shapes", help="the shapes judge: accuracy per caption family, JSON + image grid")
    s.add_argument("--model", default=None, help="model (default: the built-in shapes model)")
    s.add_argument("--prompts", default=None, help="prompt file (family<TAB>prompt or one prompt a line); "
                                                   "default: the judge's held-out prompts")
    s.add_argument("--out", default="eval-shapes", help="folder for results.json and grid.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--sampler", default=None)
    s.add_argument("--limit", type=int, default=None, help="at most N prompts per family (a quick look)")
    s.add_argument("--deepcache", type=int, default=1, metavar="N", help="DeepCache interval (1: off)")
    s.add_argument("--preview-decoder", default=None, metavar="PATH",
                   help="decode with this preview decoder (`t2i train preview`) instead of the VAE")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8", "compact"],
                   help="as in `t2i generate` (default auto: chosen by CPU flags, t2i.auto_precision)")
    s.add_argument("--rerank", type=int, default=1, metavar="K",
                   help="also judge sample-and-rank: K candidates per prompt (seeds seed..seed+K-1), the shapes "
                        "CLIP keeps one; reports --rerank 1 (the first candidate), every power of two below K (the "
                        "best of the first m) and --rerank K, all on the same draws")
    s.add_argument("--layouts", default=None, choices=["truth"],
                   help="truth: draw each held-out prompt from its scene's true layout (boxes and phrases) instead "
                        "of the model's own plan; models that take layouts only, held-out prompts only")
    s.add_argument("--controlnet", default=None, metavar="FILE",
                   help="with --layouts truth: a ControlNet (`t2i train controlnet`) draws each held-out prompt from "
                        "its scene's box map (the true layout rendered as the control image) on --model")
    s.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    s.add_argument("--regions", default=None, choices=["truth"],
                   help="truth: paint-with-words (eDiff-I) with each held-out scene's true boxes, each tied to the "
                        "words that name its object in the prompt (colour and shape); models that take regions only, "
                        "held-out prompts only")
    s.add_argument("--region-weight", type=float, default=None, metavar="W",
                   help="w', the strength of the paint-with-words boost (default: the model's)")
    s.set_defaults(func=run_shapes)
    _register_fid(kinds)
    _register_clip_score(kinds)
    _register_suite(kinds)
    _register_shapes_fid(kinds)


def checked_request(pipe, prompt: str | list[str], **settings):
    """A GenerationRequest the model can honour, or UnsupportedOption naming the option and model
    (raised before any work: eval runs are long)."""
    from t2i.systems.base import GenerationRequest, check_request

    request = GenerationRequest(prompt, **settings)
    check_request(pipe, request)
    return request


def truth_regions(prompts: list[str]) -> dict[str, list]:
    """prompt -> paint-with-words regions from its held-out scene (`--regions truth`): each object the
    prompt names gets its true box, tied to the prompt's words for it ("small red circle", "purple triangles");
    the scene's other objects (a single-object caption of a busier scene) get none. ValueError naming
    a prompt that is not a held-out one."""
    import re

    from t2i.data import captions as lang
    from t2i.diffusion.paint_with_words import Region
    from t2i.eval.shapes_judge import truth_layouts

    out: dict[str, list] = {}
    for prompt, layout in truth_layouts(prompts).items():
        out[prompt] = []
        for obj in layout.objects:
            colour, shape = obj.phrase.split()[-2:]  # "a small red circle" -> red, circle
            sizes = "|".join(lang.SIZE_WORDS)  # with the prompt's size word when it has one ("small red circle")
            m = re.search(rf"\b(?:(?:{sizes}) )?{colour} {shape}(?:e?s)?\b", prompt)
            if m is not None:
                out[prompt].append(Region(obj.box, m.group(0)))
    return out


def run_shapes(args: argparse.Namespace) -> int:
    import t2i
    from t2i.cli import UserError
    from t2i.data.shapes.heldout import heldout_prompts
    from t2i.data.shapes.prompts import first_per_family, read_prompt_file
    from t2i.eval.shapes_judge import Refused, run_shapes_eval, truth_layouts
    from t2i.systems.base import UnsupportedPrompt

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if args.limit is not None:
        prompts = first_per_family(prompts or heldout_prompts(), args.limit)
    # prompt -> its scene's layout; refused (naming a prompt) before the model loads if it has no scene
    layouts = truth_layouts([p for _, p in prompts or heldout_prompts()]) if args.layouts == "truth" else None
    regions = truth_regions([p for _, p in prompts or heldout_prompts()]) if args.regions == "truth" else None
    if args.controlnet is not None and layouts is None:
        raise UserError("--controlnet needs --layouts truth (each held-out scene's box map is its control image)")
    if args.region_weight is not None and regions is None:
        raise UserError("--region-weight needs --regions")
    pipe = t2i.load(args.model, precision=args.precision)
    settings = dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler, deepcache=args.deepcache,
                    preview=bool(args.preview_decoder))
    controls = None
    if args.controlnet is not None:  # the truth layouts go in as box maps; the model needs no layout option
        controls, layouts = _control_settings(pipe, args, layouts), None
        checked_request(pipe, "", **settings, **next(iter(controls.values())))
    # a model without the "layout" option is refused here, by name, before any image
    checked_request(pipe, "", **settings, **({"layout": next(iter(layouts.values()))} if layouts else {}))
    if regions is not None:  # likewise a model without regions (paint-with-words)
        settings["region_weight"] = args.region_weight
        checked_request(pipe, "", **settings, regions=["0,0,1,1:x"])
    if args.preview_decoder:
        from t2i.autoencoders.preview import PreviewDecoder

        pipe.preview_decoder = PreviewDecoder.load(args.preview_decoder, vae=pipe.vae.cfg)

    def generate(texts: list[str]) -> list:
        if layouts is not None:  # a request holds one layout: one call per prompt
            return [im for t in texts
                    for im in pipe.run(checked_request(pipe, t, seed=args.seed, layout=layouts[t], **settings)).images]
        if controls is not None:  # likewise one call per prompt: each has its own box map
            return [im for t in texts for im in pipe.run(checked_request(pipe, t, seed=args.seed, **controls[t],
                                                                         **settings)).images]
        if regions is not None:  # likewise one call per prompt: each has its own regions
            return [im for t in texts
                    for im in pipe.run(checked_request(pipe, t, seed=args.seed, regions=regions[t] or None,
                                                       **settings)).images]
        # one batched call per chunk of prompts, every prompt with the same seed
        return pipe.run(checked_request(pipe, texts, seed=[args.seed] * len(texts), **settings)).images

    def generate_or_refuse(texts: list[str]) -> list:
        """generate(), with each prompt the model refuses (UnsupportedPrompt) judged a miss, not an error."""
        try:
            return generate(texts)
        except UnsupportedPrompt as e:
            if len(texts) == 1:
                return [Refused(str(e))]
        out: list = []  # one of the chunk was refused: which ones
        for t in texts:
            try:
                out += generate([t])
            except UnsupportedPrompt as e:
                out.append(Refused(str(e)))
        return out

    precision = t2i.resolve_precision(args.precision, args.model)  # what `auto` became, for the report
    if args.rerank > 1:
        if regions is not None or controls is not None:
            raise UserError(f"{'--regions' if regions is not None else '--controlnet'} with --rerank is not supported")
        return _run_shapes_rerank(pipe, prompts or heldout_prompts(), args, precision, layouts)
    report = run_shapes_eval(generate_or_refuse, prompts, args.out)
    summary = {k: report[k] for k in ("overall", "n", "accuracy", "refused", "unseen_phrasing") if k in report}
    summary.update(precision=precision, model=pipe.name, family=pipe.family, layouts=args.layouts or "model")
    if regions is not None:
        summary.update(regions=args.regions, region_weight=args.region_weight)
    if controls is not None:
        summary.update(controlnet=args.controlnet, control_scale=args.control_scale)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/results.json and {args.out}/grid.png", file=sys.stderr)
    return 0


def _control_settings(pipe, args: argparse.Namespace, layouts: dict) -> dict[str, dict]:
    """prompt -> the request fields drawing it with --controlnet: the ControlNet (in the precision the model
    computes in), its scene's box map at the model's size as the control image, --control-scale."""
    import torch

    from t2i.adapters.controlnet import box_map_image, load_controlnet

    controlnet = load_controlnet(args.controlnet, torch.bfloat16 if getattr(pipe, "precision", "fp32") == "bf16"
                                 else torch.float32)
    size = pipe.capabilities.native_size
    return {p: {"controlnet": controlnet, "control_image": box_map_image(layout, *size),
                "control_scale": args.control_scale} for p, layout in layouts.items()}


def _run_shapes_rerank(pipe, prompts: list[tuple[str, str]], args: argparse.Namespace, precision: str,
                       layouts: dict | None = None) -> int:
    """Judge accuracy of the first of K candidates against the shapes CLIP's pick, per family (and on
    the prompts with held-out phrasings)."""
    import torch

    from t2i.eval.rerank import judge_rerank_gain
    from t2i.eval.shapes_judge import accuracy_by_family, unseen_phrasing

    texts = [p for _, p in prompts]
    gain = judge_rerank_gain(pipe, texts, args.rerank, seed=args.seed, steps=args.steps,
                             guidance=args.guidance, sampler=args.sampler, deepcache=args.deepcache,
                             preview=bool(args.preview_decoder), progress=False,
                             layouts=[layouts[t] for t in texts] if layouts else None)
    families = [f for f, _ in prompts]
    summary: dict = {"n": gain["n"], "k": args.rerank, "precision": precision, "layouts": args.layouts or "model"}
    # The K candidates are the draws of seeds s .. s + K - 1, so their first m are exactly what
    # `--rerank m` draws: one run also reports every power of two below K (DALL-E's K = 1, 4, 16 curve).
    sizes = sorted({2 ** i for i in range(args.rerank.bit_length()) if 2 ** i < args.rerank} | {args.rerank})
    unseen = {}
    for m in sizes:
        # the best of the first m by the reranker's own rule (`rank`: argmax, the first of equal maxima)
        oks = [row["candidates_ok"][int(torch.tensor(row["cosines"][:m]).argmax())] for row in gain["per_prompt"]]
        key = f"rerank_{m}"
        overall, acc, _ = accuracy_by_family(families, oks)
        summary[key] = {"overall": overall, **acc}
        unseen[key] = unseen_phrasing([{"prompt": t, "family": f, "ok": ok}
                                       for t, f, ok in zip(texts, families, oks, strict=True)])
    summary["unseen_phrasing"] = unseen
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"family": f, **row} for f, row in zip(families, gain["per_prompt"], strict=True)]
    (out / "rerank.json").write_text(json.dumps({**summary, "per_prompt": rows}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/rerank.json", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- fid


def _register_fid(kinds: argparse._SubParsersAction) -> None:
    f = kinds.add_parser("fid", help="FID (and IS, KID, precision/recall) between two image folders or .npz stats")
    f.add_argument("paths", nargs="+", help="1 or 2 of: a folder of images, or pytorch-fid .npz statistics")
    f.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    f.add_argument("--resize", default="clean", choices=("clean", "tf1", "pytorch"),
                   help="resizing to 299: clean-fid's PIL bicubic (default), TF1 bilinear, or pytorch-fid's")
    f.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigvals"),
                   help="trace of the covariance square root: scipy sqrtm (pytorch-fid, default) or "
                        "eigenvalues (torch-fidelity; ~3x faster at 2048 dims, same value to ~1e-12)")
    f.add_argument("--save-stats", default=None, help="write the first path's mu/sigma to this .npz")
    f.add_argument("--isc", action="store_true", help="also the Inception Score of the first folder")
    f.add_argument("--kid", action="store_true", help="also KID (folders only)")
    f.add_argument("--prc", action="store_true", help="also precision/recall (folders only)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--json", default=None, help="write the numbers to this JSON file")
    f.set_defaults(func=run_fid)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def run_fid(args: argparse.Namespace) -> int:
    from t2i.eval import fid
    from t2i.eval.inception import extract_features, load_fid_inception

    if len(args.paths) > 2:
        raise SystemExit("t2i eval fid takes one or two paths")
    paths = [Path(p) for p in args.paths]
    needs_net = any(p.is_dir() for p in paths)
    model = load_fid_inception(args.inception) if needs_net else None
    feats, stats = [], []
    for p in paths:
        if p.suffix == ".npz":
            stats.append(fid.load_stats(p))
            feats.append(None)
        elif p.is_dir():
            files = _image_files(p)
            print(f"{p}: {len(files)} images", file=sys.stderr)
            pool, logits = extract_features(model, (_open_rgb(f) for f in files), args.batch_size, args.resize)
            feats.append((pool, logits))
            stats.append(fid.feature_statistics(pool))
        else:
            raise FileNotFoundError(f"{p}: neither a folder of images nor a .npz statistics file")
    out: dict = {"resize": args.resize}
    if args.save_stats:
        fid.save_stats(args.save_stats, *stats[0])
        print(f"wrote {args.save_stats}", file=sys.stderr)
    if len(stats) == 2:
        out["fid"] = fid.frechet_distance(*stats[0], *stats[1], method=args.fid_method)
    if args.isc:
        if feats[0] is None:
            raise SystemExit("--isc needs a folder of images as the first path")
        out["inception_score"], out["inception_score_std"] = fid.inception_score(
            feats[0][1], splits=min(10, len(feats[0][1])))
    if args.kid or args.prc:
        if len(feats) != 2 or None in feats:
            raise SystemExit("--kid/--prc need two folders of images")
        if args.kid:
            out["kid"], out["kid_std"] = fid.kernel_inception_distance(feats[0][0], feats[1][0])
        if args.prc:
            out["precision"], out["recall"] = fid.precision_recall(feats[0][0], feats[1][0])
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------- shapes-fid


def _register_shapes_fid(kinds: argparse._SubParsersAction) -> None:
    f = kinds.add_parser("shapes-fid", help="Frechet distance in the shapes CLIP's image-feature space")
    f.add_argument("paths", nargs="+", help="a folder of images (against rendered ground truth), or two folders")
    f.add_argument("--clip", default=None, help="shapes CLIP .safetensors (default: the shipped one)")
    f.add_argument("--ref-seed", type=int, default=1, help="shapes seed of the rendered ground truth")
    f.add_argument("--ref-count", type=int, default=None, help="ground-truth images (default: as many as given)")
    f.add_argument("--json", default=None, help="write the numbers to this JSON file")
    f.set_defaults(func=run_shapes_fid)


def run_shapes_fid(args: argparse.Namespace) -> int:
    from t2i.eval.shapes_clip import ShapesCLIP, ground_truth_images, shapes_fid

    if len(args.paths) > 2:
        raise SystemExit("t2i eval shapes-fid takes one or two folders")
    sets = [[_open_rgb(f) for f in _image_files(Path(p))] for p in args.paths]
    out: dict = {"paths": list(args.paths)}
    if len(sets) == 1:
        n = args.ref_count or len(sets[0])
        sets.append(ground_truth_images(n, args.ref_seed))
        out.update(reference="shapes ground truth", ref_seed=args.ref_seed, ref_count=n)
    out["shapes_fid"] = shapes_fid(sets[0], sets[1], ShapesCLIP.load(args.clip))
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------- clip-score


def _register_clip_score(kinds: argparse._SubParsersAction) -> None:
    c = kinds.add_parser("clip-score", help="CLIP score of a folder of images against their prompts")
    c.add_argument("images", help="folder of images; prompts from each PNG's `parameters` text unless --prompts")
    c.add_argument("--clip", required=True, help="CLIP checkpoint folder in the transformers layout")
    c.add_argument("--prompts", default=None, help="one prompt a line, matched to the images in name order")
    c.add_argument("--json", default=None, help="write per-image scores and the mean to this JSON file")
    c.set_defaults(func=run_clip_score)


def _png_prompt(path: Path) -> str:
    """The prompt of a t2i / A1111 PNG: the first line of its `parameters` text chunk."""
    from PIL import Image

    with Image.open(path) as im:
        params = im.info.get("parameters")
    if not params:
        raise ValueError(f"{path}: no `parameters` text chunk; give the prompts with --prompts FILE")
    return params.split("\n", 1)[0].strip()


def run_clip_score(args: argparse.Namespace) -> int:
    from t2i.eval.clip_score import clip_scores, load_clip

    files = _image_files(Path(args.images))
    if args.prompts:
        texts = [t for t in Path(args.prompts).read_text(encoding="utf-8").splitlines() if t.strip()]
        if len(texts) != len(files):
            raise SystemExit(f"{len(texts)} prompts for {len(files)} images")
    else:
        texts = [_png_prompt(f) for f in files]
    model = load_clip(args.clip)
    scores = []
    for i in range(0, len(files), 16):
        scores += clip_scores(model, [_open_rgb(f) for f in files[i : i + 16]], texts[i : i + 16]).tolist()
    out = {"clip_score": sum(scores) / len(scores), "n": len(scores),
           "images": [{"file": f.name, "prompt": t, "clip_score": s} for f, t, s in zip(files, texts, scores,
                                                                                         strict=True)]}
    print(json.dumps({k: out[k] for k in ("clip_score", "n")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------- suite


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _register_suite(kinds: argparse._SubParsersAction) -> None:
    s = kinds.add_parser("suite", help="a prompt suite (DrawBench CSV, PartiPrompts TSV, or one prompt a line): "
                                       "grids per category, scores, sweeps, report.json + report.html")
    s.add_argument("--prompts", default=None, help="the suite file (DrawBench CSV, PartiPrompts TSV, or text); "
                                                   "default: the shapes judge's held-out prompts by family")
    s.add_argument("--model", default=None, help="model (default: the built-in shapes model)")
    s.add_argument("--out", default="eval-suite", help="output folder")
    s.add_argument("--images-per-prompt", type=int, default=1)
    s.add_argument("--limit", type=int, default=None, help="at most N prompts per category")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--sampler", default=None)
    s.add_argument("--sweep-guidance", type=_floats, default=None, metavar="G1,G2,...",
                   help="also score at each guidance weight (a plot of each metric against it)")
    s.add_argument("--sweep-steps", type=_floats, default=None, metavar="N1,N2,...",
                   help="also score at each number of sampler steps")
    s.add_argument("--clip", default=None, help="CLIP for CLIP score: a transformers-layout folder or a shapes CLIP "
                   "file (default for shapes prompts: the shipped shapes CLIP)")
    s.add_argument("--inception", default=None, help="FID Inception weights, with --fid-ref")
    s.add_argument("--fid-ref", default=None, help="reference statistics .npz (pytorch-fid layout) for FID")
    s.set_defaults(func=run_suite_cli)


def run_suite_cli(args: argparse.Namespace) -> int:
    import t2i
    from t2i.eval.suites import clip_scorer, read_suite, run_suite, shapes_judge_scorer, shapes_suite

    prompts = read_suite(args.prompts) if args.prompts else shapes_suite()
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    from t2i.eval.rerank import load_embedder

    scorers: dict = {}
    if args.clip:
        scorers["clip_score"] = clip_scorer(load_embedder(args.clip))
    judge = shapes_judge_scorer([p.text for p in prompts])
    if judge is not None:
        scorers["shapes_judge"] = judge
        if not args.clip:  # shapes prompts: our shipped shapes CLIP scores them out of the box
            scorers["shapes_clip_score"] = clip_scorer(load_embedder(None))
    set_metrics: dict = {}
    if args.fid_ref or args.inception:
        if not (args.fid_ref and args.inception):
            raise SystemExit("FID needs both --inception and --fid-ref")
        set_metrics["fid"] = _fid_metric(args.inception, args.fid_ref)
    pipe = t2i.load(args.model)
    base = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    sweeps = {k: v for k, v in (("guidance", args.sweep_guidance), ("steps", args.sweep_steps)) if v}
    checked_request(pipe, "", **{**base, **{k: v[0] for k, v in sweeps.items()}})  # refuse before any work

    def generate(texts: list[str], overrides: dict) -> list[list]:
        kw = {**base, **overrides}
        if kw["steps"] is not None:
            kw["steps"] = int(kw["steps"])
        return [pipe.run(checked_request(pipe, t, seed=args.seed, num_images=args.images_per_prompt, **kw)).images
                for t in texts]

    suite_name = args.prompts or "shapes held-out prompts"
    settings = {**base, "seed": args.seed, "images_per_prompt": args.images_per_prompt, "prompts": suite_name}
    report = run_suite(generate, prompts, args.out, scorers, set_metrics, sweeps, args.limit,
                       title=f"t2i suite: {suite_name}", model=str(args.model or "default"), settings=settings)
    print(json.dumps(report["metrics"], indent=2))
    print(f"wrote {args.out}/report.json, {args.out}/report.html and {args.out}/grids/", file=sys.stderr)
    return 0


def _fid_metric(inception: str, ref: str):
    from t2i.eval import fid
    from t2i.eval.inception import extract_features, load_fid_inception

    model, (mu_ref, sigma_ref) = load_fid_inception(inception), fid.load_stats(ref)

    def metric(images: list) -> float:
        pool, _ = extract_features(model, images)
        return fid.frechet_distance(*fid.feature_statistics(pool), mu_ref, sigma_ref)

    return metric
