"""ADM classifier guidance (Dhariwal & Nichol 2021): the guided x0 against a hand-computed case and ADM's
eps form, next to CFG; the noise-aware classifier (the pixel U-Net's encoder half) and a tiny run of
`t2i train classifier` whose held-out accuracy rises."""

from __future__ import annotations

import pytest
import torch
from clip_guidance_helpers import PROMPTS, clip_scores

import t2i
from t2i.diffusion.classifier_guidance import ClassifierGuidance
from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.losses import NoisyClassifierLoss
from t2i.nets.classifier import NoisyClassifier, NoisyClassifierConfig, load_noisy_classifier
from t2i.systems.base import GenerationRequest
from t2i.systems.ddpm import ddpm_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


class _Linear:
    """logits = W x_vp.flatten() + b, whose log-softmax gradient is known in closed form."""

    def __init__(self, k: int, d: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.W, self.b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)

    def __call__(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_vp.flatten(1) @ self.W.T + self.b


def _eps_net(x_vp: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """An 'eps network' (deterministic, nonlinear) standing in for a U-Net."""
    return torch.tanh(x_vp * 1.3 + 0.01 * t.reshape(-1, 1, 1, 1)) + cond.get("shift", 0.0)


def test_guided_x0_equals_the_hand_computed_eps_shift():
    """eps' = eps - sqrt(1 - abar) s grad_{x_vp} log p(y | x_vp) (ADM Algorithm 2), with the softmax gradient of a
    linear classifier written out, W_y - sum_k p_k W_k; then x0' = (x_vp - sqrt(1 - abar) eps') / sqrt(abar)."""
    acp = ddpm_schedule().alphas_cumprod()
    den = DiscreteDenoiser(_eps_net, acp)
    clf, labels, scale = _Linear(4, 3 * 2 * 2), torch.tensor([1, 3]), 2.5
    guided = ClassifierGuidance(den, clf, labels, scale, den.sigma_to_t)
    t = torch.tensor([100, 700])
    a = acp[t].double().reshape(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt().float().reshape(-1)
    x_vp = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)).double()
    x = (x_vp / a.sqrt()).float()  # VE input
    ours = guided(x, sigma)
    # by hand, in float64
    p = torch.softmax(x_vp.flatten(1) @ clf.W.double().T + clf.b.double(), dim=-1)  # (2, 4)
    grad = (clf.W.double()[labels] - p @ clf.W.double()).reshape(x_vp.shape)
    eps = _eps_net(x_vp.float(), den.sigma_to_t(sigma)).double()
    eps_guided = eps - (1 - a).sqrt() * scale * grad
    expected = (x_vp - (1 - a).sqrt() * eps_guided) / a.sqrt()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
    assert (ours - den(x, sigma)).abs().max() > 1e-2  # the guidance moved it
    assert torch.equal(ClassifierGuidance(den, clf, labels, 0.0, den.sigma_to_t)(x, sigma), den(x, sigma))


def test_classifier_guidance_composes_with_cfg():
    """Around CFG the classifier's shift adds to the CFG mix: D_cfg + s sigma^2 grad_x log p, whatever the CFG scale."""
    acp = ddpm_schedule().alphas_cumprod()
    den = DiscreteDenoiser(_eps_net, acp)
    clf, labels = _Linear(3, 3 * 2 * 2), torch.tensor([2])
    x, sigma = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(2)) * 3, torch.tensor([2.0])
    cond, uncond = {"shift": torch.full((1, 1, 1, 1), 0.3)}, {"shift": torch.zeros(1, 1, 1, 1)}
    shifts = []
    for w in (1.0, 4.0):
        cfg = CFGDenoiser(den, w)
        both = ClassifierGuidance(cfg, clf, labels, 3.0, den.sigma_to_t)
        shifts.append(both(x, sigma, cond=cond, uncond=uncond) - cfg(x, sigma, cond=cond, uncond=uncond))
    torch.testing.assert_close(shifts[0], shifts[1])
    assert shifts[0].abs().max() > 1e-3


def test_noisy_classifier_is_the_pixel_unets_encoder_half():
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet

    cfg = NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny_uncond"], num_classes=5)
    clf, unet = NoisyClassifier(cfg), PixelUNet(cfg.trunk)
    names = {k for k in clf.state_dict() if not k.startswith("head.")}
    unet_names = {k for k in unet.state_dict() if k.startswith(("conv_in", "time_", "down_blocks", "mid_block"))}
    assert names == unet_names  # the same blocks under the same names: the trunk loads from a U-Net
    logits = clf(torch.randn(3, 3, 16, 16), torch.tensor([0.0, 500.0, 999.0]))
    assert logits.shape == (3, 5)
    with pytest.raises(ValueError, match="unconditional"):
        NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny"])


