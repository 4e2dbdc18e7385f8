"""The MaskGIT family: generation through the registry (size, seeds, guidance, steps, progress,
cancel), its self-describing file with the tokenizer inside, detection, and training that learns."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_ddpm import _Words

import t2i
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS
from t2i.systems.base import Interrupted
from t2i.systems.maskgit import SYSTEM, MaskGITPipeline
from t2i.systems.registry import resolve, system
from t2i.systems.token_models import tiny_tokenizer
from t2i.train.maskgit import MaskGITTrainConfig, masked_token_loss, train_maskgit
from t2i.train.token_models import image_codes
from t2i.train.vqvae import save_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = SYSTEM.write_tiny(tmp_path_factory.mktemp("maskgit"), 0)
    return path, t2i.load(path)


def test_generates_the_native_size_reproducibly_and_guidance_and_the_negative_prompt_change_it(tiny):
    _, pipe = tiny
    assert isinstance(pipe, MaskGITPipeline) and pipe.capabilities.native_size == (16, 16)
    a = pipe.generate(["a red circle", "a blue square"], seed=3, num_images=2)
    assert [im.size for im in a.images] == [(16, 16)] * 4 and a.sample.shape == (4, 16)
    assert a.seeds == [3, 4, 3, 4]
    alone = pipe.generate("a blue square", seed=4)  # image i of seed s is seed s + i, whatever the batch
    assert torch.equal(alone.sample[0], a.sample[3])
    assert torch.equal(pipe.generate("a red circle", seed=3).sample[0], a.sample[0])
    assert not torch.equal(a.sample[0], a.sample[1])
    plain = pipe.generate("a red circle", seed=3, guidance=1.0).sample
    other_negative = pipe.generate("a red circle", seed=3, negative_prompt="a green cross").sample
    assert not torch.equal(plain, a.sample[:1]) and not torch.equal(other_negative, a.sample[:1])
    text = a.images[0].info["parameters"]
    assert "Sampler: maskgit" in text and "CFG scale: 3.0" in text and "Steps: 4" in text
    with pytest.raises(ValueError, match="width must be 16"):
        pipe.generate("a red circle", width=32)


def test_steps_are_model_calls_and_progress_and_cancel_are_honoured(tiny):
    _, pipe = tiny
    seen = []
    pipe.generate("a red circle", seed=0, steps=3, guidance=1.0, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    samples = []
    pipe.generate("a red circle", seed=0, steps=2, on_sample=lambda i, n, x: samples.append(x.clone()))
    assert len(samples) == 2 and samples[0].shape == (1, 16) and (samples[0] < 32).all()  # every token drawn
    raster = []
    result = pipe.generate("a red circle", seed=0, sampler="raster", callback=lambda i, n: raster.append((i, n)))
    assert raster == [(i, 16) for i in range(1, 17)] and "Steps: 16, Sampler: raster" in result.images[0].info[
        "parameters"]
    with pytest.raises(ValueError, match="one step per token"):
        pipe.generate("a red circle", sampler="raster", steps=4)
    with pytest.raises(Interrupted):
        pipe.generate("a red circle", seed=0, should_stop=lambda: True)
    images = pipe.decode(samples[-1])
    assert images[0].size == (16, 16)


def test_the_file_holds_the_tokenizer_and_only_maskgit_claims_it(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from t2i.checkpoints.io import CheckpointError
    from t2i.systems.maskgit import load

    path, pipe = tiny
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["t2i_system"] == "maskgit" and any(k.startswith("vq.") for k in state)
    assert torch.equal(state["vq.quantize.codebook"], pipe.vq.quantize.codebook)
    assert resolve(path)[0].name == "maskgit"
    assert not system("ddpm").detect(path)
    vq_file = tmp_path / "vqvae.safetensors"
    save_vqvae(tiny_tokenizer(), vq_file)  # a tokenizer alone is no model of any family
    assert not SYSTEM.detect(vq_file)
    ddpm_file = system("ddpm").write_tiny(tmp_path / "ddpm", 0)
    assert not SYSTEM.detect(ddpm_file)
    raw = json.loads(meta["t2i_config"])
    raw["net"]["width"] = 64
    save_file(state, tmp_path / "bad.safetensors", {**meta, "t2i_config": json.dumps(raw)})
    with pytest.raises(CheckpointError, match="do not fit|other shapes"):
        load(tmp_path / "bad.safetensors")
    raw["net"]["width"], raw["vq"]["num_codes"] = 32, 64
    save_file(state, tmp_path / "codes.safetensors", {**meta, "t2i_config": json.dumps(raw)})
    with pytest.raises(CheckpointError, match="32 codes"):
        load(tmp_path / "codes.safetensors")


def _held_out_loss(path, text: _Words) -> float:
    """The masked-token loss of a saved model on 32 fixed shapes scenes, fixed masks."""
    from t2i.systems.maskgit import MaskGITConfig
    from t2i.systems.token_models import load_token_model
    from t2i.tokens import sample_training_mask
    from t2i.train.data import open_data
    from t2i.train.distributed import DistInfo

    net, vq, cfg = load_token_model(path, "maskgit", "a MaskGIT file", MaskGITConfig.from_dict)
    x, captions, _ = open_data("shapes", None, 16, 123, print).batch(0, 32, DistInfo())
    codes = image_codes(vq, x)
    masked = sample_training_mask(32, codes.shape[1], torch.Generator().manual_seed(0))
    logits = net(codes.masked_fill(masked, cfg.net.mask_id), context=text.encode(captions).context)
    return masked_token_loss(logits, codes, masked).item()


def held_out_losses(vq_file, tmp_path, text: _Words) -> tuple[float, float]:
    """`t2i train maskgit` in-process on the tokenizer `vq_file`: the held-out masked-token loss of the
    exported model of a run that does not move (1 step at lr 1e-12, in tmp_path/r0) and of a 40-step one
    (tmp_path/r40)."""
    common = dict(vqvae=str(vq_file), net_preset="tiny", batch_size=16, warmup=5, ckpt_every=1000, image_every=0,
                  log_every=10, seed=0, ema_decay=0.0, export_every=0, sample_steps=2)
    assert train_maskgit(MaskGITTrainConfig(out=str(tmp_path / "r0"), steps=1, lr=1e-12, **common),
                         text_encoder=text) == 0
    assert train_maskgit(MaskGITTrainConfig(out=str(tmp_path / "r40"), steps=40, lr=3e-3, **common),
                         text_encoder=text) == 0
    before, after = (_held_out_loss(tmp_path / r / "model.safetensors", text) for r in ("r0", "r40"))
    print(f"held-out masked-token loss before {before:.4f} after {after:.4f}")
    return before, after


def test_tiny_maskgit_run_lowers_its_masked_token_loss_and_exports_a_loadable_model(tmp_path):
    """`t2i train maskgit` in-process on a tiny random tokenizer, 40 steps: the exported EMA model's
    held-out masked-token loss falls well below the new network's log(32) = 3.47 (measured 3.47 -> 1.24),
    and its model.safetensors generates through the registry."""
    vq_file = tmp_path / "vqvae.safetensors"
    save_vqvae(tiny_tokenizer(), vq_file)
    before, after = held_out_losses(vq_file, tmp_path, _Words(384))
    assert before == pytest.approx(3.4657, abs=1e-3) and after < 0.75 * before
    assert "maskgit/loss" in (tmp_path / "r40" / "log.txt").read_text()
    assert resolve(tmp_path / "r40" / "model.safetensors")[0].name == "maskgit"


def test_cli_trains_a_tiny_run_with_a_grid(tmp_path, monkeypatch):
    """`t2i train maskgit --vqvae FILE` runs the loop end to end (grid and export included)."""
    from t2i.cli import main
    from t2i.train import maskgit as train_module

    vq_file = tmp_path / "vqvae.safetensors"
    save_vqvae(tiny_tokenizer(), vq_file)
    monkeypatch.setattr(train_module, "load_text_encoder", lambda name, length: _Words(384))
    out = tmp_path / "run"
    assert main(["train", "maskgit", "--vqvae", str(vq_file), "--preset", "tiny", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--image-every", "2", "--sample-steps", "2", "--threads", "1"]) == 0
    assert (out / "model.safetensors").is_file() and list((out / "samples").glob("*.png"))


def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(tmp_path):
    """4 steps in one go, or 2 then --resume to 4: the same weights (the step's masks and caption
    dropout come from the step generator, the data from the position)."""
    from safetensors.torch import load_file

    vq_file = tmp_path / "vqvae.safetensors"
    save_vqvae(tiny_tokenizer(), vq_file)
    text = _Words(384)
    common = dict(vqvae=str(vq_file), net_preset="tiny", batch_size=4, warmup=1, ckpt_every=2, image_every=0,
                  log_every=10, seed=3, lr=1e-2, caption_dropout=0.5)
    assert train_maskgit(MaskGITTrainConfig(out=str(tmp_path / "once"), steps=4, **common), text_encoder=text) == 0
    assert train_maskgit(MaskGITTrainConfig(out=str(tmp_path / "twice"), steps=2, **common), text_encoder=text) == 0
    assert train_maskgit(MaskGITTrainConfig(out=str(tmp_path / "twice"), steps=4, **common), resume=True,
                         text_encoder=text) == 0
    once, twice = (load_file(tmp_path / r / "model.safetensors") for r in ("once", "twice"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)


def test_a_network_trained_on_two_captions_draws_the_map_of_the_prompt_it_is_given():
    """Conditioning end to end: captions "a red circle" / "a blue square" paired with token maps made of
    code 3 / code 7 (one stray code each), 60 steps of the masked-token loss, then parallel decoding
    (4 steps, guidance 2) draws the prompt's code almost everywhere."""
    from t2i.nets.token_transformer import TokenTransformer
    from t2i.systems.maskgit import MaskGITConfig, text_conditioning
    from t2i.tokens import sample_training_mask

    torch.manual_seed(0)
    cfg = MaskGITConfig(vq=tiny_tokenizer().cfg, net=dataclasses.replace(TOKEN_TRANSFORMER_PRESETS["tiny"]), steps=4)
    net, text = TokenTransformer(cfg.net), _Words(384)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    captions = ["a red circle", "a blue square"] * 4
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        codes = torch.tensor([[3] * 15 + [1] if c == "a red circle" else [7] * 15 + [2] for c in captions])
        masked = sample_training_mask(8, 16, gen)
        logits = net(codes.masked_fill(masked, cfg.net.mask_id), **text_conditioning(text, captions))
        loss = masked_token_loss(logits, codes, masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = MaskGITPipeline(net.eval(), tiny_tokenizer(), text, cfg)
    for sampler in ("maskgit", "raster"):  # parallel decoding, and one token per call in raster order
        red, blue = (pipe.generate(p, seed=0, num_images=2, guidance=2.0, sampler=sampler).sample
                     for p in ("a red circle", "a blue square"))
        assert (red == 3).float().mean() > 0.8 and (blue == 7).float().mean() > 0.8, sampler


@pytest.mark.parametrize("kind", ["dvae", "vit-vqgan"])
def test_maskgit_trains_and_generates_on_any_tokenizer_kind(kind, tmp_path, monkeypatch):
    """The token families sit on every single-grid tokenizer (issue 19): a dVAE's or a ViT-VQGAN's file
    trains a MaskGIT whose images are that tokenizer's decoded codes."""
    import numpy as np

    from t2i.autoencoders.tokenizers import KINDS, build_tokenizer, save_tokenizer
    from t2i.cli import main
    from t2i.systems.registry import system
    from t2i.train import maskgit as train_module

    torch.manual_seed(0)
    vq = build_tokenizer(dataclasses.replace(KINDS[kind].presets["tiny"])).eval()
    save_tokenizer(vq, tmp_path / "tok.safetensors")
    monkeypatch.setattr(train_module, "load_text_encoder", lambda name, length: _Words(384))
    out = tmp_path / "run"
    assert main(["train", "maskgit", "--vqvae", str(tmp_path / "tok.safetensors"), "--preset", "tiny", "--out",
                 str(out), "--steps", "2", "--batch-size", "4", "--image-every", "0", "--threads", "1"]) == 0
    pipe = system("maskgit").load(out / "model.safetensors")
    assert type(pipe.vq) is type(vq)
    result = pipe.generate("a red circle", seed=1, steps=2)
    with torch.no_grad():
        want = vq.decode_codes(result.sample.view(1, *vq.encode(torch.zeros(1, 3, 16, 16))[0].shape[1:]))
    got = torch.from_numpy(np.asarray(result.images[0], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (got - want[0].clamp(-1, 1)).abs().max() < 1 / 127.5 + 1e-6
