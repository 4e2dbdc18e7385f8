"""The VQ-VAE tokenizer: nearest-code quantization, the straight-through gradient, the EMA codebook
formula, dead-code restarts, a tiny training run through `t2i train vqvae`, exact code round trips,
and parity with diffusers' VQModel on the same random weights (diffusers is the oracle only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from t2i.autoencoders.vq import VQ_CONFIGS, VectorQuantizer, VQAutoencoder, code_perplexity
from t2i.train.data import open_data
from t2i.train.distributed import DistInfo
from t2i.train.vqvae import load_vqvae, vq_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantizer(k: int = 16, d: int = 4, **kw: float) -> VectorQuantizer:
    q = VectorQuantizer(k, d, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(k, d, generator=torch.Generator().manual_seed(0)))
        q.embed_avg.copy_(q.codebook)
    return q


def test_quantizer_picks_nearest_code() -> None:
    q = _quantizer().eval()
    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)  # (30, D)
    dist = ((flat[:, None, :] - q.codebook[None]) ** 2).sum(-1)  # (30, K), the definition
    assert out.codes.shape == (2, 5, 3) and out.codes.dtype == torch.int64
    assert torch.equal(out.codes.flatten(), dist.argmin(1))
    assert len(out.codes.unique()) > 4  # a real choice among many codes, not one winner
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).reshape(-1, 4), q.codebook[dist.argmin(1)])
    # commitment = beta * mean ||z - e||^2 and perplexity from the histogram
    torch.testing.assert_close(out.commitment, 0.25 * dist.min(1).values.sum() / z.numel())
    p = torch.bincount(out.codes.flatten(), minlength=16).float() / 30
    p = p[p > 0]
    torch.testing.assert_close(out.perplexity, torch.exp(-(p * p.log()).sum()))
    assert code_perplexity(torch.zeros(10, dtype=torch.long), 16).item() == pytest.approx(1.0)
    assert code_perplexity(torch.arange(16), 16).item() == pytest.approx(16.0)


def test_straight_through_gradient_reaches_encoder() -> None:
    q = _quantizer().eval()
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    out = q(z)
    (out.z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w, rtol=0, atol=0)  # dL/dz_e = dL/dz_q, copied exactly
    z.grad = None
    q(z).commitment.backward()  # beta * mean ||z - sg(e)||^2 pulls z to its code
    torch.testing.assert_close(z.grad, 2 * 0.25 * (z - out.z_q).detach() / z.numel())

    torch.manual_seed(0)
    model = VQAutoencoder(VQ_CONFIGS["tiny"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, qz = model(x)
    recon.square().mean().backward()  # the reconstruction alone: its only way to the encoder is straight-through
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_ema_update_follows_the_formula() -> None:
    decay, eps = 0.9, 1e-5
    q = VectorQuantizer(3, 2, decay=decay, eps=eps, dead_threshold=0.0)
    e = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    n0 = torch.tensor([2.0, 1.0, 0.5])
    with torch.no_grad():
        q.codebook.copy_(e)
        q.cluster_size.copy_(n0)
        q.embed_avg.copy_(e * n0[:, None])
    flat = torch.tensor([[1.0, 1.0], [-1.0, 3.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 unused
    codes = q.nearest(flat)
    assert codes.tolist() == [0, 0, 1]
    q.ema_update(flat, codes)
    # VQ-VAE eq. 6-8: N <- g N + (1 - g) n, m <- g m + (1 - g) sum, e = m / Laplace(N)
    n = decay * n0 + (1 - decay) * torch.tensor([2.0, 1.0, 0.0])
    m = decay * e * n0[:, None] + (1 - decay) * torch.tensor([[0.0, 4.0], [9.0, 1.0], [0.0, 0.0]])
    smoothed = (n + eps) / (n.sum() + 3 * eps) * n.sum()
    torch.testing.assert_close(q.cluster_size, n)
    torch.testing.assert_close(q.embed_avg, m)
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])
    # the used codes moved toward the mean of their encodings; the unused one barely moved
    assert (q.codebook[0] - torch.tensor([0.0, 2.0])).norm() < (e[0] - torch.tensor([0.0, 2.0])).norm()
    assert (q.codebook[1] - flat[2]).norm() < (e[1] - flat[2]).norm()
    assert (q.codebook[2] - e[2]).norm() < 1e-3


def test_dead_codes_are_restarted_from_the_batch() -> None:
    q = _quantizer(k=8, d=4).train()
    with torch.no_grad():  # code 0 near the data, every other code far away: only code 0 is ever chosen
        q.codebook[1:] += 100.0
        q.embed_avg.copy_(q.codebook)
    z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.1  # (B, D, h, w)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    out = q(z, torch.Generator().manual_seed(5))
    assert out.perplexity.item() == pytest.approx(1.0)
    assert int(out.dead_codes) == 7  # N = 0.99 < 1 for the 7 unused codes
    for i in range(1, 8):  # each restarted code is one of the batch's encodings
        assert (flat - q.codebook[i]).abs().sum(1).min() == 0
    assert q.cluster_size[1:].tolist() == [1.0] * 7
    torch.testing.assert_close(q.embed_avg[1:], q.codebook[1:])
    again = q(z, torch.Generator().manual_seed(6))
    assert again.perplexity.item() > 2.0  # the restarted codes now share the data
    # without restarts the same start keeps one code
    still = _quantizer(k=8, d=4, dead_threshold=0.0).train()
    with torch.no_grad():
        still.codebook[1:] += 100.0
        still.embed_avg.copy_(still.codebook)
    still(z)
    assert int(still(z).dead_codes) == 0 and still(z).perplexity.item() == pytest.approx(1.0)


def _two_clusters(k: int = 8) -> tuple[VectorQuantizer, torch.Tensor]:
    """Codes 0 and 1 at two clusters of encodings (0: the first half, 1: the second), the others far."""
    q = VectorQuantizer(k, 4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(k, 4, generator=g) + 100.0)
        q.codebook[0], q.codebook[1] = torch.full((4,), -3.0), torch.full((4,), 3.0)
        q.embed_avg.copy_(q.codebook)
    flat = torch.cat([torch.randn(12, 4, generator=g) - 3.0, torch.randn(12, 4, generator=g) + 3.0])  # (24, D)
    return q, flat


def _ema_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    q, flat = _two_clusters()
    half = flat.chunk(world)[rank]  # rank 0 sees only cluster 0, rank 1 only cluster 1
    q.ema_update(half, q.nearest(half), torch.Generator().manual_seed(100 + rank))
    torch.save(q.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ema_update_over_two_ranks_sees_the_global_batch(tmp_path) -> None:
    torch.multiprocessing.spawn(_ema_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name in r0:  # every rank holds the same codebook by itself
        assert torch.equal(r0[name], r1[name]), name
    q, flat = _two_clusters()
    q.ema_update(flat, q.nearest(flat))  # one process, the whole batch
    for name in ("cluster_size", "embed_avg", "codebook"):  # codes 0 and 1: the global statistics
        torch.testing.assert_close(r0[name][:2], getattr(q, name)[:2])
    assert r0["cluster_size"][1] > 1.0  # alone, rank 0 would have restarted code 1 (0 uses on its half)
    for i in range(2, 8):  # the dead ones restarted at rank 0's encodings
        assert (flat[:12] - r0["codebook"][i]).abs().sum(1).min() == 0


def test_codes_round_trip_through_decode_codes() -> None:
    torch.manual_seed(0)
    model = VQAutoencoder(VQ_CONFIGS["tiny"]).eval()
    with torch.no_grad():
        model.quantize.codebook.normal_()
        x = torch.rand(2, 3, 16, 12) * 2 - 1
        codes, z_q = model.encode(x)
        assert codes.shape == (2, 4, 3) and codes.dtype == torch.int64
        torch.testing.assert_close(model.decode_codes(codes), model.decode(z_q), rtol=0, atol=0)
        # forward's z_e + (z_q - z_e) is z_q up to float rounding
        torch.testing.assert_close(model(x)[0], model.decode(z_q), rtol=0, atol=1e-5)
        # every codebook vector quantizes to itself: codes -> vectors -> codes is exact
        every = torch.arange(32).view(2, 4, 4)
        back = model.quantize(model.quantize.lookup(every))
        assert torch.equal(back.codes, every)
        assert torch.equal(back.z_q, model.quantize.lookup(every))


def test_tiny_vqvae_run_lowers_reconstruction_and_uses_the_codebook(tmp_path) -> None:
    from t2i.cli import main  # here, not at the top: the two-rank test's workers import this module

    out = tmp_path / "vq"
    args = ["train", "vqvae", "--out", str(out), "--preset", "tiny", "--image-size", "16", "--steps", "50",
            "--batch-size", "16", "--lr", "2e-3", "--warmup", "5", "--log-every", "10", "--ckpt-every", "1000",
            "--image-every", "0", "--seed", "0"]
    x, _, _ = open_data("shapes", None, 16, seed=7).batch(0, 32, DistInfo())  # held-out scenes
    torch.manual_seed(0)  # fit's seed: the run's initial weights
    fresh = VQAutoencoder(dataclasses.replace(VQ_CONFIGS["tiny"])).eval()
    with torch.no_grad():
        before = vq_loss(fresh, x)[1]
    assert main(args) == 0
    model = load_vqvae(out / "vqvae.safetensors")
    with torch.no_grad():
        after = vq_loss(model, x)[1]
        codes = model.encode(x)[0]
    used = len(codes.unique())
    print(f"rec MSE before {before['vq/rec_mse']:.4f} after {after['vq/rec_mse']:.4f}; held-out perplexity "
          f"{after['vq/perplexity']:.2f}, {used}/32 codes used, dead {after['vq/dead_codes']:.0f}")
    # a tiny network learns slowly: after 50 steps, ~0.6 of the start, as the same network without
    # quantization reaches (the codebook is not what limits it)
    assert after["vq/rec_mse"] < 0.75 * before["vq/rec_mse"]
    assert after["vq/perplexity"] > 2.0 and used > 4
    logged = (out / "log.txt").read_text()
    assert "vq/perplexity" in logged and "vq/dead_codes" in logged


def test_diffusers_vqmodel_loads_with_the_same_codes_and_images(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from t2i.checkpoints.diffusers_vq import load_diffusers_vq

    torch.manual_seed(0)
    ref = diffusers.VQModel(
        block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        num_vq_embeddings=64, vq_embed_dim=6, sample_size=32).eval()
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square on purpose
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # norm affines away from (1, 0), so layout mistakes show
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        # a codebook among this input's latents, so that many codes are chosen
        flat = ref.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 6)  # (96, D)
        pick = flat[torch.randperm(96, generator=g)[:64]]
        ref.quantize.embedding.weight.copy_(pick + 0.1 * flat.std() * torch.randn(pick.shape, generator=g))
    ref.save_pretrained(tmp_path / "vq")
    ours = load_diffusers_vq(tmp_path / "vq")
    with torch.no_grad():
        h = ref.encode(x).latents  # (B, D, h, w) before quantization
        want_codes = ref.quantize(h)[2][2].view(2, 8, 6)
        want = ref.decode(h).sample  # quantize + decode
        codes, z_q = ours.encode(x)
        got = ours.decode_codes(codes)
    assert len(codes.unique()) > 10
    assert torch.equal(codes, want_codes)
    assert (ours.encode_latents(x) - h).abs().max() < 1e-5
    err = (got - want).abs().max().item()
    print(f"decoded max |diff| {err:.2e} (image std {want.std():.2f})")
    assert err < 1e-5


def test_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    from safetensors.torch import load_file

    from t2i.train.vqvae import VQTrainConfig, train_vqvae

    def cfg(out: str, steps: int) -> VQTrainConfig:
        # 64 codes for 4 x 16 encodings a step: restarts happen at every step, on both sides of the split
        vq = dataclasses.replace(VQ_CONFIGS["tiny"], num_codes=64)
        return VQTrainConfig(out=str(tmp_path / out), vq=vq, image_size=16, steps=steps, batch_size=4, lr=2e-3,
                             warmup=2, log_every=1, ckpt_every=3, image_every=0)

    assert train_vqvae(cfg("full", 6)) == 0
    assert train_vqvae(cfg("split", 3)) == 0
    assert train_vqvae(cfg("split", 6), resume=True) == 0
    full, split = (load_file(tmp_path / run / "vqvae.safetensors") for run in ("full", "split"))
    for name in full:
        assert torch.equal(full[name], split[name]), name
    dead = [float(line.split("vq/dead_codes=")[1].split()[0])
            for line in (tmp_path / "full" / "log.txt").read_text().splitlines() if "vq/dead_codes=" in line]
    assert len(dead) == 6 and min(dead[3:]) > 0, dead
