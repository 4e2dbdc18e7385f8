"""`t2i generate`: prompt(s) in, PNG files with their parameters out.

Talks to a model only through the Pipeline protocol (t2i.systems.base): the arguments become one
GenerationRequest, `check_request` refuses an option the model cannot honour before any work, and
`pipe.run` generates. Outputs are never overwritten unless --overwrite says so, and every output
path is checked before the model is loaded; with --prompts-file a rerun resumes, skipping the
outputs whose PNG parameters already match their line.
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch only when it runs, so `t2i --help` stays fast
    from t2i.systems.base import GenerationRequest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a text prompt. Settings left out take the model's "
                                   "defaults (written in the PNG's parameters).")
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="a shipped model's name (`t2i models`) or a model file or folder (default: the built-in "
                        "shapes model, t2i-shapes)")
    p.add_argument("--fast", action="store_true",
                   help="use the model's distilled few-step student (model.fast.safetensors beside it, from `t2i "
                        "distill`) with its defaults (sampler lcm, 4 steps); a model whose own defaults already are "
                        "lcm (the built-in one) is its own fast setting")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m")
    p.add_argument("--schedule", default=None, help="sigma schedule: default or karras; DDPM models also take iddpm "
                   "(IDDPM respacing). A name the model does not list is refused")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=None,
                   help="image i starts from seed + i; left out or -1: a random seed, printed and stored in the PNG")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--layout", default=None, metavar="FILE.json",
                   help='where each object goes, for models that take a layout (their planner is skipped): '
                        '{"units": "pixels" or "fractions", "objects": [{"phrase": "a red circle", "box": '
                        '[x0, y0, x1, y1]}, ...]}; pixels are on --width x --height (the model\'s size if left '
                        'out); - reads stdin')
    p.add_argument("--region", action="append", dest="regions", default=None, metavar="X0,Y0,X1,Y1:WORDS",
                   help="paint-with-words (eDiff-I): the box's cross-attention to WORDS (words of the prompt) is "
                        "boosted; numbers all within [0, 1] are fractions of the canvas, otherwise pixels on --width x "
                        "--height; repeatable")
    p.add_argument("--region-weight", type=float, default=None, metavar="W",
                   help="strength w' of the --region boost (default 1; 0: off)")
    p.add_argument("--classifier", default=None, metavar="FILE",
                   help="ADM classifier guidance for pixel DDPMs: a noise-aware classifier (`t2i train classifier`) "
                        "steers towards the class the prompt names")
    p.add_argument("--classifier-scale", type=float, default=None, metavar="S",
                   help="its scale s (default 1; 0: off), alone or with --guidance")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="token models (MaskGIT, DALL-E, Parti, aMUSEd): temperature of the token draws (0: the "
                        "most likely token; default: the model's)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="token models: draw each token from the K most likely only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="token models: draw each token from the smallest set holding probability P (nucleus)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", default=None, help="img2img / inpainting input image")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the schedule to run over the input (0 keeps it, 1 ignores it)")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint), with --init-image")
    p.add_argument("--outpaint", default=None, metavar="L,T,R,B",
                   help="pad --init-image by these pixels on each side and paint the padding")
    p.add_argument("--upscaler", default=None, metavar="NAME|PATH",
                   help="a latent upscaler (an SD x4 upscaler folder, `t2i train sd-upscale`) that finishes every "
                        "image: the model draws at 1/f of --width x --height, the upscaler brings it to that size")
    p.add_argument("--noise-level", type=int, default=None,
                   help="upscalers: the noise level of the low-res input (default: the model's, 20 for SD x4)")
    p.add_argument("--refiner", default=None, help="SDXL refiner model; takes over at --refiner-start")
    p.add_argument("--refiner-start", type=float, default=0.8, help="fraction of the schedule run by the base")
    p.add_argument("--controlnet", default=None, metavar="PATH",
                   help="a diffusers ControlNetModel folder (config.json + weights) or a t2i ControlNet file "
                        "(`t2i train controlnet`); needs --control-image")
    p.add_argument("--control-image", default=None, metavar="IMG",
                   help="the ControlNet's conditioning image (edges, depth, pose...), resized to the output size; "
                        "without --width/--height the output takes its size")
    p.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    p.add_argument("--deepcache", type=int, default=1, metavar="N",
                   help="DeepCache: the full U-Net every N-th step, only its first level between (faster; 1: off)")
    p.add_argument("--preview-decoder", default=None, metavar="PATH",
                   help="decode with this TAESD instead of the VAE: faster, rougher (a file or folder from `t2i train "
                   "preview`, a diffusers AutoencoderTiny folder, madebyollin's taesd*_decoder file)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8", "compact"],
                   help="auto: by CPU flags (t2i.auto_precision): int8 with VNNI and native bf16, bf16 with "
                        "native bf16 only, int8 with AVX2 or better and no native bf16, else fp32; int8: the "
                        "U-Net's Linear layers and 3x3 convolutions in int8, the rest bf16 where native, else "
                        "fp32; compact (Stable Diffusion): weights kept in bf16 (fp16 files stay fp16) and "
                        "widened layer by layer to fp32 compute, about half of fp32's memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: faster steps after a compile of minutes at each new size "
                        "(cached on disk); pays off for many images per process")
    p.add_argument("--out", default=None,
                   help="output PNG (default image.png); with several images, -0, -1, ... are added")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse before generating anything)")
    p.add_argument("--save-latents", default=None, metavar="FILE.safetensors",
                   help="write the final latents (before VAE scaling is undone) under the key 'latents'")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line; writes DIR/0000.png, ... (line i -> i). A rerun resumes: outputs "
                        "whose PNG parameters match their line are skipped; one that holds another prompt or other "
                        "settings (the file was edited) is refused unless --overwrite")
    p.add_argument("--out-dir", default=None, help="output folder for --prompts-file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--rerank", type=int, default=1, metavar="K",
                   help="sample-and-rank: draw K candidates per image, keep the best by CLIP score")
    p.add_argument("--rerank-clip", default=None, metavar="PATH",
                   help="CLIP for --rerank: a transformers CLIP folder or a shapes CLIP .safetensors "
                        "(default: the shipped shapes CLIP)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge this LoRA (.safetensors, kohya/A1111 or diffusers/PEFT) at WEIGHT (default 1); "
                        "repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where A1111's <lora:name:weight> prompt tags find name.safetensors (subfolders too)")
    p.add_argument("--embedding-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings (.pt, .bin, .safetensors; subfolders too), each used in the "
                        "prompt by its file name without suffix, as A1111's embeddings folder")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from t2i.cli import UserError
    from t2i.tokens.sampling import check_draws

    if args.prompts_file is None and args.prompt is None:
        raise UserError("give a PROMPT or --prompts-file FILE")
    if args.prompts_file is not None and args.prompt is not None:
        raise UserError("give a PROMPT or --prompts-file FILE, not both")
    if args.prompts_file is not None and args.out_dir is None:
        raise UserError("--prompts-file needs --out-dir DIR")
    if args.prompts_file is not None and (args.out or args.save_latents):
        raise UserError(f"{'--out' if args.out else '--save-latents'} names the file of a single PROMPT; "
                        "--prompts-file writes into --out-dir")
    if args.prompts_file is None and args.out_dir is not None:
        raise UserError("--out-dir is for --prompts-file; give --out FILE for a single PROMPT")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {v}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UserError(f"--guidance must be 0 or more (1 or less: no classifier-free guidance), got {args.guidance}")
    if args.seed is not None and args.seed < -1:
        raise UserError(f"--seed must be -1 (random) or at least 0, got {args.seed}")
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
    if (args.controlnet is None) != (args.control_image is None):
        raise UserError("--controlnet and --control-image go together")
    if not math.isfinite(args.control_scale):
        raise UserError(f"--control-scale must be a finite number, got {args.control_scale}")
    if args.classifier_scale is not None and not math.isfinite(args.classifier_scale):
        raise UserError(f"--classifier-scale must be a finite number, got {args.classifier_scale}")
    try:
        check_draws(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-')}") from None
    if args.classifier is not None and not Path(args.classifier).is_file():
        raise UserError(f"--classifier {args.classifier}: no such file")
    if args.region_weight is not None and not math.isfinite(args.region_weight):
        raise UserError(f"--region-weight must be a finite number, got {args.region_weight}")
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
    """init_image and mask for the request, from --init-image, --mask and --outpaint."""
    if args.init_image is None:
        return {"init_image": None, "mask": None}
    init = _open_image(args.init_image, "--init-image")
    mask = _open_image(args.mask, "--mask") if args.mask else None
    if args.outpaint is not None:
        from t2i.systems.latent_diffusion import outpaint_canvas

        init, mask = outpaint_canvas(init, *(int(p) for p in args.outpaint.split(",")))
    return {"init_image": init, "mask": mask}


def _control_image(args: argparse.Namespace) -> dict:
    """control_image for the request, read before the model loads (a bad path fails at once)."""
    return {"control_image": _open_image(args.control_image, "--control-image") if args.control_image else None}


def _load_controlnet(pipe, path: str):
    """--controlnet's folder or file, in the precision the model's network computes in."""
    import torch

    from t2i.adapters.controlnet import load_controlnet

    return load_controlnet(path, torch.bfloat16 if getattr(pipe, "precision", "fp32") == "bf16" else torch.float32)


def _read_layout(path: str):
    """--layout's JSON, decoded (checked against the canvas once the model's size is known)."""
    import json

    from t2i.cli import UserError

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise UserError(f"--layout file not found: {path}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"--layout {path} is not readable UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--layout {path} is not valid JSON: {e}") from None


def _layout(pipe, request: GenerationRequest, path: str):
    """request.layout (--layout's decoded JSON) as a Layout: pixels read on the size the image will
    have (the model's default size when --width/--height are left out)."""
    from t2i.cli import UserError
    from t2i.layout.spec import LayoutError, as_layout
    from t2i.request_warnings import resolved_request

    r = resolved_request(pipe, request)
    try:
        return as_layout(request.layout, r.width, r.height, getattr(pipe, "max_objects", None))
    except LayoutError as e:
        raise UserError(f"--layout {path}: {e}") from None


def _regions(pipe, request: GenerationRequest):
    """request.regions (--region's strings) parsed on the size the image will have and, where the model
    knows its tokenizer (`request_regions`), checked against the prompt: one line naming the region."""
    from t2i.cli import UserError
    from t2i.diffusion.paint_with_words import RegionError, as_regions
    from t2i.request_warnings import resolved_request

    r = resolved_request(pipe, request)
    try:
        check = getattr(pipe, "request_regions", None)
        return check(r) if check is not None else as_regions(r.regions, r.width, r.height)
    except RegionError as e:
        raise UserError(f"--region: {e}") from None


def _seed(args: argparse.Namespace) -> int:
    """--seed, or a random one (A1111: unset or -1), which is printed so the user can come back to it."""
    if args.seed is not None and args.seed != -1:
        return args.seed
    seed = secrets.randbelow(2**32)  # A1111's range for random seeds
    print(f"t2i generate: seed {seed} (random)", file=sys.stderr)
    return seed


def _request(args: argparse.Namespace, **given) -> GenerationRequest:
    """The GenerationRequest of the arguments: every option whose name is a request field is taken as
    is (the parser's defaults are the request's, so `set_options` names what the user set); `given`
    holds what the arguments only point to (the loaded input images, refiner, the resolved seed)."""
    from t2i.systems.base import GenerationRequest

    taken = {f.name: getattr(args, f.name) for f in fields(GenerationRequest)
             if f.name in vars(args) and f.name not in given}
    return GenerationRequest(**taken, **given)


def _numbered(path: Path, n: int) -> list[Path]:
    """The files n images go to: path itself for one, path-0, path-1, ... for several."""
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{j}{path.suffix}") for j in range(n)]


def _check_outputs(args: argparse.Namespace) -> list[Path]:
    """The PNG paths of a single-prompt run, refused before any work if one is a folder or exists
    (with --save-latents' file) and --overwrite is not given."""
    from t2i.cli import UserError

    out = Path(args.out or "image.png")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name, e.g. --out {out / 'image.png'}")
    paths = _numbered(out, args.num_images)
    if args.overwrite:
        return paths
    latents = [Path(args.save_latents)] if args.save_latents else []
    taken = [str(p) for p in paths + latents if p.exists()]
    if taken:
        raise UserError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: choose another --out "
                        "(or --save-latents) or pass --overwrite")
    return paths


def _load(args: argparse.Namespace):
    import t2i
    from t2i.cli import UserError

    def load(model):
        return t2i.load(model, precision=args.precision, quantizable=_quantizable(args))

    if args.fast:
        from t2i.distill import resolve_fast

        pipe = resolve_fast(args.model, load)
    else:
        pipe = load(args.model)
    if args.lora:  # merged for the whole run (before compiling, which freezes the weights)
        from t2i.adapters.lora import apply_loras, parse_lora_arg

        apply_loras(pipe, [parse_lora_arg(a) for a in args.lora])
    if args.embedding_dir:  # those for another model family are skipped with a warning, as in A1111
        from t2i.adapters.embeddings import load_embedding_dir

        load_embedding_dir(pipe, args.embedding_dir)
    if args.upscaler:  # the cascade: this model at 1/f of the size, then the upscaler
        upscaler = t2i.load(args.upscaler, precision=args.precision)
        if not hasattr(upscaler, "with_base"):
            raise UserError(f"--upscaler {args.upscaler}: {upscaler.name} ({upscaler.family}) is not an upscaler")
        pipe = upscaler.with_base(pipe)
    if args.compile:
        compile_unet = getattr(pipe, "compile", None)
        if compile_unet is None:
            raise UserError(f"--compile: {pipe.name} ({pipe.family}) has nothing to compile")
        compile_unet()
    return pipe


def _generate(pipe, request, args: argparse.Namespace, embedder):
    from t2i.adapters.lora import run_with_prompt_loras  # <lora:name:w> tags: merged for this request only

    if args.rerank == 1:
        return run_with_prompt_loras(pipe, request, args.lora_dir, pipe.run)
    from t2i.eval.rerank import run_reranked

    return run_with_prompt_loras(pipe, request, args.lora_dir, lambda r: run_reranked(pipe, r, args.rerank, embedder))


def _save(image, path: Path, overwrite: bool) -> None:
    from t2i.cli import UserError
    from t2i.imageio import save_png

    try:
        save_png(image, path, image.info.get("parameters"), overwrite=overwrite)
    except FileExistsError:  # checked before generating: something else wrote it meanwhile
        raise UserError(f"{path} appeared while generating and was not replaced (--overwrite to allow)") from None


def _warn(message: str) -> None:
    print(f"t2i generate: warning: {message}", file=sys.stderr)


def _merges_loras(args: argparse.Namespace) -> bool:
    """LoRAs are merged into float weights, so `--precision auto` stays off int8 when they are given."""
    return bool(args.lora or args.lora_dir)


def _quantizable(args: argparse.Namespace) -> bool:
    """Whether `--precision auto` may pick int8: not when LoRAs merge into the weights, nor with
    --compile (inductor cannot trace the int8 layers' oneDNN calls, see `LatentDiffusionPipeline.compile`)."""
    return not _merges_loras(args) and not args.compile


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import t2i
    from t2i.request_warnings import regions_warning, size_warning
    from t2i.systems.base import check_request

    # Cheap refusals first: outputs that exist, a prompts file that cannot be read.
    paths = _check_outputs(args) if args.prompts_file is None else []
    prompts = _read_prompts(args) if args.prompts_file is not None else []
    layout = _read_layout(args.layout) if args.layout is not None else None
    control = _control_image(args)
    pipe = _load(args)
    # Checked with the refiner's path standing in for the refiner (refused before it is loaded), and
    # the layout's JSON for the layout (read on the canvas once the model may take one).
    # (and --controlnet's path for the ControlNet).
    request = _request(args, **_input_images(args), **control, controlnet=args.controlnet, refiner=args.refiner,
                       seed=0, prompt=args.prompt if args.prompts_file is None else prompts[0],
                       preview=bool(args.preview_decoder), progress=not args.quiet, layout=layout)
    check_request(pipe, request)  # UnsupportedOption (a ValueError): one line naming option and model
    # --region's words are checked against every line of a prompts file before the first image is drawn
    regions = _regions(pipe, replace(request, prompt=prompts) if prompts else request)
    request = replace(request, layout=_layout(pipe, request, args.layout), regions=regions)
    refiner = t2i.load(args.refiner, precision=args.precision, quantizable=_quantizable(args)) \
        if args.refiner else None
    if refiner is not None and args.embedding_dir:  # it reads the same prompt: the same trigger words
        from t2i.adapters.embeddings import load_embedding_dir

        load_embedding_dir(refiner, args.embedding_dir)
    controlnet = _load_controlnet(pipe, args.controlnet) if args.controlnet else None
    request = replace(request, refiner=refiner, controlnet=controlnet, seed=_seed(args))
    if args.preview_decoder:
        from t2i.autoencoders.preview import PreviewDecoder

        # a TAESD made elsewhere does not say which VAE's latents it reads: this model's VAE tells
        pipe.preview_decoder = PreviewDecoder.load(args.preview_decoder, vae=pipe.vae.cfg)
    embedder = None
    if args.rerank > 1:
        from t2i.eval.rerank import load_embedder

        embedder = load_embedder(args.rerank_clip)
    for warning in (size_warning(pipe, request), regions_warning(request)):
        if warning is not None:
            _warn(warning)
    if args.prompts_file is not None:
        return _run_prompts_file(pipe, request, prompts, args, embedder)
    result = _generate(pipe, request, args, embedder)
    for warning in result.warnings:
        _warn(warning)
    for path, image in zip(paths, result.images, strict=True):
        _save(image, path, args.overwrite)
    if args.save_latents:
        from t2i.checkpoints.io import save_state_dict

        save_state_dict({"latents": result.sample.float().contiguous()}, args.save_latents)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- --prompts-file

def _read_prompts(args: argparse.Namespace) -> list[str]:
    from t2i.cli import UserError

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        text = Path(args.prompts_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompts-file not found: {args.prompts_file}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"--prompts-file {args.prompts_file} is not readable UTF-8 text ({e})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {args.prompts_file} holds no prompt")
    return prompts


def _expected(pipe, request: GenerationRequest, args: argparse.Namespace) -> tuple[list[dict[str, str]], set[str]]:
    """The parsed PNG parameters each image of `request` (one prompt) will carry, and the keys to
    leave out of the comparison because they are not known before generating (the CLIP score; the
    seed when it is drawn at random or picked by the reranker; the img2img strength when the model
    chooses it)."""
    import t2i
    from t2i.imageio import parse_parameters, request_parameters
    from t2i.request_warnings import resolved_request

    r = resolved_request(pipe, request)
    precision = getattr(pipe, "precision", None) or t2i.resolve_precision(args.precision, args.model)
    free = {"CLIP score"}
    if args.seed in (None, -1) or args.rerank > 1:
        free.add("Seed")
    if r.init_image is not None and r.strength is None:
        free.add("Denoising strength")
    if r.layout is None:  # a layout model plans its own: known only once it has run
        free.add("Layout")
    rerank = f", Rerank: {args.rerank}" if args.rerank > 1 else ""
    texts = [request_parameters(r, r.prompt, r.negative_prompt, r.seed + j, pipe.name, precision) + rerank
             for j in range(r.num_images)]
    return [parse_parameters(t) for t in texts], free


def _matches(path: Path, expected: dict[str, str], free: set[str]) -> bool:
    """Whether the PNG at `path` carries the `expected` parameters (keys in `free` aside)."""
    from t2i.imageio import parse_parameters, read_parameters

    try:
        text = read_parameters(path)
    except OSError:  # not an image we can read: not ours to keep
        return False
    if text is None:
        return False
    found = parse_parameters(text)
    return {k: v for k, v in found.items() if k not in free} == {k: v for k, v in expected.items() if k not in free}


def _run_prompts_file(pipe, request, prompts: list[str], args: argparse.Namespace, embedder) -> int:
    """Line i's images go to DIR/iiii.png (DIR/iiii-j.png for several). A line whose outputs all exist
    with matching parameters is skipped (resume). An existing output that holds another prompt or
    other settings (the file was edited, or the settings changed) is refused before any work, unless
    --overwrite: a name never silently changes meaning."""
    from t2i.cli import UserError

    out_dir = Path(args.out_dir)
    todo: list[tuple[int, GenerationRequest, list[Path], list[Path]]] = []
    conflicts: list[str] = []
    skipped = 0
    for i, prompt in enumerate(prompts):
        line = replace(request, prompt=prompt)
        paths = _numbered(out_dir / f"{i:04d}.png", line.num_images)
        found = [p for p in paths if p.exists()]
        expected, free = _expected(pipe, line, args)
        same = [_matches(p, e, free) for p, e in zip(paths, expected, strict=True) if p.exists()]
        if found and len(found) == len(paths) and all(same):
            skipped += 1
            continue
        conflicts += [f"{p.name}" for p, ok in zip(found, same, strict=True) if not ok]
        todo.append((i, line, paths, found))
    if conflicts and not args.overwrite:
        raise UserError(f"{out_dir} already holds {', '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''} "
                        "made from another prompt or other settings (was the prompts file edited?): use a new "
                        "--out-dir, or --overwrite to replace them")
    if skipped:
        print(f"t2i generate: {skipped} prompt(s) already done in {out_dir}: skipped", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, line, paths, found in todo:
        result = _generate(pipe, line, args, embedder)
        for warning in result.warnings:
            _warn(f"line {i + 1}: {warning}")
        for path, image in zip(paths, result.images, strict=True):
            # The outputs found above were checked (they match their line, or --overwrite).
            _save(image, path, overwrite=path in found)
    print(f"wrote {len(todo)} prompt(s) to {out_dir}", file=sys.stderr)
    return 0
