"""`t2i distill lcm`: latent consistency distillation (Luo et al. 2023, "Latent Consistency Models",
Algorithm 1 LCD) of a guided teacher into a few-step student, and LCM-LoRA (Luo et al. 2023b).

One step of LCD, for latents z of the data and their caption c:
    n ~ U{0 .. N-1}, t_{n+k} = (n + 1) k - 1 on the skipping-step grid of N = T / k timesteps
    w ~ U[w_min, w_max]                       the CFG weight (guidance scale g = w + 1)
    x = sqrt(acp) z + sqrt(1 - acp) eps      at t_{n+k}
    x_prev = DDIM(x; teacher guided by w)     the augmented PF-ODE solver from t_{n+k} to t_n = t_{n+k} - k
    loss = d(f_theta(x, w, c, t_{n+k}), f_theta-(x_prev, w, c, t_n))
with the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(net(x, t)) (the boundary scalings
LCMScheduler samples with, `consistency_boundary_scalings`), d the pseudo-Huber distance
sqrt((a - b)^2 + c^2) - c averaged over elements (diffusers' LCM script; or L2), and theta- the
target network: an EMA of the student with decay mu (0.95), stop-gradient. The student reads w through
the guidance-scale embedding (`time_cond_proj_dim`), so one student serves a range of guidance scales
with no unconditional batch; its model file samples with `lcm` at 4 steps and the teacher's guidance.

The skipping-step grid with k = T / 50 = 20 is the one LCMScheduler's timesteps come from (999, 759,
499, 259 at 4 steps), so the student is trained on exactly the timesteps the `lcm` sampler visits. The
teacher's DDIM step, which reads nothing of the student, runs in `prepare` (the loop's prefetch thread).

LCM-LoRA: the same distillation into a low-rank adapter on the frozen teacher's U-Net (no w-embedding:
the teacher's guidance is fixed, the student runs without guidance), the target being the student
itself under stop-gradient (mu = 0, as diffusers' LCM-LoRA script). The run writes the adapter in the
kohya format (`lcm_lora.safetensors`, for `--lora` on the teacher) and the merged model.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from t2i.diffusion.guidance import cat_cond
from t2i.distill.teacher import FastDefaults, Teacher, teacher_file
from t2i.nets.unet import guidance_scale_embedding
from t2i.samplers.sampling import consistency_boundary_scalings
from t2i.train.config import LoopConfig
from t2i.train.ema import EMA
from t2i.train.fit import Run, Step, Task, fit

# diffusers' LCM-LoRA targets: every attention and feed-forward projection, the ResBlocks' convolutions
# and time projections, the resamplers.
LCM_LORA_TARGETS = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
                    "downsamplers.0.conv,upsamplers.0.conv,time_emb_proj")


@dataclass
class DistillConfig(LoopConfig):
    """What every distillation run reads besides its method's settings."""

    teacher: str = ""  # a shapes_ldm or shapes_layout model (name, file or folder)
    background_p: float | None = None  # shapes data: share of black/gray backgrounds (None: the world's)
    fast_steps: int = 4  # the student's default sampler steps (its model file's) and the grids'
    steps: int = 2000
    batch_size: int = 16
    warmup: int = 50
    image_every: int = 250
    ckpt_every: int = 250
    log_every: int = 10


@dataclass
class LCMConfig(DistillConfig):
    """`t2i distill lcm`."""

    skip: int = 20  # k: the teacher's DDIM step spans k of the T training timesteps
    loss: str = "huber"  # or "l2"
    huber_c: float = 0.001
    # guidance scales g = w + 1 drawn per example (None: g_max = 2 * the teacher's default - 1, so that
    # default is the middle of the range; LCM-LoRA: both the teacher's default, fixed)
    guidance_min: float | None = None
    guidance_max: float | None = None
    target_decay: float = 0.95  # mu of the EMA target network (LCM-LoRA: 0, the student itself)
    lr: float = 1e-4  # measured: the built-in plain model's 4-step judge score 0.02 -> 0.13 in 150 steps
    lora: bool = False  # LCM-LoRA
    rank: int = 8  # 0.5M parameters on the built-in 4.8M-parameter U-Net
    alpha: float | None = None  # None: alpha = rank
    lora_targets: str = LCM_LORA_TARGETS


