"""Paint-with-words (eDiff-I): the logit bias against its formula, regions parsed and their words found
through the tokenizers (multi-token words, CLIP's 75-token chunks), the bias on the conditional half of
a guidance batch only, and the option through the pipeline, the CLI and the server, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import t2i
from t2i.cli import main
from t2i.diffusion.paint_with_words import (
    COND_KEY,
    EDiffIBias,
    PaintWithWords,
    Region,
    RegionError,
    as_regions,
    box_mask,
    cross_attentions,
    layer_size,
    parse_region,
    region_masks,
    regions_to_json,
    word_positions,
)
from t2i.nets.attention import Attention
from t2i.systems.base import GenerationRequest, UnsupportedOption, check_request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    from t2i.systems.stable_diffusion import write_tiny

    return t2i.load(write_tiny(tmp_path_factory.mktemp("pww")))


# ---------------------------------------------------------------------------- the bias


def test_bias_is_ediffi_formula_per_image_and_head():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 5) * 4  # (B, heads, N, T): a 4x4 layer
    masks = torch.zeros(2, 5, 4, 4)
    masks[0, 2, :2, :2] = 1  # image 0: token 2 in the top-left quarter; image 1: nothing (an uncond row)
    sigma = torch.tensor([3.0, 3.0])
    bias = EDiffIBias(masks, sigma, weight=0.7)(logits)
    m = masks.flatten(2).transpose(1, 2)  # (B, N, T)
    expect = 0.7 * math.log(4.0) * logits.amax(dim=(2, 3), keepdim=True).clamp(min=0) * m[:, None]
    torch.testing.assert_close(bias, expect)
    assert bias[1].abs().max() == 0 and bias[0].abs().max() > 0


def test_bias_masks_follow_the_layer_resolution():
    assert layer_size(64 * 48, (64, 48)) == (64, 48)
    assert layer_size(3 * 2, (9, 5)) == (3, 2)  # stride-2 layers round up: 9x5 -> 5x3 -> 3x2
    with pytest.raises(RegionError):
        layer_size(7, (8, 8))
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, :, :4] = 1  # the left half
    pooled = EDiffIBias(masks, torch.ones(1), 1.0).mask(4)  # a 2x2 layer: left column covered, right not
    assert pooled.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_attention_with_bias_matches_explicit_softmax_and_none_is_untouched():
    torch.manual_seed(0)
    attn = Attention(16, 2, context_dim=8)
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 8)
    plain = attn(x, ctx)
    extra = torch.randn(2, 2, 9, 5)
    attn.logit_bias = lambda logits: extra
    biased = attn(x, ctx)
    q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    ref = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + extra).softmax(-1) @ v
    torch.testing.assert_close(biased, attn.to_out(ref.transpose(1, 2).flatten(2)), atol=1e-5, rtol=1e-5)
    attn.logit_bias = lambda logits: torch.zeros_like(logits)
    torch.testing.assert_close(attn(x, ctx), plain, atol=1e-6, rtol=1e-5)  # a zero bias is the same attention
    attn.logit_bias = None
    assert torch.equal(attn(x, ctx), plain)


def test_denoiser_wrapper_biases_only_rows_with_a_mask(sd_pipe):
    """A guidance batch puts uncond rows first with a zero mask: those rows must be the model's own."""
    unet = sd_pipe.unet
    den = sd_pipe.plan("euler", 4, "default").denoiser(unet)
    wrapped = PaintWithWords(den, cross_attentions(unet), weight=3.0)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    context = sd_pipe.encode_prompts(["a red circle"] * 2, ["", ""], 64, 64, guided=False)[0]["context"]
    masks = torch.zeros(2, context.shape[1], 8, 8)
    masks[1, 2:4, :4] = 1  # row 1 ("conditional"): "red circle" in the top half
    sigma = torch.tensor([5.0, 5.0])
    out = wrapped(x, sigma, context=context, **{COND_KEY: masks})
    plain = den(x, sigma, context=context)
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-4)
    assert (out[1] - plain[1]).abs().max() > 1e-3 * plain[1].abs().max()
    assert all(layer.logit_bias is None for layer in cross_attentions(unet))  # removed after the call
    assert torch.equal(wrapped(x, sigma, context=context), plain)  # no mask: the denoiser itself


# ---------------------------------------------------------------------------- regions and words


def test_parse_region_pixels_fractions_and_errors():
    assert parse_region("0,0.25,0.5,1:red circle", 64, 32) == Region((0.0, 0.25, 0.5, 1.0), "red circle")
    assert parse_region(" 16, 8, 48, 32 : blue square ", 64, 32).box == (0.25, 0.25, 0.75, 1.0)  # pixels
    assert parse_region({"box": [0, 0, 32, 16], "words": "x"}, 64, 32).box == (0.0, 0.0, 0.5, 0.5)
    for bad, needle in [("0,0,1:x", "four"), ("a,b,c,d:x", "four numbers"), ("0,0,0.5,0.5:", "no words"),
                        ("0.5,0,0.5,1:x", "empty"), ("0,0,65,10:x", "outside"), ("no colon", "x0,y0,x1,y1:words"),
                        ("0,0,nan,1:x", "finite")]:
        with pytest.raises(RegionError, match=needle) as e:
            as_regions(["0,0,1,1:fine", bad], 64, 32)
        assert str(e.value).startswith("region 2")
    regions = as_regions(["0.1,0.2,0.3,0.45:a b", "3,5,17,29:c"], 64, 32)
    assert as_regions(regions_to_json(regions), 1, 1) == regions  # the PNG form reads back bit for bit
    assert as_regions([], 64, 64) is None


