"""A1111 prompt syntax: the parser on A1111's documented cases, chunking (75 tokens, BREAK, comma
backtrack), and encodings against hand-built chunk encodings and hand-computed emphasis."""

from __future__ import annotations

import pytest
import torch

from t2i.checkpoints.transformers_text import minilm_folder
from t2i.text.bert import BertConfig, BertModel, WordPieceTokenizer, mean_pool
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder, MiniLMTextEncoder, SDXLTextEncoder
from t2i.text.prompt_syntax import count_chunks, encode_prompts, parse_prompt_attention, prompt_chunks

WORDS = "red green blue cat dog sun moon tree house river car bird fish star cloud rain snow wind fire stone".split()
TOL = dict(atol=1e-6, rtol=1e-6)


def words(n: int, start: int = 0) -> str:
    """n one-token words (each is a single CLIP token)."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


# ---------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # the examples of A1111's parse_prompt_attention docstring, then its wiki's syntax
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a ((word)) b", [("a ", 1.0), ("word", 1.2100000000000002), (" b", 1.0)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.5 )", [(" word ", 0.5)]),
        ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
        ("a ) b ]", [("a ) b ]", 1.0)]),  # closers with nothing open are text
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("word:1.3) x", [("word:1.3) x", 1.0)]),  # a weight with no ( open is text
        ("[x:2]", [("x:2", 1 / 1.1)]),  # weights belong to round brackets only
        (r"a \\ b \[c\)", [("a \\ b [c)", 1.0)]),
        ("", [("", 1.0)]),
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # A1111 would read "break" here
        ("BREAKfast", [("BREAKfast", 1.0)]),
    ],
)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


# ---------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


def test_chunks_of_75(tok: CLIPTokenizer) -> None:
    ids = tok.token_ids([words(100)])[0]
    assert len(ids) == 100
    chunks = prompt_chunks(tok, words(100))
    assert [c.tokens for c in chunks] == [ids[:75], ids[75:]]
    assert [len(c.tokens) for c in prompt_chunks(tok, words(75))] == [75]  # exactly full: one chunk
    assert [len(c.tokens) for c in prompt_chunks(tok, words(151))] == [75, 75, 1]
    assert [len(c.tokens) for c in prompt_chunks(tok, "")] == [0]


def test_comma_backtrack(tok: CLIPTokenizer) -> None:
    near = words(70) + ", " + words(10, 3)  # comma is token 71: 5 from the end of a full chunk
    chunks = prompt_chunks(tok, near)
    assert [len(c.tokens) for c in chunks] == [71, 10]
    assert chunks[0].tokens[-1] == tok.token_ids([","])[0][0]
    assert chunks[1].tokens == tok.token_ids([words(10, 3)])[0]
    far = words(50) + ", " + words(40)  # comma 24 tokens before the boundary: no move
    assert [len(c.tokens) for c in prompt_chunks(tok, far)] == [75, 16]
    assert [len(c.tokens) for c in prompt_chunks(tok, near, comma_backtrack=0)] == [75, 6]


def test_break_and_weights_in_chunks(tok: CLIPTokenizer) -> None:
    chunks = prompt_chunks(tok, "a (red:1.5) cat BREAK [a dog]")
    assert [c.tokens for c in chunks] == tok.token_ids(["a red cat", "a dog"])
    assert [c.weights for c in chunks] == [[1.0, 1.5, 1.0], [1 / 1.1, 1 / 1.1]]
    assert len(prompt_chunks(tok, "BREAK a cat")) == 2  # as A1111: a leading BREAK gives an empty chunk


# ---------------------------------------------------------------------------- CLIP encodings


def tiny_clip(tokenizer: CLIPTokenizer, seed: int, width: int = 32, proj: int | None = None, **kw) -> CLIPTextEncoder:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(width=width, layers=2, heads=2, mlp_dim=2 * width, projection_dim=proj)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():  # random LayerNorms too, so padding and position mistakes show
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return CLIPTextEncoder(tokenizer, model, **kw)


@pytest.fixture(scope="module")
def sd1(tok: CLIPTokenizer) -> CLIPTextEncoder:
    return tiny_clip(tok, 0)


def window(tokenizer: CLIPTokenizer, tokens: list[int]) -> torch.Tensor:
    """(1, 77) ids of one chunk built by hand: bos, tokens, eos, then the pad id."""
    row = [tokenizer.bos_id, *tokens, tokenizer.eos_id]
    return torch.tensor([row + [tokenizer.pad_id] * (77 - len(row))])


def last(enc: CLIPTextEncoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc.model(ids).last_hidden_state  # (1, 77, D)


def emphasized(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's formula written out: z * w, then times original mean / new mean."""
    zw = z * w[:, None]
    return zw * (z.mean() / zw.mean())


