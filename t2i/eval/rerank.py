"""Sample-and-rank (DALL-E's and DALL-E mini's reranking; seed 000, 12.2): draw K candidates per
requested image and keep the one a CLIP model finds closest to the prompt.

Candidates are ordinary generations: output image j of a prompt with seed s is chosen among
the images of seeds s + j*K, ..., s + j*K + K - 1 (so `--rerank 1` is plain generation, and
every kept image can be regenerated alone from the seed in its parameters). The ranking uses
the cosine similarity (the CLIP score before clipping at 0, so candidates that all score 0
are still ordered); the kept image's PNG parameters gain `Rerank: K` and its CLIP score
(100 * max(cos, 0), as `t2i.eval.clip_score`).

Any `ImageTextEmbedder` ranks; the default is the shipped shapes CLIP (t2i.eval.shapes_clip).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from t2i.eval.clip_score import CLIP_SCORE_WEIGHT, ImageTextEmbedder, cosine_matrix
from t2i.layout.spec import Layout
from t2i.systems.base import GenerationRequest, Pipeline


@dataclass
class Ranking:
    """best: index of the kept candidate. cosines: (K,) cosine similarity of every candidate to the prompt."""

    best: int
    cosines: list[float]

    @property
    def score(self) -> float:
        """The kept candidate's CLIP score, 100 * max(cos, 0)."""
        return CLIP_SCORE_WEIGHT * max(self.cosines[self.best], 0.0)


def rank(embedder: ImageTextEmbedder, images: Sequence[Image.Image], prompt: str) -> Ranking:
    """Rank K candidate images for one prompt; the first of equal maxima wins."""
    if not images:
        raise ValueError("nothing to rank: no candidate images")
    cos = cosine_matrix(embedder.embed_images(list(images)), embedder.embed_texts([prompt]))[:, 0]  # (K,)
    return Ranking(int(cos.argmax()), [float(c) for c in cos])


def default_embedder() -> ImageTextEmbedder:
    """The shipped shapes CLIP (t2i/assets/shapes_clip/)."""
    from t2i.eval.shapes_clip import ShapesCLIP

    return ShapesCLIP.load()


def load_embedder(path: str | None) -> ImageTextEmbedder:
    """None: the shipped shapes CLIP; a folder: a CLIP in the transformers layout; a file: a shapes CLIP."""
    if path is None:
        return default_embedder()
    from pathlib import Path

    if Path(path).is_dir():
        from t2i.eval.clip_score import load_clip

        return load_clip(path)
    from t2i.eval.shapes_clip import ShapesCLIP

    return ShapesCLIP.load(path)


def generate_reranked(pipe, prompt: str | list[str], rerank: int, embedder: ImageTextEmbedder | None = None, *,
                      seed: int | list[int] = 0, num_images: int = 1, **settings):
    """`pipe.generate` with K = rerank candidates per output image: `run_reranked` of the request
    these keyword arguments make (settings: steps, guidance, sampler, ... of GenerationRequest)."""
    request = GenerationRequest(prompt, seed=seed, num_images=num_images, **settings)
    return run_reranked(pipe, request, rerank, embedder)


def run_reranked(pipe: Pipeline, request: GenerationRequest, rerank: int, embedder: ImageTextEmbedder | None = None):
    """`pipe.run(request)` with K = rerank candidates per output image; returns a GenerationResult of the
    kept images (request.num_images per prompt), their final samples (N, ...) and seeds."""
    if rerank < 1:
        raise ValueError(f"rerank must be at least 1, got {rerank}")
    num_images = request.num_images
    result = pipe.run(replace(request, num_images=num_images * rerank))
    if rerank == 1:
        return result
    embedder = embedder or default_embedder()
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    keep: list[int] = []
    for g in range(len(result.images) // rerank):  # group g: output g % num_images of prompt g // num_images
        lo = g * rerank
        ranking = rank(embedder, result.images[lo: lo + rerank], prompts[g // num_images])
        kept = result.images[lo + ranking.best]
        kept.info["parameters"] = (kept.info.get("parameters", "")
                                   + f", Rerank: {rerank}, CLIP score: {ranking.score:.2f}")
        keep.append(lo + ranking.best)
    result.images = [result.images[i] for i in keep]
    result.sample = result.sample[torch.tensor(keep)]
    result.seeds = [result.seeds[i] for i in keep]
    return result


def judge_rerank_gain(pipe, prompts: Sequence[str], k: int, embedder: ImageTextEmbedder | None = None, *,
                      seed: int = 0, layouts: Sequence[Layout] | None = None, **settings) -> dict:
    """Shapes-judge accuracy of `--rerank 1` against `--rerank k` on the same draws.

    Each prompt gets k candidates (seeds seed .. seed + k - 1): candidate 0 is exactly what
    rerank 1 returns, the CLIP's best is what rerank k returns. layouts: one per prompt, drawn
    as given (a layout model's `layout` option). Returns {"n", "k", "rerank_1", "rerank_k"}
    (shares of prompts the judge accepts) and per-prompt verdicts.
    """
    from t2i.eval.shapes_judge import judge

    embedder = embedder or default_embedder()
    plain, best, rows = 0, 0, []
    for i, prompt in enumerate(prompts):
        given = {"layout": layouts[i]} if layouts is not None else {}
        images = pipe.generate(prompt, seed=seed, num_images=k, **settings, **given).images
        r = rank(embedder, images, prompt)
        ok = [judge(im, prompt).ok for im in images]
        plain, best = plain + ok[0], best + ok[r.best]
        rows.append({"prompt": prompt, "candidates_ok": ok, "kept": r.best, "cosines": r.cosines})
    n = len(prompts)
    return {"n": n, "k": k, "rerank_1": plain / n, "rerank_k": best / n, "per_prompt": rows}
