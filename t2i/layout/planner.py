"""The layout planner (issue 17): a small decoder-only transformer that turns a caption into a layout
(background, then objects with colour, shape, size word and box), sampled, so one caption gives
different layouts. LayoutGPT / LLM-grounded diffusion's first stage, learned from the shapes
world's scene truth instead of prompting a language model.

The caption is read through the frozen MiniLM token states the default model already uses (so
phrasings it was not trained on still land near the ones it was); the layout is written as tokens

    [BOS] background (colour shape size s x y)*n [END]        n = 1 .. max_objects

with one vocabulary holding each field's values at its own offset: s is the box side and cx, cy its
centre rounded down (x + s // 2 for the top-left corner x), integers on the 64x64 canvas, a one-to-one
code of `t2i.data.shapes.world.ShapeObject`'s box. Centres rather than corners because what captions
say about places (a region, a relation) is a comparison of centres, which then needs no size; the side
comes first so that decoding can keep the box inside the canvas. Decoding masks the logits to
the field expected at each position (the layout format's own grammar; the caption's is learned), and
geometry alone decides validity: boxes inside the canvas and at least MIN_GAP apart, enforced by
masking the corner values that would break them and resampling any layout that still does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2i.data import captions as lang
from t2i.data.shapes.world import CANVAS, MIN_GAP, ShapeObject, gap
from t2i.layout.spec import Layout, LayoutObject
from t2i.nets.attention import Attention
from t2i.nets.transformer import MLP

SYSTEM = "layout_planner"  # the "t2i_system" of the saved file

# ------------------------------------------------------------------------------------- vocabulary
FIELDS = ("colour", "shape", "size", "s", "cx", "cy")  # one object's tokens, in order
VALUES: dict[str, tuple] = {
    "background": lang.BACKGROUNDS, "colour": lang.COLOURS, "shape": lang.SHAPES, "size": lang.SIZE_WORDS,
    "s": tuple(range(CANVAS)), "cx": tuple(range(CANVAS)), "cy": tuple(range(CANVAS)),
}
BOS, END = 0, 1
OFFSET: dict[str, int] = {}
_next = 2
for _name in ("background", *FIELDS):
    OFFSET[_name] = _next
    _next += len(VALUES[_name])
VOCAB = _next
NUMERIC = ("s", "cx", "cy")


def field_at(t: int, max_objects: int) -> str:
    """The field of sequence position t >= 1 (position 0 is BOS): 'background', an object field, or
    'end' once max_objects objects are written. The colour slot also admits END (after one object)."""
    if t == 1:
        return "background"
    k, j = divmod(t - 2, len(FIELDS))
    return "end" if k >= max_objects else FIELDS[j]


def seq_len(max_objects: int) -> int:
    """Longest token sequence: BOS, background, max_objects objects, END."""
    return 3 + len(FIELDS) * max_objects


def allowed_tokens(max_objects: int, new_shapes: int = 0) -> torch.Tensor:
    """(seq_len - 1, VOCAB + new_shapes) bool: which tokens may be predicted at each input position (the
    target is position t + 1). A box side of 0 is never allowed. new_shapes: learnt shape tokens
    (`LayoutPlanner.add_shapes`), ids VOCAB.., allowed wherever a shape is."""
    n = seq_len(max_objects)
    out = torch.zeros(n - 1, VOCAB + new_shapes, dtype=torch.bool)
    for t in range(1, n):
        field = field_at(t, max_objects)
        if field == "end":
            out[t - 1, END] = True
            continue
        lo = OFFSET[field] + (1 if field == "s" else 0)
        out[t - 1, lo:OFFSET[field] + len(VALUES[field])] = True
        if field == "colour" and t > 2:  # END instead of another object, after the first
            out[t - 1, END] = True
        if field == "shape":
            out[t - 1, VOCAB:] = True
    return out


@dataclass
class Plan:
    """One planned layout: background name, objects (64x64 canvas units), and whether it is valid on
    geometry (inside the canvas, boxes MIN_GAP apart)."""

    background: str
    objects: list[ShapeObject]
    valid: bool = True


def geometry_ok(objects: list[ShapeObject]) -> bool:
    """Every box non-empty and inside the 64x64 canvas, every two boxes at least MIN_GAP apart."""
    inside = all(o.s > 0 and o.x >= 0 and o.y >= 0 and o.x + o.s <= CANVAS and o.y + o.s <= CANVAS
                 for o in objects)
    return inside and all(gap(a, b) >= MIN_GAP for i, a in enumerate(objects) for b in objects[i + 1:])


def _token(field: str, value, new_shapes: tuple[str, ...]) -> int:
    if field == "shape" and value in new_shapes:  # a learnt shape: ids after the fixed vocabulary
        return VOCAB + new_shapes.index(value)
    return OFFSET[field] + VALUES[field].index(value)


def _value(field: str, token: int, new_shapes: tuple[str, ...]):
    return new_shapes[token - VOCAB] if token >= VOCAB else VALUES[field][token - OFFSET[field]]


def encode_layout(background: str, objects: list[ShapeObject], new_shapes: tuple[str, ...] = ()) -> list[int]:
    """The token sequence of a layout (BOS ... END); shapes in new_shapes get the learnt ids VOCAB + k."""
    out = [BOS, OFFSET["background"] + VALUES["background"].index(background)]
    for o in objects:
        values = {"colour": o.colour, "shape": o.shape, "size": o.size, "s": o.s, "cx": o.x + o.s // 2,
                  "cy": o.y + o.s // 2}
        out += [_token(f, values[f], new_shapes) for f in FIELDS]
    return out + [END]


def decode_tokens(tokens: list[int], new_shapes: tuple[str, ...] = ()) -> Plan:
    """A token sequence (BOS first; anything after END ignored) -> Plan, checked on geometry; ids from
    VOCAB on name new_shapes."""
    background = VALUES["background"][tokens[1] - OFFSET["background"]]
    objects, i = [], 2
    while i + len(FIELDS) <= len(tokens) and tokens[i] != END:
        v = {f: _value(f, tokens[i + j], new_shapes) for j, f in enumerate(FIELDS)}
        s = v["s"]
        objects.append(ShapeObject(v["shape"], v["colour"], v["size"], v["cx"] - s // 2, v["cy"] - s // 2, s))
        i += len(FIELDS)
    return Plan(background, objects, geometry_ok(objects))


def to_layout(plan: Plan) -> Layout:
    """The plan as a `t2i.layout.spec.Layout`: a phrase per object ('a small red circle') and its box
    as fractions of the canvas."""
    # "medium" left unsaid, as captions mostly leave it (and "medium purple" reads as another colour)
    return Layout(tuple(LayoutObject(lang.noun_phrase(o.colour, o.shape, None if o.size == "medium" else o.size),
                                     (o.x / CANVAS, o.y / CANVAS, (o.x + o.s) / CANVAS, (o.y + o.s) / CANVAS))
                        for o in plan.objects), plan.background)


# ------------------------------------------------------------------------------------- network
@dataclass
class LayoutPlannerConfig:
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 768
    context_dim: int = 384  # MiniLM's token states
    text_length: int = 32  # MiniLM window (tokens)
    max_objects: int = 4
    value_features: int = 16  # sinusoidal features of numeric tokens' values (s, cx, cy) added to their embedding
    # Numeric logits also get a smooth part, the same features dotted with a projection of the state:
    # one direction of it moves the mass of a whole coordinate range ('on the left' -> cx < 24), which
    # per-bin logits would learn bin by bin.
    value_head: bool = True


PLANNER_PRESETS = {
    "tiny": LayoutPlannerConfig(width=32, layers=1, heads=2, mlp_dim=64),  # tests
    "small": LayoutPlannerConfig(width=128, layers=4, heads=4, mlp_dim=512),
    "base": LayoutPlannerConfig(),
}


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention over the layout tokens, cross-attention to the text
    states, MLP. (B, N, width) -> (B, N, width)."""

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.cross = Attention(width, heads, context_dim=width, qkv_bias=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, "gelu")

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=True)
        x = x + self.cross(self.norm2(x), context, mask=mask)
        return x + self.mlp(self.norm3(x))


