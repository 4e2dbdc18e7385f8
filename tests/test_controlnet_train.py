"""Training ControlNets on the shapes world (issue 20): `t2i train controlnet --base M` on tiny random bases of
the two kinds (a shapes LDM U-Net: Zhang et al.'s ControlNet; PixArt: PixArt-delta's ControlNet-Transformer).
An untrained ControlNet leaves the base's output bit-exactly unchanged, training lowers the loss, a resumed run
ends on the same weights as an uninterrupted one, the box map is the truth's boxes, and the generate API and
`t2i eval shapes --layouts truth --controlnet` take the file and refuse one built for another base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import t2i
from t2i.adapters.controlnet import box_map, box_map_image, load_controlnet, save_controlnet
from t2i.cli import main
from t2i.data.shapes import render_array, shapes_example
from t2i.data.shapes.layouts import scene_layout
from t2i.diffusion.losses import DiffusionLoss
from t2i.nets.controlnet import ControlNet
from t2i.nets.dit import DIT_PRESETS, DiT
from t2i.nets.pixart_controlnet import PixArtControlNet
from t2i.nets.unet import UNet
from t2i.systems.dit import SYSTEM as DIT_SYSTEM
from t2i.systems.pixart import write_tiny as write_tiny_pixart
from t2i.systems.shapes_ldm import UNET_PRESETS, write_tiny_model
from t2i.train.controlnet import FAMILIES, BoxMapScenes, ControlNetTrainConfig, controlled
from t2i.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--batch-size", "8", "--warmup", "1", "--ckpt-every", "1000", "--image-every", "0", "--log-every", "5",
          "--threads", "1"]
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random bases: a shapes LDM (16x16 images, f=4) and a PixArt (32x32, two blocks)."""
    root = tmp_path_factory.mktemp("controlnet_bases")
    return {"shapes_ldm": write_tiny_model(root / "shapes"), "pixart": write_tiny_pixart(root / "pixart")}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """60 steps of `t2i train controlnet` on each base (lr 1e-3): the folder holding a run per family."""
    root = tmp_path_factory.mktemp("controlnet_runs")
    for kind, base in bases.items():
        assert main(["train", "controlnet", "--base", str(base), "--out", str(root / kind), "--steps", "60",
                     "--lr", "1e-3", *COMMON]) == 0
    return root


def _layout_image(size: int):
    scene, _ = shapes_example(7, 0)
    return box_map_image(scene_layout(scene), size, size)