def test_long_prompt_is_two_chunks_concatenated(sd1: CLIPTextEncoder, tok: CLIPTokenizer) -> None:
    ids = tok.token_ids([words(100)])[0]
    enc = encode_prompts(sd1, [words(100)])
    assert enc.context.shape == (1, 154, 32) and enc.truncated == [False] and enc.pooled is None
    expected = torch.cat([last(sd1, window(tok, ids[:75])), last(sd1, window(tok, ids[75:]))], dim=1)
    torch.testing.assert_close(enc.context, expected, **TOL)
    cut = sd1.encode([words(100)])  # the plain encoder cuts at 75 and says so
    assert cut.truncated == [True] and cut.context.shape == (1, 77, 32)
    assert count_chunks(sd1, words(100)) == 2 and count_chunks(sd1, words(75)) == 1


def test_batch_padded_with_empty_chunks(sd1: CLIPTextEncoder, tok: CLIPTokenizer) -> None:
    enc = encode_prompts(sd1, [words(160), "blurry"])  # cond spans 3 chunks, negative 1
    assert enc.context.shape == (2, 231, 32)
    neg = enc.context[1]
    torch.testing.assert_close(neg[:77], sd1.encode(["blurry"]).context[0], **TOL)
    empty = last(sd1, window(tok, []))[0]
    torch.testing.assert_close(neg[77:154], empty, **TOL)
    torch.testing.assert_close(neg[154:], empty, **TOL)


def test_sd2_padding_token(tok: CLIPTokenizer) -> None:
    """SD2's tokenizer pads with "!" (id 0) after the eos; chunks and empty chunks must too."""
    tok2 = CLIPTokenizer.default(pad_token="!")
    enc = tiny_clip(tok2, 1)
    ids = tok2.token_ids([words(90)])[0]
    got = encode_prompts(enc, [words(90), ""]).context
    assert window(tok2, ids[75:])[0, -1] == 0
    torch.testing.assert_close(got[0, 77:], last(enc, window(tok2, ids[75:]))[0], **TOL)
    torch.testing.assert_close(got[1, 77:], last(enc, window(tok2, []))[0], **TOL)
    eos_padded = window(tok, ids[75:])  # the SD1 layout: would be a different encoding
    assert (last(enc, eos_padded)[0] - got[0, 77:]).abs().max() > 1e-2


def test_weighted_prompt_matches_hand_computed(sd1: CLIPTextEncoder, tok: CLIPTokenizer) -> None:
    prompt = "a (red:1.5) circle and [blue] ((square))"
    enc = encode_prompts(sd1, [prompt])
    # tokens: bos 0, a 1, red 2, circle 3, and 4, blue 5, square 6, eos 7, padding
    z = last(sd1, window(tok, tok.token_ids(["a red circle and blue square"])[0]))[0]
    w = torch.ones(77)
    w[2], w[5], w[6] = 1.5, 1 / 1.1, 1.1 * 1.1
    expected = emphasized(z, w)
    torch.testing.assert_close(enc.context[0], expected, **TOL)
    assert (enc.context[0] - z).abs().max() > 1e-2  # the weights did something
    torch.testing.assert_close(enc.context.mean(), z.mean(), atol=1e-6, rtol=1e-5)  # mean restored
    ratio = z.mean() / (z * w[:, None]).mean()
    assert abs(float(ratio) - 1) > 1e-3  # and the rescale is not the identity here
    torch.testing.assert_close(enc.context[0, 3], z[3] * ratio, **TOL)  # an unweighted token is rescaled
    batched = encode_prompts(sd1, [prompt, "blurry, " + words(30)])  # the mean is per prompt, not per batch
    torch.testing.assert_close(batched.context[0], enc.context[0], **TOL)


def test_long_weighted_prompt_rescales_each_chunk(sd1: CLIPTextEncoder, tok: CLIPTokenizer) -> None:
    prompt = words(80) + " (cat:1.4)"
    ids = tok.token_ids([words(80) + " cat"])[0]
    enc = encode_prompts(sd1, [prompt, "blurry"])
    assert enc.context.shape == (2, 154, 32)
    first = last(sd1, window(tok, ids[:75]))[0]
    assert torch.equal(enc.context[0, :77], first)  # no weight in chunk 1: untouched, bit for bit
    z2 = last(sd1, window(tok, ids[75:]))[0]
    w = torch.ones(77)
    w[1 + 5] = 1.4  # "cat" is token 80, the 6th of chunk 2 (after bos)
    torch.testing.assert_close(enc.context[0, 77:], emphasized(z2, w), **TOL)
    torch.testing.assert_close(enc.context[1, :77], sd1.encode(["blurry"]).context[0], **TOL)


