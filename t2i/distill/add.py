"""`t2i distill add`: adversarial diffusion distillation (Sauer et al. 2023, "Adversarial Diffusion
Distillation", SDXL-Turbo; seed 003 section 5) of a teacher into a 1-4 step student.

The student starts as the teacher. Each step, for real latents z with caption c:
    s from the student's timesteps, x_s = sqrt(acp_s) z + sqrt(1 - acp_s) eps; x_theta = x0(student(x_s, s, c))
    generator:      L_G = -sum_k D_k(x_theta, c) + lambda * L_distill                       (ADD eq. 1-4)
    discriminator:  L_D = sum_k [max(0, 1 - D_k(z, c)) + max(0, 1 + D_k(sg x_theta, c))] + gamma/2 R1
with R1 = E ||d D(z, c) / d z||^2 on real data, and the score distillation loss from the frozen teacher
on the re-noised student output (stop-gradient),
    L_distill = E_t,eps' [ c(t) * mean((x_theta - x_psi(sqrt(acp_t) sg(x_theta) + sqrt(1 - acp_t) eps', t))^2) ]
with the teacher's classifier-free-guided x0 estimate x_psi, t uniform over the training timesteps and the
paper's exponential weighting c(t) = alpha_t = sqrt(acp_t) (higher noise levels count less), lambda = 2.5.

The discriminator: a frozen feature network with small trainable heads, each conditioned on the caption
by projection (Miyato & Koyama 2018; the heads of StyleGAN-T that ADD uses). The feature network is the
frozen teacher U-Net's encoder (its down levels and mid block), not a pixel network (ADD's DINOv2; ours
would be the shapes CLIP image tower), for three reasons: it reads latents, so the student's output needs
no VAE decode (forward and backward) each step; its features already know the caption and, for the layout
renderer, the layout (the discriminator judges the image against what it was asked to draw); and latent
features from the teacher are what LADD (Sauer et al. 2024) found to work as well as DINOv2 at a fraction
of the cost. Both real and generated latents are noised to a drawn level t_d <= disc_max_t before the
features are read (the U-Net's own input distribution; instance noise that keeps the discriminator smooth).

The student's timesteps are the `lcm` sampler's at 4 steps (999, 759, 499, 259 for T = 1000) rather than
ADD's 999, 749, 499, 249: the shipped model samples with `lcm` (predict x0, re-noise: ADD's multi-step
sampling), which then visits exactly the trained timesteps at 1, 2 and 4 steps. No CFG at sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.distill.lcm import DistillConfig, guided_prediction, predicted_x0_eps
from t2i.distill.teacher import FastDefaults, Teacher, teacher_file
from t2i.nets.attention import Attention
from t2i.nets.unet import UNet
from t2i.samplers.diffusers_plan import prepare_sampling
from t2i.train.ema import EMA
from t2i.train.fit import Run, Step, Task, fit


@dataclass
class ADDConfig(DistillConfig):
    """`t2i distill add`."""

    guidance: float | None = None  # the teacher's CFG scale in L_distill (None: its default)
    student_steps: int = 4  # the student's timesteps: the lcm sampler's at this many steps
    distill_weight: float = 2.5  # lambda
    r1_weight: float = 0.1  # gamma of the R1 penalty
    disc_max_t: int = 250  # discriminator features read at t_d ~ U{0 .. disc_max_t}
    disc_channels: int = 64  # the heads' projection width
    disc_lr_scale: float = 10.0  # the heads (new) learn this much faster than the student
    lr: float = 1e-5
    ema_decay: float = 0.99  # of the shipped student


# ============================================================================ losses


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """() sum_k [E max(0, 1 - D_k(real)) + E max(0, 1 + D_k(fake))] for logits (K, B) of K heads."""
    return (F.relu(1 - real).mean(1) + F.relu(1 + fake).mean(1)).sum()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """() -sum_k E D_k(fake) for logits (K, B)."""
    return -fake.mean(1).sum()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """() R1 (Mescheder et al. 2018): E_batch ||d sum_k D_k(x) / d x||^2 at the real inputs x (B, ...),
    which must require grad and be what the logits (K, B) were computed from; differentiable (create_graph)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class ScoreDistillation:
    """ADD's L_distill (module docstring) against a frozen teacher `net(x_vp, t, **cond) -> eps | v | x0`.

    Args:
        alphas_cumprod: (T,) the teacher's schedule; prediction_type: its parameterisation.
        guidance: the teacher's classifier-free guidance scale (1: none).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, guidance: float) -> None:
        self.acp = alphas_cumprod.detach().to(torch.float32)
        self.prediction_type, self.guidance = prediction_type, guidance

    def draw(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) uniform over the training timesteps, then eps' (B, C, h, w)."""
        t = torch.randint(0, self.acp.shape[0], (x.shape[0],), generator=generator)
        return t, torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    @torch.no_grad()
    def target(self, teacher: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: dict,
               uncond: dict | None) -> torch.Tensor:
        """x_psi (B, C, h, w): the guided teacher's x0 estimate at x0 re-noised to t."""
        acp = self.acp[t].to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
        guided = uncond is not None and self.guidance != 1.0
        return guided_prediction(teacher, x_t, t, acp, self.prediction_type, cond, uncond if guided else None,
                                 self.guidance)[0]

    def __call__(self, teacher: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: dict,
                 uncond: dict | None = None) -> torch.Tensor:
        """() E[c(t) mean((x0 - x_psi)^2)], c(t) = sqrt(acp_t); the gradient reaches x0 (B, C, h, w) directly."""
        target = self.target(teacher, x0.detach(), t, noise, cond, uncond)
        weight = self.acp[t].to(x0.device).sqrt()  # (B,)
        return (weight * ((x0.float() - target) ** 2).flatten(1).mean(1)).mean()


