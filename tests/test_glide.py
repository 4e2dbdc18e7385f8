"""GLIDE (Nichol et al. 2021): the network (a caption transformer read by unCLIP's / GLIDE's U-Net through the time
embedding and every attention layer), `t2i train glide` (loss falls, 20% empty captions, resume exactness), the
noise-aware CLIP and CLIP guidance (the guided x0 against autograd by hand; guided samples score higher under CLIP).
The four interfaces (API, CLI, server, eval) are tests/test_families.py's, which every registered family gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clip_guidance_helpers import PROMPTS, clip_scores

from t2i.checkpoints.io import load_state_dict
from t2i.diffusion.clip_guidance import ClipGuidance
from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.losses import HybridLoss
from t2i.eval.shapes_clip import ShapesCLIP
from t2i.nets.glide import GlideNet, preset
from t2i.nets.glide_clip import from_clean, load_noisy_clip, save_noisy_clip
from t2i.systems.glide import GlideConfig, GlideNets, glide_schedule, load, read_glide, save_glide, shapes_words
from t2i.text.words import SPECIALS, WordTokenizer
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.glide import GlideTrainConfig, NoisyCLIPTrainConfig, caption_dropout, train_glide, train_noisy_clip

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = len(SPECIALS) + len(shapes_words())
COMMON = dict(image_size=16, batch_size=8, lr=3e-3, warmup=5, ckpt_every=1000, image_every=0, log_every=5, seed=0,
              ema_decay=0.0, threads=1)


def _tokens(texts: list[str], length: int = 12) -> torch.Tensor:
    return WordTokenizer(shapes_words(), length)(texts)


def test_network_shapes_and_both_text_paths():
    """Base (3 -> 6 channels: eps, variance values) and upsampler (noisy image + low-res -> 6) keep the image size;
    the caption changes the output through the time embedding (final token) and through the attention (the token
    sequence as extra keys/values): zeroing either path alone still leaves a caption-dependent output."""
    torch.manual_seed(0)
    base, up = GlideNet(preset("tiny_base", VOCAB)).eval(), GlideNet(preset("tiny_up", VOCAB)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 600.0])
    a, b = _tokens(["a red circle", "a red circle"]), _tokens(["two blue squares", "a red circle"])
    with torch.no_grad():
        out = base(x, t, a)
        assert out.shape == (2, 6, 16, 16)
        assert up(torch.randn(2, 3, 32, 32), t, a, low_res=torch.randn(2, 3, 16, 16)).shape == (2, 6, 32, 32)
        diff = (base(x, t, b) - out).abs().flatten(1).amax(1)
        assert diff[0] > 1e-4 and diff[1] == 0  # row 0's caption changed, row 1's did not
        ea, eb = base.encode(a), base.encode(b)
        assert ea["context"].shape == (2, 12, 16) and ea["class_emb"].shape == (2, 4 * 16)
        for path in ("class_emb", "context"):  # each path alone carries the caption
            mixed = base.unet(x, t, **{**ea, path: eb[path]})
            assert (mixed - out).abs()[0].max() > 1e-5
    with pytest.raises(ValueError, match="low_res"):
        up(torch.randn(1, 3, 32, 32), t[:1], a[:1])


def test_caption_dropout_empties_a_fifth_of_the_captions_reproducibly():
    captions = [f"a red circle {i}" for i in range(5000)]
    dropped = caption_dropout(captions, 0.2, torch.Generator().manual_seed(3))
    share = sum(c == "" for c in dropped) / len(captions)
    assert 0.18 < share < 0.22
    assert all(d in ("", c) for d, c in zip(dropped, captions, strict=True))
    assert dropped == caption_dropout(captions, 0.2, torch.Generator().manual_seed(3))
    assert GlideTrainConfig(out="").caption_dropout == 0.2  # GLIDE's 20%
    empty = _tokens([""])
    assert empty[0, 0] == 1 and (empty[0, 1:] == 0).all()  # [BOS] then padding: the unconditional input


def _held_out_loss(path: Path) -> float:
    """L_simple (of the file's parameterisation) of the file's base network on 16 held-out scenes, averaged over 4
    draws of t and noise."""
    nets = read_glide(path)
    x, captions, _ = open_data("shapes", None, 16, 123, print).batch(0, 16, DistInfo())
    cond = {"tokens": WordTokenizer(nets.cfg.words, nets.cfg.base.text.length)(captions)}
    loss = HybridLoss(nets.cfg.schedule.alphas_cumprod(), nets.cfg.schedule.prediction_type)
    with torch.no_grad():
        return sum(loss.terms(nets.base, x, cond, torch.Generator().manual_seed(k))[0].mean().item()
                   for k in range(4)) / 4


def test_train_glide_lowers_the_loss_and_exports_a_cascade(tmp_path):
    """30 steps of the tiny base (the caption transformer trained with it) cut the held-out eps loss well below
    a 1-step run's; an upsampler run on top exports base + upsampler in one file that generates 32x32 images."""
    runs = {}
    for steps in (1, 30):
        out = tmp_path / f"base{steps}"
        lr = 1e-12 if steps == 1 else COMMON["lr"]
        assert train_glide(GlideTrainConfig(out=str(out), preset="tiny_base", steps=steps,
                                            **{**COMMON, "lr": lr})) == 0
        runs[steps] = out / "model.safetensors"
    before, after = _held_out_loss(runs[1]), _held_out_loss(runs[30])
    print(f"GLIDE base: held-out eps loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    assert "glide/vlb_bpd" in (tmp_path / "base30" / "log.txt").read_text()
    out = tmp_path / "up"
    assert train_glide(GlideTrainConfig(out=str(out), stage="up", preset="tiny_up", base_from=str(runs[30]),
                                        steps=2, **COMMON)) == 0
    pipe = load(out / "model.safetensors")
    assert pipe.nets.up is not None and pipe.capabilities.native_size == (32, 32)
    assert pipe.generate("a red circle", seed=0, steps=2).images[0].size == (32, 32)
    exported, trained_base = load_state_dict(out / "model.safetensors"), load_state_dict(runs[30])
    assert all(torch.equal(v, trained_base[k]) for k, v in exported.items() if k.startswith("base."))
    with pytest.raises(ValueError, match="base-from"):
        train_glide(GlideTrainConfig(out=str(tmp_path / "no"), stage="up", preset="tiny_up", steps=1, **COMMON))


def test_train_glide_v_prediction_base_and_upsampler(tmp_path):
    """`t2i train glide --prediction v_prediction` (base, then an upsampler on it): 30 steps cut the held-out v loss
    (v's target has unit variance at every t: it starts lower and falls less than eps's) and the file says v for
    both stages; an eps upsampler trained on the v base keeps its own type next to the base's, and the cascade
    samples. The 30-step run goes through the CLI."""
    from t2i.cli import main

    v = dict(COMMON, prediction_type="v_prediction")
    assert train_glide(GlideTrainConfig(out=str(tmp_path / "base1"), preset="tiny_base", steps=1,
                                        **{**v, "lr": 1e-12})) == 0
    flags = [f"--{k.replace('_', '-')}={x}" for k, x in COMMON.items()]
    assert main(["train", "glide", "--out", str(tmp_path / "base30"), "--preset", "tiny_base", "--steps", "30",
                 "--prediction", "v_prediction", *flags]) == 0
    runs = {n: tmp_path / f"base{n}" / "model.safetensors" for n in (1, 30)}
    before, after = _held_out_loss(runs[1]), _held_out_loss(runs[30])
    print(f"GLIDE v base: held-out v loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    for kind in ("v_prediction", "epsilon"):
        out = tmp_path / f"up_{kind}"
        assert train_glide(GlideTrainConfig(out=str(out), stage="up", preset="tiny_up", base_from=str(runs[30]),
                                            steps=2, **{**COMMON, "prediction_type": kind})) == 0
        cfg = read_glide(out / "model.safetensors").cfg
        assert (cfg.stage_schedule("base").prediction_type, cfg.stage_schedule("up").prediction_type) == \
            ("v_prediction", kind)
    # a new base trained next to that eps upsampler (--up-from) leaves the upsampler's type as it was
    out = tmp_path / "base_again"
    assert train_glide(GlideTrainConfig(out=str(out), preset="tiny_base", steps=1,
                                        up_from=str(tmp_path / "up_epsilon" / "model.safetensors"), **v)) == 0
    cfg = read_glide(out / "model.safetensors").cfg
    assert (cfg.schedule.prediction_type, cfg.stage_schedule("up").prediction_type) == ("v_prediction", "epsilon")
    assert load(out / "model.safetensors").generate("a red circle", seed=0, steps=2).images[0].size == (32, 32)


class _AsV(torch.nn.Module):
    """An eps + variance GLIDE network as the v + variance network of the same x0 and variance:
    v = eps / sqrt(acp) - sqrt((1 - acp) / acp) x_t (from x_t = sqrt(acp) x0 + sqrt(1 - acp) eps and
    v = sqrt(acp) eps - sqrt(1 - acp) x0), in float64 at the network's integer timesteps."""

    def __init__(self, net: GlideNet, acp: torch.Tensor) -> None:
        super().__init__()
        self.net, self.cfg, self.acp = net, net.cfg, acp.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        eps, var = self.net(x, t, tokens, **kw).chunk(2, dim=1)
        a = self.acp[t.round().long()].reshape(-1, 1, 1, 1)
        v = eps.double() / a.sqrt() - ((1 - a) / a).sqrt() * x.double()
        return torch.cat([v.float(), var], dim=1)


@pytest.mark.parametrize("v_stage", ["base", "up"])
def test_each_stage_is_sampled_with_its_own_prediction_type(v_stage):
    """A random eps cascade, and the same cascade with one stage's network turned into the v network of the same
    x0 (`_AsV`) and the config saying so for that stage only (the other stage's type stated as eps): the two sample
    the same images (learned-variance ddpm steps, CFG on the base); with the v stage read as eps they do not. The
    base's differences stay below the 8-bit grid it hands over on."""
    from t2i.systems.glide import GlidePipeline

    torch.manual_seed(0)
    cfg = GlideConfig(base=preset("tiny_base", VOCAB), up=preset("tiny_up", VOCAB))
    nets = GlideNets(cfg)
    with torch.no_grad():
        for p in nets.parameters():  # the zero-initialised output layers would hide the parameterisation
            p.add_(0.02 * torch.randn_like(p))
    acp = cfg.schedule.alphas_cumprod()
    v_cfg = GlideConfig(**{**cfg.__dict__, "schedule": glide_schedule("v_prediction"), "up_prediction_type": "epsilon"}
                        if v_stage == "base" else {**cfg.__dict__, "up_prediction_type": "v_prediction"})
    stages = {"base": nets.base, "up": nets.up, v_stage: _AsV(getattr(nets, v_stage), acp)}
    request = dict(seed=[0, 1], steps=6, guidance=3.0)
    prompts = ["a red circle", "two blue squares"]
    eps = GlidePipeline(nets).generate(prompts, **request).sample
    same = GlidePipeline(GlideNets(v_cfg, **stages)).generate(prompts, **request).sample
    err = (same - eps).abs().max().item()
    print(f"v {v_stage}: max difference {err:.2e}")
    assert err < 1e-3
    # the v stage read as eps (the eps cascade's config)
    assert (GlidePipeline(GlideNets(cfg, **stages)).generate(prompts, **request).sample - eps).abs().max() > 0.1


def test_a_file_without_up_prediction_type_reads_as_eps_and_a_v_file_round_trips(tmp_path):
    """Files written before per-stage prediction types (no up_prediction_type) read as eps for both stages; a v
    cascade's file keeps v and samples as the networks in memory; an unknown type is refused."""
    import dataclasses

    from t2i.systems.glide import GlidePipeline

    old = dataclasses.asdict(GlideConfig(base=preset("tiny_base", VOCAB), up=preset("tiny_up", VOCAB)))
    del old["up_prediction_type"]
    cfg = GlideConfig.from_dict(old)
    assert cfg.stage_schedule("base").prediction_type == cfg.stage_schedule("up").prediction_type == "epsilon"
    torch.manual_seed(0)
    v_cfg = dataclasses.replace(cfg, schedule=glide_schedule("v_prediction"))
    nets = GlideNets(v_cfg)
    save_glide(nets.base, nets.up, v_cfg, tmp_path / "v.safetensors")
    pipe = load(tmp_path / "v.safetensors")
    assert pipe.cfg.stage_schedule("up").prediction_type == "v_prediction"
    request = dict(seed=0, steps=3, guidance=3.0)
    torch.testing.assert_close(pipe.generate("a red circle", **request).sample,
                               GlidePipeline(nets).generate("a red circle", **request).sample, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="up_prediction_type"):
        dataclasses.replace(cfg, up_prediction_type="eps")


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = {**COMMON, "ckpt_every": 2, "ema_decay": 0.9}

    def run(out: Path, steps: int, resume: bool = False) -> int:
        return train_glide(GlideTrainConfig(out=str(out), preset="tiny_base", steps=steps, **common), resume=resume)

    assert run(tmp_path / "straight", 4) == 0
    assert run(tmp_path / "parts", 2) == 0
    assert run(tmp_path / "parts", 4, resume=True) == 0
    a, b = (load_state_dict(tmp_path / r / "model.safetensors") for r in ("straight", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# The noise-aware CLIP and CLIP guidance
# ---------------------------------------------------------------------------------------


def test_noisy_clip_starts_as_the_clean_clip_and_its_file_round_trips(tmp_path):
    clip = ShapesCLIP.load()
    noisy = from_clean(clip, 16).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        clean = clip.encode_images(torch.nn.functional.interpolate(x, (64, 64), mode="bilinear"))
        for t in (0.0, 900.0):  # the zero-initialised time embedding: every t reads like the clean tower
            torch.testing.assert_close(noisy.encode_noisy(x, torch.full((2,), t)), clean)
        noisy.time_embedding.linear_2.weight.normal_(std=0.1)  # (a constant over channels, LayerNorm would remove)
        moved = noisy.encode_noisy(x, torch.full((2,), 500.0))
    assert (moved - clean).abs().max() > 1e-3  # once trained, t reaches the embedding
    save_noisy_clip(noisy, glide_schedule(), tmp_path / "n.safetensors")
    again, schedule = load_noisy_clip(tmp_path / "n.safetensors")
    assert schedule.beta_schedule == "squaredcos_cap_v2"
    with torch.no_grad():
        torch.testing.assert_close(again.encode_noisy(x, torch.full((2,), 500.0)), moved)


def test_clip_guided_x0_equals_the_similarity_gradient_by_hand():
    """D' = D + s sigma^2 grad_x (f(x_vp(x), t) . g), with x_vp = x / sqrt(1 + sigma^2): autograd through x itself
    (the chain rule ClipGuidance writes out) gives the same shift."""
    torch.manual_seed(0)
    acp = glide_schedule().alphas_cumprod()
    w = torch.randn(8, 3 * 4 * 4)

    def encoder(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tanh(x_vp.flatten(1) @ w.T) + 1e-3 * t[:, None], dim=-1)

    den = DiscreteDenoiser(lambda x, t: torch.sin(x), acp)
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    sigma = torch.tensor([0.5, 3.0])
    x = torch.randn(2, 3, 4, 4) * (1 + sigma[:, None, None, None] ** 2).sqrt()
    ours = ClipGuidance(den, encoder, text, 4.0, den.sigma_to_t)(x, sigma)
    xr = x.clone().requires_grad_(True)
    sim = (encoder(xr / (1 + sigma[:, None, None, None] ** 2).sqrt(), den.sigma_to_t(sigma)) * text).sum()
    (grad,) = torch.autograd.grad(sim, xr)
    expected = den(x, sigma) + 4.0 * sigma[:, None, None, None] ** 2 * grad
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (ours - den(x, sigma)).abs().max() > 1e-2


def test_clip_guidance_raises_the_clip_score_of_the_samples(tmp_path):
    """A random tiny GLIDE base guided by the noise-aware CLIP (its clean start: the shipped CLIP): the final
    images' CLIP similarity to their prompt rises with the scale; the request field, `with_clip_guidance` and the
    PNG record agree; a file that is not a noise-aware CLIP and one of another schedule are refused."""
    from t2i.imageio import parse_parameters
    from t2i.systems.ddpm import ddpm_schedule

    torch.manual_seed(0)
    cfg = GlideConfig(base=preset("tiny_base", VOCAB))
    nets = GlideNets(cfg)
    save_glide(nets.base, None, cfg, tmp_path / "glide.safetensors")
    save_noisy_clip(from_clean(ShapesCLIP.load(), 16), glide_schedule(), tmp_path / "clip.safetensors")
    pipe = load(tmp_path / "glide.safetensors")
    prompts = PROMPTS
    settings = dict(seed=list(range(8)), steps=25, guidance=1.0)
    plain = pipe.generate(prompts, **settings).sample
    guided = pipe.generate(prompts, classifier=tmp_path / "clip.safetensors", classifier_scale=100.0, **settings)
    before, after = clip_scores(plain, prompts), clip_scores(guided.sample, prompts)
    print(f"CLIP score unguided {before.mean():.3f} {before.tolist()} -> guided {after.mean():.3f} {after.tolist()}")
    assert after.mean() > before.mean() + 0.05 and (after > before).sum() >= 6  # measured: +0.11, 8 of 8
    params = parse_parameters(guided.images[0].info["parameters"])
    assert params["Classifier"] == "clip" and float(params["Classifier scale"]) == 100.0
    by_method = pipe.with_clip_guidance(tmp_path / "clip.safetensors", 100.0).generate(prompts, **settings).sample
    assert torch.equal(by_method, guided.sample)
    from PIL import Image

    from t2i.cli import main

    out = tmp_path / "cli.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "glide.safetensors"), "--steps", "25",
                 "--seed", "0", "--guidance", "1", "--classifier", str(tmp_path / "clip.safetensors"),
                 "--classifier-scale", "100", "--quiet", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert parse_parameters(im.info["parameters"])["Classifier"] == "clip"
        single = pipe.generate("a red circle", seed=0, steps=25, guidance=1.0)  # with_clip_guidance's, as the CLI's
        assert im.convert("RGB").tobytes() == single.images[0].tobytes()  # the CLI is the API
    with pytest.raises(ValueError, match="noise-aware CLIP"):
        pipe.generate("a red circle", steps=2, classifier=tmp_path / "glide.safetensors")
    save_noisy_clip(from_clean(ShapesCLIP.load(), 16), ddpm_schedule(), tmp_path / "linear.safetensors")
    with pytest.raises(ValueError, match="another noise schedule"):
        pipe.with_clip_guidance(tmp_path / "linear.safetensors", 1.0)


def test_train_noisy_clip_lowers_its_loss_on_noised_images(tmp_path):
    """From the shipped CLIP, 12 steps on noised 16x16 images lower the contrastive loss on held-out noised
    images (fixed draws) against the frozen text tower, which stays bit for bit the shipped one."""
    out = tmp_path / "nc"
    assert train_noisy_clip(NoisyCLIPTrainConfig(out=str(out), image_size=16, steps=12, batch_size=32, lr=3e-4,
                                                 warmup=1, ckpt_every=1000, log_every=4, threads=1)) == 0
    from t2i.diffusion.losses import DiffusionLoss
    from t2i.eval.shapes_clip import contrastive_loss

    trained, _ = load_noisy_clip(out / "noisy_clip.safetensors")
    start = from_clean(ShapesCLIP.load(), 16).eval()
    x, captions, _ = open_data("shapes", None, 16, 321, print).batch(0, 64, DistInfo())
    t, _, _, x_t = DiffusionLoss(glide_schedule().alphas_cumprod()).noised(x, torch.Generator().manual_seed(0))

    def loss(model) -> float:
        with torch.no_grad():
            logits = model.clip.logit_scale.exp() * model.encode_noisy(x_t, t.float()) @ model.embed_texts(captions).T
            return contrastive_loss(logits, captions).item()

    before, after = loss(start), loss(trained)
    print(f"noisy CLIP held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.05
    shipped = ShapesCLIP.load().state_dict()
    assert all(torch.equal(v, shipped[k.removeprefix("clip.")]) for k, v in trained.state_dict().items()
               if k.startswith("clip.text."))


def test_clip_guidance_refuses_a_scale_without_a_clip_and_an_adm_classifier(tmp_path):
    """A classifier_scale with no CLIP to guide with is refused before any work (it used to be ignored: an unguided
    image whose PNG kept quiet about the scale); `with_clip_guidance`'s file takes a request's own scale; an ADM
    classifier file is refused by `check_classifier`, what `t2i serve --classifier` checks its files with."""
    from t2i.nets.classifier import NoisyClassifier, NoisyClassifierConfig, save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS
    from t2i.systems.base import GenerationRequest, UnsupportedOption
    from t2i.systems.glide import GlidePipeline

    torch.manual_seed(0)
    pipe = GlidePipeline(GlideNets(GlideConfig(base=preset("tiny_base", VOCAB))))
    for refuse in (lambda: pipe.check_guidance(GenerationRequest("a red circle", classifier_scale=3.0)),
                   lambda: pipe.generate("a red circle", steps=1, classifier_scale=3.0)):
        with pytest.raises(UnsupportedOption, match="classifier_scale needs classifier") as e:
            refuse()
        assert e.value.option == "classifier_scale"
    adm = NoisyClassifier(NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny_uncond"], num_classes=2))
    save_noisy_classifier(adm, tmp_path / "adm.safetensors", ["red", "blue"], glide_schedule())
    with pytest.raises(ValueError, match="noise-aware CLIP"):
        pipe.check_classifier(tmp_path / "adm.safetensors")
    save_noisy_clip(from_clean(ShapesCLIP.load(), 16), glide_schedule(), tmp_path / "clip.safetensors")
    settings = dict(seed=0, steps=3, guidance=1.0)
    named = pipe.generate("a red circle", classifier=tmp_path / "clip.safetensors", classifier_scale=30.0, **settings)
    pipe.with_clip_guidance(tmp_path / "clip.safetensors", 100.0)
    assert torch.equal(pipe.generate("a red circle", classifier_scale=30.0, **settings).sample, named.sample)
    assert not torch.equal(pipe.generate("a red circle", **settings).sample, named.sample)
