"""`t2i eval shapes`: score a model with the shapes judge on its held-out prompts."""

from __future__ import annotations

import argparse
import json
import sys


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
    s.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick look)")
    s.set_defaults(func=run_shapes)


def run_shapes(args: argparse.Namespace) -> int:
    import t2i
    from t2i.eval.prompts import read_prompt_file
    from t2i.eval.shapes_judge import run_shapes_eval

    pipe = t2i.load(args.model)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if args.limit is not None:
        from t2i.eval.prompts import heldout_prompts

        prompts = (prompts or heldout_prompts())[: args.limit]

    def generate(texts: list[str]) -> list:
        return [pipe.generate(t, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              sampler=args.sampler).images[0] for t in texts]

    report = run_shapes_eval(generate, prompts, args.out)
    summary = {k: report[k] for k in ("overall", "n", "accuracy")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/results.json and {args.out}/grid.png", file=sys.stderr)
    return 0
