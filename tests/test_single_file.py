"""Single-file checkpoints in the original SD layout (issue 3).

Tiny random pipelines are built in diffusers, saved as folders, loaded in t2i and exported by
t2i as one `.safetensors`. The oracle that the layout is the real one: diffusers'
`from_single_file(FILE, config=FOLDER)` must read the export with every weight identical,
and at full size (meta tensors, no memory) diffusers' own converters must map the export's
keys onto the released models' parameter names. Then the single file, loaded by t2i,
must generate the latents diffusers generates from the folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from sd_oracles import _clip, _scale_output, _tokenizer, _vae, build_sd1, build_sd2, reference_latents

import t2i
from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
from t2i.checkpoints.export import to_original_state_dict
from t2i.checkpoints.io import load_state_dict, save_state_dict
from t2i.checkpoints.openclip import identity_openclip_layer
from t2i.checkpoints.sd_keys import (
    TEXT_SLOTS,
    UNET_PREFIX,
    text_from_ours,
    text_state,
    unet_to_original,
    vae_to_original,
)
from t2i.checkpoints.single_file import load_single_file
from t2i.checkpoints.single_file_config import (
    detect_layout,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
    resolve_config,
)
from t2i.nets.unet import UNet
from t2i.systems.stable_diffusion import export as save_single_file
from t2i.systems.stable_diffusion import parts_of
from t2i.text.clip import CLIP_TEXT_PRESETS, CLIPTextModel, clip_layer

diffusers = pytest.importorskip("diffusers")
TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' latents (as in issue 2)


# ------------------------------------------------------------------------------ extra tiny oracles
def _unet(**kw):
    base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                norm_num_groups=8)
    unet = diffusers.UNet2DConditionModel(**{**base, **kw})
    _scale_output(unet)
    return unet


def _euler():
    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def build_sdxl_wide(folder: Path, seed: int = 0):
    """SDXL-like with encoders of different widths (32 and 48): diffusers' single-file loader
    tells its two CLIP towers apart by width, so equal widths would make it read the wrong one."""
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=80, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(32, 2, "quick_gelu", 49407),
        text_encoder_2=_clip(48, 2, "gelu", 49407, projection=40),
        tokenizer=_tokenizer(folder / "tokenizer", "<|endoftext|>"),
        tokenizer_2=_tokenizer(folder / "tokenizer_2", "!"),
        unet=unet, scheduler=_euler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_refiner(folder: Path, seed: int = 0):
    """SDXL-refiner-like: only the OpenCLIP tower, 5 time ids (aesthetic score)."""
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=48, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=2, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 5 * 8)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=_clip(48, 2, "gelu", 49407, projection=40), tokenizer=None,
        tokenizer_2=_tokenizer(folder / "tokenizer_2", "!"), unet=unet, scheduler=_euler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sd1_inpaint(folder: Path, seed: int = 0):
    """SD1-like inpainting: 9 input channels (latents, mask, masked-image latents)."""
    torch.manual_seed(seed)
    unet = _unet(in_channels=9, cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=_vae(), text_encoder=_clip(32, 2, "quick_gelu", 2),
        tokenizer=_tokenizer(folder / "tokenizer", "<|endoftext|>"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


CASES = {
    "sd1": (build_sd1, "StableDiffusionPipeline"),
    "sd2": (build_sd2, "StableDiffusionPipeline"),
    "sdxl": (build_sdxl_wide, "StableDiffusionXLPipeline"),
    "sdxl_refiner": (build_refiner, "StableDiffusionXLImg2ImgPipeline"),
    "sd1_inpaint": (build_sd1_inpaint, "StableDiffusionInpaintPipeline"),
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, diffusers pipeline, folder, t2i pipeline from the folder, exported single file,
    t2i pipeline from the single file)."""
    root = tmp_path_factory.mktemp(request.param)
    reference = CASES[request.param][0](root / "model")
    ours = t2i.load(root / "model")
    file = save_single_file(ours, root / "model.safetensors")
    return request.param, reference, root / "model", ours, file, t2i.load(file)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: key sets differ"
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def test_diffusers_from_single_file_reads_our_export(case):
    """The oracle for the key layout: diffusers' own single-file loader, configs from the folder."""
    name, reference, folder, _ours, file, _loaded = case
    cls = getattr(diffusers, CASES[name][1])
    loaded = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    checked = 0
    for part in COMPONENTS:
        ref = getattr(reference, part, None)
        if ref is None:
            continue
        _assert_same_weights(ref, getattr(loaded, part), f"{name} {part}")
        checked += 1
    assert checked == {"sdxl": 4, "sdxl_refiner": 3}.get(name, 3)


def test_detected_family_and_channels(case):
    name, _reference, _folder, _ours, file, _loaded = case
    state = load_state_dict(file)
    assert detect_layout(state) == name.removesuffix("_inpaint")
    assert state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == (9 if "inpaint" in name else 4)


