"""Judge an image tokenizer's code round trip on the 300 held-out scenes: the share of scenes whose
image after encode -> codes -> decode_codes the shapes judge still accepts (each scene against its
own held-out caption), per caption family, with codebook usage.

    python scripts/judge_tokenizer.py runs/vqgan/vqgan.safetensors [more files] [--json out.json]

Any tokenizer kind (`t2i.autoencoders.tokenizers.load_tokenizer`: VQ-VAE, VQGAN, ViT-VQGAN, dVAE,
VQ-VAE-2). Per file it prints the judge's accuracy per family and overall, the L1 error (0..255),
the perplexity of the held-out codes (K if all codes are used equally), how many codes the held-out
scenes use, and the dead codes of the file's own usage statistics. The ground truth itself is
accepted on all 300 scenes, so the accuracy is what the round trip loses.
"""

from __future__ import annotations

import argparse
import json

import torch

from t2i.autoencoders.tokenizers import dead_codes, load_tokenizer, round_trip
from t2i.autoencoders.vq import code_perplexity
from t2i.data.shapes import render_array, to_tensor
from t2i.data.shapes.heldout import heldout_draws
from t2i.eval.shapes_judge import evaluate


@torch.no_grad()
def judge_tokenizer(path: str, per_family: int = 50, batch: int = 50) -> dict:
    """The round-trip report of one tokenizer file (JSON-ready)."""
    tok = load_tokenizer(path).eval()
    draws = heldout_draws(per_family=per_family)
    x = torch.stack([to_tensor(render_array(scene)) for _f, scene, _p in draws])  # (N, 3, 64, 64)
    codes = torch.cat([tok.encode(b)[0].flatten(1) for b in x.split(batch)])  # (N, tokens)
    recon = torch.cat([round_trip(tok, b) for b in x.split(batch)]).clamp(-1, 1)
    images = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    report = evaluate(list(images), [d[2] for d in draws], [d[0] for d in draws])
    k = tok.cfg.num_codes
    return {"file": path, "kind": getattr(tok.cfg, "kind", "vqvae"), "num_codes": k,
            "downsample_factor": tok.cfg.downsample_factor, "tokens": codes.shape[1],
            "overall": report["overall"], "accuracy": report["accuracy"], "n": report["n"],
            "l1": float((recon - x).abs().mean() * 127.5), "perplexity": float(code_perplexity(codes, k)),
            "codes_used": len(codes.unique()), "dead_codes": dead_codes(tok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--per-family", type=int, default=50)
    p.add_argument("--json", help="also write the reports here")
    args = p.parse_args()
    torch.set_num_threads(1)
    reports = []
    for path in args.files:
        r = judge_tokenizer(path, args.per_family)
        reports.append(r)
        print(f"{path} ({r['kind']}, {r['num_codes']} codes, f={r['downsample_factor']}, {r['tokens']} tokens): "
              f"round trip judge overall {r['overall']:.3f} ",
              {f: round(a, 3) for f, a in r["accuracy"].items()},
              f"| L1 {r['l1']:.2f}/255 | held-out perplexity {r['perplexity']:.1f}, {r['codes_used']}/{r['num_codes']} "
              f"codes used, {r['dead_codes']} dead")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
