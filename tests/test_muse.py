"""Muse's token super-resolution (t2i.systems.muse, t2i.train.muse): the network reads the low-res tokens,
the two-stage decoding re-masks MaskGIT's counts at each stage, training lowers the loss and resumes
exactly, a bundle of a MaskGIT base with a super-resolution network round-trips, and inpainting /
outpainting by masking tokens keeps the unmasked tokens (API, CLI, server). The four doors for plain
generation (API, CLI, server, eval) are tests/test_families.py's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_ddpm import _Words
from test_tokens import SCHEDULE_COUNTS

from t2i.nets.muse_transformer import MuseTransformer
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer
from t2i.systems.maskgit import MaskGITConfig, save_maskgit
from t2i.systems.muse import (
    MuseConfig,
    MusePipeline,
    bundle,
    bundle_muse,
    load,
    sr_config,
    tiny_config,
)
from t2i.systems.registry import resolve
from t2i.systems.token_models import load_token_model, tiny_tokenizer
from t2i.train.maskgit import masked_token_loss
from t2i.train.muse import MuseSRTrainConfig, train_muse_sr
from t2i.train.token_models import image_codes
from t2i.train.vqvae import save_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TOKEN_TRANSFORMER_PRESETS["tiny"]  # 32 codes; the tiny tokenizer's 4x4 map of 16x16 images


def _sr_net(seed: int = 0) -> MuseTransformer:
    """A random tiny super-resolution network (4x4 -> 8x8 tokens) with a random head."""
    torch.manual_seed(seed)
    net = MuseTransformer(tiny_config(tiny_tokenizer().cfg).net, tiny_config(tiny_tokenizer().cfg).low_res).eval()
    with torch.no_grad():
        net.to_logits.weight.normal_(0, net.cfg.width ** -0.5)
    return net


def test_the_network_gives_high_res_logits_that_depend_on_the_low_res_tokens():
    net = _sr_net()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 33, (2, 64), generator=g)  # [MASK] = 32 included
    low_a, low_b = (torch.randint(0, 32, (2, 16), generator=g) for _ in range(2))
    context = torch.randn(2, 4, 384, generator=g)
    with torch.no_grad():
        a = net(tokens, context=context, low_res=low_a)
        again = net(tokens, context=context, low_res=low_a)
        b = net(tokens, context=context, low_res=low_b)
        one = net(tokens, context=context, low_res=torch.cat([low_a[:1], low_b[1:]]))
    assert a.shape == (2, 64, 32) and torch.equal(a, again)
    assert (a - b).abs().amax(-1).min() > 1e-3  # every position reads the low-res map
    assert torch.equal(one[0], a[0]) and torch.equal(one[1], b[1])  # row by row
    with pytest.raises(ValueError, match="low-res"):
        net(tokens, context=context)


class _Recording:
    """Wraps a network: the number of [MASK] tokens in each call's input, per row."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.cfg, self.masked = net, net.cfg, []

    def __call__(self, tokens: torch.Tensor, **cond) -> torch.Tensor:
        self.masked.append((tokens == self.cfg.mask_id).sum(-1).tolist())
        return self.net(tokens, **cond)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the tiny Muse pipeline, its file)."""
    from t2i.systems.muse import SYSTEM

    path = SYSTEM.write_tiny(tmp_path_factory.mktemp("muse"), 0)
    return load(path), path


def test_both_stages_re_mask_the_cosine_schedule_counts_and_the_sr_reads_the_base_tokens(tiny):
    """8 steps: the base's 16 tokens follow floor(16 cos(pi/2 (s+1)/8)) = 15, 14, 13, 11, 8, 6, 3, 0, the
    super-resolution's 64 tokens MaskGIT's golden (8, 64) counts; the SR stage's low_res is the base's output."""
    pipe, _ = tiny
    base, sr = _Recording(pipe.unet.base), _Recording(pipe.unet)
    seen = []
    original = pipe.sample_tokens

    def sample_tokens(net, cond, r, generators, report, edit=None):
        out = original({pipe.unet.base: base, pipe.unet: sr}[net], cond, r, generators, report, edit=edit)
        seen.append((cond.cond.get("low_res"), out))
        return out

    pipe.sample_tokens = sample_tokens
    steps = []
    try:
        result = pipe.generate(["a red circle", "a blue square"], seed=0, steps=8, guidance=1.0,
                               callback=lambda i, n: steps.append((i, n)))
    finally:
        del pipe.sample_tokens
    assert base.masked == [[c, c] for c in [16, 15, 14, 13, 11, 8, 6, 3]]
    assert sr.masked == [[c, c] for c in [64, *SCHEDULE_COUNTS[8, 64][:-1]]]
    assert steps == [(i, 16) for i in range(1, 17)]
    (none, low), (given, high) = seen
    assert none is None and torch.equal(given, low) and torch.equal(high, result.sample)
    assert low.shape == (2, 16) and result.sample.shape == (2, 64)


def test_a_base_stage_preview_decodes_to_the_image_size(tiny):
    pipe, _ = tiny
    codes = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    preview = pipe.decode_pixels(codes)
    low = pipe.vq.decode_codes(codes.view(1, 4, 4))
    assert preview.shape == (1, 3, 32, 32)
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(preview, up.clamp(-1, 1))  # the base image at the final size
    with pytest.raises(ValueError, match="steps must be between 1 and the base's 16"):
        pipe.generate("a red circle", steps=17)


def _write_base(folder, seed: int = 1):
    """A tiny random tokenizer file and a random MaskGIT base on it (4x4 tokens), in `folder`."""
    vq = tiny_tokenizer()
    save_vqvae(vq, folder / "vqvae.safetensors")
    torch.manual_seed(seed)
    cfg = MaskGITConfig(net=replace(TINY), vq=vq.cfg, steps=2)
    net = TokenTransformer(cfg.net)
    with torch.no_grad():
        net.to_logits.weight.normal_(0, 0.2)
    save_maskgit(net, vq, cfg, folder / "base.safetensors")
    return folder / "vqvae.safetensors", folder / "base.safetensors"


def _common(vq_file, base_file, **kw):
    return dict(vqvae=str(vq_file), base=str(base_file), net_preset="tiny", low_res_layers=1, image_every=0,
                log_every=10, **kw)


def _held_out_loss(path, text: _Words) -> float:
    """The masked-token loss of a saved Muse file's SR network on 32 fixed 32x32 scenes, fixed masks."""
    from t2i.tokens import sample_training_mask
    from t2i.train.data import open_data
    from t2i.train.distributed import DistInfo

    net, vq, cfg = load_token_model(path, "muse", "a Muse file", MuseConfig.from_dict)
    x, captions, _ = open_data("shapes", None, 32, 123, print).batch(0, 32, DistInfo())
    codes, low = image_codes(vq, x), image_codes(vq, torch.nn.functional.avg_pool2d(x, 2))
    masked = sample_training_mask(32, codes.shape[1], torch.Generator().manual_seed(0))
    logits = net(codes.masked_fill(masked, cfg.net.mask_id), context=text.encode(captions).context, low_res=low)
    return masked_token_loss(logits, codes, masked).item()