def test_single_file_loads_the_same_weights_as_the_folder(case):
    name, _reference, _folder, ours, _file, loaded = case
    _assert_same_weights(ours.unet, loaded.unet, f"{name} unet")
    _assert_same_weights(ours.vae, loaded.vae, f"{name} vae")
    _assert_same_weights(ours.text_encoder, loaded.text_encoder, f"{name} text encoder")
    assert loaded.schedule == ours.schedule
    assert loaded.zero_empty_negative == ours.zero_empty_negative


def test_single_file_generates_the_reference_latents(case):
    """The single file, loaded by t2i, lands on diffusers' latents from the folder original (one
    sampler: the samplers themselves are tested in test_sd_pipeline_parity)."""
    name, reference, _folder, ours, _file, loaded = case
    sampler = "euler"
    if name in ("sdxl_refiner", "sd1_inpaint"):
        pytest.skip("text-to-image sampling needs a 4-channel U-Net with 6 time ids; see the U-Net test below")
    prompt, seed, steps, guidance = "a red circle above a blue square", 5, 4, 5.0
    expected = reference_latents(reference, prompt, sampler, False, steps, guidance, seed, 16)
    got = loaded.generate(prompt, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                                  width=16, height=16).latents
    err = ((got - expected).abs().max() / expected.std()).item()
    assert err < TOLERANCE, f"{name} {sampler}: relative error {err:.2e}"
    from_folder = ours.generate(prompt, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                                width=16, height=16).latents
    assert torch.equal(got, from_folder)


def test_unet_of_single_file_matches_diffusers(case):
    """Inpainting (9 channels) and refiner (5 time ids) U-Nets load from the file and run."""
    name, reference, _folder, _ours, _file, loaded = case
    if name not in ("sdxl_refiner", "sd1_inpaint"):
        pytest.skip("covered by the end-to-end latents test")
    unet = loaded.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    t = torch.tensor([10.0, 500.0])
    kwargs, ref_kwargs = {}, {}
    if name == "sdxl_refiner":
        pooled = torch.randn(2, 40, generator=g)
        ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]).expand(2, 5)
        kwargs = {"text_embeds": pooled, "time_ids": ids}
        ref_kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    got = unet(x, t, context=ctx, **kwargs)
    expected = reference.unet(x, t, encoder_hidden_states=ctx, **ref_kwargs).sample
    assert got.shape == (2, 4, 8, 8)
    assert ((got - expected).abs().max() / expected.std()).item() < 1e-4


# ------------------------------------------------------------------------------ files without metadata
def _strip_metadata(file: Path, out: Path) -> Path:
    save_state_dict(load_state_dict(file), out)
    return out


def test_real_layout_without_metadata_loads_with_config_folder(case, tmp_path):
    """Files in the wild carry no t2i metadata; the configs then come from a diffusers folder
    (as in diffusers' `from_single_file(config=...)`), the weights from the file."""
    name, _reference, folder, ours, file, _loaded = case
    bare = _strip_metadata(file, tmp_path / "bare.safetensors")
    loaded = load_single_file(bare, config=folder)
    _assert_same_weights(ours.unet, loaded.unet, f"{name} unet")
    _assert_same_weights(ours.text_encoder, loaded.text_encoder, f"{name} text encoder")
    assert loaded.schedule == ours.schedule


