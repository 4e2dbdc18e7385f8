"""The CLIP byte-pair-encoding tokenizer (Radford et al. 2021), as Stable Diffusion uses it.

The BPE itself is the `tokenizers` library's; this module sets it up the way transformers'
`CLIPTokenizer` does, so ids match it token for token:

- normalization: NFC, every run of whitespace becomes one space, lowercase (the ftfy-free
  path; no HTML unescaping);
- pre-tokenization: CLIP's regex (contractions, letter runs, single digits, runs of other
  symbols; whitespace dropped), then the GPT-2 byte-to-unicode mapping;
- BPE with `</w>` marking the end of a word;
- `<|startoftext|>` ... `<|endoftext|>` around the text, then padding with the pad token of
  the checkpoint (SD1: `<|endoftext|>` 49407; SD2's OpenCLIP tokenizer: `!`, id 0).

A prompt longer than the window is cut to `max_length - 2` tokens and the cut is reported in
`TokenizedBatch.truncated`; `token_ids` gives the full, uncut ids for A1111-style chunking.

Added words (textual inversion, `add_words`) are found as A1111 finds embeddings: by their own
token ids in the tokenized text (so case-insensitively and only as whole CLIP words), each
replaced by the ids of its embedding's rows, n ids for an n-vector embedding.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps 49152 - 256 (bytes) - 2 (special tokens) merges of the file; the rest are unused.
NUM_MERGES = 49152 - 256 - 2

# CLIP's word splitter: special tokens, contractions, letter runs, one digit at a time, runs of
# anything else. Whitespace is never matched, so it disappears between pieces.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (control characters,
    space, ...) map to code points 256, 257, ... in byte order, so BPE never sees whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def default_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49,408-entry CLIP vocabulary and its 48,894 merges, derived from the shipped file.

    Same derivation as CLIP's `SimpleTokenizer`: bytes, bytes + `</w>`, one token per merge,
    then the two special tokens (ids 49406 and 49407).
    """
    lines = gzip.open(ASSET, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


@dataclass
class TokenizedBatch:
    """Token ids of a batch of prompts, padded to one window.

    ids: (B, max_length) int64, `<|startoftext|>` text `<|endoftext|>` then pad ids.
    lengths: (B,) int64, tokens before padding, bos and eos included.
    truncated: per prompt, whether text was cut to fit (the caller should say so).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    truncated: list[bool]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, max_length) bool, True on real tokens (bos, text, eos)."""
        return torch.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]


