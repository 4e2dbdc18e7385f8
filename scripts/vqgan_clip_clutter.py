"""Does VQGAN-CLIP's single-object score come from the prompt or from clutter? (docs/FAMILIES.md, session 22)

Its images for the 50 held-out single-object prompts (seed 0, the model's defaults, as `t2i eval shapes` draws
them) are judged on their own prompt and on the next prompt's: a cluttered canvas that would pass any prompt
scores the same on both. Prints each pair and the totals, with the exact McNemar test of the paired verdicts.

    python scripts/vqgan_clip_clutter.py training_state/vq8s_f8small_512codes_step3000_fp16.safetensors
"""

from __future__ import annotations

import argparse
import json

import torch

import t2i
from t2i.data.shapes.heldout import heldout_prompts
from t2i.data.shapes.prompts import first_per_family
from t2i.eval.paired import discordant, mcnemar_p
from t2i.eval.shapes_judge import judge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a VQ tokenizer file (the vqgan_clip family's model)")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = t2i.load(args.model, precision="fp32")
    singles = [prompt for family, prompt in first_per_family(heldout_prompts(), 50) if family == "single"]
    verdicts = []
    for i, prompt in enumerate(singles):
        image = pipe.generate(prompt, seed=0).images[0]
        other = singles[(i + 1) % len(singles)]
        verdicts.append((judge(image, prompt).ok, judge(image, other).ok))
        print(i, prompt, verdicts[-1][0], "|", other, verdicts[-1][1], flush=True)
    own_only, other_only = discordant([a for a, _ in verdicts], [b for _, b in verdicts])
    print(json.dumps({"n": len(singles), "own": sum(a for a, _ in verdicts), "other": sum(b for _, b in verdicts),
                      "own_only": own_only, "other_only": other_only,
                      "mcnemar_p": round(mcnemar_p(own_only, other_only), 4)}))


if __name__ == "__main__":
    main()
