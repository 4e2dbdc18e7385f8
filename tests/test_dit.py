"""The DiT family: parity with diffusers' DiTPipeline on a tiny random DiTTransformer2DModel saved by
diffusers (classifier-free guidance on the eps half, learned variance dropped), class names from
id2label, and the network's own properties (adaLN-Zero starts as zero, the 2D position embedding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import t2i
from t2i.checkpoints.diffusers_dit import dit_config_from_diffusers, dit_state_dict_to_diffusers
from t2i.checkpoints.io import CheckpointError
from t2i.nets.dit import DIT_PRESETS, DiT, sincos_2d
from t2i.systems.dit import DiTPipeline
from t2i.systems.registry import resolve

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUT_SCALE = 8.0  # as tests/sd_oracles.py: a random network barely moves the sample otherwise
ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "white shark", "3": "tiger shark", "4": "hammerhead"}


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    """(folder, the diffusers DiTPipeline loaded back from it): a tiny random DiTTransformer2DModel (2 layers,
    width 32, patch 2 on 8x8 latents, learned variance, 1000 classes + null: diffusers' pipeline hard-codes
    the null class as 1000; 5 of them named), every block's embedding copy
    tied to block 0's as converted DiT checkpoints are, output projection x8; a tiny f=2 AutoencoderKL and
    DiT's DDIM schedule (linear betas, no clipping)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in tr.parameters():  # adaLN-Zero and the final layer may start at zero: randomise everything
            p.copy_(torch.randn_like(p) * 0.1)
        emb = tr.transformer_blocks[0].norm1.emb.state_dict()
        for block in tr.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb)
        tr.proj_out_2.weight.mul_(OUTPUT_SCALE)
        tr.proj_out_2.bias.mul_(OUTPUT_SCALE)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    folder = tmp_path_factory.mktemp("dit") / "dit-tiny"
    diffusers.DiTPipeline(tr, vae, scheduler, id2label=ID2LABEL).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if "id2label" not in index:  # the pipeline takes it at init; a saved folder carries it in the index
        index["id2label"] = ID2LABEL
        (folder / "model_index.json").write_text(json.dumps(index))
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.labels["Tinca tinca"] == 0
    return folder, pipe