# ============================================================================ the discriminator


class _FeaturesDone(Exception):
    """Raised by the last feature hook: the rest of the U-Net (its up path) is not needed."""


class DiscriminatorHead(nn.Module):
    """Logits (B,) from one feature map (B, C, h, w) and the caption embedding (B, E): conv3x3 -
    GroupNorm - LeakyReLU - conv1x1 to D channels, then the projection <h, W c> / sqrt(D) at every
    position (a projection discriminator), averaged over positions."""

    def __init__(self, channels: int, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(math.gcd(8, channels), channels), nn.LeakyReLU(0.2),
                                  nn.Conv2d(channels, dim, 1))
        self.cond = nn.Linear(cond_dim, dim)
        self.dim = dim

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.body(features)  # (B, D, h, w)
        c = self.cond(text.to(h.dtype))[:, :, None, None]  # (B, D, 1, 1)
        return ((h * c).sum(1) / math.sqrt(self.dim)).mean((1, 2))  # (B,)


class FeatureDiscriminator(nn.Module):
    """Trainable heads on the features of a frozen U-Net (module docstring): the output of each down
    level's last block (before its downsampling) and of the mid block, read by the U-Net's own forward
    (so every conditioning it takes, the layout included, reaches the features), stopped after the mid
    block. forward(x, t, cond, text) -> (K, B) logits, one row per head."""

    def __init__(self, unet: UNet, cond_dim: int, dim: int = 64) -> None:
        super().__init__()
        ch = list(unet.cfg.block_channels) + ([unet.cfg.block_channels[-1]] if unet.mid_block is not None else [])
        self.heads = nn.ModuleList(DiscriminatorHead(c, cond_dim, dim) for c in ch)
        self._unet = [unet]  # in a list: the frozen teacher is not a submodule (not checkpointed, not trained)

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: dict,
                 double_backward: bool = False) -> list[torch.Tensor]:
        """The feature maps of x (B, C, h, w) at timesteps t (B,). double_backward: through attention in its
        explicit form (softmax(Q K^T / sqrt(d)) V, the path a logit bias takes), whose graph can be
        differentiated twice (R1), unlike the fused kernel's; set on the U-Net's own attention modules for
        this call only (the global `sdpa_kernel` switch would also reach the encoders the loop's prefetch
        thread runs at the same time)."""
        unet = self._unet[0]
        found: list[torch.Tensor] = []
        explicit = [m for m in unet.modules() if isinstance(m, Attention)] if double_backward else []
        last = unet.mid_block if unet.mid_block is not None else unet.down_blocks[-1]

        def level(block: nn.Module, _args: tuple, out: tuple) -> None:
            found.append(out[1][len(block.resnets) - 1])  # the level's features before its Downsample

        def mid(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if unet.mid_block is not None:
                found.append(out)
            raise _FeaturesDone

        hooks = [b.register_forward_hook(level) for b in unet.down_blocks] + [last.register_forward_hook(mid)]
        for m in explicit:
            m.logit_bias = _no_bias
        try:
            unet(x, t.float(), **cond)
        except _FeaturesDone:
            pass
        finally:
            for h in hooks:
                h.remove()
            for m in explicit:
                m.logit_bias = None
        return found

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, text: torch.Tensor,
                double_backward: bool = False) -> torch.Tensor:
        features = self.features(x, t, cond, double_backward)
        return torch.stack([head(f, text) for head, f in zip(self.heads, features, strict=True)])


def _no_bias(logits: torch.Tensor) -> float:
    return 0.0


# ============================================================================ the run


@dataclass
class ADDDraws:
    """One step's draws: student timestep s and eps; teacher t and eps'; discriminator t_d and its noise."""

    s: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    eps_t: torch.Tensor
    t_d: torch.Tensor
    eps_d: torch.Tensor


