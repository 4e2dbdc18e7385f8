"""`t2i train textual-inversion`: a new word's input vectors learned on a frozen model (Gal et al. 2022,
"An Image is Worth One Word", eq. 2: v* = argmin_v E ||eps - eps_theta(z_t, t, c_theta(y, v))||^2, with
the text encoder c_theta and the U-Net eps_theta frozen).

The word (`--token`) is added to the CLIP encoder as `t2i.adapters.embeddings` adds a loaded embedding
(n new rows, n ids the tokenizer puts wherever the word appears); a forward hook on the token embedding
reads the trainable (n, D) vectors in place of those rows, so nothing else can move. They start from the
token embeddings of `--init-word` (repeated to fill n, as A1111 does; zeros for an empty init word).

Captions: `[name]` (A1111's template placeholder) becomes the token; a caption that does not hold the
token gets it in front (`<token> caption`): a step whose captions lack the word trains nothing. A caption
whose tokens do not hold the word's (CLIP reads `<w>,` as other tokens than `<w>`: punctuation joins the
word's last piece) is an error naming it, not a step without gradient.

The file written, `<out>/<token>.safetensors`, holds `emb_params` (n, D), the single-tensor form A1111
and kohya write as safetensors, which A1111, diffusers' `load_textual_inversion` and t2i's
`--embedding FILE` / `--embedding-dir` read; used by its file stem (the token) in prompts. On SDXL the
word is learned in both text encoders, n vectors each, and the file holds `clip_l` (n, 768) and `clip_g`
(n, 1280), SDXL's two-encoder form (a refiner, with the second encoder only: `clip_g`).

The shapes models' MiniLM encoder (BERT WordPiece) takes a word too, one vector (`add_minilm_word`: the
token becomes an added token of its tokenizer, one new embedding row); t2i's `--embedding` does not read
those yet: `add_learned_word(pipe.text_encoder, token, file's emb_params)` loads one in Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.adapters.embeddings import SDXL_KEYS
from t2i.checkpoints.io import save_state_dict
from t2i.text.encoders import CLIPTextEncoder, MiniLMTextEncoder, SDXLTextEncoder
from t2i.train.fit import Run, Step, Task, fit
from t2i.train.lora import AdapterTrainConfig, FrozenModel, encode_trainable

NAME_PLACEHOLDER = "[name]"  # A1111's template placeholder for the embedding's word


@dataclass
class TextualInversionConfig(AdapterTrainConfig):
    """`t2i train textual-inversion`."""

    token: str = ""  # the new word, and the file's stem
    init_word: str = "*"  # the vectors start as this text's token embeddings (A1111's default `*`)
    vectors: int = 1  # vectors per word (tokens it takes in a prompt)
    lr: float = 5e-3  # A1111's default


def add_minilm_word(encoder: MiniLMTextEncoder, token: str, vectors: torch.Tensor) -> int:
    """Add `token` to a MiniLM encoder with its vector (1, D) as a new row of the token embedding; returns
    its id. The token becomes an added token of the WordPiece tokenizer (matched before WordPiece splits,
    wherever it appears, also inside `<w>s`). Refuses a vocabulary word (one token already: it would
    vanish from every prompt), a word already added, and n != 1 (ValueError, nothing changed)."""
    from tokenizers import AddedToken

    emb, tok = encoder.model.token_embedding, encoder.tokenizer._tok  # no add_words on WordPieceTokenizer yet
    if vectors.shape != (1, emb.weight.shape[1]):
        raise ValueError(f"{token!r}: a MiniLM word takes one vector (1, {emb.weight.shape[1]}), "
                         f"got {tuple(vectors.shape)}")
    if len(encoder.tokenizer.token_ids([token])[0]) < 2:
        raise ValueError(f"{token!r} is one token of MiniLM's vocabulary (or an added word); choose a new word, "
                         "e.g. '<my-word>'")
    if tok.get_vocab_size(with_added_tokens=True) != emb.num_embeddings:
        raise ValueError(f"the tokenizer ({tok.get_vocab_size(with_added_tokens=True)} ids) and the embedding "
                         f"({emb.num_embeddings} rows) disagree")
    tok.add_tokens([AddedToken(token, single_word=False, normalized=True)])
    emb.weight = nn.Parameter(torch.cat([emb.weight.detach(), vectors.to(emb.weight)]),
                              requires_grad=emb.weight.requires_grad)  # (V + 1, D)
    emb.num_embeddings += 1
    return emb.num_embeddings - 1


def add_learned_word(encoder: CLIPTextEncoder | MiniLMTextEncoder, token: str, vectors: torch.Tensor) -> int:
    """Add a word with its vectors (n, D) to a CLIP or MiniLM encoder; returns its first id (its n ids
    are consecutive)."""
    if isinstance(encoder, MiniLMTextEncoder):
        return add_minilm_word(encoder, token, vectors)
    encoder.add_words({token: vectors})  # refuses a vocabulary word or a clash, before anything changed
    return encoder.tokenizer.words[token][0]


class LearnedWord(nn.Module):
    """A word's n trainable vectors (n, D), read in place of its rows of a CLIP or MiniLM token embedding."""

    def __init__(self, encoder: CLIPTextEncoder | MiniLMTextEncoder, token: str, vectors: int,
                 init_word: str) -> None:
        super().__init__()
        emb = encoder.model.token_embedding
        ids = encoder.tokenizer.token_ids([init_word])[0] if init_word else []
        rows = emb.weight.detach()[ids] if ids else torch.zeros(1, emb.weight.shape[1])  # (len, D)
        init = rows[torch.arange(vectors) % len(rows)].float()  # (n, D) cycled, as A1111 fills n vectors
        self.first = add_learned_word(encoder, token, init)
        self.vectors = nn.Parameter(init.clone())  # (n, D)
        self._hook = emb.register_forward_hook(self._replace)

    def _replace(self, _module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        ids = args[0]  # (B, T)
        offset = ids - self.first
        mine = (offset >= 0) & (offset < len(self.vectors))  # (B, T) the word's positions
        picked = self.vectors[offset.clamp(0, len(self.vectors) - 1)]  # (B, T, D)
        return torch.where(mine[..., None], picked.to(out.dtype), out)

    def check(self, tokenizer: Any, captions: list[str]) -> None:
        """Refuse captions whose tokens do not hold the word (ValueError naming the first)."""
        for caption, ids in zip(captions, tokenizer.token_ids(captions), strict=True):
            if not any(0 <= i - self.first < len(self.vectors) for i in ids):
                raise ValueError(f"caption {caption!r} does not hold the word's tokens (punctuation right after "
                                 "the word changes how CLIP splits it: put a space before it)")

    def remove(self) -> None:
        self._hook.remove()


def with_token(caption: str, token: str) -> str:
    """A caption as trained on: `[name]` -> token; the token in front when the caption lacks it."""
    caption = caption.replace(NAME_PLACEHOLDER, token)
    return caption if token in caption else f"{token} {caption}".strip()


def check_token(token: str) -> None:
    if not token or token != token.strip() or any(c in token for c in "/\\:") or token.startswith("."):
        raise ValueError(f"--token {token!r}: give the word the embedding stands for (it is the file's stem, so "
                         "no slashes, colons or leading dot; e.g. '<my-style>')")


def learned_words(encoder: Any, token: str, vectors: int, init_word: str) -> dict[str, LearnedWord]:
    """The word in every tower of `encoder`, keyed as the file stores them: {"emb_params": word} for one
    CLIP or MiniLM encoder; SDXL's pair {"clip_l", "clip_g"} (the refiner's lone tower: "clip_g"), the
    two-encoder form A1111 and diffusers read, each tower learning its own vectors (their widths differ)."""
    if isinstance(encoder, CLIPTextEncoder | MiniLMTextEncoder):
        return {"emb_params": LearnedWord(encoder, token, vectors, init_word)}
    if isinstance(encoder, SDXLTextEncoder):
        keys = SDXL_KEYS[-len(encoder.encoders):]
        return {k: LearnedWord(e, token, vectors, init_word) for k, e in zip(keys, encoder.encoders, strict=True)}
    raise ValueError(f"textual inversion trains a word of CLIP text encoders (SD 1.x/2.x/XL) or of MiniLM (the "
                     f"shapes models); this model has {type(encoder).__name__}")


def build_textual_inversion(cfg: TextualInversionConfig, run: Run) -> Task:
    check_token(cfg.token)
    if cfg.vectors < 1:
        raise ValueError(f"--vectors must be at least 1, got {cfg.vectors}")
    frozen = FrozenModel(cfg, run)
    pipe = frozen.pipe
    try:
        words = learned_words(pipe.text_encoder, cfg.token, cfg.vectors, cfg.init_word)
    except ValueError as e:
        raise ValueError(f"{pipe.name}: {e}") from None
    towers = getattr(pipe.text_encoder, "encoders", [pipe.text_encoder])
    params = [w.vectors for w in words.values()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    done = {"steps": 0}

    def encode(captions: list[str]):
        return encode_trainable(pipe, [with_token(c, cfg.token) for c in captions])

    def prepare(position: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        z, captions = frozen.latents(position, gen)  # the captions are encoded in the step, through the vectors
        for word, tower in zip(words.values(), towers, strict=True):
            word.check(tower.tokenizer, [with_token(c, cfg.token) for c in captions])
        return z, captions

    def step(batch: tuple[torch.Tensor, list[str]], s: Step) -> dict[str, float]:
        z, captions = batch
        loss = frozen.loss(z, encode(captions), s.generator)
        gnorm = s.update(loss, opt, params, average=params)
        done["steps"] = s.index + 1
        return {"ti/loss": loss.item(), "ti/grad_norm": gnorm}

    def export() -> None:
        meta = {"name": cfg.token, "step": str(done["steps"]), "init_word": cfg.init_word,
                "sd_checkpoint_name": Path(cfg.model).name, "t2i_config": json.dumps(cfg.to_dict())}
        save_state_dict({k: w.vectors.detach().float() for k, w in words.items()},
                        Path(cfg.out) / f"{cfg.token}.safetensors", meta)

    def evaluate(step: int) -> None:
        run.log.scalars(step, {"ti/fixed_loss": frozen.fixed_loss(encode)})

    prompts = frozen.sample_prompts(lambda c: with_token(c, cfg.token))
    about = f", word {cfg.token!r} ({cfg.vectors} vectors from {cfg.init_word!r}) on {pipe.name}"
    # One tower's word is checkpointed as the module "word" (as before SDXL), two as "word.clip_l/clip_g".
    module = words["emb_params"] if "emb_params" in words else nn.ModuleDict(words)
    return Task("textual-inversion", {"word": module}, {"opt": opt}, prepare=prepare, step=step,
                grid=lambda: frozen.grid(prompts), grid_name="embedding", export=export, evaluate=evaluate,
                about=about)


def train_textual_inversion(cfg: TextualInversionConfig, resume: bool = False, resume_lr: float | None = None,
                            given: dict[str, str] | None = None) -> int:
    """Run (or, with resume, continue) a textual-inversion training. Returns the exit code."""
    return fit(cfg, build_textual_inversion, resume=resume, resume_lr=resume_lr, given=given)

