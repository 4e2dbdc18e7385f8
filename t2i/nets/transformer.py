"""The pre-norm transformer block of CLIP's text and image towers (and of ViT-style models).

x + attn(norm1(x)), then x + mlp(norm2(x)); causal for text, full for image patches. The
parameter names (norm1, attn, norm2, mlp.fc1, mlp.fc2) are what t2i's CLIP key maps target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (DiT, GPT-2)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


class MLP(nn.Module):
    """Position-wise feed-forward: width -> mlp_dim -> width."""

    def __init__(self, width: int, mlp_dim: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """Pre-norm residual block over tokens (B, T, width) -> (B, T, width)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, activation: str, eps: float,
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=self.causal)  # (B, T, D)
        return x + self.mlp(self.norm2(x))
