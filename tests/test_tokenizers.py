"""The image tokenizers beyond the VQ-VAE (t2i.autoencoders: vqgan, vit_vqgan, dvae, vqvae2, perceptual,
tokenizers): each quantizer's golden behaviour, exact code round trips, self-describing files loaded by
kind, short tiny runs through `t2i train vqvae --kind` that lower the reconstruction loss, exact resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from t2i.autoencoders.dvae import DVAE, DVAE_CONFIGS, GumbelQuantizer, gumbel_temperature, kl_to_uniform, kl_weight
from t2i.autoencoders.tokenizers import (
    KINDS,
    build_tokenizer,
    dead_codes,
    load_tokenizer,
    round_trip,
    save_tokenizer,
    tokenizer_config_from_dict,
)
from t2i.autoencoders.vit_vqgan import VIT_VQGAN_CONFIGS, FactorizedQuantizer, ViTVQGAN
from t2i.autoencoders.vq import VQ_CONFIGS
from t2i.autoencoders.vqvae2 import VQVAE2, VQVAE2_CONFIGS
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.vqvae import VQTrainConfig, export_name, tokenizer_preset, train_vqvae, vq_loss

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_KINDS = ("vqgan", "vit-vqgan", "dvae", "vqvae2")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tokenizer(tokenizer_preset(kind, "tiny"))


# --- ViT-VQGAN: factorized, l2-normalised codes -------------------------------------------------------

def test_factorized_codes_pick_the_max_cosine_code_not_the_nearest_raw_vector() -> None:
    q = FactorizedQuantizer(16, 8).eval()
    z = torch.randn(2, 8, 3, 5, generator=_gen(1)) * 5.0  # (B, D, h, w), far from unit length
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)  # (30, D)
    cos = F.cosine_similarity(flat[:, None, :], q.codebook[None], dim=-1)  # (30, K), the definition
    assert torch.equal(out.codes.flatten(), cos.argmax(1))
    assert len(out.codes.unique()) > 4
    raw = torch.cdist(flat, q.codebook).argmin(1)  # plain nearest code by Euclidean distance: another rule
    assert not torch.equal(raw, cos.argmax(1))
    # the code vectors are the chosen codes at unit length
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).reshape(-1, 8), F.normalize(q.codebook[cos.argmax(1)]))
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 5))


def test_factorized_straight_through_and_codebook_gradients() -> None:
    q = FactorizedQuantizer(16, 8, beta=0.25).eval()
    z = torch.randn(2, 8, 3, 3, generator=_gen(2), requires_grad=True)
    w = torch.randn(2, 8, 3, 3, generator=_gen(3))
    (q(z).z_q * w).sum().backward()
    want = torch.autograd.grad((F.normalize(z, dim=1) * w).sum(), z)[0]  # dL/dz_q copied to the unit encoding
    torch.testing.assert_close(z.grad, want)
    assert q.codebook.grad is None  # the decoder's gradient never reaches the codebook ...
    q(z).commitment.backward()  # ... its own term does: ||sg(z) - e||^2 pulls the chosen codes
    used = q(z).codes.unique()
    assert q.codebook.grad[used].abs().sum(1).min() > 0
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    assert unused.any() and q.codebook.grad[unused].abs().max() == 0  # only the chosen codes move


def test_factorized_dead_codes_restart_at_the_batch_encodings() -> None:
    q = FactorizedQuantizer(8, 4, dead_threshold=1.0).train()
    z = torch.randn(4, 4, 2, 2, generator=_gen(4))
    out = q(z, _gen(5))
    used = out.codes.unique()
    assert int(out.dead_codes) == 8 - len(used)  # usage 0.99 < 1 for each unused code, restarted
    unit = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    for i in set(range(8)) - set(used.tolist()):
        assert (unit - q.codebook[i]).abs().sum(1).min() < 1e-6


# --- dVAE: Gumbel-softmax, schedules, KL to the uniform prior -------------------------------------------

def test_gumbel_temperature_and_kl_weight_schedules() -> None:
    assert gumbel_temperature(0, 1.0, 1 / 16, 1000) == 1.0
    assert gumbel_temperature(500, 1.0, 1 / 16, 1000) == pytest.approx((1 + 1 / 16) / 2)
    quarter = 1 / 16 + (15 / 16) * (1 + math.cos(math.pi / 4)) / 2  # half a cosine, a quarter of the way
    assert gumbel_temperature(250, 1.0, 1 / 16, 1000) == pytest.approx(quarter)
    assert gumbel_temperature(1000, 1.0, 1 / 16, 1000) == gumbel_temperature(5000, 1.0, 1 / 16, 1000) == 1 / 16
    taus = [gumbel_temperature(s, 1.0, 1 / 16, 1000) for s in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(taus, taus[1:], strict=False))  # strictly annealed
    assert kl_weight(0, 6.6, 100) == 0.0 and kl_weight(50, 6.6, 100) == pytest.approx(3.3)
    assert kl_weight(100, 6.6, 100) == kl_weight(10**6, 6.6, 100) == 6.6


def test_kl_to_uniform_equals_its_formula() -> None:
    logits = torch.randn(2, 7, 3, 4, generator=_gen(6)) * 3  # (B, K, h, w)
    q = logits.softmax(1)
    want = (q * (q.log() - math.log(1 / 7))).sum(1).mean()  # sum_k q_k log(q_k / (1/K)), mean over positions
    torch.testing.assert_close(kl_to_uniform(logits), want)
    assert kl_to_uniform(torch.zeros(1, 7, 2, 2)).abs() < 1e-6  # uniform posterior: 0
    peaked = torch.full((1, 7, 1, 1), -1e4)
    peaked[:, 3] = 0
    assert kl_to_uniform(peaked) == pytest.approx(math.log(7), abs=1e-4)  # certain posterior: log K


def test_gumbel_quantizer_relaxes_in_training_and_is_hard_in_eval() -> None:
    q = GumbelQuantizer(6, 3)
    logits = torch.randn(2, 6, 4, 4, generator=_gen(7), requires_grad=True)
    # eval: the argmax codes' vectors, exactly
    q.eval()
    hard = q(logits)
    assert torch.equal(hard.codes, logits.argmax(1))
    torch.testing.assert_close(hard.z_q, q.lookup(logits.argmax(1)), rtol=0, atol=0)
    # training: softmax((logits + g) / tau) @ codebook with this generator's Gumbel noise
    q.train()
    tau = 0.5
    soft = q(logits, tau, kl_weight=0.3, generator=_gen(8))
    u = torch.rand(logits.shape, generator=_gen(8))
    y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
    torch.testing.assert_close(soft.z_q, torch.einsum("bkhw,kd->bdhw", y, q.codebook))
    torch.testing.assert_close(soft.commitment, 0.3 * kl_to_uniform(logits))
    soft.z_q.sum().backward()  # differentiable: the encoder's logits get a gradient through the relaxation
    assert logits.grad.abs().sum() > 0
    # as tau -> 0 the relaxed sample becomes the one-hot of argmax(logits + g) (the Gumbel-max trick) ...
    cold = q(logits.detach(), 1e-4, generator=_gen(9)).z_q
    g = -torch.log(-torch.log(torch.rand(logits.shape, generator=_gen(9))))
    torch.testing.assert_close(cold, q.lookup((logits.detach() + g).argmax(1)), rtol=0, atol=1e-5)


def test_gumbel_max_samples_follow_the_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 20000
    g = -torch.log(-torch.log(torch.rand(n, 4, generator=_gen(10))))
    freq = torch.bincount((logits + g).argmax(1), minlength=4).float() / n
    torch.testing.assert_close(freq, logits.softmax(0), atol=0.01, rtol=0)


# --- VQ-VAE-2 -------------------------------------------------------------------------------------------

def test_vqvae2_levels_shapes_and_token_sequence() -> None:
    model = _tiny("vqvae2").eval()
    cfg = model.cfg
    x = torch.rand(2, 3, 16, 24, generator=_gen(11)) * 2 - 1
    with torch.no_grad():
        top, bottom = model.encode_levels(x)
        assert top.shape == (2, 2, 3) and bottom.shape == (2, 4, 6)  # top at half the bottom's resolution
        tokens, _ = model.encode(x)
        assert tokens.shape == (2, cfg.tokens(16, 24)) == (2, 6 + 24)
        assert tokens[:, :6].max() < cfg.top_codes <= tokens[:, 6:].min() and tokens.max() < cfg.num_codes
        t2, b2 = model.split_tokens(tokens, 16, 24)
        assert torch.equal(t2, top) and torch.equal(b2, bottom)
        img = model.decode_codes(tokens, 16, 24)
        assert img.shape == x.shape
        torch.testing.assert_close(img, model.decode_levels(top, bottom), rtol=0, atol=0)
        torch.testing.assert_close(model(x)[0], img, rtol=0, atol=1e-5)  # eval forward = the code round trip


def test_vqvae2_bottom_is_conditioned_on_the_top_and_both_codebooks_are_decoded() -> None:
    model = _tiny("vqvae2").eval()
    x = torch.rand(1, 3, 16, 16, generator=_gen(12)) * 2 - 1
    with torch.no_grad():
        top, bottom = model.encode_levels(x)
        base = model.decode_levels(top, bottom)
        assert (model.decode_levels((top + 1) % 16, bottom) - base).abs().max() > 1e-4  # the top is decoded
        assert (model.decode_levels(top, (bottom + 1) % 32) - base).abs().max() > 1e-4  # the bottom is too
    # the bottom quantizer's input reads the top's decoding of its codes
    h_b = model.encoder(x)
    e_t = model.quantize_top.lookup(top).requires_grad_(True)
    z_b = model.quant_conv(torch.cat([h_b, model.decoder_top(e_t)], 1))
    assert torch.autograd.grad(z_b.sum(), e_t)[0].abs().sum() > 0


# --- every kind: exact round trips, files, training ------------------------------------------------------

@pytest.mark.parametrize("kind", ["vqvae", *NEW_KINDS])
def test_codebook_vectors_round_trip_exactly(kind: str) -> None:
    model = _tiny(kind).eval()
    with torch.no_grad():
        if kind == "vqvae2":
            for vq, k in ((model.quantize_top, 16), (model.quantize, 32)):
                vq.codebook.normal_()
                every = torch.arange(k).view(1, -1, 1)
                assert torch.equal(vq(vq.lookup(every)).codes, every)
            tokens = torch.cat([torch.arange(4).view(1, 4), torch.arange(16, 32).view(1, 16)], 1)  # (1, 20)
            assert torch.equal(model.split_tokens(tokens, 16, 16)[0].flatten(1), tokens[:, :4])
            return
        quantize = model.quantize
        every = torch.arange(32).view(2, 4, 4)
        if kind == "dvae":  # no search: a code is decoded through its codebook row, whatever the path
            torch.testing.assert_close(model.decode_codes(every), model.decode(F.embedding(every, quantize.codebook)
                                                                               .permute(0, 3, 1, 2)), rtol=0, atol=0)
            x = torch.rand(2, 3, 16, 16, generator=_gen(13)) * 2 - 1
            torch.testing.assert_close(model(x)[0], round_trip(model, x), rtol=0, atol=0)
            return
        if kind in ("vqvae", "vqgan"):
            quantize.codebook.normal_()
        vectors = quantize.lookup(every)  # (2, D, 4, 4)
        back = quantize(vectors)
        assert torch.equal(back.codes, every)
        torch.testing.assert_close(back.z_q, vectors, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_files_are_self_describing_and_load_by_kind(kind: str, tmp_path) -> None:
    model = _tiny(kind).eval()
    path = tmp_path / export_name(kind)
    save_tokenizer(model, path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # a token model's saved `vq` entry reads back as the same config
    assert tokenizer_config_from_dict(dataclasses.asdict(model.cfg)) == model.cfg
    x = torch.rand(1, 3, 16, 16, generator=_gen(14)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(round_trip(loaded, x), round_trip(model, x), rtol=0, atol=0)
    # a file stored in 16 bits (as training_state/ keeps one) loads in float32, the CPU's compute dtype
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}, half,
              metadata=safe_metadata(path))
    assert {p.dtype for p in load_tokenizer(half).parameters()} == {torch.float32}
    # a VQGAN file is a VQ-VAE file: what reads one (the token families' load_vqvae) reads it
    if kind == "vqgan":
        from t2i.train.vqvae import load_vqvae

        assert load_vqvae(path).cfg == model.cfg


def safe_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_old_vq_configs_read_as_vqvae_and_a_foreign_file_is_refused(tmp_path) -> None:
    cfg = dataclasses.asdict(VQ_CONFIGS["tiny"])  # no "kind": a file from before the other kinds
    assert tokenizer_config_from_dict(cfg) == VQ_CONFIGS["tiny"]
    saved = VQTrainConfig(out="x").to_dict()
    del saved["kind"]
    assert VQTrainConfig.from_dict(saved).vq == VQ_CONFIGS["f4"]
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_config_from_dict({"kind": "nope"})
    from t2i.checkpoints.io import save_with_config

    save_with_config({"w": torch.zeros(1)}, tmp_path / "other.safetensors", {"a": 1}, "shapes_ldm")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "other.safetensors")


def test_perceptual_distance_on_the_clip_tower() -> None:
    from t2i.autoencoders.perceptual import CLIPPerceptual
    from t2i.autoencoders.vqgan import VQGANLoss, VQGANLossConfig

    p = CLIPPerceptual.load()
    x, _, _ = open_data("shapes", None, 64, seed=3).batch(0, 4, DistInfo())  # (4, 3, 64, 64)
    assert p(x, x).abs().max() < 1e-6
    noise = torch.randn(x.shape, generator=_gen(15))
    small, large = p(x + 0.05 * noise, x), p(x + 0.5 * noise, x)
    assert (small > 0).all() and (large > small).all()
    y = (x + 0.3 * noise).requires_grad_(True)
    p(y, x).sum().backward()  # the gradient reaches the reconstruction, the tower stays frozen
    assert y.grad.abs().sum() > 0 and all(t.grad is None for t in p.parameters())
    loss = VQGANLoss(VQGANLossConfig(), p)
    assert not any(k.startswith("perceptual") or "vision" in k for k in loss.state_dict())  # never checkpointed


def _run_cfg(kind: str, out: str, steps: int, **kw) -> VQTrainConfig:
    vq = tokenizer_preset(kind, "tiny")
    if kind == "vqvae2":
        vq = dataclasses.replace(vq, bottom_codes=64)  # restarts on both sides of a split
    cfg = VQTrainConfig(out=out, kind=kind, vq=vq, image_size=16, steps=steps, batch_size=8, lr=2e-3, warmup=2,
                        log_every=1, ckpt_every=3, image_every=0, tau_steps=4, kl_steps=2, **kw)
    cfg.gan.disc_start = 2  # the discriminator and the adaptive weight on both sides of a split
    return cfg


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_resumed_run_equals_an_uninterrupted_one(kind: str, tmp_path) -> None:
    from safetensors.torch import load_file

    assert train_vqvae(_run_cfg(kind, str(tmp_path / "full"), 6)) == 0
    assert train_vqvae(_run_cfg(kind, str(tmp_path / "split"), 3)) == 0
    assert train_vqvae(_run_cfg(kind, str(tmp_path / "split"), 6), resume=True) == 0
    name = export_name(kind)
    full, split = (load_file(tmp_path / run / name) for run in ("full", "split"))
    for key in full:
        assert torch.equal(full[key], split[key]), key
    log = (tmp_path / "full" / "log.txt").read_text()
    assert "vq/perplexity" in log and "vq/dead_codes" in log
    if KINDS[kind].gan:
        assert "vq/d_weight" in log and "vq/perceptual" in log and "disc/loss" in log
    if kind == "dvae":
        assert "vq/tau" in log and "vq/kl=" in log


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_tiny_run_lowers_reconstruction_loss(kind: str, tmp_path) -> None:
    out = tmp_path / kind
    cfg = _run_cfg(kind, str(out), 40)
    cfg.gan.disc_start = 1000  # the adversarial term would only add noise to 40 steps
    cfg.log_every, cfg.ckpt_every, cfg.batch_size = 10, 1000, 16
    x, _, _ = open_data("shapes", None, 16, seed=7).batch(0, 32, DistInfo())  # held-out scenes
    fresh = _tiny(kind).eval()  # fit's seed 0: the run's initial weights
    with torch.no_grad():
        before = vq_loss(fresh, x)[1]["vq/rec_mse"]
    assert train_vqvae(cfg) == 0
    model = load_tokenizer(out / export_name(kind))
    with torch.no_grad():
        after = vq_loss(model, x)[1]
        codes = model.encode(x)[0]
    print(f"{kind}: rec MSE {before:.4f} -> {after['vq/rec_mse']:.4f}, held-out perplexity "
          f"{after['vq/perplexity']:.2f}, {len(codes.unique())} codes used, {dead_codes(model)} dead")
    assert after["vq/rec_mse"] < 0.8 * before
    assert len(codes.unique()) > 3


def test_configs_of_every_kind_have_the_token_interface() -> None:
    for kind, k in KINDS.items():
        for name, cfg in k.presets.items():
            assert cfg.num_codes > 0 and cfg.downsample_factor in (4, 8), (kind, name)
            assert cfg.sample_size % cfg.downsample_factor == 0
    assert isinstance(build_tokenizer(VIT_VQGAN_CONFIGS["tiny"]), ViTVQGAN)
    assert isinstance(build_tokenizer(DVAE_CONFIGS["tiny"]), DVAE)
    assert isinstance(build_tokenizer(VQVAE2_CONFIGS["tiny"]), VQVAE2)
    with pytest.raises(ValueError, match="must match"):
        train_vqvae(VQTrainConfig(out="/nonexistent/x", kind="vit-vqgan", vq=VIT_VQGAN_CONFIGS["tiny"], image_size=32))


def test_options_of_another_kind_are_refused() -> None:
    from t2i.train.vqvae import check_network_options

    check_network_options(tokenizer_preset("dvae", "tiny"), {"vq.num_codes": "--codes"})  # the dVAE has K
    with pytest.raises(ValueError, match="--codebook-decay does not apply to a dvae"):
        check_network_options(tokenizer_preset("dvae", "tiny"), {"vq.decay": "--codebook-decay"})
    with pytest.raises(ValueError, match="--codes does not apply to a vqvae2"):
        check_network_options(tokenizer_preset("vqvae2", "tiny"), {"vq.num_codes": "--codes"})
