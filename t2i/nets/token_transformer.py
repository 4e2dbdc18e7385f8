"""The transformer of the token families: MaskGIT's bidirectional one and DALL-E's causal one.

One network, two readings of its config:

- bidirectional (MaskGIT, Chang et al. 2022, sec. 3.1; Muse): the image tokens (B, N), with
  ``num_codes`` as the [MASK] id, are embedded with a codebook-plus-[MASK] table and learned
  positions; every block is self-attention over the map, cross-attention to the frozen text
  encoder's token states (Muse's conditioning; ``context_dim``), then an MLP; the head gives
  logits over the codebook at every position: ``(B, N) -> (B, N, V)``, the contract of
  ``t2i.tokens.masked``.
- causal (DALL-E, Ramesh et al. 2021, sec. 2.2): one decoder-only stream of ``text_length`` text
  tokens then the image tokens, each predicting the next; ``(B, T) -> (B, T + 1, V)`` image
  logits (the distribution of image token t given the text and tokens[:, :t]), the contract of
  ``t2i.tokens.autoregressive``; a second head gives the text logits for DALL-E's text loss.

Self-attention takes a mask per layer (``t2i.tokens.masks``): full, DALL-E's row / column /
convolutional sparse masks ("dalle" schedules them by layer) or a sliding window, on top of the
causal order for the causal network. The blocks are the shared pre-norm block
(``t2i.nets.transformer.PreNormBlock``) with a cross-attention sublayer added.

Read top to bottom: config, block, model, presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.transformer import PreNormBlock
from t2i.tokens.masks import PATTERNS, image_mask, layer_kinds, stream_mask


@dataclass
class TokenTransformerConfig:
    """Shape of a token transformer.

    Attributes:
        num_codes: V, the image codebook size (the bidirectional network's [MASK] id is V).
        grid: image tokens per side (the map is grid x grid, N = grid ** 2).
        width, layers, heads, mlp_dim: the blocks.
        causal: DALL-E's autoregressive stream (True) or MaskGIT's bidirectional map (False).
        context_dim: width of the text states the blocks cross-attend to; None: no cross-attention.
        text_vocab, text_length: the causal stream's text tokens (0: none; DALL-E's text comes
            first in the same sequence, ids < text_vocab).
        attention: self-attention mask pattern, one of `t2i.tokens.masks.PATTERNS`.
        kernel: side of the "conv" neighbourhood and of the "window".
        top_grid: side of a coarser map read before the grid x grid one (0: none): a VQ-VAE-2's top
            codes, then its bottom codes, one sequence of top_grid ** 2 + grid ** 2 tokens. Every
            position of both maps has its own learned embedding (so no separate map embedding is
            needed); full attention only (the sparse patterns are defined on one map).
    """

    num_codes: int = 512
    grid: int = 8
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_dim: int = 1024
    causal: bool = False
    context_dim: int | None = None
    text_vocab: int = 0
    text_length: int = 0
    attention: str = "full"
    kernel: int = 5
    top_grid: int = 0  # last: files written before it read as 0

    def __post_init__(self) -> None:
        if self.attention not in PATTERNS:
            raise ValueError(f"unknown attention pattern {self.attention!r}; choose one of {', '.join(PATTERNS)}")
        if self.top_grid and self.attention != "full":
            raise ValueError(f"attention {self.attention!r} is defined on one token map; two maps (top_grid) take "
                             "full attention")
        if (self.text_vocab > 0) != (self.text_length > 0) or (self.text_vocab and not self.causal):
            raise ValueError("text tokens in the stream (text_vocab, text_length) need each other and causal=True")

    @property
    def num_tokens(self) -> int:
        """N, the image tokens of one image (both maps' with a top_grid)."""
        return self.top_grid * self.top_grid + self.grid * self.grid

    @property
    def mask_id(self) -> int:
        """The bidirectional network's [MASK] token id."""
        return self.num_codes


class KVCache:
    """Each layer's self-attention keys and values of the stream so far, so that a causal network
    decoding one token at a time feeds only the new positions (their queries attend to the cached
    keys; a causal stream's earlier states never change, so the result equals the full pass).

    `length` counts the stream positions cached (text included); `tokens` and `text` are what the
    cached stream was built from, for the caller to check that the next call extends it."""

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers  # (B, H, S, Dh) per layer
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0
        self.tokens: torch.Tensor | None = None
        self.text: torch.Tensor | None = None

    def attend(self, layer: int, attn: Attention, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """attn over the cached stream and h (B, S_new, D), the new positions' normed states, whose
        keys and values are appended; mask (1, 1, S_new, S_total) bool. Returns (B, S_new, D)."""
        q, k, v = (p(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (B, H, S_total, Dh)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S_new, Dh)
        return attn.to_out(out.transpose(1, 2).flatten(2))


class TokenBlock(PreNormBlock):
    """x + self_attn(norm1(x), mask); x + cross_attn(norm_cross(x), context) when the block reads
    text states; x + mlp(norm2(x)). (B, S, width) -> (B, S, width)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, context_dim: int | None) -> None:
        super().__init__(width, heads, mlp_dim, "gelu", 1e-5)
        self.norm_cross = nn.LayerNorm(width) if context_dim else None
        self.cross = Attention(width, heads, context_dim=context_dim, qkv_bias=True) if context_dim else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,  # type: ignore[override]
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        """cache: (the KV cache, this block's layer index): x holds only the new positions."""
        if cache is None:
            x = x + self.attn(self.norm1(x), mask=mask)  # (B, S, D)
        else:
            x = x + cache[0].attend(cache[1], self.attn, self.norm1(x), mask)  # (B, S_new, D)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, mask=context_mask)  # (B, S, D)
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """MaskGIT's bidirectional or DALL-E's causal transformer over image tokens (module docstring)."""

    def __init__(self, cfg: TokenTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        # the bidirectional network reads [MASK] (id V) too; the causal one only real codes
        self.token_embedding = nn.Embedding(cfg.num_codes + (0 if cfg.causal else 1), d)
        self.text_embedding = nn.Embedding(cfg.text_vocab, d) if cfg.text_vocab else None
        self.position = nn.Parameter(torch.zeros(1, cfg.text_length + cfg.num_tokens, d))  # learned
        self.blocks = nn.ModuleList(TokenBlock(d, cfg.heads, cfg.mlp_dim, cfg.context_dim)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.to_logits = nn.Linear(d, cfg.num_codes)
        self.to_text_logits = nn.Linear(d, cfg.text_vocab) if cfg.text_vocab else None
        self._masks: dict[tuple[str, str], torch.Tensor] = {}  # built on first use, per device
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every weight in one place: N(0, 0.02) for linears, embeddings and positions (BERT,
        MaskGIT), zero biases; the image head zero so that a new network starts at the uniform
        distribution over the codebook (loss log V)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.position, std=0.02)
        nn.init.zeros_(self.to_logits.weight)

    def layer_masks(self, device: torch.device) -> list[torch.Tensor]:
        """Each layer's (S, S) self-attention mask over the whole stream (S = text_length + N)."""
        c = self.cfg
        # two maps take full attention, which has no geometry: their N tokens read as one row
        rows, columns = (1, c.num_tokens) if c.top_grid else (c.grid, c.grid)
        masks = []
        for kind in layer_kinds(c.attention, c.layers):
            key = (kind, str(device))
            if key not in self._masks:
                image = image_mask(kind, rows, columns, causal=c.causal, kernel=c.kernel)
                self._masks[key] = stream_mask(image, c.text_length, causal=c.causal).to(device)
            masks.append(self._masks[key])
        return masks

    def hidden(self, tokens: torch.Tensor, text: torch.Tensor | None = None, context: torch.Tensor | None = None,
               context_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The final states (B, S, D) of the stream [text; tokens] (S = text_length + T); with a
        cache (causal networks), of the positions after the cached ones only, (B, S - cached, D),
        which the cache then holds too."""
        c = self.cfg
        x = self.token_embedding(tokens)  # (B, T, D)
        if self.text_embedding is not None:
            if text is None or text.shape[1] != c.text_length:
                raise ValueError(f"this network reads text first: pass text (B, {c.text_length})")
            x = torch.cat([self.text_embedding(text), x], dim=1)  # (B, Lt + T, D)
        s = x.shape[1]
        if s > self.position.shape[1]:
            raise ValueError(f"{tokens.shape[1]} image tokens for a map of {c.num_tokens}")
        x = x + self.position[:, :s]
        if c.context_dim is not None:
            if context is None:
                raise ValueError("this network cross-attends to text states: pass context (B, T, context_dim)")
            context = context.to(x.dtype)
        # a prefix of the stream takes the top-left block of each mask: every mask is prefix-closed
        # where it is causal, and the bidirectional network always reads the whole map
        start = 0
        if cache is not None:
            if not c.causal:
                raise ValueError("a KV cache serves causal networks only")
            start, cache.length = cache.length, s
            x = x[:, start:]  # (B, S - start, D): the new positions
        masks = [m[start:s, :s] for m in self.layer_masks(x.device)]
        full = c.attention == "full" and not c.causal  # no mask at all: SDPA's fastest path
        for i, (block, mask) in enumerate(zip(self.blocks, masks, strict=True)):
            x = block(x, None if full else mask[None, None], context, context_mask,
                      None if cache is None else (cache, i))
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None,
                with_text_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image logits in the token contracts (module docstring), float32.

        Args:
            tokens: (B, N) codes with [MASK] = num_codes (bidirectional), or (B, T), T < N, the
                image tokens so far (causal).
            text: (B, text_length) text ids of a causal stream with text.
            context, context_mask: (B, M, context_dim) text states and (B, M) bool, True on real
                tokens, for cross-attention.
            with_text_logits: also return the text logits (B, text_length - 1, text_vocab), the
                prediction of text tokens 1.. (DALL-E's text loss).
        Returns:
            (B, N, V) (bidirectional) or (B, T + 1, V) (causal), and the text logits if asked.
        """
        h = self.hidden(tokens, text, context, context_mask)  # (B, S, D)
        if not self.cfg.causal:
            return self.to_logits(h).float()
        lt = self.cfg.text_length
        if lt == 0:  # no text in the stream: a start state predicts token 0
            raise ValueError("a causal network needs text tokens to predict the first image token from")
        logits = self.to_logits(h[:, lt - 1:]).float()  # (B, T + 1, V): state i predicts token i + 1
        if not with_text_logits:
            return logits
        return logits, self.to_text_logits(h[:, : lt - 1]).float()  # type: ignore[misc]


class CachedDecoder:
    """A causal TokenTransformer as `t2i.tokens.sample_autoregressive`'s model, with a KV cache.

    The sampler calls ``model(tokens (B, T), text)`` on prefixes that grow by one token; each call
    here feeds only the positions after the previous call's (`KVCache`), so a map of N tokens costs
    N one-position passes instead of N passes over ever longer prefixes. Only the last row of the
    returned logits (B, T + 1, V) is computed, the one the sampler reads; the rows before it are 0.
    A call that does not extend the cached stream (other text, batch or earlier tokens) starts a
    new cache, so the result never depends on what was cached.

    The cond is the text ids (B, text_length), or a mapping of `hidden`'s keyword arguments
    ``{"text", "context", "context_mask"}`` for a network that also cross-attends to text states
    (Parti's decoder reading its encoder); every tensor of it must be unchanged for a call to extend
    the cache.
    """

    def __init__(self, net: TokenTransformer) -> None:
        if not net.cfg.causal:
            raise ValueError("a KV cache serves causal networks only")
        self.net = net
        self.cache: KVCache | None = None
        self.more: dict[str, torch.Tensor] = {}  # the cached stream's context and context_mask, if any

    def _extends(self, tokens: torch.Tensor, text: torch.Tensor, more: dict[str, torch.Tensor]) -> bool:
        c = self.cache
        if c is None or c.tokens is None or c.text is None or c.tokens.shape[1] >= tokens.shape[1]:
            return False
        same = self.more.keys() == more.keys() and all(torch.equal(self.more[k], v) for k, v in more.items())
        return same and torch.equal(c.text, text) and torch.equal(c.tokens, tokens[:, : c.tokens.shape[1]])

    def __call__(self, tokens: torch.Tensor, text: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        more: dict[str, torch.Tensor] = {}
        if isinstance(text, Mapping):  # {"text", "context", "context_mask"} (class docstring)
            more = {k: v for k, v in text.items() if k != "text"}
            text = text["text"]
        if not self._extends(tokens, text, more):
            self.cache = KVCache(len(self.net.blocks))
            self.cache.text, self.more = text.clone(), {k: v.clone() for k, v in more.items()}
        h = self.net.hidden(tokens, text, cache=self.cache, **more)  # (B, new positions, D)
        self.cache.tokens = tokens.clone()  # type: ignore[union-attr]
        last = self.net.to_logits(h[:, -1]).float()  # (B, V): the distribution of token T
        logits = last.new_zeros(tokens.shape[0], tokens.shape[1] + 1, last.shape[-1])
        logits[:, -1] = last
        return logits


TOKEN_TRANSFORMER_PRESETS: dict[str, TokenTransformerConfig] = {
    # 8x8 tokens of the f8 shapes tokenizer, cross-attending to MiniLM (384): 4.2 M parameters (2.9 M
    # as DALL-E's causal stream, without cross-attention). A batch of 32 takes 0.68 s of CPU on one
    # thread to step (0.69 s as DALL-E) plus ~0.5 s to prepare (f8 VQ encode 0.29 s, MiniLM 0.17 s;
    # fit's prefetch thread): 3,500 steps in about 70 min of one core (measured 2026-11-30).
    "shapes": TokenTransformerConfig(num_codes=512, grid=8, width=192, layers=6, heads=4, mlp_dim=768,
                                     context_dim=384),
    # Muse's token super-resolution on the shapes world (16x16 tokens of 128x128 images over an 8x8 base): the
    # high-res map mostly refines what the low-res tokens already say, so a narrower, shallower network than the
    # base; 2.0 M parameters with a 2-layer low-res encoder (t2i.systems.muse), about a third of "shapes"' step time.
    "shapes_sr": TokenTransformerConfig(num_codes=512, grid=16, width=128, layers=4, heads=4, mlp_dim=512,
                                        context_dim=384),
    # DALL-E's shipped size (t2i-dalle-small): 1.35 M parameters as the causal stream over 20 words + 64 codes,
    # 2.7 MB in fp16, 4.7 MB with the f8-small tokenizer (issue 19's 5 MB); 0.67 s of CPU a step at batch 32 on
    # one thread, data preparation included (7,490 steps in 5,019 s, AMD Zen 3, session 20).
    "shapes_s": TokenTransformerConfig(num_codes=512, grid=8, width=128, layers=6, heads=4, mlp_dim=512,
                                       context_dim=384),
    # Small enough to ship with its tokenizer (Parti's "parti-small" decoder, t2i.systems.parti): 0.72 M parameters
    # as Parti's causal decoder reading MiniLM.
    "small": TokenTransformerConfig(num_codes=512, grid=8, width=96, layers=3, heads=4, mlp_dim=384, context_dim=384),
    # A few-millisecond test network on the tiny tokenizer's 4x4 map of 32 codes.
    "tiny": TokenTransformerConfig(num_codes=32, grid=4, width=32, layers=2, heads=2, mlp_dim=64, context_dim=384),
}
