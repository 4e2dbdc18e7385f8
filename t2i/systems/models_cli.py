"""`t2i models`: the models t2i ships and the ones installed in the model folder, with their family,
size on disk and the score their model card states; `--families` lists the registered families."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from t2i.systems.registry import ModelEntry, model_entries, systems


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _row(entry: ModelEntry) -> dict:
    present = entry.path.exists()
    return {"name": entry.name, "family": entry.family, "source": entry.source, "default": entry.default,
            "path": str(entry.path), "present": present, "size_mb": round(_size_mb(entry.path), 1) if present else None,
            "score": entry.score, "description": entry.description}


def run(args: argparse.Namespace) -> int:
    if args.families:
        rows = [{"family": s.name, "description": s.description} for s in systems()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['family']:<20} {r['description']}")
        return 0
    rows = [_row(e) for e in model_entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'family':<18} {'size':>9}  score")
    for r in rows:
        size = f"{r['size_mb']:.1f} MB" if r["present"] else "missing"
        name = r["name"] + (" *" if r["default"] else "")
        print(f"{name:<24} {r['family']:<18} {size:>9}  {r['score'] or '-'}")
    print("* the default model (used without --model); --model NAME or a path selects another", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the shipped and installed models (and --families)",
                       description="List the models t2i ships and those installed in the model folder "
                                   "($T2I_MODEL_DIR, default ~/.local/share/t2i/models): name, family, size, "
                                   "the score its model card states. `t2i generate --model NAME` uses one by name.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--families", action="store_true", help="list the registered model families instead")
    p.set_defaults(func=run)
