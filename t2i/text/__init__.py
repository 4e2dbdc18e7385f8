"""Tokenizers and text encoders.

- `clip_tokenizer`: the CLIP BPE tokenizer (transformers-identical ids), with the real CLIP
  vocabulary shipped in t2i/assets/clip.
- `clip`: the CLIP text transformer of SD 1.x / 2.x / XL.
- `bert`: BERT and all-MiniLM-L6-v2 (the default model's frozen text encoder).
- `encoders`: the one interface pipelines use, prompts -> TextEncoding(context, pooled, mask,
  truncated).
"""