def test_box_mask_centres_and_tiny_boxes():
    assert box_mask((0.0, 0.0, 0.5, 1.0), 2, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    tiny = box_mask((0.6, 0.6, 0.61, 0.61), 4, 4)  # holds no pixel centre: the pixel under its centre
    assert tiny.sum() == 1 and tiny[2, 2] == 1


def test_word_positions_clip_multi_token_and_chunks(sd_pipe):
    enc = sd_pipe.text_encoder
    assert word_positions(enc, "a photo of a red circle", "red circle") == [5, 6]  # after <bos> at 0
    assert word_positions(enc, "a (red:1.3) circle, red circle", "red circle") == [2, 3, 5, 6]  # every occurrence
    word = "zxqvbnmlk"
    n = len(enc.tokenizer.token_ids([word])[0])
    assert n > 1 and word_positions(enc, f"a {word} cat", word) == list(range(2, 2 + n))
    # 75 tokens fill the first window (77 with <bos>/<eos>): the words open the second, after its <bos>
    long = " ".join(["a"] * 75) + " red circle"
    assert word_positions(enc, long, "red circle") == [78, 79]
    assert word_positions(enc, "a blue square", "red") == []


def test_region_masks_and_error_naming_the_region(sd_pipe):
    enc = sd_pipe.text_encoder
    regions = as_regions(["0,0,0.5,1:red", "0.5,0,1,1:blue square"], 8, 8)
    masks = region_masks(enc, ["a red circle and a blue square", "blue square, red"], regions, 77, (2, 2))
    assert masks.shape == (2, 77, 2, 2)
    assert masks[0, 2].tolist() == [[1, 0], [1, 0]] and masks[0, 6].tolist() == [[0, 1], [0, 1]]
    assert masks[1, 4].tolist() == [[1, 0], [1, 0]] and masks[0, 1].sum() == 0
    with pytest.raises(RegionError, match=r"region 2 \('blue square'\).*not in the prompt 'a red circle'"):
        region_masks(enc, ["a red circle"], regions, 77, (2, 2))


# ---------------------------------------------------------------------------- through the pipeline


def test_pipeline_regions_change_the_image_and_are_checked(sd_pipe):
    settings = dict(seed=3, steps=3, width=32, height=32, guidance=5.0)
    plain = sd_pipe.generate("a red circle and a blue square", **settings)
    request = GenerationRequest("a red circle and a blue square", regions=["0,0,0.5,1:red circle"],
                                region_weight=2.0, **settings)
    check_request(sd_pipe, request)
    painted = sd_pipe.run(request)
    assert (painted.latents - plain.latents).abs().max() > 1e-3 * plain.latents.std()
    zero = sd_pipe.run(GenerationRequest("a red circle and a blue square", regions=["0,0,0.5,1:red circle"],
                                         region_weight=0.0, **settings))
    torch.testing.assert_close(zero.latents, plain.latents, atol=1e-4 * float(plain.latents.std()), rtol=0)
    with pytest.raises(RegionError, match="region 1"):
        sd_pipe.generate("a cat", regions=["0,0,1,1:dog"], **settings)


def test_families_without_regions_refuse_them(tmp_path):
    from t2i.systems.shapes_layout import write_tiny_model

    pipe = t2i.load(write_tiny_model(tmp_path / "layout"))  # re-encodes the prompt: not offered
    with pytest.raises(UnsupportedOption, match="regions"):
        check_request(pipe, GenerationRequest("x", regions=["0,0,1,1:x"]))
    with pytest.raises(ValueError, match="does not take regions"):  # the API without check_request: not ignored
        pipe.generate("x", steps=1, regions=["0,0,1,1:x"])


def test_shapes_ldm_minilm_regions(tmp_path):
    from t2i.systems.shapes_ldm import write_tiny_model

    pipe = t2i.load(write_tiny_model(tmp_path / "ldm"))
    assert word_positions(pipe.text_encoder, "two blue crosses", "blue crosses") == [2, 3]  # after [CLS]
    out = pipe.generate("a red circle", seed=0, steps=2, regions=["0,0,0.5,0.5:red circle"], region_weight=1.0)
    assert out.images[0].size == (pipe.defaults.width, pipe.defaults.height)


def test_cli_region(tmp_path, sd_pipe, capsys):
    from t2i.systems.stable_diffusion import write_tiny

    folder = write_tiny(tmp_path / "m")
    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "1", "--quiet", "--precision", "fp32", "--region", "0,0,16,32:red", "--region-weight", "1.5"]
    assert main([*args, "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert main([*args, "--region", "0,0,1,1:green", "--out", str(tmp_path / "b.png")]) == 2
    assert "--region: region 2 ('green')" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_server_regions_422_naming_the_region_and_distributed_round_trip(sd_pipe):
    from t2i.serve.config import Limits
    from t2i.serve.distributed import read_request, request_fields
    from t2i.serve.schemas import A1111Txt2Img, FieldError, JobRequest, Resolver

    resolver = Resolver(sd_pipe, Limits(max_width=64, max_height=64))
    r = resolver.job(JobRequest(prompt="a red circle", width=32, height=32, regions=["0,0,16,32:red circle"],
                                region_weight=0.8))
    assert r.regions == (Region((0.0, 0.0, 0.5, 1.0), "red circle"),) and r.region_weight == 0.8
    back = read_request({k.encode(): v.encode() if isinstance(v, str) else v for k, v in request_fields(r).items()})
    assert (back.regions, back.region_weight) == (r.regions, r.region_weight)
    for body, needle in [({"regions": ["0,0,1,1:blue"]}, "region 1 ('blue')"),
                         ({"regions": ["0,0,1,1:red", "oops"]}, "region 2"),
                         ({"regions": "not json"}, "JSON")]:
        with pytest.raises(FieldError) as e:
            resolver.a1111(A1111Txt2Img(prompt="a red circle", **body))
        assert e.value.field == "regions" and needle in e.value.message and e.value.status == 422


def test_eval_truth_regions_name_the_objects_of_the_prompt():
    from t2i.data.shapes.heldout import heldout_draws
    from t2i.eval.cli import truth_regions
    from t2i.eval.shapes_judge import truth_layouts

    prompt = next(p for fam, _, p in heldout_draws() if fam == "relation")
    regions = truth_regions([prompt])[prompt]
    layout = truth_layouts([prompt])[prompt]
    assert len(regions) == 2 and all(r.words in prompt for r in regions)
    assert {r.box for r in regions} <= {o.box for o in layout.objects}


def test_unchanged_attention_path_is_the_fused_one():
    """No regions: Attention calls scaled_dot_product_attention exactly as before (bit for bit)."""
    torch.manual_seed(0)
    attn = Attention(16, 2, context_dim=8)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 3, 8)
    q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    ref = attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    assert torch.equal(attn(x, ctx), ref)


def test_regions_json_is_compact_and_exact():
    text = regions_to_json([Region((0.1, 0.2, 0.3, 0.4), "red circle")])
    assert json.loads(text) == [{"box": [0.1, 0.2, 0.3, 0.4], "words": "red circle"}]


def test_png_records_regions_and_regenerates(sd_pipe):
    from t2i.imageio import parse_parameters, request_fields

    first = sd_pipe.generate("a red circle", seed=2, steps=2, width=32, height=32,
                             regions=["0,0,16,32:red circle"], region_weight=1.5)
    fields = request_fields(parse_parameters(first.images[0].info["parameters"]))
    assert fields["regions"] == (Region((0.0, 0.0, 0.5, 1.0), "red circle"),) and fields["region_weight"] == 1.5
    for key in ("model", "precision"):
        fields.pop(key)
    again = sd_pipe.run(GenerationRequest(**fields))
    assert torch.equal(again.latents, first.latents)


def test_prompts_file_region_words_are_checked_on_every_line_before_any_image(tmp_path, capsys):
    """--region with --prompts-file: a later line without the words is refused before line 1 is drawn."""
    from t2i.systems.stable_diffusion import write_tiny

    folder = write_tiny(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["generate", "--prompts-file", str(prompts), "--model", str(folder), "--steps", "1", "--width", "32",
            "--height", "32", "--quiet", "--precision", "fp32", "--region", "0,0,16,32:red", "--out-dir",
            str(tmp_path / "out")]
    assert main(args) == 2
    assert "--region: region 1 ('red')" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*.png"))


def test_empty_regions_are_none_for_a_model_without_them_and_a1111_info_has_the_weight(tmp_path, sd_pipe):
    """`regions: []` asks for nothing: a model that takes no regions answers it, not a 422; the A1111 info
    of a request with regions carries their weight, so a non-default weight can be reproduced from it."""
    from t2i.serve.api_a1111 import extra_generation_params
    from t2i.serve.config import Limits
    from t2i.serve.schemas import JobRequest, Resolver
    from t2i.systems.shapes_layout import write_tiny_model

    layout = t2i.load(write_tiny_model(tmp_path / "layout"))
    assert Resolver(layout, Limits()).job(JobRequest(prompt="a red circle", regions=[])).regions is None
    r = Resolver(sd_pipe, Limits(max_width=64, max_height=64)).job(
        JobRequest(prompt="a red circle", width=32, height=32, regions=["0,0,16,32:red circle"], region_weight=0.8))
    assert extra_generation_params(r)["Region weight"] == "0.8"
