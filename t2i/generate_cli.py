"""`t2i generate`: prompt(s) in, PNG files with their parameters out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a text prompt. Settings left out take the model's "
                                   "defaults (written in the PNG's parameters).")
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    p.add_argument("--model", default=None, help="model folder or file (default: the built-in shapes model)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m")
    p.add_argument("--schedule", default=None, choices=["default", "karras"], help="sigma schedule")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", default=None, help="img2img / inpainting input image")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the schedule to run over the input (0 keeps it, 1 ignores it)")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint), with --init-image")
    p.add_argument("--outpaint", default=None, metavar="L,T,R,B",
                   help="pad --init-image by these pixels on each side and paint the padding")
    p.add_argument("--refiner", default=None, help="SDXL refiner model; takes over at --refiner-start")
    p.add_argument("--refiner-start", type=float, default=0.8, help="fraction of the schedule run by the base")
    p.add_argument("--deepcache", type=int, default=1, metavar="N",
                   help="DeepCache: the full U-Net every N-th step, only its first level between (faster; 1: off)")
    p.add_argument("--preview-decoder", default=None, metavar="PATH",
                   help="decode with this preview decoder (`t2i train preview`) instead of the VAE: faster, rougher")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the CPU computes it natively, else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: faster steps after a compile of minutes at each new size "
                        "(cached on disk); pays off for many images per process")
    p.add_argument("--out", default="image.png", help="output PNG; with several images, -0, -1, ... are added")
    p.add_argument("--save-latents", default=None, metavar="FILE.safetensors",
                   help="write the final latents (before VAE scaling is undone) under the key 'latents'")
    p.add_argument("--prompts-file", default=None, help="one prompt per line; writes DIR/0000.png, ...")
    p.add_argument("--out-dir", default=None, help="output folder for --prompts-file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--rerank", type=int, default=1, metavar="K",
                   help="sample-and-rank: draw K candidates per image, keep the best by CLIP score")
    p.add_argument("--rerank-clip", default=None, metavar="PATH",
                   help="CLIP for --rerank: a transformers CLIP folder or a shapes CLIP .safetensors "
                        "(default: the shipped shapes CLIP)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from t2i.cli import UserError

    if args.prompts_file is None and args.prompt is None:
        raise UserError("give a PROMPT or --prompts-file FILE")
    if args.prompts_file is not None and args.out_dir is None:
        raise UserError("--prompts-file needs --out-dir DIR")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {v}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.rerank < 1:
        raise UserError(f"--rerank must be at least 1, got {args.rerank}")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask needs --init-image")
    if args.outpaint is not None:
        if args.init_image is None or args.mask is not None:
            raise UserError("--outpaint needs --init-image (and no --mask: the padding is the mask)")
        parts = args.outpaint.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"--outpaint takes four pixel counts L,T,R,B, got {args.outpaint!r}")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1, got {args.strength}")
    if not 0.0 < args.refiner_start < 1.0:
        raise UserError(f"--refiner-start must be between 0 and 1, got {args.refiner_start}")
    if args.deepcache < 1:
        raise UserError(f"--deepcache must be at least 1, got {args.deepcache}")
    if args.save_latents and not args.save_latents.endswith(".safetensors"):
        raise UserError("--save-latents must name a .safetensors file")


def _open_image(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    from t2i.cli import UserError

    try:
        with Image.open(path) as im:
            return im.convert("RGB") if what != "--mask" else im.convert("L")
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable image ({e})") from None


def _input_images(args: argparse.Namespace) -> dict:
    """init_image / mask / strength for generate(), from --init-image, --mask and --outpaint."""
    if args.init_image is None:
        return {}
    init = _open_image(args.init_image, "--init-image")
    mask = _open_image(args.mask, "--mask") if args.mask else None
    if args.outpaint is not None:
        from t2i.systems.latent_diffusion import outpaint_canvas

        init, mask = outpaint_canvas(init, *(int(p) for p in args.outpaint.split(",")))
    return {"init_image": init, "mask": mask, "strength": args.strength}


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import t2i
    from t2i.imageio import save_png

    pipe = t2i.load(args.model, precision=args.precision)
    if args.compile:
        pipe.compile()
    if args.preview_decoder:
        from t2i.autoencoders.preview import PreviewDecoder

        pipe.preview_decoder = PreviewDecoder.load(args.preview_decoder)
    images = _input_images(args)
    refiner = t2i.load(args.refiner, precision=args.precision) if args.refiner else None
    settings = dict(**images, refiner=refiner, refiner_start=args.refiner_start,
                    negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                    guidance=args.guidance, guidance_rescale=args.guidance_rescale, sampler=args.sampler,
                    schedule=args.schedule, eta=args.eta, width=args.width, height=args.height,
                    num_images=args.num_images, deepcache=args.deepcache,
                    preview=bool(args.preview_decoder), progress=not args.quiet)
    generate = pipe.generate
    if args.rerank > 1:
        from functools import partial

        from t2i.eval.rerank import generate_reranked, load_embedder

        generate = partial(generate_reranked, pipe, rerank=args.rerank, embedder=load_embedder(args.rerank_clip))
    if args.prompts_file is not None:
        prompts = [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
        out_dir = Path(args.out_dir)
        for i, prompt in enumerate(prompts):
            result = generate(prompt, **settings)
            for j, image in enumerate(result.images):
                name = f"{i:04d}.png" if len(result.images) == 1 else f"{i:04d}-{j}.png"
                save_png(image, out_dir / name, image.info.get("parameters"))
        print(f"wrote {len(prompts)} prompt(s) to {out_dir}", file=sys.stderr)
        return 0
    result = generate(args.prompt, **settings)
    for warning in result.warnings:
        print(f"t2i generate: warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{j}{out.suffix}")
                                                   for j in range(len(result.images))]
    for path, image in zip(paths, result.images, strict=True):
        save_png(image, path, image.info.get("parameters"))
    if args.save_latents:
        from t2i.checkpoints.io import save_state_dict

        save_state_dict({"latents": result.latents.float().contiguous()}, args.save_latents)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
