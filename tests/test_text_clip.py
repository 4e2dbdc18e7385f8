"""CLIP text towers: parity with transformers on tiny random weights, both key layouts, encoders."""

from __future__ import annotations

import pytest
import torch

from t2i.checkpoints.transformers_text import (
    clip_config_from_transformers,
    clip_config_to_transformers,
    clip_state_dict_from_transformers,
    clip_state_dict_to_transformers,
    clip_text_model_from_transformers,
    load_clip_text_folder,
)
from t2i.text.clip import CLIP_TEXT_PRESETS
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder, SDXLTextEncoder, load_diffusers_text_encoder

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def tiny(cls: type, act: str, eos: int, vocab: int = 1000, width: int = 32, proj: int = 24, seed: int = 0):
    """A tiny transformers CLIP text tower with every parameter random (LayerNorms included,
    so a swapped norm cannot hide behind weight 1 / bias 0)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=proj,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=1,
    )
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model


def ids_with_eos(eos: int, pad: int, vocab: int) -> torch.Tensor:
    """(3, 77) ids: eos at different positions, then padding; ids above eos before it."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (3, 77), generator=g)
    ids[ids == eos] = 3
    for row, n in enumerate((5, 20, 76)):
        ids[row, n] = eos
        ids[row, n + 1 :] = pad
    return ids


def compare(ref, ours, ids: torch.Tensor) -> None:
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert len(o.hidden_states) == len(r.hidden_states) == 4
    for a, b in zip(o.hidden_states, r.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    torch.testing.assert_close(o.last_hidden_state, r.last_hidden_state, atol=TOL, rtol=0)
    if hasattr(r, "text_embeds"):
        torch.testing.assert_close(o.text_embeds, r.text_embeds, atol=TOL, rtol=0)
    else:
        torch.testing.assert_close(o.pooled, r.pooler_output, atol=TOL, rtol=0)
        assert o.text_embeds is None


def test_clip_text_model_quick_gelu_legacy_argmax_pooling() -> None:
    # SD1's config: eos_token_id 2 -> pooled at argmax(ids); the eos (999) is the largest id here.
    ref = tiny(transformers.CLIPTextModel, "quick_gelu", eos=2)
    flat = ref.state_dict()
    assert next(iter(flat)).startswith("embeddings.")  # transformers >= 5.6 layout
    ours = clip_text_model_from_transformers(ref.config.to_dict(), flat).eval()
    assert (
        ours.cfg.pooling == "argmax" and ours.cfg.activation == "quick_gelu" and ours.text_projection is None
    )
    ids = ids_with_eos(eos=999, pad=999, vocab=999)
    compare(ref, ours, ids)
    # The older layout: every key under text_model.
    prefixed = {f"text_model.{k}": v for k, v in flat.items()}
    compare(ref, clip_text_model_from_transformers(ref.config.to_dict(), prefixed).eval(), ids)


def test_clip_text_with_projection_gelu_first_eos() -> None:
    # eos 500 is not the largest id: argmax pooling would pick the wrong token.
    ref = tiny(transformers.CLIPTextModelWithProjection, "gelu", eos=500)
    state = ref.state_dict()
    assert "text_projection.weight" in state and next(iter(state)).startswith("text_model.")
    ours = clip_text_model_from_transformers(ref.config.to_dict(), state).eval()
    assert ours.cfg.pooling == "first_eos" and ours.cfg.projection_dim == 24
    ids = ids_with_eos(eos=500, pad=0, vocab=1000)
    assert (ids.argmax(-1) != ours.eos_positions(ids)).any()
    compare(ref, ours, ids)
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    compare(ref, clip_text_model_from_transformers(ref.config.to_dict(), flat).eval(), ids)


def test_export_round_trip_and_unknown_keys() -> None:
    ref = tiny(transformers.CLIPTextModelWithProjection, "gelu", eos=500)
    ours = clip_text_model_from_transformers(ref.config.to_dict(), ref.state_dict())
    back = clip_state_dict_to_transformers(ours.state_dict(), prefixed=True)
    cfg = transformers.CLIPTextConfig(**clip_config_to_transformers(ours.cfg))
    rebuilt = transformers.CLIPTextModelWithProjection(cfg).eval()
    rebuilt.load_state_dict(back, strict=True)
    ids = ids_with_eos(eos=500, pad=0, vocab=1000)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).text_embeds, ref(ids).text_embeds)
    with pytest.raises(KeyError, match="unexpected"):
        clip_state_dict_from_transformers(
            {**ref.state_dict(), "text_model.encoder.layers.0.bogus.weight": back["text_projection.weight"]}
        )


