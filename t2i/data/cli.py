"""`t2i data shapes`: write the synthetic shapes world to disk."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make data sets")
    kinds = p.add_subparsers(dest="kind", required=True)
    s = kinds.add_parser("shapes", help="the shapes world (docs/SHAPES_WORLD.md)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=64, help="image side in pixels")
    s.add_argument("--layout", default="both", choices=["folder", "jsonl", "both"],
                   help="PNG + .txt caption sidecars, a manifest.jsonl, or both")
    s.set_defaults(func=run_shapes)


def run_shapes(args: argparse.Namespace) -> int:
    from t2i.cli import UserError
    from t2i.data.shapes import write_shapes_dataset

    if args.n < 1 or args.size < 8:
        raise UserError("--n must be >= 1 and --size >= 8")
    write_shapes_dataset(args.n, args.out, seed=args.seed, size=args.size, layout=args.layout)
    print(f"wrote {args.n} shapes images to {args.out}", file=sys.stderr)
    return 0
