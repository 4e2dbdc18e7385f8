"""Do unCLIP's variations keep the scene? (issue 20: "variations keep the judge's verdict on the source image's
scene more often than a random sample does", measured.) And does its prior land near the right image?

Held-out shapes scenes (a seed no run trains on) are rendered with their true caption c. Each source image's
CLIP embedding is decoded `per_source` times with new noise (`UnCLIPPipeline.variations`), and the shapes judge
checks every variation against c. The baseline is the same decoding of *another* source's embedding (the next
scene's), judged against c: what a random sample of the model scores on c. A decoder that reads the embedding
keeps the verdict far more often than that baseline; one that ignores it scores about the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from t2i.data.shapes.rendering import render
from t2i.eval.shapes_clip import heldout_scenes
from t2i.eval.shapes_judge import judge

# Sources are rendered at least at the shapes CLIP's input side, as the training images it embedded were (a
# smaller render, upsampled by CLIP's preprocessing, is a blurrier image than any it saw).
SOURCE_SIZE = 64


def variation_agreement(pipe: Any, n: int = 50, per_source: int = 2, seed: int = 20_000, steps: int | None = None,
                        out: str | Path | None = None, guidance: float | None = None) -> dict[str, float]:
    """The share of variations the judge passes on their source's caption, against the same share for variations
    of another scene (the random-sample baseline), and the rendered sources' own pass rate (the judge's ceiling).
    pipe: an UnCLIPPipeline with a CLIP image tower. steps, guidance: the decoder's (None: the model's). out: a
    folder for results.json (optional)."""
    scenes = heldout_scenes(n, fresh_seed=seed)
    size = max(pipe.capabilities.native_size[0], SOURCE_SIZE)
    sources = [render(scene, size) for scene, _ in scenes]
    captions = [caption for _, caption in scenes]
    settings = {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
    kept = baseline = source_ok = 0
    pairs: list[tuple[int, int]] = []  # per source: (its variations that pass, the other scene's that pass)
    for i, (image, caption) in enumerate(zip(sources, captions, strict=True)):
        source_ok += judge(image, caption).ok
        own = pipe.variations(image, per_source, seed=seed + 2 * i * per_source, **settings).images
        other = pipe.variations(sources[(i + 1) % n], per_source, seed=seed + (2 * i + 1) * per_source,
                                **settings).images
        pairs.append((sum(judge(v, caption).ok for v in own), sum(judge(v, caption).ok for v in other)))
        kept, baseline = kept + pairs[-1][0], baseline + pairs[-1][1]
    total = n * per_source
    result = {"n": n, "per_source": per_source, "variation_pass": kept / total, "random_pass": baseline / total,
              "source_pass": source_ok / n, "guidance": pipe.settings.embedding_guidance} | settings
    if out is not None:  # with the per-source counts, for a paired test
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps(result | {"pairs": pairs}, indent=2))
    return result


@torch.no_grad()
def prior_retrieval(pipe: Any, n: int = 100, seed: int = 20_000, steps: int | None = None,
                    guidance: float | None = None) -> dict[str, float]:
    """The prior alone, on held-out shapes scenes: for each true caption, one prior sample z (seed + i) is ranked
    by cosine against the CLIP image embeddings of all n rendered scenes. top1: the caption's own scene ranks
    first; cos_own / cos_other: mean cosine to the own scene / to the others. (A prior that ignores its text
    gives top1 about 1 / n and cos_own about cos_other.) steps, guidance: the prior's (None: the model's)."""
    from t2i.seeds import seed_generators

    scenes = heldout_scenes(n, fresh_seed=seed)
    size = max(pipe.capabilities.native_size[0], SOURCE_SIZE)
    images = F.normalize(pipe.embed_images([render(scene, size) for scene, _ in scenes]), dim=-1)  # (n, E)
    captions = [caption for _, caption in scenes]
    cond, uncond = pipe.encode_text(captions), pipe.encode_text([""] * n)
    z = F.normalize(pipe.sample_prior(cond, uncond, seed_generators([seed + i for i in range(n)]), steps, guidance),
                    dim=-1)
    cos = z @ images.T  # (n, n): caption i's sample against scene j
    own = cos.diagonal()
    other = (cos.sum() - own.sum()) / (n * (n - 1))
    top1 = (cos.argmax(dim=1) == torch.arange(n)).float().mean()
    used = pipe.settings.prior_guidance if guidance is None else guidance
    return {"n": n, "top1": top1.item(), "cos_own": own.mean().item(), "cos_other": other.item(), "guidance": used}