def test_box_map_is_the_truth_boxes():
    """Inside every object's box white, everywhere else black, at the world's 64 px exactly; at 32 px the
    pixels whose centres lie in a box. The training data's maps are the scenes' own."""
    for i in range(20):
        scene, _ = shapes_example(3, i)
        want = np.zeros((64, 64), bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            want[y0:y1, x0:x1] = True
        got = box_map(scene_layout(scene), 64, 64)
        assert got.shape == (64, 64, 3) and set(np.unique(got)) <= {0, 255}
        assert np.array_equal(got[..., 0] == 255, want) and (got == got[..., :1]).all()
        half = box_map(scene_layout(scene), 32, 32)[..., 0] == 255
        assert np.array_equal(half, want[1::2, 1::2])  # pixel c's centre is 64-px 2c + 1's left edge
    x, captions, maps = BoxMapScenes(3, 64, None).batch(0, 4, DistInfo())
    for k in range(4):
        scene, caption = shapes_example(3, k)
        assert captions[k] == caption
        assert torch.equal(maps[k], torch.from_numpy(box_map(scene_layout(scene), 64, 64)).permute(2, 0, 1) / 255)
        assert torch.equal(x[k], torch.from_numpy(render_array(scene, 64)).permute(2, 0, 1) / 127.5 - 1)


@pytest.mark.parametrize("family", ["shapes_ldm", "pixart"])
def test_untrained_controlnet_leaves_the_base_output_unchanged(bases, family):
    """At init (copies of the base, zero projections) the controlled network's output and a whole generation
    equal the base's bit for bit; with the zero layers perturbed they differ (the residuals do arrive)."""
    pipe = t2i.load(bases[family])
    controlnet, control_input = FAMILIES[family](pipe, ControlNetTrainConfig(out=""))
    size = pipe.defaults.width
    _, captions, maps = BoxMapScenes(5, size, None).batch(0, 2, DistInfo())
    cond, _, _ = pipe.encode_prompts(captions, ["", ""], size, size, False)
    gen = torch.Generator().manual_seed(0)
    h = size // pipe.vae_scale
    x, t = torch.randn(2, pipe.latent_channels, h, h, generator=gen), torch.tensor([100, 700])
    model = controlled(controlnet, pipe.unet)
    with torch.no_grad():
        base_out = pipe.unet(x, t, **cond)[:, :pipe.latent_channels]  # the eps half of a learned variance
        assert torch.equal(model(x, t, control=control_input(maps), **cond), base_out)
    control = {"controlnet": controlnet, "control_image": _layout_image(size)}
    plain = pipe.generate(PROMPT, seed=0, steps=3).sample
    assert torch.equal(pipe.generate(PROMPT, seed=0, steps=3, **control).sample, plain)
    zero = ([*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
            if isinstance(controlnet, ControlNet) else [controlnet.before_proj, *controlnet.after_proj])
    with torch.no_grad():
        for layer in zero:
            layer.weight.normal_(0, 0.1)
        assert (model(x, t, control=control_input(maps), **cond) - base_out).abs().max() > 1e-3
    assert (pipe.generate(PROMPT, seed=0, steps=3, **control).sample - plain).abs().max() > 1e-3


def _held_out_loss(pipe, controlnet, control_input) -> float:
    """The ControlNet's loss on 16 scenes of another seed (posterior means), fixed timesteps and noise."""
    size = pipe.defaults.width
    x, captions, maps = BoxMapScenes(123, size, None).batch(0, 16, DistInfo())
    with torch.no_grad():
        z = pipe.vae.scale(pipe.vae.encode(x).mode())
        cond, _, _ = pipe.encode_prompts(captions, [""] * 16, size, size, False)
        cond["control"] = control_input(maps)
        loss = DiffusionLoss(pipe.schedule.alphas_cumprod(), pipe.schedule.prediction_type)
        model = controlled(controlnet, pipe.unet)
        return sum(loss(model, z, cond, torch.Generator().manual_seed(k)).item() for k in range(4)) / 4


@pytest.mark.parametrize("family", ["shapes_ldm", "pixart"])
def test_training_lowers_the_loss(bases, trained, family):
    """The trained ControlNet's held-out loss against the untrained one's on the same frozen base (measured:
    shapes_ldm 0.374 -> 0.320, pixart 1.021 -> 0.779)."""
    pipe = t2i.load(bases[family])
    fresh, control_input = FAMILIES[family](pipe, ControlNetTrainConfig(out=""))
    net = load_controlnet(trained / family / "controlnet.safetensors")
    assert type(net) is type(fresh) and net.name == family  # the run folder's name
    before, after = _held_out_loss(pipe, fresh, control_input), _held_out_loss(pipe, net, control_input)
    print(f"{family}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    assert "controlnet/loss" in (trained / family / "log.txt").read_text()


def test_resume_ends_on_the_weights_of_an_uninterrupted_run(bases, tmp_path):
    base = str(bases["shapes_ldm"])
    assert main(["train", "controlnet", "--base", base, "--out", str(tmp_path / "a"), "--steps", "4", *COMMON]) == 0
    assert main(["train", "controlnet", "--base", base, "--out", str(tmp_path / "b"), "--steps", "2", *COMMON,
                 "--ckpt-every", "2"]) == 0
    assert main(["train", "controlnet", "--base", base, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"]) == 0
    a, b = (load_controlnet(tmp_path / r / "controlnet.safetensors").state_dict() for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = load_controlnet(tmp_path / "b" / "controlnet.safetensors").controlnet_mid_block.weight
    assert moved.abs().max() > 0  # the zero convolution has left zero


def test_api_and_eval_cli_take_a_controlnet_and_refuse_another_bases(bases, trained, tmp_path, capsys):
    shapes_file = trained / "shapes_ldm" / "controlnet.safetensors"
    pixart_file = trained / "pixart" / "controlnet.safetensors"
    pipe = t2i.load(bases["shapes_ldm"])
    control = {"controlnet": load_controlnet(shapes_file), "control_image": _layout_image(16)}
    assert (pipe.generate(PROMPT, seed=0, steps=3, **control).sample
            - pipe.generate(PROMPT, seed=0, steps=3).sample).abs().max() > 1e-3
    # a ControlNet of a wider U-Net (the built-in model's widths), of another family, and a PixArt one of another width
    wide = ControlNet.from_unet(UNet(UNET_PRESETS["shapes_s"]), 3, (16, 32, 96))
    save_controlnet(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"^the ControlNet does not fit this model: its block channels is "
                                         r"\(32, 64, 128\), the U-Net's \(16, 32\)$"):
        pipe.generate(PROMPT, steps=1, controlnet=load_controlnet(tmp_path / "wide.safetensors"),
                      control_image=control["control_image"])
    with pytest.raises(ValueError, match=r"^the ControlNet does not fit this model: shapes \(shapes_ldm\) takes a "
                                         r"loaded U-Net ControlNet, not a PixArtControlNet$"):
        pipe.generate(PROMPT, steps=1, controlnet=load_controlnet(pixart_file), control_image=control["control_image"])
    pixart = t2i.load(bases["pixart"])
    with pytest.raises(ValueError, match="^a PixArt model takes a PixArt ControlNet .* not ControlNet with one$"):
        pixart.generate(PROMPT, steps=1, **control)
    narrow = PixArtControlNet.from_dit(DiT(DIT_PRESETS["pixart_tiny"]), 1)  # caption width 32, not MiniLM's 384
    with pytest.raises(ValueError, match="its caption width is 32, the network's 384$"):
        pixart.generate(PROMPT, steps=1, controlnet=narrow, control_image=control["control_image"])

    args = ["eval", "shapes", "--model", str(bases["shapes_ldm"]), "--layouts", "truth", "--limit", "1",
            "--steps", "1", "--precision", "fp32"]
    assert main([*args, "--controlnet", str(shapes_file), "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layouts"] == "truth" and summary["controlnet"] == str(shapes_file) and summary["n"] == 6
    assert main([*args, "--controlnet", str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2i eval: error: the ControlNet does not fit this model: its block channels")
    assert "\n" not in err
    assert main([*args[:4], "--controlnet", str(shapes_file), "--out", str(tmp_path / "ev3")]) == 2
    assert "--controlnet needs --layouts truth" in capsys.readouterr().err


def test_train_refuses_a_base_without_a_controlnet_and_options_of_the_other_kind(bases, tmp_path, capsys):
    dit = DIT_SYSTEM.write_tiny(tmp_path / "dit")
    assert main(["train", "controlnet", "--base", str(dit), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "no ControlNet for the dit family" in capsys.readouterr().err
    assert main(["train", "controlnet", "--base", str(bases["shapes_ldm"]), "--out", str(tmp_path / "r2"), "--steps",
                 "1", "--blocks", "2"]) == 2
    assert "--blocks counts a PixArt network's copied blocks" in capsys.readouterr().err