def _value_table(n_features: int) -> torch.Tensor:
    """(VOCAB, n_features) sin/cos of each numeric token's value at geometric frequencies (zero rows
    for the other tokens): lets the embedding of cx=30 start out near cx=31, so comparisons between
    coordinates (a relation, a region) need not be learned from scratch for every bin."""
    table = torch.zeros(VOCAB, n_features)
    half = n_features // 2
    freqs = torch.exp(-math.log(CANVAS) * torch.arange(half) / max(half, 1)) * math.pi / 2
    for f in NUMERIC:
        v = torch.arange(CANVAS, dtype=torch.float32)[:, None] * freqs
        table[OFFSET[f]:OFFSET[f] + CANVAS, : 2 * half] = torch.cat([v.sin(), v.cos()], dim=1)
    return table


class LayoutPlanner(nn.Module):
    """Caption -> layout tokens. forward(tokens (B, N), context (B, T, context_dim), mask (B, T) bool)
    -> logits (B, N, VOCAB), masked to the field expected next."""

    def __init__(self, cfg: LayoutPlannerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = seq_len(cfg.max_objects)
        self.token = nn.Embedding(VOCAB, cfg.width)
        self.value = nn.Linear(cfg.value_features, cfg.width, bias=False)
        self.position = nn.Parameter(torch.randn(n, cfg.width) * 0.02)
        self.text_norm = nn.LayerNorm(cfg.context_dim)
        self.text_proj = nn.Linear(cfg.context_dim, cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.mlp_dim) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, VOCAB)
        self.value_head = nn.Linear(cfg.width, cfg.value_features, bias=False) if cfg.value_head else None
        self.new_shapes: tuple[str, ...] = ()  # learnt shape words (`add_shapes`), token ids VOCAB..
        self.new_token: nn.Parameter | None = None  # (k, width) their input embeddings
        self.new_head: nn.Linear | None = None  # their logits: (k, width) rows of the output head and biases
        self._make_tables()
        self._text_encoder: nn.Module | None = None  # loaded on first `plan` without one; not a submodule

    def _make_tables(self) -> None:
        """The fixed tables (not in the file: they follow from the config). Called again after a load
        that built the module on the meta device."""
        k = len(self.new_shapes)  # learnt shapes: zero value features (not numeric), allowed as shapes
        values = torch.cat([_value_table(self.cfg.value_features), torch.zeros(k, self.cfg.value_features)])
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("allowed", allowed_tokens(self.cfg.max_objects, k), persistent=False)

    def add_shapes(self, names: tuple[str, ...], like: str = "circle") -> None:
        """Learnable shape tokens for words outside the fixed vocabulary (issue 21's new word; textual
        inversion's new embedding row, Gal et al. 2022, here a row of the input table and one of the
        output head): each starts as a copy of shape `like`'s rows, its bias 4 nats lower so the
        planner does not pick it before it is trained. The rest of the planner is untouched."""
        src = OFFSET["shape"] + VALUES["shape"].index(like)
        k = len(names)
        self.new_shapes = tuple(names)
        self.new_token = nn.Parameter(self.token.weight[src].detach().clone().repeat(k, 1))
        self.new_head = nn.Linear(self.cfg.width, k)
        with torch.no_grad():
            self.new_head.weight.copy_(self.head.weight[src].repeat(k, 1))
            self.new_head.bias.copy_(self.head.bias[src].repeat(k) - 4.0)
        self._make_tables()

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) ids -> (B, N, width) token embeddings, learnt shapes' from `new_token`."""
        if self.new_token is None:
            return self.token(tokens)
        new = tokens >= VOCAB
        base = self.token(tokens.masked_fill(new, 0))
        return torch.where(new[..., None], self.new_token[(tokens - VOCAB).clamp(min=0)], base)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n = tokens.shape[1]
        x = self._embed(tokens) + self.value(self.values[tokens]) + self.position[:n]  # (B, N, width)
        ctx = self.text_proj(self.text_norm(context))  # (B, T, width)
        for block in self.blocks:
            x = block(x, ctx, mask)
        x = self.norm(x)
        logits = self.head(x)  # (B, N, VOCAB (+ k learnt shapes))
        if self.new_head is not None:
            logits = torch.cat([logits, self.new_head(x)], dim=-1)
        if self.value_head is not None:
            logits = logits + self.value_head(x) @ self.values.T
        return logits.masked_fill(~self.allowed[:n], float("-inf"))

    # --------------------------------------------------------------------------------- sampling
    def text_encoder(self) -> nn.Module:
        """The frozen MiniLM the planner reads captions with (loaded once)."""
        if self._text_encoder is None:
            from t2i.text.encoders import MiniLMTextEncoder

            self._text_encoder = MiniLMTextEncoder.load(max_length=self.cfg.text_length)
        return self._text_encoder

    @torch.no_grad()
    def sample_tokens(self, context: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None,
                      temperature: float = 1.0) -> torch.Tensor:
        """Autoregressive sampling, one layout per context row -> tokens (B, seq_len) (END-padded).
        Centres are masked so the box stays inside the canvas and, for cy, keeps MIN_GAP from the boxes
        already placed (when no cy can, the row keeps only the canvas mask and fails `geometry_ok`)."""
        b, n = context.shape[0], seq_len(self.cfg.max_objects)
        tokens = torch.full((b, 1), BOS, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        corner = torch.arange(CANVAS)[None, :]  # (1, 64): the corner each centre value gives, plus s // 2
        boxes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x, y, s) per object placed, (B,) each
        s = x = torch.zeros(b, dtype=torch.long)
        for t in range(1, n):
            logits = self(tokens, context, mask)[:, -1].float()  # (B, VOCAB)
            field = field_at(t, self.cfg.max_objects)
            if field in ("cx", "cy"):
                lo = corner - (s // 2)[:, None]  # (B, 64) the corner of each centre value
                inside = (lo >= 0) & (lo + s[:, None] <= CANVAS)  # never empty: s <= 63
                ok = inside.clone()
                if field == "cy":
                    for px, py, ps in boxes:
                        near_x = torch.maximum(px - (x + s), x - (px + ps)) < MIN_GAP  # (B,)
                        near_y = torch.maximum(py[:, None] - (lo + s[:, None]), lo - (py + ps)[:, None]) < MIN_GAP
                        ok &= ~(near_x[:, None] & near_y)
                ok = torch.where(ok.any(1, keepdim=True), ok, inside)  # no room: inside only, the row fails later
                sl = logits[:, OFFSET[field]:OFFSET[field] + CANVAS]
                logits[:, OFFSET[field]:OFFSET[field] + CANVAS] = sl.masked_fill(~ok, float("-inf"))
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, END), nxt)
            done |= nxt == END
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if field in NUMERIC:
                value = (nxt - OFFSET[field]).clamp(0, CANVAS - 1)
                if field == "s":
                    s = value
                elif field == "cx":
                    x = value - s // 2
                else:
                    boxes.append((x, value - s // 2, s))
            if bool(done.all()):
                break
        return tokens

    @torch.no_grad()
    def plan(self, captions: list[str], generator: torch.Generator | None = None, temperature: float = 1.0,
             tries: int = 8, text_encoder: nn.Module | None = None) -> list[Plan]:
        """One layout per caption. Layouts invalid on geometry are resampled up to `tries` times in
        all (the last one is returned, marked valid=False, if none was). Different generators give
        different layouts."""
        context, mask = text_states(text_encoder or self.text_encoder(), captions)
        out: list[Plan | None] = [None] * len(captions)
        todo = list(range(len(captions)))
        for attempt in range(tries):
            rows = torch.tensor(todo)
            sampled = self.sample_tokens(context[rows], None if mask is None else mask[rows], generator, temperature)
            left = []
            for i, seq in zip(todo, sampled.tolist(), strict=True):
                p = decode_tokens(seq, self.new_shapes)
                out[i] = p
                if not p.valid and attempt + 1 < tries:
                    left.append(i)
            todo = left
            if not todo:
                break
        return out  # type: ignore[return-value]

    # --------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """Weights (float32) and config in one safetensors file (t2i_system 'layout_planner')."""
        from t2i.checkpoints.io import save_module

        save_module(self, path, SYSTEM)

    @classmethod
    def load(cls, path: str | Path) -> LayoutPlanner:
        """A file written by `save`, config checked before anything is allocated; frozen, eval mode."""
        from t2i.checkpoints.limits import load_checked_file

        planner = load_checked_file(path, SYSTEM, "a layout planner file", LayoutPlannerConfig, cls)
        planner._make_tables()
        return planner


def text_states(encoder: nn.Module, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MiniLM context (B, T, context_dim) and mask (B, T) of the captions, cut to the longest caption's
    tokens: the padding is masked out of the cross-attention anyway, and dropping it halves the cost
    of projecting the text for a step (shapes captions are ~14 of the 32 tokens)."""
    enc = encoder.encode(list(captions))
    context, mask = enc.context.float(), enc.mask
    if mask is None:
        return context, None
    n = max(int(mask.sum(1).max()), 1)
    return context[:, :n], mask[:, :n]


def planner_loss(net: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced cross-entropy of a planner `net` (nats per layout token, each field's softmax over
    its own values). tokens (B, N) END-padded, lengths (B,) the real lengths (BOS and END included)."""
    logits = net(tokens[:, :-1], context, mask)  # (B, N - 1, VOCAB), predicts tokens[:, 1:]
    target = tokens[:, 1:].masked_fill(torch.arange(tokens.shape[1] - 1)[None, :] >= lengths[:, None] - 1, -100)
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def planner_config(preset: str, **overrides) -> LayoutPlannerConfig:
    """A copy of a preset with fields replaced."""
    if preset not in PLANNER_PRESETS:
        raise ValueError(f"unknown planner preset {preset!r}; choose from {sorted(PLANNER_PRESETS)}")
    return dataclasses.replace(PLANNER_PRESETS[preset], **overrides)