def _accuracy(path) -> tuple[float, float]:
    """Held-out colour accuracy on 64 fixed one-object scenes (seed 123): (noised at t ~ U{0..T-1}, fixed
    draws; noised at t = 100, where the colour is still plain to see)."""
    from t2i.train.classifier import class_of
    from t2i.train.distributed import DistInfo
    from t2i.train.dit import SingleObjects

    net, labels, schedule = load_noisy_classifier(path)
    x, ids = SingleObjects(123, 16, 0.25).batch(0, 64, DistInfo())
    y = class_of(ids, "colour")
    acp = schedule.alphas_cumprod()
    loss = NoisyClassifierLoss(acp)
    with torch.no_grad():
        uniform = sum(loss.with_accuracy(net, x, y, torch.Generator().manual_seed(k))[1].item() for k in range(4)) / 4
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        x_t = acp[100].sqrt() * x + (1 - acp[100]).sqrt() * noise
        low = (net(x_t, torch.full((64,), 100.0)).argmax(-1) == y).float().mean().item()
    return uniform, low


def test_t2i_train_classifier_raises_its_held_out_accuracy(tmp_path):
    """`t2i train classifier --preset tiny --label colour`, 300 steps at 16x16 (~15 s): held-out accuracy among the
    8 colours rises from chance, at t = 100 and over t ~ U{0..T-1} (where half the images are nearly pure noise).
    Measured: t = 100 0.16 -> 0.38; uniform t 0.13 -> 0.22. (Shapes need more: a 32x32 run of thousands of steps.)"""
    from t2i.cli import main

    common = ["--preset", "tiny", "--label", "colour", "--image-size", "16", "--batch-size", "16", "--warmup", "5",
              "--ckpt-every", "1000", "--log-every", "100", "--seed", "0", "--threads", "1"]
    assert main(["train", "classifier", "--out", str(tmp_path / "r0"), "--steps", "1", "--lr", "1e-12", *common]) == 0
    assert main(["train", "classifier", "--out", str(tmp_path / "r"), "--steps", "300", "--lr", "2e-3", *common]) == 0
    (before, low_before), (after, low_after) = (_accuracy(tmp_path / r / "classifier.safetensors") for r in ("r0", "r"))
    print(f"held-out colour accuracy: t = 100 {low_before:.3f} -> {low_after:.3f}; uniform {before:.3f} -> {after:.3f}")
    assert low_after > low_before + 0.15 and after > before + 0.05
    assert "classifier/accuracy" in (tmp_path / "r" / "log.txt").read_text()
    _, labels, _ = load_noisy_classifier(tmp_path / "r" / "classifier.safetensors")
    assert labels == ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]


