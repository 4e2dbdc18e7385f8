"""CLIP tokenizer: the shipped vocabulary, and id-for-id parity with transformers' CLIPTokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.text.clip_tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode, default_vocab_and_merges

transformers = pytest.importorskip("transformers")

TRICKY = [
    "a photo of a cat",
    "Hello, World!!  It's   2024... \t\n tabs",
    "naïve café — “quotes” 日本語 😀 e\u0301 ÀÉÎ",
    "<|endoftext|> a literal special token",
    "xxx 12345 3.14 1,000 $5.99 #hashtag @user",
    "   leading and trailing   ",
    "don't won't I'M they'll we've she'd",
    "a (red:1.3) circle, [blue] square_{x}; masterpiece!!!",
    "",
    "UPPER lower MiXeD-case_words snake_case kebab-case",
    " ".join(f"word{i}" for i in range(80)),  # > 77 tokens: must be reported as cut
]


@pytest.fixture(scope="module")
def shipped() -> CLIPTokenizer:
    return CLIPTokenizer.default()


def test_shipped_vocabulary_is_clip(shipped: CLIPTokenizer) -> None:
    vocab, merges = default_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894 and shipped.vocab_size == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert len(set(bytes_to_unicode().values())) == 256
    # Golden ids of the real CLIP vocabulary (as in every SD tokenizer/vocab.json).
    ids = shipped.tokenize(["a photo of a cat"], max_length=9).ids
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407]]


@pytest.mark.parametrize("pad", [EOS, "!"])  # SD1 pads with <|endoftext|>, SD2's OpenCLIP with "!" (id 0)
def test_parity_with_transformers(tmp_path, pad: str) -> None:
    ours = CLIPTokenizer.default(pad_token=pad)
    ours.save(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert ref.pad_token == pad
    batch = ours.tokenize(TRICKY)
    expected = ref(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.ids.shape == (len(TRICKY), 77)
    assert torch.equal(batch.ids, expected.input_ids)
    assert torch.equal(batch.attention_mask.long(), expected.attention_mask)
    assert batch.truncated == [False] * (len(TRICKY) - 1) + [True]
    assert batch.ids[0, 7].item() == (49407 if pad == EOS else 0)
    # Untruncated ids: what transformers gives without truncation, minus bos/eos.
    full = ours.token_ids(TRICKY)
    assert full == [ref(t).input_ids[1:-1] for t in TRICKY]
    assert len(full[-1]) > 75 and batch.lengths[-1].item() == 77


def test_from_folder_reads_pad_token(tmp_path, shipped: CLIPTokenizer) -> None:
    shipped.save(tmp_path)
    # SD2-style folder: pad token only in tokenizer_config.json, as an AddedToken dict.
    (tmp_path / "special_tokens_map.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = {"content": "!", "lstrip": False, "normalized": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert tok.pad_id == 0
    ids = tok.tokenize(["a cat"], max_length=6).ids
    assert ids.tolist() == [[49406, 320, 2368, 49407, 0, 0]]
    same = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", pad_token="!")
    assert torch.equal(same.tokenize(TRICKY).ids, tok.tokenize(TRICKY).ids)
    assert tok.decode(ids[0].tolist()) == "a cat"


def test_short_window_truncation_is_reported(shipped: CLIPTokenizer) -> None:
    batch = shipped.tokenize(["a photo of a cat", "a cat"], max_length=5)
    assert batch.ids.tolist() == [[49406, 320, 1125, 539, 49407], [49406, 320, 2368, 49407, 49407]]
    assert batch.truncated == [True, False] and batch.lengths.tolist() == [5, 4]
    with pytest.raises(TypeError):
        shipped.tokenize("not a list")  # type: ignore[arg-type]


def test_from_folder_saved_by_transformers(tmp_path, shipped: CLIPTokenizer) -> None:
    """transformers >= 5 saves only tokenizer.json + tokenizer_config.json: read that too."""
    shipped.save(tmp_path / "src")
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "src"), pad_token="!")
    ref.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "vocab.json").exists()
    tok = CLIPTokenizer.from_folder(tmp_path / "saved")
    assert tok.pad_id == 0
    expected = ref(
        TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(tok.tokenize(TRICKY).ids, expected)
