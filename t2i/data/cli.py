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
                   help="PNG + .txt caption sidecars, a manifest.jsonl, or both (--format files)")
    s.add_argument("--format", default="files", choices=["files", "webdataset"],
                   help="loose files (see --layout), or WebDataset tar shards shard-000000.tar, ... holding "
                        "{key}.png, {key}.txt and {key}.json (the scene); train on them with --data webdataset")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (--format webdataset)")
    s.set_defaults(func=run_shapes)


def run_shapes(args: argparse.Namespace) -> int:
    from t2i.cli import UserError
    from t2i.data.shapes import write_shapes_dataset

    if args.n < 1 or args.size < 8:
        raise UserError("--n must be >= 1 and --size >= 8")
    if args.format == "webdataset":
        from t2i.data.webdataset import write_shapes_shards

        if args.shard_size < 1:
            raise UserError("--shard-size must be >= 1")
        shards = write_shapes_shards(args.n, args.out, seed=args.seed, size=args.size, shard_size=args.shard_size)
        print(f"wrote {args.n} shapes images in {len(shards)} shards to {args.out}", file=sys.stderr)
        return 0
    write_shapes_dataset(args.n, args.out, seed=args.seed, size=args.size, layout=args.layout)
    print(f"wrote {args.n} shapes images to {args.out}", file=sys.stderr)
    return 0