def test_a_tiny_run_lowers_the_masked_token_loss_and_exports_a_bundle(tmp_path):
    """30 steps on 32x32 scenes over a 16x16 base: the exported network's held-out masked-token loss
    falls well below the new network's log(32) = 3.47 (measured 3.47 -> 1.40); the export is a Muse
    file holding the base's weights, found by the registry."""
    vq_file, base_file = _write_base(tmp_path)
    text = _Words(384)
    common = _common(vq_file, base_file, batch_size=16, warmup=5, ckpt_every=1000, seed=0, ema_decay=0.0,
                     export_every=0, sample_steps=2)
    assert train_muse_sr(MuseSRTrainConfig(out=str(tmp_path / "r0"), steps=1, lr=1e-12, **common),
                         text_encoder=text) == 0
    assert train_muse_sr(MuseSRTrainConfig(out=str(tmp_path / "r30"), steps=30, lr=3e-3, **common),
                         text_encoder=text) == 0
    before, after = (_held_out_loss(tmp_path / r / "model.safetensors", text) for r in ("r0", "r30"))
    print(f"held-out masked-token loss before {before:.4f} after {after:.4f}")
    assert before == pytest.approx(3.4657, abs=1e-3) and after < 0.75 * before
    assert "muse_sr/loss" in (tmp_path / "r30" / "log.txt").read_text()
    out = tmp_path / "r30" / "model.safetensors"
    assert resolve(out)[0].name == "muse"
    base, _, _ = load_token_model(base_file, "maskgit", "a MaskGIT file", MaskGITConfig.from_dict)
    bundled, _, cfg = load_token_model(out, "muse", "a Muse file", MuseConfig.from_dict)
    assert cfg.base == base.cfg and cfg.net.grid == 8 and cfg.low_res.length == 16
    assert all(torch.equal(v, bundled.base.state_dict()[k]) for k, v in base.state_dict().items())


