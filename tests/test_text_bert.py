"""BERT / all-MiniLM-L6-v2: parity with transformers (tiny random and shipped weights) and
with sentence-transformers' sentence embeddings."""

from __future__ import annotations

import os

import pytest
import torch

from t2i.checkpoints.transformers_text import bert_model_from_transformers, load_minilm, minilm_folder
from t2i.text.bert import mean_pool, sentence_embedding
from t2i.text.encoders import MiniLMTextEncoder

transformers = pytest.importorskip("transformers")
SENTENCES = [
    "a red circle above a blue square",
    "three green triangles on a black background",
    "Hello, World! naïve café 123",
    "a small purple diamond in the top left",
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_tiny_bert_parity_with_padding_and_segments() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
    )
    ref = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms random too, so a swapped norm shows
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    state = {f"bert.{k}": v for k, v in ref.state_dict().items()}  # a BertFor* checkpoint's prefix
    ours = bert_model_from_transformers(cfg.to_dict(), state).eval()
    ids = torch.randint(1, 120, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    types = (torch.arange(16) >= 6).long().expand(3, -1)
    with torch.no_grad():
        for tt in (None, types):
            r = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            o = ours(ids, mask, tt)
            real = mask.bool()
            torch.testing.assert_close(o[real], r[real], atol=1e-5, rtol=0)
            torch.testing.assert_close(o, r, atol=1e-4, rtol=0)  # padded positions: unused, looser


def test_minilm_shipped_weights_vs_transformers(minilm) -> None:
    model, tok = minilm
    assert model.cfg.width == 384 and len(model.layers) == 6
    assert not any(p.requires_grad for p in model.parameters())
    ref = transformers.BertModel.from_pretrained(str(minilm_folder())).eval()
    batch = tok.tokenize(SENTENCES, max_length=24)
    assert batch.ids[0, :9].tolist() == [101, 1037, 2417, 4418, 2682, 1037, 2630, 2675, 102]
    mask = batch.attention_mask
    with torch.no_grad():
        o = model(batch.ids, mask)
        r = ref(input_ids=batch.ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(o[mask], r[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_pool(o, mask), mean_pool(r, mask), atol=1e-5, rtol=0)


def test_minilm_sentence_embedding_vs_sentence_transformers(minilm) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    st = pytest.importorskip("sentence_transformers")
    try:
        ref_model = st.SentenceTransformer(str(minilm_folder()), device="cpu")
    except Exception as e:  # offline loading failed: nothing to compare with
        pytest.skip(f"sentence-transformers cannot load the model offline: {e}")
    expected = ref_model.encode(SENTENCES, convert_to_tensor=True)  # (4, 384), L2-normalized
    model, tok = minilm
    batch = tok.tokenize(SENTENCES, max_length=64)
    with torch.no_grad():
        ours = sentence_embedding(model(batch.ids, batch.attention_mask), batch.attention_mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_minilm_encoder_interface_and_truncation(minilm) -> None:
    model, tok = minilm
    enc = MiniLMTextEncoder(tok, model, max_length=12)
    out = enc.encode(["a red circle", "a red circle above a blue square on a black background today"])
    assert out.context.shape == (2, 12, 384) and out.pooled.shape == (2, 384)
    assert out.truncated == [False, True]
    assert out.mask.sum(1).tolist() == [5, 12]  # [CLS] a red circle [SEP]; the full window
    # Real-token states do not depend on how much padding follows.
    wide = MiniLMTextEncoder(tok, model, max_length=40).encode(["a red circle"])
    torch.testing.assert_close(wide.context[0, :5], out.context[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(wide.pooled[0], out.pooled[0], atol=1e-5, rtol=0)
    assert wide.context[0, 5:].abs().max() == 0 and out.context[0, 5:].abs().max() == 0
    # Same numbers as the plain tower over the full window, and as encoding the prompt alone.
    batch = tok.tokenize(["a red circle"], max_length=12)
    with torch.no_grad():
        full = model(batch.ids, batch.attention_mask)
    torch.testing.assert_close(out.context[0, :5], full[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled[:1], mean_pool(full, batch.attention_mask), atol=1e-5, rtol=0)
    alone = enc.encode(["a red circle"])
    torch.testing.assert_close(alone.context[0], out.context[0], atol=1e-5, rtol=0)