def predicted_x0_eps(out: torch.Tensor, x_t: torch.Tensor, acp: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A network output (eps, v or x0) at VP latents x_t = sqrt(acp) x0 + sqrt(1 - acp) eps -> (x0, eps).
    acp: broadcastable against x_t, (B, 1, 1, 1)."""
    a, s = acp.sqrt(), (1 - acp).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    return out, (x_t - a * out) / s


def guided_prediction(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, prediction_type: str,
                      cond: dict, uncond: dict | None,
                      scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) of `net` at x_t (B, C, h, w) and integer timesteps t (B,), guided by classifier-free guidance
    with `scale` g ((B,) or a number): x0_u + g (x0_c - x0_u) and eps likewise; uncond None: the conditional
    prediction alone."""
    if uncond is None:
        return predicted_x0_eps(net(x_t, t.to(torch.float32), **cond).float(), x_t, acp, prediction_type)
    both = net(torch.cat([x_t, x_t]), torch.cat([t, t]).to(torch.float32), **cat_cond(uncond, cond)).float()
    out_u, out_c = both.chunk(2)  # unconditional first, as CFGDenoiser batches them
    x0_u, eps_u = predicted_x0_eps(out_u, x_t, acp, prediction_type)
    x0_c, eps_c = predicted_x0_eps(out_c, x_t, acp, prediction_type)
    g = torch.as_tensor(scale, dtype=torch.float32, device=x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
    return x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)


@dataclass
class Draw:
    """One LCD step's random draws. n, t, t_prev: (B,) long; w: (B,) CFG weights; noise, x_t: (B, C, h, w)."""

    n: torch.Tensor
    t: torch.Tensor
    t_prev: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor


class ConsistencyDistillation:
    """The LCD objective (module docstring) over networks `net(x_vp, t, **cond) -> eps | v | x0`.

    Args:
        alphas_cumprod: (T,) the teacher's training schedule; prediction_type: its parameterisation
            (the student's too).
        skip: k; must divide T and leave at least 2 grid timesteps.
        guidance: (g_min, g_max) guidance scales, w = g - 1 drawn uniformly.
        loss: "huber" (pseudo-Huber with huber_c) or "l2".
        embed_dim: the student's time_cond_proj_dim (w fed as `guidance_scale_embedding`), None: the
            student does not see w (LCM-LoRA).
        timestep_scaling: of the boundary scalings (LCMScheduler's 10).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, skip: int = 20,
                 guidance: tuple[float, float] = (1.0, 1.0), loss: str = "huber", huber_c: float = 0.001,
                 embed_dim: int | None = None, timestep_scaling: float = 10.0) -> None:
        T = alphas_cumprod.shape[0]
        if not (isinstance(skip, int) and 1 <= skip <= T // 2 and T % skip == 0):
            raise ValueError(f"--skip {skip}: the skipping step k must divide the {T} training timesteps and leave "
                             f"at least two on the grid (e.g. 20: a 50-timestep grid, the lcm sampler's)")
        g_min, g_max = guidance
        if not (math.isfinite(g_min) and math.isfinite(g_max) and 1.0 <= g_min <= g_max):
            raise ValueError(f"guidance range [{g_min}, {g_max}]: need 1 <= min <= max (1: no guidance)")
        if loss not in ("huber", "l2"):
            raise ValueError(f"--loss must be huber or l2, not {loss!r}")
        if loss == "huber" and not huber_c > 0:
            raise ValueError(f"--huber-c must be positive, got {huber_c}")
        self.acp = alphas_cumprod.detach().to(torch.float32)
        self.prediction_type = prediction_type
        self.skip, self.guidance, self.loss_kind, self.huber_c = skip, (g_min, g_max), loss, huber_c
        self.embed_dim = embed_dim
        self.grid = torch.arange(1, T // skip + 1) * skip - 1  # (N,) t_n = k-1, 2k-1, ..., T-1
        self.timestep_scaling = timestep_scaling

    def _acp(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.acp[t].to(x.device).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None) -> Draw:
        """Draw n, then eps, then w from the generator (in this order) and noise x0 (B, C, h, w) to t_{n+k}."""
        b = x0.shape[0]
        n = torch.randint(0, self.grid.shape[0], (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        g_min, g_max = self.guidance
        w = g_min - 1 + (g_max - g_min) * torch.rand(b, generator=generator)  # (B,) w = g - 1
        t = self.grid[n]
        acp = self._acp(t, x0)
        x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
        return Draw(n, t, (t - self.skip).clamp(min=0), w, noise, x_t)

    def student_cond(self, cond: dict, w: torch.Tensor) -> dict:
        """cond plus the embedding of w for a student that reads it."""
        if self.embed_dim is None:
            return cond
        return {**cond, "timestep_cond": guidance_scale_embedding(w, self.embed_dim)}  # (B, embed_dim)

    @torch.no_grad()
    def teacher_step(self, teacher: nn.Module, d: Draw, cond: dict, uncond: dict | None) -> torch.Tensor:
        """x_prev (B, C, h, w): one DDIM step (Song et al. 2021 eq. 12, eta 0) of the teacher guided by w,
        x0 = x0_c + w (x0_c - x0_u) and eps likewise (LCM eq. 9 with diffusers' w), from t_{n+k} to t_n
        (alphas_cumprod[0] for the step below the grid's first timestep, whose target is x_prev itself)."""
        acp = self._acp(d.t, d.x_t)
        guided = uncond is not None and float(d.w.abs().max()) > 0
        x0, eps = guided_prediction(teacher, d.x_t, d.t, acp, self.prediction_type, cond, uncond if guided else None,
                                    d.w + 1)
        acp_prev = self._acp(d.t_prev, d.x_t)
        return acp_prev.sqrt() * x0 + (1 - acp_prev).sqrt() * eps

    def consistency(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0(net(x, t)), (B, C, h, w)."""
        c_skip, c_out = (c.to(torch.float32).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
                         for c in consistency_boundary_scalings(t, self.timestep_scaling))
        x0, _ = predicted_x0_eps(net(x, t.to(torch.float32), **cond).float(), x, self._acp(t, x), self.prediction_type)
        return c_skip * x + c_out * x0

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """() the mean pseudo-Huber (or squared) distance, elementwise."""
        if self.loss_kind == "l2":
            return ((a - b) ** 2).mean()
        return (((a - b) ** 2 + self.huber_c**2).sqrt() - self.huber_c).mean()

    def loss(self, student: nn.Module, target: nn.Module, d: Draw, x_prev: torch.Tensor, cond: dict) -> torch.Tensor:
        """() d(f_theta(x_t, t_{n+k}), sg f_theta-(x_prev, t_n)) for the drawn batch."""
        scond = self.student_cond(cond, d.w)
        pred = self.consistency(student, d.x_t, d.t, scond)
        with torch.no_grad():
            tgt = self.consistency(target, x_prev, d.t_prev, scond)
        return self.distance(pred, tgt)

    def __call__(self, student: nn.Module, target: nn.Module, teacher: nn.Module, x0: torch.Tensor, cond: dict,
                 uncond: dict | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """() the LCD loss of latents x0 (B, C, h, w) under cond (and uncond for the guided teacher)."""
        d = self.draw(x0, generator)
        return self.loss(student, target, d, self.teacher_step(teacher, d, cond, uncond), cond)


# ============================================================================ the run


def guidance_range(cfg: LCMConfig, teacher: Teacher) -> tuple[float, float]:
    """(g_min, g_max) of the run: the config's, unset ends from the teacher's default guidance g0
    (full LCM: [1, 2 g0 - 1]; LCM-LoRA: g0 fixed)."""
    g0 = teacher.guidance
    lo = cfg.guidance_min if cfg.guidance_min is not None else (g0 if cfg.lora else 1.0)
    hi = cfg.guidance_max if cfg.guidance_max is not None else (g0 if cfg.lora else max(lo, 2 * g0 - 1))
    return lo, hi


def merged_state(student: nn.Module, network) -> dict[str, torch.Tensor]:
    """The student's weights with each LoRA update s * B A added (the adapter merged)."""
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    path = {id(m): name for name, m in student.named_modules()}
    for name, layer in network.layers().items():
        key = f"{path[id(network._bases[name])]}.weight"
        state[key] = state[key] + layer.delta().to(state[key].dtype)
    return state


def sd_layout_view(unet: nn.Module) -> nn.Module:
    """The U-Net as `t2i.adapters.lora.named_layers` can name it: a shallow copy without a LayoutUNet's
    layout input layers (phrase_proj, layout_in), which SD's original key layout has no name for. The
    copy shares every other submodule, so hooks placed through it act on `unet`."""
    view = copy.copy(unet)
    view._modules = {k: m for k, m in unet._modules.items() if k not in ("phrase_proj", "layout_in")}
    return view


def build_lcm(cfg: LCMConfig, run: Run, text_encoder: nn.Module | None = None) -> Task:
    teacher = Teacher(cfg.teacher, text_encoder)
    lo, hi = guidance_range(cfg, teacher)
    student = teacher.student_unet(embed_guidance=not cfg.lora)
    schedule = teacher.schedule
    lcd = ConsistencyDistillation(schedule.alphas_cumprod(), schedule.prediction_type, cfg.skip, (lo, hi), cfg.loss,
                                  cfg.huber_c, student.cfg.time_cond_proj_dim)
    if cfg.skip != schedule.num_train_timesteps // 50:
        run.log.text(f"note: the lcm sampler visits the timesteps of k = {schedule.num_train_timesteps // 50}; "
                     f"with --skip {cfg.skip} the student is trained on another grid")
    if cfg.lora:
        from t2i.adapters.lora import write_lora
        from t2i.train.lora import LoraNetwork, lora_alpha, select_layers

        student.requires_grad_(False).eval()
        layers = select_layers(SimpleNamespace(unet=sd_layout_view(student), name=teacher.file.name), cfg.lora_targets,
                               None)
        network = LoraNetwork(layers, cfg.rank, lora_alpha(cfg.rank, cfg.alpha)).attach()
        params = list(network.parameters())
        modules, ema, net, target, average = {"lora": network}, None, student, student, params
    else:
        if not 0.0 <= cfg.target_decay < 1.0:
            raise ValueError(f"--target-decay must be in [0, 1), got {cfg.target_decay}")
        ema = EMA(student, cfg.target_decay) if cfg.target_decay > 0 else None
        params = list(student.parameters())
        net = run.parallel(student)
        target = ema.averaged if ema is not None else student
        modules = {"student": student, **({"target": ema.averaged} if ema is not None else {})}
        average = ()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = teacher.data(cfg.seed, cfg.background_p, run.log.text)
    # the student's default guidance: the teacher's, embedded (within the trained range); LCM-LoRA: none
    defaults = FastDefaults(steps=cfg.fast_steps, guidance=1.0 if cfg.lora else min(max(teacher.guidance, lo), hi))

    def prepare(position: int, gen: torch.Generator):
        """The data's latents and conditioning, LCD's draws and the teacher's guided DDIM step."""
        b = teacher.encode(*data(position, cfg.batch_size, run.info), gen)
        d = lcd.draw(b.z, gen)
        return d, lcd.teacher_step(teacher.unet, d, b.cond, b.uncond if hi > 1.0 else None), b.cond

    def step(batch, s: Step) -> dict[str, float]:
        d, x_prev, cond = batch
        loss = lcd.loss(net, target, d, x_prev, cond)
        gnorm = s.update(loss, opt, params, average=average)
        return {"lcm/loss": loss.item(), "lcm/grad_norm": gnorm}

    def shipped() -> nn.Module:
        state = merged_state(student, network) if cfg.lora else student.state_dict()
        return teacher.student_model(student.cfg, state, defaults)

    def export() -> None:
        teacher.save_student(shipped(), Path(cfg.out))
        if cfg.lora:
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                    "ss_network_alpha": str(cfg.rank if cfg.alpha is None else cfg.alpha),
                    "ss_output_name": "lcm_lora", "ss_training_comment": f"t2i distill lcm --lora on {cfg.teacher}",
                    "t2i_config": json.dumps(cfg.to_dict())}
            write_lora(Path(cfg.out) / "lcm_lora.safetensors", network.layers(), meta)

    what = (f"LCM-LoRA rank {cfg.rank} on {len(params) // 2} layers" if cfg.lora
            else f"LCM, w-embedding {student.cfg.time_cond_proj_dim}, target EMA {cfg.target_decay}")
    about = (f", {what} of the {teacher.family} teacher {cfg.teacher}: k {cfg.skip}, guidance [{lo:g}, {hi:g}], "
             f"{cfg.loss} loss, {sum(p.numel() for p in params) / 1e6:.3f}M trained parameters")
    return Task("lcm", modules, {"opt": opt}, prepare=prepare, step=step, ema=ema,
                grid=lambda: teacher.grid(shipped()), grid_name="student", export=export, about=about)


def distill_lcm(cfg: LCMConfig, resume: bool = False, resume_lr: float | None = None,
                given: dict[str, str] | None = None, text_encoder: nn.Module | None = None) -> int:
    """Run (or, with resume, continue) an LCM distillation. Returns the exit code."""
    if not resume:  # a wrong teacher is refused before the run's folder and log exist
        teacher_file(cfg.teacher)
    return fit(cfg, partial(build_lcm, text_encoder=text_encoder), resume=resume, resume_lr=resume_lr, given=given)