def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(tmp_path):
    from safetensors.torch import load_file

    vq_file, base_file = _write_base(tmp_path)
    text = _Words(384)
    common = _common(vq_file, base_file, batch_size=4, warmup=1, ckpt_every=2, seed=3, lr=1e-2, caption_dropout=0.5)
    assert train_muse_sr(MuseSRTrainConfig(out=str(tmp_path / "once"), steps=4, **common), text_encoder=text) == 0
    assert train_muse_sr(MuseSRTrainConfig(out=str(tmp_path / "twice"), steps=2, **common), text_encoder=text) == 0
    assert train_muse_sr(MuseSRTrainConfig(out=str(tmp_path / "twice"), steps=4, **common), resume=True,
                         text_encoder=text) == 0
    once, twice = (load_file(tmp_path / r / "model.safetensors") for r in ("once", "twice"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    changed = load_file(tmp_path / "twice" / "model.safetensors")
    assert any(k.startswith("transformer.low_res.") for k in changed)


def test_the_cli_trains_with_a_grid_and_refuses_a_base_on_another_tokenizer(tmp_path, monkeypatch, capsys):
    from t2i.cli import main
    from t2i.train import muse as train_module

    vq_file, base_file = _write_base(tmp_path)
    monkeypatch.setattr(train_module, "load_text_encoder", lambda name, length: _Words(384))
    out = tmp_path / "run"
    args = ["train", "muse-sr", "--vqvae", str(vq_file), "--preset", "tiny", "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--image-every", "2", "--sample-steps", "2", "--threads", "1", "--low-res-layers", "1"]
    assert main([*args, "--base", str(base_file)]) == 0
    assert (out / "model.safetensors").is_file() and list((out / "samples").glob("*.png"))
    other = tmp_path / "other"
    other.mkdir()
    save_vqvae(tiny_tokenizer(seed=5), other / "vqvae.safetensors")
    capsys.readouterr()
    assert main(["train", "muse-sr", "--vqvae", str(other / "vqvae.safetensors"), "--base", str(base_file), "--preset",
                 "tiny", "--out", str(tmp_path / "no"), "--steps", "1", "--batch-size", "2"]) == 2
    assert "not a MaskGIT model on this tokenizer" in capsys.readouterr().err


def test_a_bundle_round_trips_and_generates_what_its_parts_generate(tmp_path, tiny):
    """bundle_muse(base file, muse file) -> a file whose weights are exactly the base's and the SR's, and whose
    pipeline draws what a pipeline assembled from the two in memory draws."""
    pipe, path = tiny
    _, base_file = _write_base(tmp_path, seed=7)
    out = bundle_muse(base_file, path, tmp_path / "rebundled.safetensors")
    again = load(out)
    base, _, _ = load_token_model(base_file, "maskgit", "a MaskGIT file", MaskGITConfig.from_dict)
    state = again.unet.state_dict()
    assert all(torch.equal(v, state[f"base.{k}"]) for k, v in base.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items() if not k.startswith("base."))
    net, cfg = bundle(pipe.unet, pipe.cfg, base)
    built = MusePipeline(net, pipe.vq, pipe.text_encoder, cfg)
    lows = {}

    def run(p: MusePipeline, name: str) -> torch.Tensor:
        keep = lambda step, total, x: lows.__setitem__(name, x) if step == 3 else None  # noqa: E731
        return p.generate("a red circle", seed=4, steps=3, on_sample=keep).sample

    assert torch.equal(run(again, "file"), run(built, "memory")) and torch.equal(lows["file"], lows["memory"])
    run(pipe, "old")
    assert lows["file"].shape == (1, 16) and not torch.equal(lows["file"], lows["old"])  # another base's tokens
    with pytest.raises(ValueError, match="reads 16 tokens"):
        bundle(pipe.unet, pipe.cfg, TokenTransformer(replace(TINY, grid=2)))


def test_sr_config_scales_the_base_grid_and_keeps_its_settings():
    base = MaskGITConfig(net=replace(TOKEN_TRANSFORMER_PRESETS["shapes"]), steps=12, guidance=4.0)
    cfg = sr_config(base, TOKEN_TRANSFORMER_PRESETS["shapes"], factor=2, low_res_layers=3)
    assert (cfg.net.grid, cfg.net.num_codes, cfg.low_res.length, cfg.low_res.layers) == (16, 512, 64, 3)
    assert (cfg.steps, cfg.guidance, cfg.text_encoder, cfg.base) == (12, 4.0, "minilm", None)
    with pytest.raises(ValueError, match="no base"):
        MusePipeline(cfg.network(), None, None, cfg)


# --- zero-shot editing: inpainting and outpainting by masking tokens ----------------------------------


def _picture(size: int = 32, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _left_half_mask(size: int = 32):
    """White (repaint) over the left half: the left 4 of 8 high-res token columns, 2 of the base's 4."""
    import numpy as np
    from PIL import Image

    m = np.zeros((size, size), dtype=np.uint8)
    m[:, : size // 2] = 255
    return Image.fromarray(m)


def _stages(pipe, **request):
    """(the base's tokens (B, n), the result) of pipe.generate(**request), the base's tokens recorded."""
    lows = []
    original = pipe.sample_tokens

    def sample_tokens(net, cond, r, generators, report, edit=None):
        out = original(net, cond, r, generators, report, edit=edit)
        lows.append(out)
        return out

    pipe.sample_tokens = sample_tokens
    try:
        result = pipe.generate(**request)
    finally:
        del pipe.sample_tokens
    return lows[0], result


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpainting_keeps_the_unmasked_tokens_of_both_stages_and_redraws_the_masked_ones(tiny, strength):
    """The base redraws the masked part of the image's low-res tokens (the image area-averaged to 16x16),
    the super-resolution the masked part of its 32x32 tokens: every unmasked token equals the image's,
    the masked ones change; steps * strength calls per stage."""
    from t2i.systems.base import GenerationRequest

    pipe, _ = tiny
    image, mask = _picture(), _left_half_mask()
    calls = []
    low, result = _stages(pipe, prompt="a red circle", seed=2, steps=4, strength=strength, init_image=image,
                          mask=mask, num_images=2, callback=lambda i, n: calls.append((i, n)))
    r = pipe._resolve(GenerationRequest("a red circle", init_image=image, mask=mask))
    codes, keep = pipe.edit_tokens(r, (8, 8))
    low_codes, low_keep = pipe.edit_tokens(r, (4, 4), downscale=2)
    assert keep.view(8, 8)[:, 4:].all() and not keep.view(8, 8)[:, :4].any()
    assert low_keep.view(4, 4)[:, 2:].all() and not low_keep.view(4, 4)[:, :2].any()
    for row in range(2):
        assert torch.equal(result.sample[row][keep], codes[keep])
        assert torch.equal(low[row][low_keep], low_codes[low_keep])
        assert not torch.equal(result.sample[row][~keep], codes[~keep])
        assert not torch.equal(low[row][~low_keep], low_codes[~low_keep])
    n = int(4 * strength)
    assert calls == [(i, 2 * n) for i in range(1, 2 * n + 1)]
    assert "Denoising strength: " in result.images[0].info["parameters"]
    plain = pipe.generate("a red circle", seed=2, steps=4, num_images=2).sample
    assert not torch.equal(plain[:, keep], result.sample[:, keep])  # the kept part is the image's, not a new draw


def test_outpainting_keeps_the_centre_and_paints_the_padding(tiny):
    """outpaint_canvas (what `t2i generate --outpaint` builds): a 16x16 picture padded by 8 pixels per side is
    a 32x32 canvas whose centre 4x4 high-res tokens are kept and whose border is drawn."""
    from t2i.systems.base import GenerationRequest
    from t2i.systems.latent_diffusion import outpaint_canvas

    pipe, _ = tiny
    canvas, mask = outpaint_canvas(_picture(16), 8, 8, 8, 8)
    result = pipe.generate("a blue square", seed=0, steps=4, init_image=canvas, mask=mask)
    codes, keep = pipe.edit_tokens(pipe._resolve(GenerationRequest("x", init_image=canvas, mask=mask)), (8, 8))
    assert keep.view(8, 8)[2:6, 2:6].all() and keep.sum() == 16
    assert torch.equal(result.sample[0][keep], codes[keep]) and not torch.equal(result.sample[0][~keep], codes[~keep])


def test_editing_is_refused_without_both_inputs_or_with_a_strength_that_leaves_no_step(tiny):
    pipe, _ = tiny
    with pytest.raises(ValueError, match="init_image and mask"):
        pipe.generate("a red circle", init_image=_picture())
    with pytest.raises(ValueError, match="strength applies"):
        pipe.generate("a red circle", strength=0.5)
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.generate("a red circle", init_image=_picture(), mask=_left_half_mask(), steps=4, strength=0.1)
    assert {"init_image", "mask", "strength"} <= pipe.capabilities.options


def test_the_cli_and_the_server_inpaint_as_the_library_does(tiny, tmp_path):
    """`t2i generate --init-image --mask --strength` and the server's img2img route (init_images, mask,
    denoising_strength) give the library's image for the same request."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from test_serve import request, serve

    from t2i.cli import main

    pipe, path = tiny
    image, mask = _picture(seed=3), _left_half_mask()
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    want = pipe.generate("a red circle", seed=5, steps=4, strength=0.5, init_image=image, mask=mask).images[0]
    assert main(["generate", "a red circle", "--model", str(path), "--out", str(tmp_path / "out.png"), "--seed", "5",
                 "--steps", "4", "--precision", "fp32", "--init-image", str(tmp_path / "init.png"), "--mask",
                 str(tmp_path / "mask.png"), "--strength", "0.5"]) == 0
    got = Image.open(tmp_path / "out.png")
    assert np.array_equal(np.asarray(got), np.asarray(want)) and "Denoising strength: 0.5" in got.info["parameters"]

    def b64(im) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    with serve(pipe) as server:
        status, _, body = request("POST", f"{server.url}/sdapi/v1/img2img", {
            "prompt": "a red circle", "seed": 5, "steps": 4, "width": 32, "height": 32, "denoising_strength": 0.5,
            "init_images": [b64(image)], "mask": b64(mask)})
    assert status == 200, body
    served = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(want))
