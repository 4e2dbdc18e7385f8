"""Write a layout renderer into the package as the built-in model's, with its sampling defaults.

    python scripts/ship_layout_model.py [--renderer runs/lr6/model.safetensors] [--sampler lcm --steps 4 --guidance 1]

The renderer run exports its EMA U-Net in float32 with the autoencoder it trained on; the package
holds the U-Net in float16 (half the file; `load` gives float32 back), or with --fp32 as exported, so
that the judge's numbers measured on the run's export are the shipped model's own. The defaults a
request without its own settings takes (sampler, steps, guidance) are part of the file's config: the
judge's "defaults" are these.
Without --renderer the shipped renderer is rewritten with new defaults only.
"""

from __future__ import annotations

import argparse

import torch

from t2i.systems.shapes_layout import LAYOUT_MODEL_DIR, ShapesLayoutModel

SHIPPED = LAYOUT_MODEL_DIR / "model.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--renderer", default=str(SHIPPED), help="a layout renderer's model.safetensors")
    p.add_argument("--sampler", default=None, help="default sampler (unset: the renderer's)")
    p.add_argument("--steps", type=int, default=None, help="default steps (unset: the renderer's)")
    p.add_argument("--guidance", type=float, default=None, help="default guidance (unset: the renderer's)")
    p.add_argument("--fp32", action="store_true", help="keep the U-Net in float32 (default: float16)")
    args = p.parse_args()
    model = ShapesLayoutModel.load(args.renderer)
    c = model.cfg.ldm
    c.sampler = args.sampler or c.sampler
    c.steps = args.steps or c.steps
    c.guidance = c.guidance if args.guidance is None else args.guidance
    model.save(SHIPPED, torch.float32 if args.fp32 else torch.float16)
    print(f"wrote {SHIPPED}: renderer {args.renderer}, defaults {c.sampler}, {c.steps} steps, guidance {c.guidance}")


if __name__ == "__main__":
    main()
