"""`t2i distill lcm|add --teacher MODEL --out RUN ...`: few-step students of t2i's latent diffusion models
(registered by t2i/cli.py). Runs are training runs (`t2i.train.fit`): resumable with --resume, stopped
cleanly by Ctrl-C, logged to RUN/log.txt and TensorBoard, with sample grids of the student."""

from __future__ import annotations

import argparse

from t2i.train.cli import RUN, Option, run_plain, subparser

COMMON: list[Option] = [
    ("--teacher", "teacher", {}, "the model to distil: a shapes_ldm or shapes_layout model (a name from `t2i models`, "
     "a model file or folder), e.g. t2i/assets/layout"),
    ("--background-p", "background_p", {"type": float}, "shapes data: share of black/gray backgrounds "
     "(unset: the world's)"),
    ("--fast-steps", "fast_steps", {"type": int}, "the student's default sampler steps (written into its model file)"),
    ("--image-every", "image_every", {"type": int}, "sample grid of the student (samples/*.png) every N steps; "
     "0: none"),
    ("--export-every", "export_every", {"type": int}, "write RUN/model.safetensors every N steps (0: at every "
     "checkpoint)"),
]
LCM: list[Option] = [
    ("--skip", "skip", {"type": int}, "k: the teacher's DDIM step spans k training timesteps (20: the lcm "
     "sampler's grid)"),
    ("--loss", "loss", {"choices": ("huber", "l2")}, "consistency distance: pseudo-Huber or squared"),
    ("--huber-c", "huber_c", {"type": float}, "c of the pseudo-Huber distance"),
    ("--guidance-min", "guidance_min", {"type": float}, "smallest guidance scale drawn (w = g - 1; unset: 1, "
     "LCM-LoRA: the teacher's default)"),
    ("--guidance-max", "guidance_max", {"type": float}, "largest guidance scale drawn (unset: 2 * the teacher's "
     "default - 1; LCM-LoRA: the teacher's default)"),
    ("--target-decay", "target_decay", {"type": float}, "mu: EMA decay of the target network (0: the student "
     "itself)"),
    ("--lora", "lora", {"action": "store_true"}, "LCM-LoRA: distil into a low-rank adapter on the frozen teacher "
     "(writes RUN/lcm_lora.safetensors and the merged RUN/model.safetensors)"),
    ("--rank", "rank", {"type": int}, "LCM-LoRA rank"),
    ("--alpha", "alpha", {"type": float}, "LCM-LoRA alpha (unset: the rank)"),
    ("--lora-targets", "lora_targets", {}, "LCM-LoRA: comma-separated endings of the U-Net's module names"),
]
ADD: list[Option] = [
    ("--guidance", "guidance", {"type": float}, "the teacher's guidance scale in the distillation loss (unset: its "
     "default)"),
    ("--student-steps", "student_steps", {"type": int}, "the student is trained at the lcm sampler's timesteps for "
     "this many steps"),
    ("--distill-weight", "distill_weight", {"type": float}, "lambda: weight of the score distillation loss"),
    ("--r1-weight", "r1_weight", {"type": float}, "gamma: R1 penalty on real latents (0: none)"),
    ("--disc-max-t", "disc_max_t", {"type": int}, "the discriminator reads features at noise levels t_d <= this"),
    ("--disc-channels", "disc_channels", {"type": int}, "projection width of the discriminator heads"),
    ("--disc-lr-scale", "disc_lr_scale", {"type": float}, "the heads' learning rate relative to --lr"),
    ("--ema-decay", "ema_decay", {"type": float}, "EMA decay of the shipped student"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    from t2i.distill.add import ADDConfig, distill_add
    from t2i.distill.lcm import LCMConfig, distill_lcm

    text = ("distil a latent diffusion model into a few-step student (LCM, LCM-LoRA, ADD): RUN/model.safetensors "
            "loads like the teacher and samples with lcm at 4 steps. Interrupt with Ctrl-C (a checkpoint is saved) "
            "and continue with --resume.")
    distill = subparsers.add_parser("distill", help=text.split(":")[0], description=text)
    sub = distill.add_subparsers(dest="distill_command", required=True)
    subparser(sub, "lcm", "latent consistency distillation (Luo et al. 2023, Algorithm 1): a student with the guidance "
              "scale as an input, or with --lora an LCM-LoRA", LCMConfig(out=""), [*RUN, *COMMON, *LCM]
              ).set_defaults(func=run_plain, config=LCMConfig, train=distill_lcm)
    subparser(sub, "add", "adversarial diffusion distillation (Sauer et al. 2023, SDXL-Turbo): hinge GAN on the "
              "teacher's U-Net features + score distillation; 1-4 steps, no guidance", ADDConfig(out=""),
              [*RUN, *COMMON, *ADD]).set_defaults(func=run_plain, config=ADDConfig, train=distill_add)
