"""Copy the shapes LDM run's current EMA export into the package as the built-in model.

    python scripts/ship_default_model.py [--ldm runs/ldm] [--decoder runs/dec/vae.safetensors] [--steps-before N]

The LDM run exports its EMA U-Net with the autoencoder it trained on (runs/ldm/model.safetensors);
the autoencoder is replaced by the decoder-only fine-tune of the same autoencoder (same encoder,
so the latent space is unchanged). Writes t2i/assets/default/model.safetensors (atomically) and
TRAINING_STATUS.txt with the LDM step it holds (--steps-before: the steps of the run that --ldm was
warm-started from with --init-from, so the status counts all of them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from t2i.systems.shapes_ldm import DEFAULT_MODEL_FILE, ShapesLDM
from t2i.train.autoencoder import load_vae
from t2i.train.checkpoint import latest_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ldm", default="runs/ldm", help="the LDM run directory")
    p.add_argument("--decoder", default="runs/dec/vae.safetensors", help="fine-tuned autoencoder, if any")
    p.add_argument("--steps-before", type=int, default=0,
                   help="LDM steps before this run (it was warm-started with --init-from)")
    args = p.parse_args()
    run = Path(args.ldm)
    model = ShapesLDM.load(run / "model.safetensors")
    decoder = Path(args.decoder)
    if decoder.is_file():
        model.vae.load_state_dict(load_vae(decoder).state_dict())
    latest = latest_checkpoint(run)
    step = int(latest.stem.split("_")[1]) + args.steps_before if latest else "?"
    model.save(DEFAULT_MODEL_FILE)
    status = (f"EMA U-Net exported by {run} at about step {step} "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); decoder fine-tuned: {decoder.is_file()}\n")
    (DEFAULT_MODEL_FILE.parent / "TRAINING_STATUS.txt").write_text(status)
    print(status, end="")


if __name__ == "__main__":
    main()
