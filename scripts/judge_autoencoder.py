"""Judge an autoencoder's reconstructions of the held-out scenes: a first stage is good enough
for the default model when the judge still accepts the rendered ground truth after an
encode -> decode round trip (each scene against its own held-out caption).

    python scripts/judge_autoencoder.py runs/ae/vae.safetensors [--per-family 50]

Prints the judge's accuracy per family on the round trips, and how far apart the latents of
the palette colours are, in units of the latents' own standard deviation (the LDM must tell
colours apart at that precision).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from t2i.data.shapes import PALETTE, render_array, to_tensor
from t2i.data.shapes.heldout import heldout_draws
from t2i.eval.shapes_judge import evaluate
from t2i.train.autoencoder import load_vae


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae")
    p.add_argument("--per-family", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = load_vae(args.vae).eval()
    draws = heldout_draws(per_family=args.per_family)
    x = torch.stack([to_tensor(render_array(scene)) for _f, scene, _p in draws])
    z = torch.cat([vae.encode(b).mean for b in x.split(64)])
    recon = torch.cat([vae.decode(b) for b in z.split(64)])
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    report = evaluate(list(images), [d[2] for d in draws], [d[0] for d in draws])
    print("round trip judge:", {k: round(v, 3) for k, v in report["accuracy"].items()},
          "overall", round(report["overall"], 3))
    print("L1 (0..255):", float((recon.clamp(-1, 1) - x).abs().mean() * 127.5))
    # Latent of a flat 16x16 patch of each palette colour on white, in units of the latents' std.
    std = float(z.std())
    patches = torch.ones(len(PALETTE), 3, 64, 64)
    for i, rgb in enumerate(PALETTE.values()):
        patches[i, :, 24:40, 24:40] = torch.tensor(rgb).view(3, 1, 1) / 127.5 - 1
    centre = vae.encode(patches).mean[:, :, 7:9, 7:9].flatten(1)
    d = torch.cdist(centre, centre) / np.sqrt(centre.shape[1]) / std
    d.fill_diagonal_(float("inf"))
    names = list(PALETTE)
    i, j = divmod(int(d.argmin()), len(names))
    print(f"closest colours in latent space: {names[i]}/{names[j]} at {float(d.min()):.3f} std per dim")


if __name__ == "__main__":
    main()
