"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, and prompts longer than one CLIP window.

Emphasis (A1111's `prompt_parser.parse_prompt_attention`):
- `(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets
  a factor of 1.3; brackets nest and multiply (`((text))` -> 1.21);
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters;
- an unclosed `(` or `[` applies its factor up to the end of the prompt; a `)` or `]` with
  nothing open is literal text;
- `BREAK` (upper case, a word of its own) ends the current 75-token chunk.

Long prompts (A1111's `FrozenCLIPEmbedderWithCustomWords`): the token ids of the parsed pieces
(each piece tokenized on its own) are cut into chunks of 75; when a chunk is full and a comma
was seen within its last 20 tokens, the text after that comma moves on to the next chunk. Each
chunk is wrapped as `<bos> tokens <eos> <pad>...` (77 ids), encoded on its own, and the chunk
contexts are concatenated on the token axis: (B, 77 k, D). Prompts of a batch are padded to the
same k with empty chunks (`<bos> <eos> <pad>...`), so a prompt and its negative can be batched
for classifier-free guidance. Pooled vectors (SDXL) come from the first chunk. Nothing is cut:
`truncated` is all False.

Weights (A1111's "Original" emphasis): each token's context vector is multiplied by its weight,
then the chunk is rescaled so its mean equals the unweighted mean, z * (mean(z) / mean(z w)).
As in A1111 the rescale is per chunk; unlike A1111, whose mean runs over the whole batch of a
chunk, it is per prompt, so a prompt's embedding does not depend on what it is batched with
(A1111 batches copies of one prompt, for which the two agree).

MiniLM (t2i's default encoder) has one 512-position window and no chunking: weights apply the
same way over its window, BREAK is ignored, and a prompt longer than the encoder's
`max_length` is cut and flagged in `truncated`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from t2i.text.bert import WordPieceTokenizer, mean_pool
from t2i.text.clip_tokenizer import CLIPTokenizer, pack
from t2i.text.encoders import CLIPTextEncoder, MiniLMTextEncoder, SDXLTextEncoder, TextEncoder, TextEncoding

ROUND = 1.1  # factor of one pair of ( )
SQUARE = 1 / 1.1  # factor of one pair of [ ]
BREAK = ("BREAK", -1.0)  # the parser's marker for a forced chunk boundary
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

# One alternative per lexical item, in A1111's order: escapes, openers, a weight closing a
# round bracket, closers, plain text, a lone colon. The weight must be a number (A1111 accepts
# any run of digits and dots and then fails on "1.2.3"; here that is plain text).
_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \( | \[
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)
    | \) | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A prompt in A1111's emphasis syntax -> [(text, weight), ...], neighbours of equal weight
    merged; a BREAK is the item ("BREAK", -1.0).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    Factors multiply in A1111's order (innermost bracket first), so the floats are A1111's to
    the last bit (`(((house:1.3))` -> 1.5730000000000004). One deliberate difference: a BREAK
    inside brackets still breaks (A1111 multiplies its -1 marker and then reads "BREAK" as a word).
    """
    res: list[list] = []  # [text, weight]; mutable because open brackets multiply their range
    round_open: list[int] = []  # index into res where each open ( started
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[1] != BREAK[1]:
                item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])  # a lone "\" gives "", which changes nothing
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:  # text, or a closer with nothing open (literal), or a ":" that is no weight
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:  # unclosed brackets reach to the end of the prompt
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in res or [["", 1.0]]:
        if merged and merged[-1][1] == weight and weight != BREAK[1]:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


# ---------------------------------------------------------------------------- chunking


@dataclass
class PromptChunk:
    """Up to `chunk_length` token ids of one prompt (no bos/eos) and the weight of each."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _is_break(item: tuple[str, float]) -> bool:
    return item[1] == BREAK[1] and item[0] == BREAK[0]


def weighted_tokens(
    tokenizer: CLIPTokenizer | WordPieceTokenizer, parsed: list[tuple[str, float]]
) -> list[tuple[list[int], float] | None]:
    """Token ids of each parsed piece, tokenized on its own as A1111 does; None for a BREAK."""
    texts = [text for text, _ in parsed]
    ids = tokenizer.token_ids(texts)
    return [None if _is_break(item) else (toks, item[1]) for item, toks in zip(parsed, ids, strict=True)]


def prompt_chunks(
    tokenizer: CLIPTokenizer, text: str, chunk_length: int = 75, comma_backtrack: int = COMMA_BACKTRACK
) -> list[PromptChunk]:
    """A prompt -> its A1111 chunks (at least one).

    A chunk closes when it holds `chunk_length` tokens or at a BREAK. When a full chunk meets
    one more token that is not a comma, and a comma sits within its last `comma_backtrack`
    tokens, the tokens after that comma move to the next chunk (0 disables the move).
    """
    comma = tokenizer.token_ids([","])[0]
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1  # index in chunk.tokens of its last comma, -1 when none

    def close(rest: PromptChunk | None = None) -> PromptChunk:
        nonlocal last_comma
        chunks.append(chunk)
        last_comma = -1
        return rest if rest is not None else PromptChunk()

    for item in weighted_tokens(tokenizer, parse_prompt_attention(text)):
        if item is None:
            chunk = close()
            continue
        tokens, weight = item
        for token in tokens:
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif (
                comma_backtrack
                and len(chunk.tokens) == chunk_length
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved = PromptChunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk = close(moved)
            if len(chunk.tokens) == chunk_length:
                chunk = close()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


def count_chunks(encoder: TextEncoder, prompt: str) -> int:
    """How many 77-token windows `encode_prompts` gives this prompt (1 for MiniLM), for reports
    such as "prompt spans 2 chunks"."""
    if isinstance(encoder, MiniLMTextEncoder):
        return 1
    towers = encoder.encoders if isinstance(encoder, SDXLTextEncoder) else [encoder]
    return max(len(prompt_chunks(e.tokenizer, prompt, e.max_length - 2)) for e in towers)


# ---------------------------------------------------------------------------- weighting


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one prompt's window.

    z: (T, D) token features; weights: (T,). Returns z * w rescaled by mean(z) / mean(z * w),
    so the mean over the window is unchanged. Computed in float32, returned in z's dtype.
    """
    zf = z.float()
    original_mean = zf.mean()
    weighted = zf * weights.to(zf)[:, None]  # (T, D)
    return (weighted * (original_mean / weighted.mean())).to(z.dtype)


def _emphasize_rows(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z: (B, T, D), weights: (B, T). Rows whose weights are all 1 are returned untouched (bit for bit)."""
    rows = [emphasize(z[b], weights[b]) if bool((weights[b] != 1).any()) else z[b] for b in range(len(z))]
    return torch.stack(rows)


# ---------------------------------------------------------------------------- encoding


def _plain_texts(parsed: list[list[tuple[str, float]]]) -> list[str] | None:
    """The prompts' texts when none carries a weight or a BREAK (escapes resolved), else None."""
    if all(len(p) == 1 and p[0][1] == 1.0 for p in parsed):
        return [p[0][0] for p in parsed]
    return None


def _encode_clip_chunks(
    encoder: CLIPTextEncoder, batch_chunks: list[list[PromptChunk]], k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tower over k chunks per prompt -> (context (B, 77 k, D), pooled of chunk 0 or None)."""
    tok, window = encoder.tokenizer, encoder.max_length
    contexts, pooled = [], None
    for i in range(k):
        chunks = [c[i] if i < len(c) else PromptChunk() for c in batch_chunks]  # empty chunks pad
        ids = pack([c.tokens for c in chunks], tok.bos_id, tok.eos_id, tok.pad_id, window).ids  # (B, 77)
        weights = torch.ones(ids.shape)  # (B, 77): bos, eos and padding keep weight 1
        for b, c in enumerate(chunks):
            weights[b, 1 : 1 + len(c.weights)] = torch.tensor(c.weights)
        context, chunk_pooled = encoder.encode_ids(ids)  # (B, 77, D), (B, P) or None
        contexts.append(_emphasize_rows(context, weights))
        pooled = chunk_pooled if i == 0 else pooled
    return torch.cat(contexts, dim=1), pooled  # (B, 77 k, D)


def _encode_clip(encoder: CLIPTextEncoder | SDXLTextEncoder, prompts: list[str]) -> TextEncoding:
    towers = list(encoder.encoders) if isinstance(encoder, SDXLTextEncoder) else [encoder]
    per_tower = [[prompt_chunks(e.tokenizer, p, e.max_length - 2) for p in prompts] for e in towers]
    k = max(len(c) for chunks in per_tower for c in chunks)  # same k for every prompt and tower
    parts = [_encode_clip_chunks(e, chunks, k) for e, chunks in zip(towers, per_tower, strict=True)]
    context = torch.cat([c for c, _ in parts], dim=-1)  # (B, 77 k, sum D), as SDXLTextEncoder
    return TextEncoding(context, parts[-1][1], None, [False] * len(prompts))


@torch.no_grad()
def _encode_minilm(encoder: MiniLMTextEncoder, parsed: list[list[tuple[str, float]]]) -> TextEncoding:
    """MiniLMTextEncoder.encode with per-token weights (BREAK ignored; pooled unweighted)."""
    tok, window = encoder.tokenizer, encoder.max_length
    token_lists, weight_lists = [], []
    for p in parsed:
        items = [item for item in weighted_tokens(tok, p) if item is not None]
        token_lists.append([t for toks, _ in items for t in toks])
        weight_lists.append([w for toks, w in items for _ in toks])
    batch = pack(token_lists, tok.cls_id, tok.sep_id, tok.pad_id, window)
    weights = torch.ones(batch.ids.shape)  # (B, max_length)
    for b, w in enumerate(weight_lists):
        w = w[: window - 2]
        weights[b, 1 : 1 + len(w)] = torch.tensor(w)
    device = encoder.model.token_embedding.weight.device
    ids, mask = batch.ids.to(device), batch.attention_mask.to(device)
    n = int(batch.lengths.max())  # as MiniLMTextEncoder: run over the longest prompt only
    states = encoder.model(ids[:, :n], mask[:, :n]) * mask[:, :n, None]  # (B, n, D), zero on padding
    context = states.new_zeros(len(parsed), window, states.shape[-1])
    context[:, :n] = states  # (B, max_length, D)
    context = _emphasize_rows(context, weights.to(device))  # zero padding adds nothing to either mean's sum
    return TextEncoding(context, mean_pool(states, mask[:, :n]), mask, batch.truncated)


def encode_prompts(encoder: TextEncoder, prompts: list[str]) -> TextEncoding:
    """`encoder.encode(prompts)` with A1111's emphasis, BREAK and long-prompt chunking.

    CLIP (SD1/SD2/SDXL): context (B, 77 k, D) with k the most chunks of any prompt, pooled
    from the first chunk, mask None, truncated all False. MiniLM: (B, max_length, D), long
    prompts cut and flagged. When no prompt carries a weight or a BREAK and all fit one window,
    this is `encoder.encode` of the (unescaped) prompts: bit for bit the same tensors.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of strings")
    parsed = [parse_prompt_attention(p) for p in prompts]
    plain = _plain_texts(parsed)
    if isinstance(encoder, MiniLMTextEncoder):
        return encoder.encode(plain) if plain is not None else _encode_minilm(encoder, parsed)
    towers = list(encoder.encoders) if isinstance(encoder, SDXLTextEncoder) else [encoder]
    if plain is not None and all(len(ids) <= e.max_length - 2 for e in towers for ids in e.tokenizer.token_ids(plain)):
        return encoder.encode(plain)
    return _encode_clip(encoder, prompts)
