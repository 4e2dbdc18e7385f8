"""Codebook bookkeeping shared by the tokenizers whose codebook is not the EMA one of `vq.VectorQuantizer`
(ViT-VQGAN's learnt, l2-normalised codes; the dVAE's Gumbel codebook).

- Usage: an EMA of how many encodings each code took per step, the same statistic as the EMA
  codebook's cluster size N_i (VQ-VAE eq. 6), so "dead codes" mean the same thing for every tokenizer:
  codes whose usage fell below a threshold (in encodings per step).
- Restarts (Jukebox, Dhariwal et al. 2020, sec. 3.1): a dead code is moved onto a random encoding of
  the batch, so it takes part again.
In a process group the counts are summed over the ranks and the restart encodings come from rank 0,
so every rank keeps the same codebook by itself (as `VectorQuantizer.ema_update`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def update_usage(usage: torch.Tensor, codes: torch.Tensor, decay: float) -> None:
    """usage (K,) <- decay * usage + (1 - decay) * counts of `codes` (any shape), counts over all ranks."""
    counts = torch.bincount(codes.flatten(), minlength=usage.numel()).to(usage.dtype)  # (K,)
    if _grouped():
        dist.all_reduce(counts)
    usage.mul_(decay).add_(counts, alpha=1 - decay)


@torch.no_grad()
def restart_dead(codebook: torch.Tensor, usage: torch.Tensor, flat: torch.Tensor, threshold: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Move the codes with usage < threshold onto random rows of `flat` (N, D) in place, their usage
    reset to 1 (one fresh encoding). codebook: (K, D). Returns the number restarted (a 0-d tensor)."""
    dead = usage < threshold  # (K,)
    n_dead = int(dead.sum())
    if n_dead:
        pick = torch.randint(0, flat.shape[0], (n_dead,), generator=generator, device=flat.device)
        fresh = flat[pick].to(codebook.dtype)  # (n_dead, D)
        if _grouped():
            dist.broadcast(fresh, src=0)
        codebook[dead] = fresh
        usage[dead] = 1.0
    return torch.tensor(n_dead)
