"""T5 encoder and tokenizer vs transformers' T5EncoderModel / T5 tokenizer on tiny random weights.

The oracle folders are built and saved here (no downloads): a Unigram tokenizer trained on a few
captions with the `tokenizers` library, wrapped in transformers' T5 tokenizer and saved; tiny
T5EncoderModels (gated-GELU as T5 v1.1 / IF / PixArt, and the original ReLU) with every weight
randomized, saved with save_pretrained.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from t2i.checkpoints.transformers_t5 import (  # noqa: E402
    load_t5_folder,
    t5_config_from_transformers,
    t5_state_dict_from_transformers,
)
from t2i.text.encoders import T5TextEncoder  # noqa: E402
from t2i.text.t5 import (  # noqa: E402
    T5_PRESETS,
    T5Encoder,
    T5Tokenizer,
    read_sentencepiece_model,
    relative_position_bucket,
)

CORPUS = [
    "a red circle above a blue square",
    "two green triangles next to each other",
    "the small yellow star left of a big purple hexagon",
    "an orange ring below three white dots",
]
PROMPTS = [
    "a red circle",
    "the big purple hexagon left of two green triangles above a blue square and a yellow star",
    "",
    "zebra quokka",  # letters unseen in training: <unk> pieces
]
MAX_LENGTH = 24  # long enough for relative distances past max_exact (8) and max_distance (20)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 4, trainer)
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    transformers.T5Tokenizer(tokenizer_object=tok).save_pretrained(folder)
    return folder


def _oracle(folder, feed_forward_proj: str, vocab_size: int, seed: int = 0):
    cfg = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():  # every weight random and away from its init (norm weights are ones)
        for p in model.parameters():
            p.copy_(p + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :]
    for buckets, distance in ((32, 128), (32, 20), (64, 256)):
        want = T5Attention._relative_position_bucket(rel, True, buckets, distance)
        assert torch.equal(relative_position_bucket(rel, buckets, distance), want)


def test_tokenizer_ids_match_transformers(tokenizer_dir):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    want = hf(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ours = T5Tokenizer.from_folder(tokenizer_dir).tokenize(PROMPTS, MAX_LENGTH)
    assert torch.equal(ours.ids, want["input_ids"])
    assert torch.equal(ours.attention_mask, want["attention_mask"].bool())
    assert ours.truncated == [False, True, False, False]
    assert (ours.ids == hf.unk_token_id).any()  # the unseen letters did reach <unk>
    # the window cut: max_length - 1 text tokens, then </s>
    assert ours.ids[1, -1].item() == hf.eos_token_id and ours.lengths[1].item() == MAX_LENGTH


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A folder as IF and PixArt ship their tokenizer: spiece.model (here a tiny Unigram model
    trained by sentencepiece, with its default NFKC normalization) and tokenizer_config.json."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("t5_spiece")
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=45, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    out = tmp_path_factory.mktemp("t5_spiece_folder")
    (out / "spiece.model").write_bytes((folder / "sp.model").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    return out


def test_spiece_model_reads_as_sentencepiece_and_transformers(spiece_dir):
    """spiece.model read without sentencepiece: the pieces and scores sentencepiece itself holds,
    the ids transformers' T5 tokenizer gives (NFKC-normalized text, sentinels, literal </s>)."""
    spm = pytest.importorskip("sentencepiece")
    proc = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    pieces, unk_id, charsmap = read_sentencepiece_model(spiece_dir / "spiece.model")
    assert [(t, s) for t, s, _ in pieces] == [(proc.id_to_piece(i), proc.get_score(i)) for i in range(len(proc))]
    assert unk_id == proc.unk_id() == 2 and len(charsmap) > 1000

    prompts = [*PROMPTS, "\ufb01ve \uff32\uff25\uff24  squares", "caf\u00e9 \u2162", "</s> x <extra_id_0>"]
    hf = transformers.AutoTokenizer.from_pretrained(spiece_dir)
    want = hf(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ours = T5Tokenizer.from_folder(spiece_dir)
    got = ours.tokenize(prompts, MAX_LENGTH)
    assert torch.equal(got.ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"].bool())
    assert got.ids[-1, 3].item() == hf.convert_tokens_to_ids("<extra_id_0>") == len(hf) - 1
    # plain prompts: sentencepiece's own pieces, then </s>
    for text, ids in zip(PROMPTS[:3], ours.token_ids(PROMPTS[:3]), strict=True):
        assert ids == proc.encode(text)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(tmp_path, tokenizer_dir, feed_forward_proj):
    hf_tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    oracle = _oracle(tmp_path / "text_encoder", feed_forward_proj, len(hf_tok))
    batch = hf_tok(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    enc = T5TextEncoder.from_folders(tokenizer_dir, tmp_path / "text_encoder", max_length=MAX_LENGTH)
    assert enc.model.cfg.gated == (feed_forward_proj == "gated-gelu")
    got = enc.encode(PROMPTS)
    assert got.context.shape == want.shape == (len(PROMPTS), MAX_LENGTH, 32)
    assert got.pooled is None and got.truncated == [False, True, False, False]
    assert torch.equal(got.mask, batch["attention_mask"].bool())
    err = (got.context - want).abs().max().item()
    print(f"T5 {feed_forward_proj}: max |diff| {err:.2e}, std {want.std().item():.3f}")
    assert err < 1e-5, err
    assert want.std().item() > 0.5  # the comparison is over states of a real spread

    # the padding really is masked: the short prompt's real tokens come out the same without
    # its tail of pads, and different when the pads are attended
    n = int(got.mask[0].sum())
    with torch.no_grad():
        alone = enc.model(batch["input_ids"][:1, :n])
        unmasked = enc.model(batch["input_ids"][:1])
    assert (alone[0] - got.context[0, :n]).abs().max() < 1e-5
    assert (unmasked[0, :n] - got.context[0, :n]).abs().max() > 1e-3


def test_state_dict_layouts(tmp_path, tokenizer_dir):
    """Both tied-embedding names are read; a full T5ForConditionalGeneration's decoder is skipped."""
    oracle = _oracle(tmp_path / "enc", "gated-gelu", 136)
    state = oracle.state_dict()
    mapped = t5_state_dict_from_transformers(state)
    model = T5Encoder(t5_config_from_transformers(json.loads((tmp_path / "enc" / "config.json").read_text())))
    assert sorted(mapped) == sorted(model.state_dict())
    only_encoder = {k: v for k, v in state.items() if k != "shared.weight"}
    assert torch.equal(t5_state_dict_from_transformers(only_encoder)["token_embedding.weight"], state["shared.weight"])
    full = transformers.T5ForConditionalGeneration(oracle.config)
    assert sorted(t5_state_dict_from_transformers(full.state_dict())) == sorted(mapped)
    with pytest.raises(KeyError, match="unexpected"):
        t5_state_dict_from_transformers({**state, "encoder.block.0.layer.2.x.weight": torch.zeros(1)})


def test_loaded_model_is_frozen_and_presets_build(tmp_path):
    _oracle(tmp_path / "enc", "relu", 136)
    model = load_t5_folder(tmp_path / "enc")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    cfg = t5_config_from_transformers({"feed_forward_proj": "gated-gelu", "d_model": 4096, "d_ff": 10240,
                                       "num_layers": 24, "num_heads": 64, "vocab_size": 32128})
    assert cfg == T5_PRESETS["t5-v1_1-xxl"]  # the encoder IF and PixArt ship
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5_config_from_transformers({"feed_forward_proj": "swish-gelu"})