def pack(token_lists: list[list[int]], bos: int, eos: int, pad: int, max_length: int) -> TokenizedBatch:
    """bos + tokens cut to max_length - 2 + eos, padded with `pad`; cuts are flagged, not hidden."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    ids = torch.full((len(token_lists), max_length), pad, dtype=torch.long)
    lengths, truncated = [], []
    for i, toks in enumerate(token_lists):
        row = [bos, *toks[: max_length - 2], eos]
        ids[i, : len(row)] = torch.tensor(row)
        lengths.append(len(row))
        truncated.append(len(toks) > max_length - 2)
    return TokenizedBatch(ids, torch.tensor(lengths, dtype=torch.long), truncated)


class CLIPTokenizer:
    """CLIP BPE tokenizer with transformers-identical ids (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS) -> None:
        for tok in (BOS, EOS, pad_token):
            if tok not in vocab:
                raise ValueError(f"CLIP vocabulary lacks the token {tok!r}")
        bpe = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # transformers registers bos/eos/pad as special tokens matched in the raw text before
        # BPE; we do the same so a literal "<|endoftext|>" (or SD2's "!") gives the same ids.
        specials = dict.fromkeys((BOS, EOS, pad_token))  # ordered, without duplicates
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self._tok = tok
        self._vocab = vocab
        self._merges = merges
        # Added words: {word: (its own token ids, the ids it stands for)}, indexed by first token id
        # (longest first) for the scan in `_replace_words`.
        self._words: dict[str, tuple[tuple[int, ...], list[int]]] = {}
        self._by_first: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}
        self.pad_token = pad_token
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, vocab: str | Path, merges: str | Path, pad_token: str = EOS) -> CLIPTokenizer:
        """Read a `vocab.json` and a `merges.txt` (first line `#version: ...` is skipped)."""
        vocab_map = json.loads(Path(vocab).read_text(encoding="utf-8"))
        merge_list = []
        for line in Path(merges).read_text(encoding="utf-8").split("\n"):
            if line.startswith("#version") or not line.strip():
                continue
            merge_list.append(tuple(line.split()))
        return cls(vocab_map, merge_list, pad_token=pad_token)  # type: ignore[arg-type]

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Read a checkpoint's `tokenizer/` folder: vocab.json + merges.txt, or else tokenizer.json
        (transformers >= 5 saves only that), and the pad token from special_tokens_map.json or
        tokenizer_config.json (SD1: `<|endoftext|>`, SD2: `!`)."""
        path = Path(path)
        pad = read_pad_token(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_files(path / "vocab.json", path / "merges.txt", pad_token=pad)
        if (path / "tokenizer.json").is_file():
            model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            if model.get("type") != "BPE":
                raise ValueError(f"{path / 'tokenizer.json'}: a {model.get('type')} model, not CLIP's BPE")
            # merges are "a b" strings in older files, [a, b] pairs in newer ones.
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(model["vocab"], merges, pad_token=pad)  # type: ignore[arg-type]
        raise FileNotFoundError(
            f"{path}: no vocab.json + merges.txt or tokenizer.json: not a CLIP tokenizer folder"
        )

    @classmethod
    def default(cls, pad_token: str = EOS) -> CLIPTokenizer:
        """The real CLIP vocabulary shipped in t2i/assets/clip (no hub needed)."""
        vocab, merges = default_vocab_and_merges()
        return cls(vocab, merges, pad_token=pad_token)

    def save(self, folder: str | Path) -> None:
        """Write the diffusers `tokenizer/` layout: vocab.json, merges.txt and the two configs."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Untruncated ids of each text, without bos/eos (for chunking long prompts), added words
        replaced by their ids."""
        ids = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self._replace_words(row) for row in ids] if self._words else ids

    # ------------------------------------------------------------------ added words (textual inversion)
    @property
    def words(self) -> dict[str, list[int]]:
        """The added words and the ids each stands for, in the order they were added."""
        return {word: list(ids) for word, (_, ids) in self._words.items()}

    def add_words(self, words: dict[str, list[int]]) -> None:
        """Make each word stand for its ids (the rows its embedding added to the text model) wherever
        a text holds its token ids. All-or-nothing: refuses (ValueError) a word that is a single token
        (a vocabulary word: it would vanish from every prompt; rename the embedding) or that tokenizes
        like a word already added (`Style` and `style`)."""
        taken = {seq: word for word, (seq, _) in self._words.items()}
        new = {}
        for word, ids in words.items():
            seq = tuple(self._tok.encode(word, add_special_tokens=False).ids)
            if len(seq) < 2:
                raise ValueError(f"{word!r} is {'a word of the vocabulary' if seq else 'no text'} "
                                 "(an embedding's name must not be one token; rename its file)")
            if seq in taken:
                raise ValueError(f"{word!r} tokenizes like the word {taken[seq]!r}, already added")
            taken[seq] = word
            new[word] = (seq, [int(i) for i in ids])
        self._words.update(new)
        self._index_words()

    def remove_words(self, words: list[str]) -> None:
        """Forget added words (KeyError for one never added)."""
        for word in words:
            del self._words[word]
        self._index_words()

    def _index_words(self) -> None:
        self._by_first = {}
        for seq, ids in sorted(self._words.values(), key=lambda item: -len(item[0])):
            self._by_first.setdefault(seq[0], []).append((seq, ids))

    def _replace_words(self, ids: list[int]) -> list[int]:
        """ids with each added word's token ids replaced by the word's ids, the longest word first
        where several start at one position (A1111's `find_embedding_at_position`)."""
        out, i = [], 0
        while i < len(ids):
            for seq, new in self._by_first.get(ids[i], ()):
                if tuple(ids[i : i + len(seq)]) == seq:
                    out += new
                    i += len(seq)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out

    def tokenize(self, texts: list[str], max_length: int = 77) -> TokenizedBatch:
        """Tokenize, cut to `max_length` (bos + up to max_length - 2 tokens + eos) and pad.

        A cut prompt is flagged in `truncated`, never dropped silently.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings")
        return pack(self.token_ids(texts), self.bos_id, self.eos_id, self.pad_id, max_length)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens dropped, words separated by spaces."""
        return self._tok.decode(ids, skip_special_tokens=True).replace("</w>", " ").strip()


def read_pad_token(folder: Path) -> str:
    """The pad token named by a tokenizer folder, `<|endoftext|>` when none is named."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # AddedToken serialized as {"content": "!", ...}
                pad = pad.get("content")
            if pad:
                return pad
    return EOS
