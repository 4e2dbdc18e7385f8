"""Training losses as callables outside the networks: ``loss(model, x0, cond, generator) -> scalar``
(the shape of EDM's ``EDMLoss``, Karras et al. 2022, training/loss.py).

A loss draws its own noise levels and noise from the generator it is given, so a training step's
randomness is a pure function of that generator (``t2i.train.loop.step_generator``) and a resumed
run draws exactly the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from t2i.diffusion.denoiser import PREDICTIONS, DiscreteDenoiser
from t2i.diffusion.precond import split_learned_variance


class DiffusionLoss:
    """The denoising objective (DDPM "simple" loss generalised to eps/v/x0 targets).

    ``loss(model, x0, cond, generator) -> scalar``: draws t ~ U{0..T-1} and eps ~ N(0, I)
    per sample from ``generator``, noises in VP form and regresses the network output onto
    the target of its parameterisation (eps; v = sqrt(acp) eps - sqrt(1 - acp) x0; x0).
    ``min_snr_gamma`` applies Min-SNR-gamma weighting (Hang et al. 2023) normalised so that
    each objective keeps its usual scale: eps weight min(snr, g)/snr, v weight
    min(snr, g)/(snr + 1), x0 weight min(snr, g).

    Args:
        alphas_cumprod: (T,) the training schedule.
        prediction_type: what the network predicts.
        min_snr_gamma: None for the plain (unweighted) MSE.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None):
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTIONS}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample loss weights for integer timesteps t (B,)."""
        acp = self.alphas_cumprod.to(t.device)[t]
        if self.min_snr_gamma is None:
            return torch.ones_like(acp)
        snr = acp / (1 - acp)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def __call__(self, model: nn.Module | Callable, x0: torch.Tensor, cond: dict | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Args:
            model: the raw network ``net(x_vp, t, **cond)`` or a DiscreteDenoiser around it.
            x0: (B, C, H, W) clean latents.
            cond: network keyword arguments, batched like x0.
            generator: RNG for t and noise (drawn on CPU, then moved to x0's device).
        Returns:
            () the weighted mean squared error.
        """
        net = model.net if isinstance(model, DiscreteDenoiser) else model
        t, noise, acp, x_t = self.noised(x0, generator)
        out = net(x_t, t.to(torch.float32), **(cond or {}))
        return (self.weights(t) * self.simple(out, x0, noise, acp)).mean()

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw t (B,) then eps (B, C, H, W) from the generator, in this order; returns (t, eps,
        acp_t broadcast (B, 1, 1, 1), x_t = sqrt(acp) x0 + sqrt(1 - acp) eps, the VP input)."""
        b = x0.shape[0]
        T = self.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=generator).to(x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        acp = self.alphas_cumprod.to(x0.device)[t].reshape(b, *([1] * (x0.ndim - 1)))
        x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * noise  # (B, C, H, W) VP
        return t, noise, acp, x_t

    def simple(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
        """(B,) unweighted mean squared error of the prediction `out` (B, C, H, W) against its target."""
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = acp.sqrt() * noise - (1 - acp).sqrt() * x0
        else:
            target = x0
        return ((out.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)

    def x0_estimate(self, out: torch.Tensor, x_t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
        """The x0 a prediction `out` (B, C, H, W) implies at x_t (no clipping, as in training)."""
        if self.prediction_type == "epsilon":
            return (x_t - (1 - acp).sqrt() * out) / acp.sqrt()
        if self.prediction_type == "v_prediction":
            return acp.sqrt() * x_t - (1 - acp).sqrt() * out
        return out


class DecodedLoss(DiffusionLoss):
    """The latent objective plus an L1 loss in pixel space, through a frozen decoder:

        L = L_latent + lambda * mean_i acp_i |decode(x0_hat_i) - x_i|      over the k least noisy samples

    A latent model's loss weighs every latent direction alike, but the decoder does not: where it
    maps a small latent difference to a large colour difference (on the shapes autoencoder, a large
    yellow and a large pink square on black are 0.094 apart, RMS, against 0.61 on white), the latent
    loss barely sees an error the picture shows. Decoding the network's own x0 estimate and comparing
    pixels puts the error where the judge sees it. acp_i (the signal share at t_i) weighs the term:
    at high noise the x0 estimate is a blurred mean that an L1 pull would only sharpen wrongly; and
    only the k samples with the least noise of the batch are decoded, which bounds the decoder's cost.

    Args:
        decode: scaled latents (k, C, h, w) -> pixels (k, 3, H, W) in [-1, 1], differentiable (the
            decoder frozen: requires_grad False on its weights, gradients flow through it).
        pixel_weight: lambda. pixel_batch: k.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, min_snr_gamma: float | None,
                 decode: Callable[[torch.Tensor], torch.Tensor], pixel_weight: float = 1.0, pixel_batch: int = 8):
        super().__init__(alphas_cumprod, prediction_type, min_snr_gamma)
        self.decode, self.pixel_weight, self.pixel_batch = decode, pixel_weight, pixel_batch

    def __call__(self, model: nn.Module | Callable, x0: torch.Tensor, cond: dict | None = None,
                 generator: torch.Generator | None = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """As DiffusionLoss, with pixels (B, 3, H, W) in [-1, 1]: the images x0 encodes."""
        if pixels is None:
            raise ValueError("DecodedLoss needs the images the latents encode (pixels=)")
        net = model.net if isinstance(model, DiscreteDenoiser) else model
        t, noise, acp, x_t = self.noised(x0, generator)
        out = net(x_t, t.to(torch.float32), **(cond or {}))
        latent = (self.weights(t) * self.simple(out, x0, noise, acp)).mean()
        k = min(self.pixel_batch, x0.shape[0])
        least_noisy = torch.argsort(t)[:k]
        x0_hat = self.x0_estimate(out.float()[least_noisy], x_t[least_noisy], acp[least_noisy])
        error = (self.decode(x0_hat) - pixels[least_noisy].float()).abs().mean(dim=(1, 2, 3))  # (k,)
        return latent + self.pixel_weight * (acp[least_noisy].flatten() * error).mean()


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation IDDPM's code uses (so the numbers are theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data in [-1, 1] under N(mean, exp(log_scale)^2) integrated over each value's bin of
    width 2/255, the outer bins open (Ho et al. 2020 eq. 13, DDPM's decoder L_0). Elementwise, in nats."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class HybridLoss(DiffusionLoss):
    """IDDPM's hybrid objective (Nichol & Dhariwal 2021, sec. 3.1): L_hybrid = L_simple + lambda L_vlb,
    lambda = 0.001, for a network with learned variance, ``net(x_t, t) -> (B, 2C, H, W)`` (the mean
    parameterisation, then the variance values v in [-1, 1]).

    L_simple is DiffusionLoss's (same draws, Min-SNR weighting optional) on the first half. L_vlb is
    estimated by one term per sample at its drawn t, scaled by T (L_vlb = L_0 + ... + L_{T-1}, t uniform):

        L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))      t > 0      (eq. 5-7 of Ho et al.)
        L_0 = -log p(x0 | x_1), discretized Gaussian (8-bit bins)  t = 0
        p's mean: the posterior mean at the network's x0 estimate, from a *stopped-gradient* mean
            half, so that L_vlb trains only the variance (sec. 3.1: "we apply a stop-gradient to
            the mu output for the L_vlb term");
        p's log variance: v' log beta_t + (1 - v') log beta~_t, v' = (v + 1) / 2 (eq. 15), with
            beta~_0 taken as beta~_1 (IDDPM's posterior_log_variance_clipped: beta~_0 = 0).

    Each L_t is in bits per dimension (mean over C, H, W, divided by ln 2) as in IDDPM's code, whose
    "rescaled MSE" hybrid weights it by T / 1000: exactly lambda * T * L_t.

    Args:
        alphas_cumprod: (T,) the training schedule; beta_t = 1 - acp_t / acp_{t-1} (acp_{-1} = 1),
            computed in float64.
        prediction_type: what the mean half predicts (eps, v or x0).
        min_snr_gamma: Min-SNR weighting of the L_simple part (None: plain).
        vlb_weight: lambda.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None, vlb_weight: float = 0.001):
        super().__init__(alphas_cumprod, prediction_type, min_snr_gamma)
        self.vlb_weight = vlb_weight
        acp = self.alphas_cumprod.double()
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.betas = 1 - acp / acp_prev  # (T,) float64
        self.acp_prev = acp_prev
        posterior_var = self.betas * (1 - acp_prev) / (1 - acp)  # beta~_t, 0 at t = 0
        self.log_posterior_var = torch.cat([posterior_var[1:2], posterior_var[1:]]).log()  # clipped at t = 0
        # posterior mean = coef_x0 * x0 + coef_xt * x_t (Ho et al. eq. 7)
        self.coef_x0 = self.betas * acp_prev.sqrt() / (1 - acp)
        self.coef_xt = (1 - acp_prev) * (1 - self.betas).sqrt() / (1 - acp)

    def _at(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 (B, 1, ..., 1) on x's device."""
        return table[t.cpu()].to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0), (B, C, H, W)."""
        return self._at(self.coef_x0, t, x_t) * x0 + self._at(self.coef_xt, t, x_t) * x_t

    def model_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """IDDPM eq. 15: (B, C, H, W) log Sigma_theta from the variance values v in [-1, 1]."""
        frac = (var_values.float() + 1) / 2
        max_log = self._at(self.betas.log(), t, var_values)
        min_log = self._at(self.log_posterior_var, t, var_values)
        return frac * max_log + (1 - frac) * min_log

    def vlb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mean_out: torch.Tensor,
                  var_values: torch.Tensor) -> torch.Tensor:
        """(B,) L_t in bits per dimension for each sample at its t, from the network's mean half (used
        as given: detach it for the stop-gradient) and variance values, each (B, C, H, W)."""
        acp = self._at(self.alphas_cumprod.double(), t, x_t)
        x0_hat = self.x0_estimate(mean_out.float(), x_t, acp)
        model_mean = self.posterior_mean(x0_hat, x_t, t)
        model_log_var = self.model_log_variance(var_values, t)
        dims = tuple(range(1, x0.ndim))
        true_mean = self.posterior_mean(x0, x_t, t)
        true_log_var = self._at(self.log_posterior_var, t, x_t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def terms(self, model: nn.Module | Callable, x0: torch.Tensor, cond: dict | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parts for each sample: ((B,) weighted L_simple, (B,) L_t in bits/dim); args as __call__."""
        net = model.net if isinstance(model, DiscreteDenoiser) else model
        t, noise, acp, x_t = self.noised(x0, generator)
        mean_out, var_values = split_learned_variance(net(x_t, t.to(torch.float32), **(cond or {})))
        simple = self.weights(t) * self.simple(mean_out, x0, noise, acp)  # (B,)
        vlb = self.vlb_terms(x0.float(), x_t.float(), t, mean_out.detach(), var_values)  # (B,) stop-gradient mean
        return simple, vlb

    def combine(self, simple: torch.Tensor, vlb: torch.Tensor) -> torch.Tensor:
        """() L_simple + lambda * T * L_t, averaged over the batch, from `terms`."""
        return (simple + self.vlb_weight * self.alphas_cumprod.shape[0] * vlb).mean()

    def __call__(self, model: nn.Module | Callable, x0: torch.Tensor, cond: dict | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Args as DiffusionLoss's; the network returns (B, 2C, H, W). Returns () the hybrid loss."""
        return self.combine(*self.terms(model, x0, cond, generator))


class NoisyClassifierLoss:
    """Cross-entropy of a noise-aware classifier on noised images (Dhariwal & Nichol 2021, sec. 4.1: the
    classifier of classifier guidance is trained on x_t, t drawn uniformly, "on noisy images").

    ``loss(classifier, x0, {"labels": (B,)}, generator) -> scalar``: t and eps are drawn exactly as
    DiffusionLoss draws them (``DiffusionLoss.noised``), then ``classifier(x_t, t) -> (B, K)`` logits.

    Args:
        alphas_cumprod: (T,) the schedule of the diffusion model it will guide.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.draws = DiffusionLoss(alphas_cumprod)

    def with_accuracy(self, classifier: nn.Module | Callable, x0: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(() mean cross-entropy, () share of rows whose argmax is their label)."""
        t, _, _, x_t = self.draws.noised(x0, generator)
        logits = classifier(x_t, t.to(torch.float32)).float()  # (B, K)
        labels = labels.to(logits.device)
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()

    def __call__(self, classifier: nn.Module | Callable, x0: torch.Tensor, cond: dict,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return self.with_accuracy(classifier, x0, cond["labels"], generator)[0]
