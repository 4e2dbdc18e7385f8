"""`t2i unclip variations|interpolate|text-diff`: what unCLIP is for (Ramesh et al. 2022 sec. 3), from the command
line, on any unCLIP model (`t2i.systems.unclip`: a t2i file on the shapes CLIP, or a Karlo folder with an image
tower). Each writes OUT/NAME_000.png, ... with A1111 parameters naming the operation.

    t2i unclip variations IMAGE --model M --num 4 --seed 1 --out DIR
    t2i unclip interpolate IMAGE_A IMAGE_B --model M --num 5 --out DIR
    t2i unclip text-diff IMAGE --caption "a red circle" --target "a blue circle" --model M --out DIR
    t2i unclip judge-variations --model M --n 50 --out DIR   (t2i.eval.unclip_variations: do variations keep the scene?)
    t2i unclip prior-retrieval --model M --n 100 [--guidance G]   (does the prior's sample find its caption's scene?)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from t2i.imageio import save_png


def _load(args: argparse.Namespace):  # -> UnCLIPPipeline
    import t2i

    pipe = t2i.load(args.model, args.precision)
    if pipe.family != "unclip":
        raise ValueError(f"{args.model} is a {pipe.family} model; `t2i unclip` needs an unCLIP model")
    return pipe


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}


def _image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _judge(args: argparse.Namespace) -> int:
    from t2i.eval.unclip_variations import variation_agreement

    result = variation_agreement(_load(args), args.n, args.num, args.seed, args.steps, args.out, args.guidance)
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from t2i.eval.unclip_variations import prior_retrieval

    result = prior_retrieval(_load(args), args.n, args.seed, args.steps, args.guidance)
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _run(args: argparse.Namespace) -> int:
    pipe = _load(args)
    settings = _settings(args)
    if args.unclip_command == "variations":
        result = pipe.variations(_image(args.image), args.num, args.seed, **settings)
        stem = Path(args.image).stem + "_variation"
    elif args.unclip_command == "interpolate":
        result = pipe.interpolate(_image(args.image), _image(args.other), args.num, args.seed, **settings)
        stem = "interpolation"
    else:
        result = pipe.text_diff(_image(args.image), args.caption, args.target, args.num, args.amount, args.seed,
                                **settings)
        stem = Path(args.image).stem + "_text_diff"
    out = Path(args.out)
    for i, image in enumerate(result.images):
        path = out / f"{stem}_{i:03d}.png"
        save_png(image, path, image.info.get("parameters"))
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    text = "unCLIP's image operations: variations, interpolation between two images, text diffs"
    p = subparsers.add_parser("unclip", help=text, description=text)
    sub = p.add_subparsers(dest="unclip_command", required=True)
    parsers = {
        "variations": sub.add_parser("variations", help="new images with the input's CLIP image embedding "
                                     "(new noise for each)"),
        "interpolate": sub.add_parser("interpolate", help="images along the slerp between two images' CLIP "
                                      "embeddings (one seed)"),
        "text-diff": sub.add_parser("text-diff", help="an image moved towards the difference of two captions' "
                                    "CLIP embeddings (one seed)"),
    }
    judge = sub.add_parser("judge-variations", help="held-out shapes scenes: the judge's pass rate of their "
                           "variations on the source caption, against variations of another scene")
    judge.add_argument("--model", required=True, help="an unCLIP model on the shapes CLIP")
    judge.add_argument("--out", help="folder for results.json")
    judge.add_argument("--n", type=int, default=50, help="source scenes (default: 50)")
    judge.add_argument("--num", type=int, default=2, help="variations per source (default: 2)")
    judge.add_argument("--seed", type=int, default=20_000, help="scene seed, one no run trains on (default: 20000)")
    judge.add_argument("--steps", type=int, help="decoder steps (unset: the model's)")
    judge.add_argument("--guidance", type=float, help="decoder guidance scale (unset: the model's)")
    judge.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="weights' precision")
    judge.set_defaults(func=_judge)
    retrieval = sub.add_parser("prior-retrieval", help="held-out shapes scenes: how often the prior's sample for a "
                               "caption is closest (cosine) to the CLIP embedding of that caption's scene")
    retrieval.add_argument("--model", required=True, help="an unCLIP model on the shapes CLIP")
    retrieval.add_argument("--n", type=int, default=100, help="scenes (default: 100)")
    retrieval.add_argument("--seed", type=int, default=20_000, help="scene seed (default: 20000)")
    retrieval.add_argument("--steps", type=int, help="diffusion prior steps (unset: the model's)")
    retrieval.add_argument("--guidance", type=float, help="prior guidance scale (unset: the model's)")
    retrieval.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="weights' precision")
    retrieval.set_defaults(func=_retrieval)
    parsers["variations"].add_argument("image", help="the input image")
    parsers["interpolate"].add_argument("image", help="the first image")
    parsers["interpolate"].add_argument("other", help="the last image")
    parsers["text-diff"].add_argument("image", help="the input image")
    parsers["text-diff"].add_argument("--caption", required=True, help="a caption of the input image")
    parsers["text-diff"].add_argument("--target", required=True, help="the caption to move towards")
    parsers["text-diff"].add_argument("--amount", type=float, default=0.5,
                                      help="the largest slerp amount towards the text diff (default: 0.5)")
    for name, q in parsers.items():
        q.add_argument("--model", required=True, help="an unCLIP model (a t2i file or a Karlo folder)")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--num", type=int, default=4 if name == "variations" else 5, help="images to make")
        q.add_argument("--seed", type=int, help="seed (variations: image i uses seed + i; unset: random)")
        q.add_argument("--steps", type=int, help="decoder steps (unset: the model's)")
        q.add_argument("--guidance", type=float, help="decoder guidance scale (unset: the model's)")
        q.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="weights' precision")
        q.set_defaults(func=_run)
