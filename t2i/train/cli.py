"""`t2i train autoencoder|ldm|preview|clip ...`: the training subcommands (registered by t2i/cli.py).

The same command runs on one process or, unchanged, under
`torchrun --nproc_per_node N -m t2i.cli train ...` (DDP over gloo on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def _common(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoints/, samples/, tb/, log.txt)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    p.add_argument("--resume-lr", type=float, help="with --resume: the learning rate from here on (e.g. lower, "
                   "late in a long run); everything else comes from the run's saved config")
    p.add_argument("--data", choices=("shapes", "folder", "jsonl"), default="shapes",
                   help="the endless shapes world, an image folder with .txt captions, or a JSONL manifest")
    p.add_argument("--data-path", help="folder or manifest for --data folder/jsonl")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--background-p", type=float, help="shapes data: share of black/gray backgrounds "
                   "(default: the world's 0.25; more helps a first stage learn dark scenes)")
    p.add_argument("--steps", type=int, default=steps, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, default=batch, help="per process")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--image-every", type=int, default=250)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def _run_autoencoder(args: argparse.Namespace) -> int:
    from t2i.autoencoders.losses import AutoencoderLossConfig
    from t2i.systems.shapes_ldm import VAE_PRESETS
    from t2i.train.autoencoder import AETrainConfig, train_autoencoder

    if args.preset not in VAE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {args.preset!r}; choose from {sorted(VAE_PRESETS)}")
    loss = AutoencoderLossConfig(kl_weight=args.kl_weight, disc_weight=args.disc_weight,
                                 disc_start=args.disc_start)
    vae = dataclasses.replace(VAE_PRESETS[args.preset])
    if args.init_from:  # the starting weights decide the shape
        from t2i.train.autoencoder import load_vae

        vae = load_vae(args.init_from).cfg
    cfg = AETrainConfig(out=args.out, vae=vae, loss=loss, init_from=args.init_from,
                        decoder_only=args.decoder_only, **_shared(args))
    return train_autoencoder(cfg, resume=args.resume, resume_lr=args.resume_lr)


def _run_ldm(args: argparse.Namespace) -> int:
    from t2i.systems.shapes_ldm import UNET_PRESETS
    from t2i.train.ldm import LDMTrainConfig, train_ldm

    if args.preset not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {args.preset!r}; choose from {sorted(UNET_PRESETS)}")
    if (args.vae is None) == (args.init_from is None) and not args.resume:
        raise ValueError("give exactly one of --vae (a new model) and --init-from (a warm start)")
    cfg = LDMTrainConfig(out=args.out, vae_path=args.vae or "", init_from=args.init_from, unet_preset=args.preset,
                         prediction_type=args.prediction, caption_dropout=args.caption_dropout,
                         ema_decay=args.ema_decay, weight_decay=args.weight_decay, bf16=args.bf16,
                         min_snr_gamma=args.min_snr_gamma, sample_steps=args.sample_steps,
                         export_every=args.export_every, **_shared(args))
    return train_ldm(cfg, resume=args.resume, resume_lr=args.resume_lr)


def _run_clip(args: argparse.Namespace) -> int:
    from t2i.eval.shapes_clip import ShapesCLIPConfig
    from t2i.train.clip import CLIPTrainConfig, train_clip

    model = ShapesCLIPConfig(vision_width=args.width, text_width=args.width, vision_layers=args.vision_layers,
                             text_layers=args.text_layers, embed_dim=args.width)
    cfg = CLIPTrainConfig(out=args.out, model=model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup=args.warmup, seed=args.seed, threads=args.threads, log_every=args.log_every,
                          eval_every=args.eval_every, eval_scenes=args.eval_scenes, ckpt_every=args.ckpt_every,
                          keep=args.keep)
    return train_clip(cfg, resume=args.resume, resume_lr=args.resume_lr)


def _run_preview(args: argparse.Namespace) -> int:
    from t2i.autoencoders.preview import PreviewDecoderConfig
    from t2i.train.preview import PreviewTrainConfig, train_preview

    # Only the shape is taken from here: channels, upsamplings and latent scaling come from the model's VAE.
    decoder = PreviewDecoderConfig(width=args.width, blocks=args.blocks, final_blocks=args.final_blocks)
    cfg = PreviewTrainConfig(out=args.out, model=args.model, decoder=decoder, mse_weight=args.mse_weight,
                             **_shared(args))
    return train_preview(cfg, resume=args.resume, resume_lr=args.resume_lr)


def _shared(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    return dict(data=args.data, data_path=args.data_path, image_size=args.image_size,
                background_p=args.background_p, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                seed=args.seed, log_every=args.log_every, image_every=args.image_every,
                ckpt_every=args.ckpt_every, keep=args.keep)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train an autoencoder or a latent diffusion model")
    sub = train.add_subparsers(dest="train_command", required=True)

    ae = sub.add_parser("autoencoder", help="KL autoencoder with L1 + KL + patch-GAN losses")
    _common(ae, steps=3000, batch=16, lr=2e-4)
    ae.set_defaults(grad_clip=1000.0)  # the loss is summed over pixels: clip only real spikes
    ae.add_argument("--preset", default="shapes_f4", help="autoencoder shape (t2i.systems.shapes_ldm.VAE_PRESETS)")
    ae.add_argument("--kl-weight", type=float, default=1e-6)
    ae.add_argument("--disc-weight", type=float, default=0.5)
    ae.add_argument("--disc-start", type=int, default=2000, help="step at which the adversarial loss starts")
    ae.add_argument("--init-from", help="start from a vae.safetensors (e.g. to fine-tune its decoder)")
    ae.add_argument("--decoder-only", action="store_true",
                    help="train only the decoder: the latent space (and any LDM trained on it) stays valid")
    ae.set_defaults(func=_run_autoencoder)

    ldm = sub.add_parser("ldm", help="latent diffusion U-Net on a frozen autoencoder and MiniLM text encoder")
    _common(ldm, steps=20000, batch=32, lr=3e-4)
    ldm.add_argument("--vae", help="vae.safetensors written by `t2i train autoencoder` (a new model)")
    ldm.add_argument("--init-from", help="warm start from a model file (e.g. the built-in "
                     "t2i/assets/default/model.safetensors): its config, autoencoder and U-Net; a fresh optimizer")
    ldm.add_argument("--preset", default="shapes_s", help="U-Net shape (t2i.systems.shapes_ldm.UNET_PRESETS)")
    ldm.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="v_prediction")
    ldm.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    ldm.add_argument("--ema-decay", type=float, default=0.999)
    ldm.add_argument("--weight-decay", type=float, default=0.0)
    ldm.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 turns it off")
    ldm.add_argument("--bf16", action="store_true",
                     help="bf16 autocast (off by default: slower than fp32 on CPUs without AVX512-BF16/AMX)")
    ldm.add_argument("--sample-steps", type=int, default=20, help="sampler steps for the sample grids")
    ldm.add_argument("--export-every", type=int, default=500,
                     help="write the EMA model as model.safetensors every N steps")
    ldm.set_defaults(func=_run_ldm)

    preview = sub.add_parser("preview", help="distil a tiny TAESD-like preview decoder from a model's VAE decoder")
    _common(preview, steps=2000, batch=16, lr=1e-3)
    preview.add_argument("--model", help="shapes-LDM model file (or a vae.safetensors) whose VAE is the teacher "
                                         "(default: the built-in model)")
    preview.add_argument("--width", type=int, default=64, help="channels of every convolution (TAESD: 64)")
    preview.add_argument("--blocks", type=int, default=3, help="residual blocks before each upsampling")
    preview.add_argument("--final-blocks", type=int, default=1, help="residual blocks at full resolution")
    preview.add_argument("--mse-weight", type=float, default=1.0, help="loss = L1 + w * MSE to the VAE decode")
    preview.set_defaults(func=_run_preview)

    clip = sub.add_parser("clip", help="the small shapes CLIP (t2i.eval.shapes_clip) on the shapes world")
    clip.add_argument("--out", required=True, help="run directory (checkpoints/, log.txt, shapes_clip.safetensors)")
    clip.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    clip.add_argument("--resume-lr", type=float, help="with --resume: the learning rate from here on")
    clip.add_argument("--steps", type=int, default=1000)
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument("--lr", type=float, default=1e-3)
    clip.add_argument("--warmup", type=int, default=100)
    clip.add_argument("--width", type=int, default=128, help="width of both towers and of the joint space")
    clip.add_argument("--vision-layers", type=int, default=4)
    clip.add_argument("--text-layers", type=int, default=3)
    clip.add_argument("--seed", type=int, default=0, help="shapes stream seed (and init seed)")
    clip.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    clip.add_argument("--log-every", type=int, default=25)
    clip.add_argument("--eval-every", type=int, default=100, help="held-out ranking accuracy every N steps")
    clip.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes in that measurement")
    clip.add_argument("--ckpt-every", type=int, default=100)
    clip.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    clip.set_defaults(func=_run_clip)
