"""Token models' home: sampling from logits, classifier-free guidance on logits, and the
autoregressive (DALL-E, Parti) and masked (MaskGIT, Muse) decoders over a codebook.

Both decoders are plain functions over a token model callable, as the diffusion samplers are
over a denoiser: ``model(tokens (B, T), cond) -> logits`` (see ``autoregressive`` and
``masked`` for the two shapes), seeded with one generator per image.
"""

from t2i.tokens.autoregressive import sample_autoregressive
from t2i.tokens.guidance import CFGTokenModel, GuidedCond, TokenModel, guide_logits
from t2i.tokens.masked import (
    MASK_SCHEDULES,
    choice_temperatures,
    gumbel_noise,
    mask_ratio,
    sample_masked,
    sample_training_mask,
)
from t2i.tokens.sampling import Generators, filter_logits, sample_logits

__all__ = [
    "MASK_SCHEDULES",
    "CFGTokenModel",
    "Generators",
    "GuidedCond",
    "TokenModel",
    "choice_temperatures",
    "filter_logits",
    "guide_logits",
    "gumbel_noise",
    "mask_ratio",
    "sample_autoregressive",
    "sample_logits",
    "sample_masked",
    "sample_training_mask",
]