def _diffusers_latents(pipe, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents, np images) of a diffusers DiTPipeline call: the latents are what reaches vae.decode,
    times the scaling factor."""
    seen = []
    decode = pipe.vae.decode

    def spy(z, *a, **k):
        seen.append(z * pipe.vae.config.scaling_factor)
        return decode(z, *a, **k)

    pipe.vae.decode = spy
    try:
        images = pipe(output_type="np", **kwargs).images
    finally:
        pipe.vae.decode = decode
    return seen[0], images


def _relative(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / ref.std())


def test_the_folder_is_detected_as_dit_with_its_class_names(diffusers_dit):
    folder, _ = diffusers_dit
    assert resolve(folder)[0].name == "dit"
    pipe = t2i.load(folder)
    assert isinstance(pipe, DiTPipeline) and pipe.unet.cfg.learn_sigma and pipe.unet.cfg.num_classes == 1000
    assert pipe.capabilities.native_size == (16, 16) and pipe.capabilities.accepts("guidance")
    assert pipe.class_id("tench, Tinca tinca") == pipe.class_id("Tinca tinca") == 0 and pipe.class_id("hammerhead") == 4
    with pytest.raises(ValueError, match="'goldfish'"):
        pipe.generate("a red circle", steps=1)


def test_the_transformer_output_equals_diffusers(diffusers_dit):
    """One network call, conditional and null class together: both output halves (eps, variance values)."""
    folder, ref = diffusers_dit
    net = t2i.load(folder).unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([999, 10]), torch.tensor([3, 1000])
    with torch.no_grad():
        want = ref.transformer(x, timestep=t, class_labels=labels).sample
        got = net(x, t, labels)
    assert got.shape == want.shape == (2, 8, 8, 8)
    assert _relative(got, want) < 1e-5


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ddim_final_latents_equal_diffusers_dit_pipeline(diffusers_dit, guidance):
    """DDIM 10 steps, with and without guidance (diffusers guides the eps half, batch [cond, null]):
    the same final latents and images from the same seed. Measured: 2.1e-6 and 2.3e-6 of the std."""
    folder, ref = diffusers_dit
    ours = t2i.load(folder).generate("white shark", seed=7, steps=10, guidance=guidance, sampler="ddim")
    want, images = _diffusers_latents(ref, class_labels=[2], guidance_scale=guidance, num_inference_steps=10,
                                      generator=torch.Generator("cpu").manual_seed(7))
    rel = _relative(ours.sample, want)
    print(f"guidance {guidance}: latents {rel:.2e} of the std")
    assert rel < 2e-4
    assert np.abs(np.asarray(ours.images[0], dtype=np.float64) / 255 - images[0]).max() < 2 / 255
    other = t2i.load(folder).generate("goldfish", seed=7, steps=10, guidance=guidance, sampler="ddim").sample
    assert _relative(other, want) > 1e-2  # the class matters at this scale


def test_dpmpp_2m_final_latents_equal_diffusers_with_dpm_solver(diffusers_dit):
    """DPMSolverMultistepScheduler.from_config of the folder's DDIM config, as DiT's model card runs it.
    Measured: 1.7e-6 of the std."""
    diffusers = pytest.importorskip("diffusers")
    folder, ref = diffusers_dit
    dpm = diffusers.DiTPipeline(ref.transformer, ref.vae, diffusers.DPMSolverMultistepScheduler.from_config(
        ref.scheduler.config), id2label=ID2LABEL)
    dpm.set_progress_bar_config(disable=True)
    want, _ = _diffusers_latents(dpm, class_labels=[4], guidance_scale=3.0, num_inference_steps=8,
                                 generator=torch.Generator("cpu").manual_seed(2))
    ours = t2i.load(folder).generate("hammerhead", seed=2, steps=8, guidance=3.0, sampler="dpmpp_2m")
    rel = _relative(ours.sample, want)
    print(f"dpmpp_2m: latents {rel:.2e} of the std")
    assert rel < 2e-4


def test_bf16_weights_generate_close_to_fp32(diffusers_dit):
    folder, _ = diffusers_dit
    full = t2i.load(folder).generate("goldfish", seed=1, steps=4, guidance=2.0).sample
    half = t2i.load(folder, precision="bf16").generate("goldfish", seed=1, steps=4, guidance=2.0).sample
    assert half.dtype == torch.float32 and 0 < _relative(half, full) < 0.2


def test_the_older_transformer2dmodel_config_loads_and_without_id2label_prompts_are_class_ids(diffusers_dit, tmp_path):
    """facebook/DiT-XL-2-256 names its transformer Transformer2DModel, with the U-Net-era keys set to their
    no-op values; the weights are named the same. Without id2label the prompt is a class id."""
    import shutil

    folder, _ = diffusers_dit
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "transformer" / "config.json").read_text())
    cfg.update({"_class_name": "Transformer2DModel", "cross_attention_dim": None, "num_vector_embeds": None,
                "use_linear_projection": False, "only_cross_attention": False, "upcast_attention": False,
                "norm_num_groups": 32, "dropout": 0.0})
    (old / "transformer" / "config.json").write_text(json.dumps(cfg))
    index = json.loads((old / "model_index.json").read_text())
    del index["id2label"]
    (old / "model_index.json").write_text(json.dumps(index))
    a = t2i.load(old).generate("2", seed=7, steps=3).sample
    assert torch.equal(a, t2i.load(folder).generate("white shark", seed=7, steps=3).sample)
    with pytest.raises(ValueError, match="class ids 0..999"):
        t2i.load(old).generate("white shark", steps=1)
    cfg["num_vector_embeds"] = 4096  # VQ-Diffusion's discrete transformer: not a DiT
    (old / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_vector_embeds"):
        t2i.load(old)


def test_blocks_whose_embedding_copies_differ_are_refused(diffusers_dit, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = diffusers_dit
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    file = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1
    save_file(state, file)
    with pytest.raises(CheckpointError, match="block 0's copy"):
        t2i.load(bad)


def test_adaln_zero_starts_as_zero_and_the_position_embedding_is_maes():
    """A fresh DiT outputs zeros (zero final layer, zero-gated blocks); the sin-cos table puts the column in
    the first half and the row in the second, sin then cos of each."""
    net = DiT(DIT_PRESETS["tiny"])
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 8]))
    assert out.shape == (2, 8, 8, 8) and not out.abs().max()
    pos = sincos_2d(8, 2, 2, 2)  # (4 tokens, 8): column c, row r at token 2r + c
    one = [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)]
    assert torch.allclose(pos[3], torch.tensor(one + one).float())
    assert torch.allclose(pos[1], torch.tensor(one + [0, 0, 1, 1]).float())


def test_config_round_trips_and_unsupported_options_are_refused():
    cfg = DIT_PRESETS["tiny"]
    from t2i.checkpoints.diffusers_dit import dit_config_to_diffusers

    assert dit_config_from_diffusers(dit_config_to_diffusers(cfg)) == cfg
    with pytest.raises(ValueError, match="norm_type"):
        dit_config_from_diffusers({**dit_config_to_diffusers(cfg), "norm_type": "ada_norm_single"})
    state = DiT(cfg).state_dict()
    assert sum(k.endswith("norm1.emb.class_embedder.embedding_table.weight")
               for k in dit_state_dict_to_diffusers(state, cfg.layers)) == cfg.layers