def _noised(x0: torch.Tensor, acp: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    a = acp[t].to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def build_add(cfg: ADDConfig, run: Run, text_encoder: nn.Module | None = None) -> Task:
    teacher = Teacher(cfg.teacher, text_encoder)
    schedule = teacher.schedule
    acp = schedule.alphas_cumprod()
    if not 1 <= cfg.student_steps <= 8:
        raise ValueError(f"--student-steps must be 1 to 8 (ADD trains 1-4 step students), got {cfg.student_steps}")
    if not 0 <= cfg.disc_max_t < acp.shape[0]:
        raise ValueError(f"--disc-max-t must be in [0, {acp.shape[0] - 1}], got {cfg.disc_max_t}")
    for name in ("distill_weight", "r1_weight"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    student_t = prepare_sampling(schedule, "lcm", cfg.student_steps).timesteps.long()  # (S,)
    guidance = teacher.guidance if cfg.guidance is None else cfg.guidance
    distill = ScoreDistillation(acp, schedule.prediction_type, guidance)
    student = teacher.student_unet(embed_guidance=False)
    ema = EMA(student, cfg.ema_decay)
    net = run.parallel(student)
    disc = FeatureDiscriminator(teacher.unet, teacher.text.pooled_dim or teacher.ldm_cfg.unet.context_dim,
                                cfg.disc_channels)
    heads = list(disc.heads.parameters())
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt_d = torch.optim.AdamW([{"params": heads, "lr_scale": cfg.disc_lr_scale}], lr=cfg.lr, weight_decay=0.0,
                              betas=(0.0, 0.99))  # the usual GAN betas for the discriminator
    data = teacher.data(cfg.seed, cfg.background_p, run.log.text)

    def prepare(position: int, gen: torch.Generator):
        b = teacher.encode(*data(position, cfg.batch_size, run.info), gen)
        n = b.z.shape[0]
        s = student_t[torch.randint(0, student_t.shape[0], (n,), generator=gen)]
        eps = torch.randn(b.z.shape, generator=gen)
        t, eps_t = distill.draw(b.z, gen)
        t_d = torch.randint(0, cfg.disc_max_t + 1, (n,), generator=gen)
        return b, ADDDraws(s, eps, t, eps_t, t_d, torch.randn(b.z.shape, generator=gen))

    def step(batch, st: Step) -> dict[str, float]:
        b, d = batch
        x_s = _noised(b.z, acp, d.s, d.eps)
        a_s = acp[d.s].reshape(-1, 1, 1, 1)
        x0 = predicted_x0_eps(net(x_s, d.s.float(), **b.cond).float(), x_s, a_s, schedule.prediction_type)[0]
        # the student: fool the discriminator, match the teacher
        disc.heads.requires_grad_(False)
        g_adv = hinge_g_loss(disc(_noised(x0, acp, d.t_d, d.eps_d), d.t_d, b.cond, b.pooled))
        l_distill = distill(teacher.unet, x0, d.t, d.eps_t, b.cond, b.uncond)
        g_norm = st.update(g_adv + cfg.distill_weight * l_distill, opt_g, student.parameters(), "generator loss")
        disc.heads.requires_grad_(True)
        # the discriminator: hinge on real and generated latents, R1 on the real ones
        real = b.z.detach().requires_grad_(cfg.r1_weight > 0)
        real_logits = disc(_noised(real, acp, d.t_d, d.eps_d), d.t_d, b.cond, b.pooled, cfg.r1_weight > 0)
        r1 = r1_penalty(real_logits, real) if cfg.r1_weight > 0 else real_logits.new_zeros(())
        fake_logits = disc(_noised(x0.detach(), acp, d.t_d, d.eps_d), d.t_d, b.cond, b.pooled)
        d_hinge = hinge_d_loss(real_logits, fake_logits)
        d_norm = st.update(d_hinge + cfg.r1_weight / 2 * r1, opt_d, heads, "discriminator loss", average=heads)
        return {"add/distill": l_distill.item(), "add/g_adv": g_adv.item(), "add/d_hinge": d_hinge.item(),
                "add/r1": r1.item(), "add/real_logit": real_logits.mean().item(),
                "add/fake_logit": fake_logits.mean().item(), "add/g_grad_norm": g_norm, "add/d_grad_norm": d_norm}

    defaults = FastDefaults(steps=cfg.fast_steps, guidance=1.0)

    def shipped() -> nn.Module:
        return teacher.student_model(student.cfg, ema.averaged.state_dict(), defaults)

    about = (f", ADD of the {teacher.family} teacher {cfg.teacher}: student timesteps {student_t.tolist()}, teacher "
             f"guidance {guidance:g}, lambda {cfg.distill_weight:g}, R1 gamma {cfg.r1_weight:g}, {len(disc.heads)} "
             f"discriminator heads on the teacher's U-Net features ({sum(p.numel() for p in heads) / 1e6:.3f}M)")
    return Task("add", {"student": student, "ema": ema.averaged, "disc": disc.heads}, {"g": opt_g, "d": opt_d},
                prepare=prepare, step=step, ema=ema, grid=lambda: teacher.grid(shipped()), grid_name="student",
                export=lambda: teacher.save_student(shipped(), Path(cfg.out)), about=about)


def distill_add(cfg: ADDConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None, text_encoder: nn.Module | None = None) -> int:
    """Run (or, with resume, continue) an ADD distillation. Returns the exit code."""
    if not resume:  # a wrong teacher is refused before the run's folder and log exist
        teacher_file(cfg.teacher)
    return fit(cfg, partial(build_add, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)