def test_ddpm_pipeline_with_classifier_guidance_raises_the_named_class_probability(tmp_path):
    """A random unconditional DDPM guided by a random classifier file: the final images' log p(named class | x, t=0)
    rises with the scale for the class the prompt names (and the classifier steers towards another class for
    another prompt); a prompt naming none is refused, and so is a classifier of another schedule."""
    from t2i.nets.classifier import save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.ddpm import DDPMPipeline

    torch.manual_seed(0)
    labels = ["red", "green", "blue"]
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny_uncond"], num_classes=3))
    with torch.no_grad():
        clf.head.weight.mul_(30.0)  # a decided classifier: a random one's gradients are tiny
    save_noisy_classifier(clf, tmp_path / "c.safetensors", labels, ddpm_schedule())
    pipe = DDPMPipeline(PixelUNet(PIXEL_UNET_PRESETS["tiny_uncond"]).eval(), ddpm_schedule())

    def log_p(prompt: str, scale: float) -> torch.Tensor:
        images = pipe.with_classifier(tmp_path / "c.safetensors", scale).generate(prompt, seed=0, num_images=2,
                                                                                  steps=10).sample
        with torch.no_grad():
            return torch.log_softmax(clf.eval()(images, torch.zeros(2)), -1)[:, labels.index(prompt.split()[1])]

    for prompt in ("a green circle", "a red circle"):  # blue is the unguided images' class already
        plain, guided = log_p(prompt, 0.0), log_p(prompt, 20.0)
        print(prompt, plain.tolist(), guided.tolist())
        assert (guided > plain + 0.5).all()
    with pytest.raises(ValueError, match="exactly one of red, green, blue"):
        pipe.with_classifier(tmp_path / "c.safetensors", 1.0).generate("a circle", steps=2)
    save_noisy_classifier(clf, tmp_path / "cos.safetensors", labels, ddpm_schedule("squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="another noise schedule"):
        pipe.with_classifier(tmp_path / "cos.safetensors", 1.0)


def test_a_ddpm_takes_glides_clip_guidance_from_a_noise_aware_clip_file(tmp_path):
    """The same `classifier` field with a `t2i train noisy-clip` file guides a DDPM towards each image's caption
    (GLIDE sec. 2.4), so one model compares CFG, classifier and CLIP guidance: a random unconditional tiny DDPM's
    final images rise in shapes-CLIP similarity to their prompts at scale 100 (any caption, no class to name), and
    the PNG names the file; a noise-aware CLIP of another schedule is refused."""
    from t2i.eval.shapes_clip import ShapesCLIP
    from t2i.imageio import parse_parameters
    from t2i.nets.glide_clip import from_clean, save_noisy_clip
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.ddpm import DDPMPipeline

    torch.manual_seed(0)
    clip = ShapesCLIP.load()
    save_noisy_clip(from_clean(clip, 16), ddpm_schedule(), tmp_path / "clip.safetensors")
    pipe = DDPMPipeline(PixelUNet(PIXEL_UNET_PRESETS["tiny_uncond"]).eval(), ddpm_schedule())
    settings = dict(seed=list(range(8)), steps=25)
    before = clip_scores(pipe.generate(PROMPTS, **settings).sample, PROMPTS)
    guided = pipe.generate(PROMPTS, classifier=tmp_path / "clip.safetensors", classifier_scale=100.0, **settings)
    after = clip_scores(guided.sample, PROMPTS)
    print(f"CLIP score unguided {before.mean():.3f} {before.tolist()} -> guided {after.mean():.3f} {after.tolist()}")
    assert after.mean() > before.mean() + 0.05 and (after > before).sum() >= 6  # measured: +0.076, 8 of 8
    assert parse_parameters(guided.images[0].info["parameters"])["Classifier"] == "clip"
    save_noisy_clip(from_clean(clip, 16), ddpm_schedule("squaredcos_cap_v2"), tmp_path / "cos.safetensors")
    with pytest.raises(ValueError, match="another noise schedule"):
        pipe.with_classifier(tmp_path / "cos.safetensors", 1.0)


def test_classifier_guided_images_record_the_classifier_and_its_scale(tmp_path):
    """A guided image's PNG parameters name the classifier file and its scale (they change every pixel);
    an unguided image's do not."""
    from t2i.imageio import parse_parameters
    from t2i.nets.classifier import save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.ddpm import DDPMPipeline

    torch.manual_seed(0)
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny_uncond"], num_classes=2))
    save_noisy_classifier(clf, tmp_path / "colours.safetensors", ["red", "blue"], ddpm_schedule())
    pipe = DDPMPipeline(PixelUNet(PIXEL_UNET_PRESETS["tiny_uncond"]).eval(), ddpm_schedule())
    plain = parse_parameters(pipe.generate("a red circle", seed=0, steps=2).images[0].info["parameters"])
    assert "Classifier" not in plain
    guided = pipe.with_classifier(tmp_path / "colours.safetensors", 3.5).generate("a red circle", seed=0, steps=2)
    params = parse_parameters(guided.images[0].info["parameters"])
    assert params["Classifier"] == "colours" and float(params["Classifier scale"]) == 3.5


def test_classifier_guidance_from_the_request_and_the_cli_and_refused_by_other_families(tmp_path, capsys):
    """`classifier=` / `classifier_scale=` on a request guide exactly as `with_classifier` does (the same
    images); `t2i generate --classifier FILE --classifier-scale S` writes an image that records them; a model
    without classifier guidance refuses the option by name, and a missing file is a one-line error."""
    from t2i.cli import main
    from t2i.imageio import parse_parameters
    from t2i.nets.classifier import save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.base import UnsupportedOption, check_request
    from t2i.systems.ddpm import DDPMConfig, DDPMPipeline, save_ddpm
    from t2i.systems.stable_diffusion import write_tiny

    torch.manual_seed(0)
    net_cfg = PIXEL_UNET_PRESETS["tiny_uncond"]
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=net_cfg, num_classes=2))
    with torch.no_grad():
        clf.head.weight.mul_(30.0)
    save_noisy_classifier(clf, tmp_path / "colours.safetensors", ["red", "blue"], ddpm_schedule())
    net = PixelUNet(net_cfg).eval()
    pipe = DDPMPipeline(net, ddpm_schedule())
    by_request = pipe.generate("a red circle", seed=0, steps=3, classifier=tmp_path / "colours.safetensors",
                               classifier_scale=5.0).sample
    by_method = pipe.with_classifier(tmp_path / "colours.safetensors", 5.0).generate("a red circle", seed=0,
                                                                                    steps=3).sample
    plain = pipe.with_classifier(tmp_path / "colours.safetensors", 0).generate("a red circle", seed=0, steps=3).sample
    assert torch.equal(by_request, by_method) and not torch.allclose(by_request, plain)
    model = tmp_path / "ddpm.safetensors"
    save_ddpm(net, DDPMConfig(net=net_cfg, schedule=ddpm_schedule(), text_encoder=None, image_size=16), model)
    out = tmp_path / "g.png"
    assert main(["generate", "a red circle", "--model", str(model), "--steps", "3", "--seed", "0", "--quiet",
                 "--classifier", str(tmp_path / "colours.safetensors"), "--classifier-scale", "5",
                 "--out", str(out)]) == 0
    from PIL import Image

    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["Classifier"] == "colours" and float(params["Classifier scale"]) == 5.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue circle\n")
    batch = ["generate", "--prompts-file", str(prompts), "--model", str(model), "--steps", "2", "--seed", "0",
             "--quiet", "--classifier", str(tmp_path / "colours.safetensors"), "--out-dir", str(tmp_path / "batch")]
    assert main(batch) == 0
    capsys.readouterr()
    assert main(batch) == 0  # a rerun finds both images with their classifier: nothing to redo, no conflict
    assert "already holds" not in capsys.readouterr().err
    assert main(["generate", "a red circle", "--model", str(model), "--classifier", str(tmp_path / "none.st"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--classifier" in capsys.readouterr().err
    sd = t2i.load(write_tiny(tmp_path / "sd"))
    with pytest.raises(UnsupportedOption, match="classifier"):
        check_request(sd, GenerationRequest("a red circle", classifier=tmp_path / "colours.safetensors"))


def test_classifier_guidance_refuses_what_it_cannot_guide_before_any_work(tmp_path, capsys):
    """A prompt naming none (or two) of the classifier's classes, and a classifier_scale without a classifier
    (which used to be ignored: an unguided image whose PNG kept quiet about the scale), are refused up front by
    `check_guidance` (UnsupportedOption naming the field: the server's 422) and by a run before the network is
    called, and by `t2i generate`; `with_classifier`'s file takes a request's own scale; the PNG records the name
    a request gives the file (`classifier_name`, the server's NAME), the file's stem without one."""
    from t2i.cli import main
    from t2i.imageio import parse_parameters
    from t2i.nets.classifier import save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.base import UnsupportedOption
    from t2i.systems.ddpm import DDPMConfig, DDPMPipeline, save_ddpm

    torch.manual_seed(0)
    net_cfg = PIXEL_UNET_PRESETS["tiny_uncond"]
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=net_cfg, num_classes=2))
    with torch.no_grad():
        clf.head.weight.mul_(30.0)
    file = tmp_path / "colours.safetensors"
    save_noisy_classifier(clf, file, ["red", "blue"], ddpm_schedule())
    net = PixelUNet(net_cfg).eval()
    pipe = DDPMPipeline(net, ddpm_schedule())
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))

    def refused(prompt: str | list[str], option: str, message: str, **settings) -> None:
        """Refused by check_guidance and by a run, UnsupportedOption naming `option`."""
        for refuse in (lambda: pipe.check_guidance(GenerationRequest(prompt, **settings)),
                       lambda: pipe.generate(prompt, steps=2, **settings)):
            with pytest.raises(UnsupportedOption, match=message) as e:
                refuse()
            assert e.value.option == option

    for prompt, found in (("a circle", 0), ("a red and blue circle", 2), (["a red circle", "a square"], 0)):
        bad = prompt if isinstance(prompt, str) else prompt[1]
        refused(prompt, "prompt", f"exactly one of red, blue; prompt {bad!r} names {found}", classifier=file,
                classifier_scale=3.0)
    pipe.check_guidance(GenerationRequest("a red circle", classifier=file))  # one class: nothing to refuse
    pipe.check_guidance(GenerationRequest("a circle", classifier=file, classifier_scale=0))  # guidance off
    refused("a red circle", "classifier_scale", "classifier_scale needs classifier", classifier_scale=3.0)
    assert not calls  # every refusal came before the first network call
    named = pipe.generate("a red circle", seed=0, steps=2, classifier=file, classifier_scale=2.0,
                          classifier_name="tint")
    assert parse_parameters(named.images[0].info["parameters"])["Classifier"] == "tint"
    own_scale = pipe.with_classifier(file, 5.0).generate("a red circle", seed=0, steps=2, classifier_scale=2.0)
    assert torch.equal(own_scale.sample, named.sample)
    params = parse_parameters(own_scale.images[0].info["parameters"])
    assert params["Classifier"] == "colours" and float(params["Classifier scale"]) == 2.0
    model = tmp_path / "ddpm.safetensors"
    save_ddpm(net, DDPMConfig(net=net_cfg, schedule=ddpm_schedule(), text_encoder=None, image_size=16), model)
    capsys.readouterr()
    for args, message in ((["--classifier-scale", "5"], "classifier_scale needs classifier"),
                          (["--classifier", str(file)], "prompt 'a circle' names 0")):
        assert main(["generate", "a circle", "--model", str(model), "--steps", "2", "--seed", "0", "--quiet", *args,
                     "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()