def test_sd2_export_has_identity_last_layer(case):
    """SD2 readers use the penultimate of the file's OpenCLIP layers: the export appends an
    all-zero (identity) block so that is our last layer; the loader drops it again."""
    name, _reference, _folder, ours, file, _loaded = case
    if name != "sd2":
        pytest.skip("SD2 only")
    state = load_state_dict(file)
    n = ours.text_encoder.model.cfg.layers
    extra = {k: v for k, v in state.items() if k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.")}
    assert len(extra) == 12 and all(not v.any() for v in extra.values())
    # the identity block really is one: running it changes nothing
    block = clip_layer(ours.text_encoder.model.cfg)
    block.load_state_dict({k: torch.zeros_like(v) for k, v in block.state_dict().items()})
    x = torch.randn(1, 5, ours.text_encoder.model.cfg.width)
    assert torch.equal(block(x), x)


def test_prediction_type_sources(tmp_path):
    """eps vs v is not in the weights: hint > metadata > `v_pred` key > sidecar yaml > family."""
    build_sd1(tmp_path / "sd1")
    build_sd2(tmp_path / "sd2")
    sd1, sd2 = t2i.load(tmp_path / "sd1"), t2i.load(tmp_path / "sd2")
    state1, state2 = to_original_state_dict(parts_of(sd1)), to_original_state_dict(parts_of(sd2))
    assert resolve_config(state1).schedule.prediction_type == "epsilon"
    assert resolve_config(state2).schedule.prediction_type == "v_prediction"  # SD 2.x default (2.1-768)
    assert resolve_config(state2, prediction="epsilon").schedule.prediction_type == "epsilon"
    assert resolve_config({**state1, "v_pred": torch.zeros(())}).schedule.prediction_type == "v_prediction"
    cfg = resolve_config({**state1, "ztsnr": torch.zeros(())})
    assert cfg.schedule.rescale_betas_zero_snr
    inpaint = dict(state2)
    w = inpaint[UNET_PREFIX + "input_blocks.0.0.weight"]
    inpaint[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    assert resolve_config(inpaint).schedule.prediction_type == "epsilon"  # SD 2 inpainting is eps
    # AUTOMATIC1111's sidecar: model.yaml beside model.safetensors
    file = tmp_path / "m.safetensors"
    save_state_dict(state1, file)
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert resolve_config(state1, file).schedule.prediction_type == "v_prediction"
    # metadata of our own export wins over the family default; the explicit hint over both
    save_single_file(sd2, tmp_path / "sd2.safetensors")
    assert load_single_file(tmp_path / "sd2.safetensors").schedule.prediction_type == "v_prediction"
    sd2e = load_single_file(tmp_path / "sd2.safetensors", prediction="epsilon")
    assert sd2e.schedule.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction"):
        resolve_config(state1, prediction="x0")


# ------------------------------------------------------------------------------ full size, meta tensors
SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "norm_num_groups": 32, "sample_size": 512}


def _published_unets():
    from test_unet_parity import SD15_JSON, SD21_JSON, SDXL_JSON

    refiner = {**SDXL_JSON, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
               "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560,
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               "transformer_layers_per_block": 4}
    inpaint = {**SD15_JSON, "in_channels": 9}
    return {"sd1": SD15_JSON, "sd2": SD21_JSON, "sdxl": SDXL_JSON, "sdxl_refiner": refiner, "sd1_inpaint": inpaint}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl_refiner", "sd1_inpaint"])
def test_full_size_unet_layout_and_inferred_config(name):
    """Released U-Net architectures on the meta device: our export's keys are what diffusers'
    converter (`convert_ldm_unet_checkpoint`) maps back onto every parameter, and the config
    inferred from the keys and shapes alone equals the published one."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    published = _published_unets()[name]
    cfg = unet_config_from_diffusers(dict(published))
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
    original = unet_to_original(ours, cfg)
    assert len(original) == len(ours)
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in original.items()}, dict(published))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    family = name.removesuffix("_inpaint")
    inferred = infer_unet_config(original, family, "v_prediction" if family == "sd2" else "epsilon")
    # transformer depth of a level without attention is unused (except the last: the mid block's)
    depth = tuple(d if a or i == len(cfg.attention) - 1 else 1
                  for i, (d, a) in enumerate(zip(cfg.transformer_depth, cfg.attention, strict=True)))
    assert inferred == dataclasses.replace(cfg, transformer_depth=depth)


def test_full_size_unet_key_names_of_released_files():
    """A few keys every SD 1.5 / SDXL file has (upsamplers after attention sit at slot 2)."""
    published = _published_unets()
    names = {}
    for fam in ("sd1", "sdxl"):
        cfg = unet_config_from_diffusers(dict(published[fam]))
        with torch.device("meta"):
            names[fam] = set(unet_to_original(UNet(cfg).state_dict(), cfg))
    assert len(names["sd1"]) == 686
    assert {"output_blocks.11.0.skip_connection.weight", "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
            "output_blocks.8.2.conv.weight", "middle_block.1.proj_out.weight", "time_embed.2.bias"} <= names["sd1"]
    assert {"label_emb.0.0.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.8.0.skip_connection.weight"
            } <= names["sdxl"]


def test_full_size_vae_layout_and_inferred_config():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = vae_config_from_diffusers(SD15_VAE)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg).state_dict()
    original = vae_to_original(ours, cfg)
    assert original["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # 1x1 conv in the original
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in original.items()}, SD15_VAE)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    assert infer_vae_config(original, "sd1", 512) == cfg


@pytest.mark.parametrize(("family", "slot", "preset"), [
    ("sd1", 0, "openai-vit-l-14"), ("sd2", 0, "openclip-vit-h-14-sd2"),
    ("sdxl", 0, "openai-vit-l-14"), ("sdxl", 1, "openclip-vit-bigg-14"), ("sdxl_refiner", 0, "openclip-vit-bigg-14")])
def test_full_size_text_encoder_layout(family, slot, preset):
    """The released text towers: export -> diffusers' converters give transformers' names and
    shapes (OpenCLIP's in_proj split in three, text_projection transposed); the config inferred
    from the file's keys is the preset (SD2: 24 blocks in the file, 23 used)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    from t2i.checkpoints.transformers_text import clip_state_dict_to_transformers

    cfg = CLIP_TEXT_PRESETS[preset]
    where = TEXT_SLOTS[family][slot]
    with torch.device("meta"):
        ours = CLIPTextModel(cfg).state_dict()
    original = text_from_ours(ours, where.layout)
    if where.cut_last:
        original.update(identity_openclip_layer(cfg.layers, original))
        assert f"transformer.resblocks.{cfg.layers}.attn.in_proj_weight" in original
    full = {where.prefix + k: v for k, v in original.items()}
    if where.layout == "openclip":
        tower = type("Tower", (), {"config": type("C", (), {"hidden_size": cfg.width})()})()
        back = convert_open_clip_checkpoint(tower, full, prefix=where.prefix)
    else:
        back = convert_ldm_clip_checkpoint(full)
    expected = clip_state_dict_to_transformers(ours, prefixed=True)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in expected.items()}
    assert infer_clip_config(text_state(full, where, None), where) == cfg