def test_folders_and_encoders(tmp_path) -> None:
    """SD1-style (last layer) and SDXL-style (penultimate, concatenated, pooled text_embeds)
    encoders read from saved folders, against transformers on the same ids."""
    tok = CLIPTokenizer.default()
    enc1 = tiny(transformers.CLIPTextModel, "quick_gelu", eos=2, vocab=49408, width=32, seed=1)
    enc2 = tiny(
        transformers.CLIPTextModelWithProjection, "gelu", eos=2, vocab=49408, width=40, proj=16, seed=2
    )
    enc1.save_pretrained(tmp_path / "sdxl" / "text_encoder")
    enc2.save_pretrained(tmp_path / "sdxl" / "text_encoder_2")
    tok.save(tmp_path / "sdxl" / "tokenizer")
    CLIPTokenizer.default(pad_token="!").save(tmp_path / "sdxl" / "tokenizer_2")
    enc1.save_pretrained(tmp_path / "sd1" / "text_encoder")
    tok.save(tmp_path / "sd1" / "tokenizer")

    prompts = ["a red circle above a blue square", "Hello, World!", " ".join(["long"] * 90)]
    sd1 = load_diffusers_text_encoder(tmp_path / "sd1")
    assert isinstance(sd1, CLIPTextEncoder)
    out = sd1.encode(prompts)
    ids = tok.tokenize(prompts).ids
    with torch.no_grad():
        torch.testing.assert_close(out.context, enc1(ids).last_hidden_state, atol=TOL, rtol=0)
    assert out.pooled is None and out.truncated == [False, False, True] and out.context.shape == (3, 77, 32)

    sdxl = load_diffusers_text_encoder(tmp_path / "sdxl")
    assert isinstance(sdxl, SDXLTextEncoder) and sdxl.context_dim == 72 and sdxl.pooled_dim == 16
    out = sdxl.encode(prompts)
    ids2 = CLIPTokenizer.from_folder(tmp_path / "sdxl" / "tokenizer_2").tokenize(prompts).ids
    assert (ids2 == 0).any() and not torch.equal(ids, ids2)  # "!" padding on the 2nd tokenizer
    with torch.no_grad():
        h1 = enc1(ids, output_hidden_states=True).hidden_states[-2]
        r2 = enc2(ids2, output_hidden_states=True)
    torch.testing.assert_close(out.context, torch.cat([h1, r2.hidden_states[-2]], -1), atol=TOL, rtol=0)
    torch.testing.assert_close(out.pooled, r2.text_embeds, atol=TOL, rtol=0)
    assert out.context.shape == (3, 77, 72) and out.truncated == [False, False, True]

    # The SDXL refiner: only the 2nd tower, its penultimate states and text_embeds.
    (tmp_path / "refiner").mkdir()
    for name in ("text_encoder_2", "tokenizer_2"):
        (tmp_path / "refiner" / name).symlink_to(tmp_path / "sdxl" / name)
    refiner = load_diffusers_text_encoder(tmp_path / "refiner").encode(prompts)
    torch.testing.assert_close(refiner.context, r2.hidden_states[-2], atol=TOL, rtol=0)
    torch.testing.assert_close(refiner.pooled, r2.text_embeds, atol=TOL, rtol=0)

    # The older prefixed layout on disk loads to the same numbers.
    from safetensors.torch import load_file, save_file

    f = tmp_path / "sd1" / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(f).items()}, f)
    assert next(iter(load_file(f))).startswith("text_model.")
    torch.testing.assert_close(
        load_clip_text_folder(f.parent)(ids).last_hidden_state, sd1.encode(prompts).context
    )


# The text_encoder(_2)/config.json of the released SD 1.5, SD 2.1 and SDXL base pipelines
# (fields that matter; the rest are dropout and init settings).
COMMON = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "model_type": "clip_text_model",
}
PUBLISHED = {
    "openai-vit-l-14": {
        "architectures": ["CLIPTextModel"],
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        **COMMON,
    },
    "openclip-vit-h-14-sd2": {
        "architectures": ["CLIPTextModel"],
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        **COMMON,
    },
    "openclip-vit-bigg-14": {
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
        **COMMON,
    },
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_map_to_presets(name: str) -> None:
    assert clip_config_from_transformers(PUBLISHED[name]) == CLIP_TEXT_PRESETS[name]