def test_plain_prompts_are_bit_identical(sd1: CLIPTextEncoder) -> None:
    prompts = ["a red circle above a blue square", "", "photo, 4k, " + words(60)]
    ref, got = sd1.encode(prompts), encode_prompts(sd1, prompts)
    assert torch.equal(got.context, ref.context) and got.pooled is ref.pooled is None
    assert got.truncated == ref.truncated == [False] * 3
    escaped = encode_prompts(sd1, [r"a \(red\) circle"])  # escapes only: the literal text, unweighted
    assert torch.equal(escaped.context, sd1.encode(["a (red) circle"]).context)


# ---------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl(tok: CLIPTokenizer) -> SDXLTextEncoder:
    first = tiny_clip(tok, 2, layer="penultimate")
    second = tiny_clip(
        CLIPTokenizer.default(pad_token="!"), 3, width=48, proj=40, layer="penultimate", pooled="text_embeds"
    )
    return SDXLTextEncoder([first, second])


def test_sdxl_long_weighted(sdxl: SDXLTextEncoder) -> None:
    prompt = "a (red:1.5) circle, " + words(90)
    enc = encode_prompts(sdxl, [prompt])
    assert enc.context.shape == (1, 154, 32 + 48) and enc.pooled.shape == (1, 40)
    for e, part in zip(sdxl.encoders, enc.context.split([32, 48], dim=-1), strict=True):
        ids = e.tokenizer.token_ids(["a red circle, " + words(90)])[0]
        w = torch.ones(77)
        w[2] = 1.5
        with torch.no_grad():
            out1, out2 = e.model(window(e.tokenizer, ids[:75])), e.model(window(e.tokenizer, ids[75:]))
        expected = torch.cat([emphasized(out1.hidden_states[-2][0], w), out2.hidden_states[-2][0]])
        torch.testing.assert_close(part[0], expected, **TOL)
    torch.testing.assert_close(enc.pooled, out1.text_embeds, **TOL)  # pooled from chunk 1, unweighted


def test_sdxl_plain_bit_identical(sdxl: SDXLTextEncoder) -> None:
    prompts = ["a red circle above a blue square", ""]
    ref, got = sdxl.encode(prompts), encode_prompts(sdxl, prompts)
    assert torch.equal(got.context, ref.context) and torch.equal(got.pooled, ref.pooled)


# ---------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    torch.manual_seed(4)
    model = BertModel(BertConfig(width=32, layers=2, heads=4, mlp_dim=48, max_positions=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return MiniLMTextEncoder(WordPieceTokenizer.from_file(minilm_folder() / "tokenizer.json"), model, max_length=16)


def test_minilm_weighted_and_cut(minilm: MiniLMTextEncoder) -> None:
    prompts = ["a (red:1.5) circle BREAK [above] a square", "a blue square"]
    enc = encode_prompts(minilm, prompts)
    plain = minilm.encode(["a red circle above a square", "a blue square"])
    assert torch.equal(enc.mask, plain.mask) and enc.context.shape == (2, 16, 32)
    # [CLS] 0, a 1, red 2, circle 3, above 4, a 5, square 6, [SEP] 7, padding (zero states)
    w = torch.ones(16)
    w[2], w[4] = 1.5, 1 / 1.1
    torch.testing.assert_close(enc.context[0], emphasized(plain.context[0], w), **TOL)
    torch.testing.assert_close(enc.context[1], plain.context[1], **TOL)
    torch.testing.assert_close(enc.pooled, plain.pooled, **TOL)  # pooled stays unweighted
    assert (enc.context[0] - plain.context[0]).abs().max() > 1e-2

    long = "(" + " ".join(["red"] * 20) + ")"  # 20 tokens: cut to 14 and reported
    cut = encode_prompts(minilm, [long])
    assert cut.truncated == [True] and cut.context.shape == (1, 16, 32)
    ref = minilm.encode([" ".join(["red"] * 20)])
    w = torch.full((16,), 1.1)
    w[0] = w[15] = 1.0
    torch.testing.assert_close(cut.context[0], emphasized(ref.context[0], w), **TOL)
    torch.testing.assert_close(cut.pooled, mean_pool(ref.context, ref.mask), **TOL)


def test_minilm_plain_bit_identical(minilm: MiniLMTextEncoder) -> None:
    prompts = ["a red circle above a blue square", "three green triangles"]
    ref, got = minilm.encode(prompts), encode_prompts(minilm, prompts)
    assert torch.equal(got.context, ref.context) and torch.equal(got.pooled, ref.pooled)
    assert torch.equal(got.mask, ref.mask)
