"""VQGAN-CLIP: the optimisation raises the CLIP similarity of the decoded image to the prompt, its output is
on the codebook, it is seeded, and a tokenizer file generates through the registry as a family."""

from __future__ import annotations

import pytest
import torch

import t2i
from t2i.eval.shapes_clip import ShapesCLIP, ShapesCLIPConfig
from t2i.systems.registry import resolve
from t2i.systems.token_models import tiny_tokenizer
from t2i.systems.vqgan_clip import (
    SYSTEM,
    VQGANCLIPConfig,
    VQGANCLIPPipeline,
    make_cutouts,
    optimise_codes,
    snap,
    spherical_distance,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_clip() -> ShapesCLIP:
    torch.manual_seed(0)
    return ShapesCLIP(ShapesCLIPConfig(image_size=16, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
                                       text_width=32, text_layers=1, text_heads=2, embed_dim=32)).eval()


def test_spherical_distance_is_half_the_squared_angle():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    angle = torch.arccos((a * b).sum(-1).clamp(-1, 1))
    assert torch.allclose(spherical_distance(a, b), angle ** 2 / 2, atol=1e-5)
    assert spherical_distance(b, b).abs().max() < 1e-6


def test_snap_is_the_nearest_code_with_the_straight_through_gradient():
    codebook = torch.randn(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, codes = snap(z, codebook)
    dist = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1)  # (2, 3, 3, 16)
    assert torch.equal(codes, dist.argmin(-1))
    assert torch.allclose(z_q.detach(), codebook[codes].permute(0, 3, 1, 2), atol=1e-6)  # z + (e - z): rounding
    (z_q * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
    assert torch.equal(z.grad, torch.arange(4.0).view(1, 4, 1, 1).expand_as(z))


def test_cutouts_are_seeded_views_of_the_requested_size():
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    a, b = (make_cutouts(image, 6, 8, 0.5, 0.0, torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == (6, 3, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, make_cutouts(image, 6, 8, 0.5, 0.0, torch.Generator().manual_seed(2)))
    full = make_cutouts(image, 1, 16, 1.0, 0.0, torch.Generator())  # cut_min 1: the whole image
    assert torch.allclose(full, image, atol=1e-6)


def test_the_optimisation_raises_the_clip_similarity_and_ends_on_the_codebook():
    """On a tiny tokenizer and a tiny CLIP (one 16x16 patch, so that its random image tower responds to
    the pixels): the output's cosine to the prompt ends far above its random start and above 200 random
    code maps' mean + 2 std (measured: start 0.05, random 0.04 +- 0.05, output 0.21), the loss falls,
    every latent of the output is a codebook entry, and the same seed gives the same codes."""
    vq, clip = tiny_tokenizer(), _tiny_clip()
    text = clip.embed_texts(["a red circle"])
    cfg = VQGANCLIPConfig(cutouts=4, cut_min=0.9, noise=0.02, lr=0.3)

    def cosine(codes):
        with torch.no_grad():
            return clip.encode_images(vq.decode_codes(codes).clamp(-1, 1)) @ text[0]  # (B,)

    start = torch.randint(0, 32, (1, 4, 4), generator=torch.Generator().manual_seed(1))  # optimise_codes' first draw
    random = cosine(torch.randint(0, 32, (200, 4, 4), generator=torch.Generator().manual_seed(5)))
    losses = []
    codes = optimise_codes(vq, clip, text, (4, 4), cfg, torch.Generator().manual_seed(1), 60,
                           lambda i, pixels, loss: losses.append(loss))
    got = float(cosine(codes)[0])
    print(f"cosine start {float(cosine(start)[0]):.3f}, random {random.mean():.3f} +- {random.std():.3f}, "
          f"output {got:.3f}; loss {losses[0]:.4f} -> {min(losses[-5:]):.4f}")
    assert codes.shape == (1, 4, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 32
    assert got > float(cosine(start)[0]) + 0.1 and got > float(random.mean() + 2 * random.std())
    assert min(losses[-5:]) < losses[0]
    again = optimise_codes(vq, clip, text, (4, 4), cfg, torch.Generator().manual_seed(1), 60)
    assert torch.equal(codes, again)  # seeded: the same codes for the same seed


def test_a_tokenizer_file_generates_through_the_registry(tmp_path):
    path = SYSTEM.write_tiny(tmp_path, 0)
    assert resolve(path)[0].name == "vqgan_clip"
    pipe = t2i.load(path)
    assert isinstance(pipe, VQGANCLIPPipeline) and pipe.capabilities.native_size == (16, 16)
    pipe.clip = _tiny_clip()
    steps = []
    a = pipe.generate(["a red circle", "a blue square"], seed=3, steps=3, callback=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 6) for i in range(1, 7)] and a.sample.shape == (2, 4, 4) and a.seeds == [3, 3]
    assert torch.equal(pipe.generate("a blue square", seed=3, steps=3).sample[0], a.sample[1])
    assert not torch.equal(pipe.generate("a red circle", seed=4, steps=3).sample, a.sample[:1])
    wide = pipe.generate("a red circle", seed=3, steps=1, width=32, height=16)
    assert wide.images[0].size == (32, 16) and wide.sample.shape == (1, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        pipe.generate("a red circle", width=18)
