"""`t2i train autoencoder|ldm|ddpm|vqvae|preview|clip|layout-planner|layout-renderer ...`: the training
subcommands (registered by t2i/cli.py).

The same command runs on one process or, unchanged, under
`torchrun --nproc_per_node N -m t2i.cli train ...` (DDP over gloo on CPU).

Each option sets one field of the family's config dataclass and has no default of its own: the
dataclass is the one place defaults live (--help shows them), and an option left out is known
to be left out. That is what lets `--resume` keep the run's saved settings and apply only what
the user actually typed (`t2i.train.config.resolve_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from t2i.train.config import LoopConfig, get_path, set_path

# (flag, config path, argparse keywords, help); the default is appended from the family's config.
Option = tuple[str, str, dict[str, Any], str]

RUN: list[Option] = [
    ("--steps", "steps", {"type": int}, "total optimizer steps of the run"),
    ("--batch-size", "batch_size", {"type": int}, "samples per process and step"),
    ("--lr", "lr", {"type": float}, "peak learning rate"),
    ("--warmup", "warmup", {"type": int}, "linear learning-rate warm-up steps"),
    ("--grad-clip", "grad_clip", {"type": float}, "max gradient norm"),
    ("--seed", "seed", {"type": int}, "seed of the initial weights, the data order and every step's noise"),
    ("--threads", "threads", {"type": int}, "torch intra-op threads (unset: torch's choice)"),
    ("--log-every", "log_every", {"type": int}, "scalars to log.txt and TensorBoard every N steps"),
    ("--ckpt-every", "ckpt_every", {"type": int}, "checkpoint every N steps"),
    ("--keep", "keep", {"type": int}, "checkpoints kept"),
]
# Only for the families whose sharded checkpoints convert to their model file (t2i.train.fsdp.FAMILIES).
PARALLEL: Option = ("--parallel", "parallel", {"choices": ("ddp", "fsdp")}, "under torchrun: DDP (weights "
                    "replicated) or FSDP (weights, gradients and optimizer state sharded; checkpoints step_N.dcp, "
                    "`t2i convert` makes the model file)")
IMAGES: list[Option] = [
    ("--data", "data", {"choices": ("shapes", "folder", "jsonl", "webdataset")},
     "the endless shapes world, an image folder with .txt captions, a JSONL manifest, or WebDataset tar shards"),
    ("--data-path", "data_path", {}, "folder or manifest for --data folder/jsonl; for webdataset a folder of "
     ".tar shards or a pattern 'DIR/shard-{000000..000009}.tar'"),
    ("--data-workers", "data_workers", {"type": int}, "loader processes reading the WebDataset shards (each "
     "reads its own shards; part of the data order, so a resumed run keeps it)"),
    ("--image-size", "image_size", {"type": int}, "training image side in pixels"),
    ("--background-p", "background_p", {"type": float}, "shapes data: share of black/gray backgrounds "
     "(unset: the world's 0.25; more helps a first stage learn dark scenes)"),
    ("--image-every", "image_every", {"type": int}, "captioned sample grid (samples/*.png) every N steps; 0: none"),
]
AUTOENCODER: list[Option] = [
    ("--kl-weight", "loss.kl_weight", {"type": float}, "weight of the KL term"),
    ("--disc-weight", "loss.disc_weight", {"type": float}, "weight of the adversarial term"),
    ("--disc-start", "loss.disc_start", {"type": int}, "step at which the adversarial loss starts"),
    ("--init-from", "init_from", {}, "start from a vae.safetensors (e.g. to fine-tune its decoder)"),
    ("--decoder-only", "decoder_only", {"action": "store_true"},
     "train only the decoder: the latent space (and any LDM trained on it) stays valid"),
]
LDM: list[Option] = [
    ("--vae", "vae_path", {}, "vae.safetensors written by `t2i train autoencoder` (a new model)"),
    ("--init-from", "init_from", {}, "warm start from a model file (e.g. the built-in "
     "t2i/assets/default/model.safetensors): its config, autoencoder and U-Net; a fresh optimizer"),
    ("--prediction", "prediction_type", {"choices": ("epsilon", "v_prediction")}, "what the network predicts: "
     "the noise, or v (Salimans & Ho)"),
    ("--caption-dropout", "caption_dropout", {"type": float}, "share of empty captions (for CFG)"),
    ("--ema-decay", "ema_decay", {"type": float}, "EMA decay of the shipped weights"),
    ("--weight-decay", "weight_decay", {"type": float}, "AdamW weight decay"),
    ("--min-snr-gamma", "min_snr_gamma", {"type": float}, "Min-SNR loss weighting; 0 turns it off"),
    ("--bf16", "bf16", {"action": "store_true"},
     "bf16 autocast (slower than fp32 on CPUs without AVX512-BF16/AMX)"),
    ("--sample-steps", "sample_steps", {"type": int}, "sampler steps for the sample grids"),
    ("--export-every", "export_every", {"type": int}, "write the EMA model as model.safetensors every N steps"),
    ("--aspect-buckets", "aspect_buckets", {"action": "store_true"}, "SDXL multi-aspect training: the shapes "
     "world at many aspect ratios, or --data folder/jsonl images at their own sizes, each batch one bucket of "
     "about --image-size^2 pixels"),
    ("--center-crop", "center_crop", {"action": "store_true"}, "the baseline to --aspect-buckets: the same "
     "many-aspect images, every one centre-cropped to the square"),
    ("--crop-zoom", "crop_zoom", {"type": float, "nargs": 2, "metavar": ("SHARE", "FACTOR")}, "with "
     "--aspect-buckets: enlarge a SHARE of the images by up to FACTOR, then crop at a random offset (SDXL's random "
     "crops, which --micro-conditioning learns the crop ids from; e.g. 0.5 1.6)"),
    ("--micro-conditioning", "micro_conditioning", {"action": "store_true"}, "SDXL micro-conditioning: the U-Net "
     "embeds each image's original size and crop top-left (needs --aspect-buckets; with --init-from added to that "
     "model's U-Net, starting at zero)"),
    ("--timestep-range", "timestep_range", {"type": int, "nargs": 2, "metavar": ("LO", "HI")},
     "train timesteps [LO, HI) only (0 200: an SDXL refiner-style expert on the lowest noise levels)"),
]
DDPM: list[Option] = [
    ("--preset", "net_preset", {}, "pixel U-Net shape (t2i.nets.pixel_unet.PIXEL_UNET_PRESETS)"),
    ("--beta-schedule", "beta_schedule", {"choices": ("linear", "cosine")}, "training betas (DDPM / IDDPM)"),
    ("--learn-sigma", "learn_sigma", {"action": "store_true"}, "IDDPM: the U-Net also outputs its variance, "
     "trained by the hybrid loss L_simple + 0.001 L_vlb; the ddpm sampler uses it"),
    *(o for o in LDM if o[1] in ("prediction_type", "caption_dropout", "ema_decay", "weight_decay", "sample_steps",
                                  "export_every")),
]
VQVAE: list[Option] = [
    ("--kind", "kind", {"choices": ("vqvae", "vqgan", "vit-vqgan", "dvae", "vqvae2")}, "tokenizer: VQ-VAE, VQGAN (the "
     "VQ-VAE network on L1 + CLIP-perceptual + patch-GAN), ViT-VQGAN, DALL-E's dVAE, VQ-VAE-2 (t2i.autoencoders)"),
    ("--codes", "vq.num_codes", {"type": int}, "codebook size (vqvae, vqgan, vit-vqgan, dvae)"),
    ("--beta", "vq.beta", {"type": float}, "commitment loss weight (vqvae, vqgan, vit-vqgan, vqvae2)"),
    ("--codebook-decay", "vq.decay", {"type": float}, "EMA decay of the codebook (vqvae, vqgan, vqvae2)"),
    ("--dead-threshold", "vq.dead_threshold", {"type": float},
     "restart codes whose EMA usage (encodings per step) falls below this; 0: no restarts"),
    ("--perceptual-weight", "gan.perceptual_weight", {"type": float}, "vqgan, vit-vqgan: weight of the perceptual "
     "term (the frozen shapes CLIP image tower's features); 0: none"),
    ("--disc-weight", "gan.disc_weight", {"type": float}, "vqgan, vit-vqgan: patch-GAN weight on top of the "
     "adaptive weight; 0: no GAN"),
    ("--disc-start", "gan.disc_start", {"type": int}, "vqgan, vit-vqgan: step at which the GAN terms start"),
    ("--rec-loss", "gan.rec_loss", {"choices": ("l1", "mse")}, "vqgan, vit-vqgan: pixel reconstruction loss"),
    ("--tau-steps", "tau_steps", {"type": int}, "dvae: Gumbel temperature annealed 1 -> 1/16 over these steps"),
    ("--kl-weight", "kl_weight", {"type": float}, "dvae: weight of the KL to the uniform prior"),
    ("--kl-steps", "kl_steps", {"type": int}, "dvae: the KL weight ramps up from 0 over these steps"),
]
PREVIEW: list[Option] = [
    ("--model", "model", {}, "shapes-LDM model file (or a vae.safetensors) whose VAE is the teacher "
     "(unset: the built-in model)"),
    ("--width", "decoder.width", {"type": int}, "channels of every convolution (TAESD: 64)"),
    ("--blocks", "decoder.blocks", {"type": int}, "residual blocks before each upsampling"),
    ("--final-blocks", "decoder.final_blocks", {"type": int}, "residual blocks at full resolution"),
    ("--mse-weight", "mse_weight", {"type": float}, "loss = L1 + w * MSE to the VAE decode"),
    ("--eval-every", "eval_every", {"type": int}, "held-out L1 to the VAE decode every N steps"),
]
CLIP: list[Option] = [
    ("--width", "model.vision_width", {"type": int}, "width of both towers and of the joint space"),
    ("--vision-layers", "model.vision_layers", {"type": int}, "image tower layers"),
    ("--text-layers", "model.text_layers", {"type": int}, "text tower layers"),
    ("--eval-every", "eval_every", {"type": int}, "held-out ranking accuracy every N steps; 0: only at the end"),
    ("--eval-scenes", "eval_scenes", {"type": int}, "held-out scenes in that measurement"),
]
RENDERER: list[Option] = [
    ("--init-from", "init_from", {}, "a shapes LDM model file to warm-start from (the plain "
     "t2i/assets/default/model.safetensors), or a layout renderer's model.safetensors to continue"),
    ("--vae", "vae", {}, "an autoencoder file (t2i train autoencoder) in place of the init's: the U-Net is "
     "warm-started and learns the new latent space (its scale measured at the start)"),
    ("--recaption", "recaption", {"action": "store_true"},
     "train on the layout's complete caption (the pipeline then rewrites prompts the same way)"),
    ("--layout-dropout", "layout_dropout", {"type": float}, "share of examples without their layout"),
    ("--pixel-weight", "pixel_weight", {"type": float}, "weight of an L1 loss on the decoded x0 estimate, through "
     "the frozen decoder (0: off; it sees colours the latent loss barely weighs)"),
    ("--pixel-batch", "pixel_batch", {"type": int}, "samples per batch decoded for --pixel-weight (the least noisy)"),
    ("--layout-lr-scale", "layout_lr_scale", {"type": float}, "learning-rate factor of the new layout layers"),
    ("--background-p", "background_p", {"type": float}, "share of black/gray backgrounds"),
    ("--image-every", "image_every", {"type": int}, "sample grid every N steps; 0: none"),
    *(o for o in LDM if o[1] in ("caption_dropout", "ema_decay", "min_snr_gamma", "sample_steps", "export_every")),
]
PLANNER: list[Option] = [
    ("--preset", "preset", {}, "planner shape (t2i.layout.planner.PLANNER_PRESETS: tiny, small, base)"),
    ("--ema-decay", "ema_decay", {"type": float}, "EMA decay of the exported planner"),
    ("--weight-decay", "weight_decay", {"type": float}, "AdamW weight decay"),
    ("--export-every", "export_every", {"type": int}, "write the EMA planner as planner.safetensors every N steps"),
    ("--eval-every", "eval_every", {"type": int}, "judge-checked plans of the held-out prompts every N steps; "
     "0: only at the end"),
    ("--eval-prompts", "eval_prompts", {"type": int}, "held-out prompts in that measurement"),
]
ADAPTER: list[Option] = [
    ("--model", "model", {}, "the frozen model: a diffusers folder, an SD single file or a t2i model file "
     "(e.g. t2i/assets/default/model.safetensors)"),
    *(o for o in IMAGES if o[1] in ("data", "data_path", "data_workers", "image_size", "image_every")),
    ("--min-snr-gamma", "min_snr_gamma", {"type": float}, "Min-SNR loss weighting; 0 turns it off"),
    ("--caption-dropout", "caption_dropout", {"type": float}, "share of empty captions"),
    ("--sample-prompt", "sample_prompts", {"action": "append"},
     "a prompt of the sample grids (repeatable; unset: the first 4 captions)"),
    ("--sample-steps", "sample_steps", {"type": int}, "sampler steps for the sample grids"),
    ("--eval-every", "eval_every", {"type": int}, "the loss at fixed noise on the first data items every N steps "
     "(log.txt); 0: only at the end"),
    ("--eval-items", "eval_items", {"type": int}, "data items in that measurement"),
    ("--export-every", "export_every", {"type": int}, "write the adapter file every N steps (0: at every checkpoint)"),
]
LORA: list[Option] = [
    ("--rank", "rank", {"type": int}, "LoRA rank r"),
    ("--alpha", "alpha", {"type": float}, "LoRA alpha (scale alpha / r; unset: alpha = r)"),
    ("--unet-targets", "unet_targets", {}, "comma-separated endings of the U-Net's (diffusers) module names"),
    ("--text-encoder", "text_encoder", {"action": "store_true"}, "also train LoRAs on the CLIP text encoder"),
    ("--text-targets", "text_targets", {}, "comma-separated endings of CLIP's (transformers) module names"),
    ("--name", "name", {}, "the file's stem: <out>/NAME.safetensors, <lora:NAME:1> in A1111"),
    ("--instance-prompt", "instance_prompt", {}, "DreamBooth: every data image's caption, e.g. 'a sks dog' "
     "(unset: the data's captions)"),
    ("--class-prompt", "class_prompt", {}, "DreamBooth prior preservation: the subject's class, e.g. 'a dog'"),
    ("--class-images", "class_images", {"type": int}, "class images the frozen model draws into OUT/class_images "
     "(where missing)"),
    ("--prior-weight", "prior_weight", {"type": float}, "lambda: loss = instance + lambda * class-image loss "
     "(layout model: the --replay scenes' loss)"),
    ("--new-word", "new_word", {}, "layout model, --data shapes: a shape it never saw (e.g. ring) drawn in every "
     "training scene; the planner learns its token too (OUT/NAME.planner.safetensors)"),
    ("--planner-steps", "planner_steps", {"type": int}, "--new-word: the first N steps also train the planner's "
     "new rows"),
    ("--planner-batch", "planner_batch", {"type": int}, "--new-word: captions per planner step"),
    ("--planner-lr", "planner_lr", {"type": float}, "--new-word: learning rate of the planner's new rows"),
    ("--planner-share", "planner_share", {"type": float}, "--new-word: share of planner captions naming the word"),
    ("--replay", "replay", {"type": int}, "layout model: ordinary world scenes replayed each step (prior "
     "preservation), weighted by --prior-weight"),
    ("--replay-target", "replay_target", {"choices": ("truth", "base")}, "the replayed scenes' target: their "
     "truth, or the frozen model's own prediction (distillation)"),
    ("--aspect-buckets", "aspect_buckets", {"action": "store_true"}, "SDXL multi-aspect training (kohya's "
     "--enable_bucket): the images at their own aspect ratios, each batch one bucket of about --image-size^2 "
     "pixels; SDXL's U-Net is told each image's original size and crop"),
    ("--crop-zoom", "crop_zoom", {"type": float, "nargs": 2, "metavar": ("SHARE", "FACTOR")}, "with "
     "--aspect-buckets: enlarge a SHARE of the images by up to FACTOR, then crop at a random offset (SDXL's random "
     "crops; e.g. 0.5 1.6)"),
    *(o for o in RENDERER if o[1] in ("pixel_weight", "pixel_batch")),
]
TEXTUAL_INVERSION: list[Option] = [
    ("--token", "token", {}, "the new word (and the file's stem), e.g. '<my-style>'"),
    ("--init-word", "init_word", {}, "the vectors start as this text's token embeddings"),
    ("--vectors", "vectors", {"type": int}, "vectors per word (prompt tokens it takes)"),
]
FINETUNE: list[Option] = [
    ("--model", "model", {}, "the model whose U-Net is trained: a diffusers folder (-> OUT/model/), an SD single file "
     "(-> OUT/model.safetensors) or a t2i shapes model file (-> OUT/model.safetensors)"),
    *(o for o in ADAPTER if o[1] not in ("model", "export_every")),
    ("--export-every", "export_every", {"type": int}, "write the model every N steps (0: at every checkpoint; "
     "default -1: only where the run ends or is stopped, a whole U-Net each time)"),
    ("--gradient-checkpointing", "gradient_checkpointing", {"action": "store_true"}, "recompute the activations of "
     "every ResBlock and spatial transformer in the backward pass instead of keeping them (less memory, one more "
     "forward of them per step)"),
    ("--bf16", "bf16", {"action": "store_true"}, "the forward under bf16 autocast (float32 master weights); only on "
     "CPUs that compute bf16 natively (AVX512-BF16 / AMX-BF16), refused elsewhere"),
    ("--optimizer", "optimizer", {"choices": ("adamw", "sgd")}, "AdamW (two float32 moments: 8 bytes a parameter) "
     "or plain SGD (no state; wants a far larger --lr)"),
    ("--weight-decay", "weight_decay", {"type": float}, "the optimizer's weight decay"),
    ("--ema-decay", "ema_decay", {"type": float}, "export (and evaluate, sample) an EMA of the weights with this "
     "decay, one more copy of the U-Net in memory; 0: the trained weights"),
    *(o for o in LORA if o[1] in ("aspect_buckets", "crop_zoom")),
]
MASKGIT: list[Option] = [
    ("--vqvae", "vqvae", {}, "the frozen tokenizer: vqvae.safetensors of `t2i train vqvae` (embedded in the model)"),
    ("--preset", "net_preset", {}, "token transformer shape (t2i.nets.token_transformer.TOKEN_TRANSFORMER_PRESETS)"),
    ("--attention", "attention", {"choices": ("full", "row", "column", "conv", "window", "dalle")},
     "self-attention mask (t2i.tokens.masks): full, DALL-E's sparse ones, or a sliding window"),
    ("--label-smoothing", "label_smoothing", {"type": float}, "label smoothing of the token cross-entropy"),
    *(o for o in IMAGES if o[1] in ("data", "data_path", "data_workers", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("caption_dropout", "ema_decay", "weight_decay", "export_every")),
    ("--sample-steps", "sample_steps", {"type": int}, "decoding steps of the sample grids (and the model's default)"),
]
MUSE_SR: list[Option] = [
    ("--base", "base", {}, "the MaskGIT model file (`t2i train maskgit`) whose tokens are upsampled; bundled into "
     "the exported Muse model.safetensors"),
    ("--sr-factor", "sr_factor", {"type": int}, "high-res token grid over the base's (2: 8x8 -> 16x16 tokens)"),
    ("--low-res-layers", "low_res_layers", {"type": int}, "self-attention layers over the low-res tokens"),
    *MASKGIT,
]
DALLE: list[Option] = [
    *(o for o in MASKGIT if o[1] not in ("label_smoothing", "sample_steps")),
    ("--text-length", "text_length", {"type": int}, "text tokens of the stream ([BOS] + caption words + [PAD])"),
    ("--text-loss-weight", "text_loss_weight", {"type": float}, "weight of the text cross-entropy; the image "
     "tokens' takes 1 - this (DALL-E: 1/8)"),
]
PARTI: list[Option] = [
    ("--preset", "preset", {"choices": ("parti", "dalle-mini", "parti-small")}, "branch member "
     "(t2i.systems.parti.PRESETS): Parti (frozen MiniLM states, a deep decoder), DALL-E mini (BART-like: a word "
     "encoder as deep as the decoder) or parti-small (Parti with a 3-layer width-96 decoder: 4.8 MB in fp16 with a "
     "ViT-VQGAN f8 tokenizer)"),
    ("--net-preset", "net_preset", {}, "decoder shape (t2i.nets.token_transformer.TOKEN_TRANSFORMER_PRESETS); unset: "
     "the preset's (shapes; small for parti-small)"),
    ("--text-encoder", "text_encoder", {"choices": ("words", "minilm")}, "the caption encoder: words (trained with "
     "the decoder) or frozen MiniLM states; unset: the preset's"),
    ("--text-length", "text_length", {"type": int}, "word encoder tokens ([BOS] + caption words + [PAD])"),
    *(o for o in MASKGIT if o[1] not in ("net_preset", "label_smoothing", "sample_steps")),
]
DIT: list[Option] = [
    ("--preset", "preset", {}, "transformer shape (t2i.nets.dit.DIT_PRESETS: shapes_s / pixart_shapes_s, tiny / "
     "pixart_tiny)"),
    ("--vae-from", "vae_from", {}, "a shapes LDM model file whose frozen autoencoder gives the latents (unset: the "
     "built-in t2i/assets/default/model.safetensors)"),
    ("--condition-dropout", "condition_dropout", {"type": float}, "share of examples without their class or "
     "caption (for CFG)"),
    *(o for o in IMAGES if o[1] in ("image_size", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("prediction_type", "ema_decay", "weight_decay", "min_snr_gamma", "sample_steps",
                                  "export_every")),
    ("--learn-sigma", "learn_sigma", {"action": "store_true"}, "the network also outputs its variance (IDDPM's "
     "Sigma, as DiT), trained by the hybrid loss L_simple + 0.001 L_vlb"),
]
CLASSIFIER: list[Option] = [
    ("--preset", "preset", {}, "trunk shape (t2i.nets.classifier.NOISY_CLASSIFIER_PRESETS: shapes_32, tiny)"),
    ("--label", "label", {"choices": ("shape", "colour")}, "what it tells apart, from the scene truth"),
    ("--beta-schedule", "beta_schedule", {"choices": ("linear", "cosine")}, "the guided DDPM's training betas"),
    *(o for o in IMAGES if o[1] in ("image_size", "background_p")),
    *(o for o in LDM if o[1] in ("weight_decay", "export_every")),
]
DEEPFLOYD_IF: list[Option] = [
    ("--stage", "stage", {"choices": ("base", "sr")}, "the cascade stage this run trains: base (text -> image) or "
     "sr (text + the image at 1/--sr-factor -> image)"),
    ("--preset", "preset", {}, "IF U-Net shape (t2i.nets.if_unet.IF_UNET_PRESETS; unset: shapes_base_32 for base, "
     "shapes_sr_64 for sr)"),
    ("--base-from", "base_from", {}, "sr: the cascade's stage I (the model.safetensors of a --stage base run), "
     "exported with the new stage II"),
    ("--sr-from", "sr_from", {}, "base: a cascade model file whose stage II is exported with the new base"),
    ("--sr-factor", "sr_factor", {"type": int}, "sr: output side / input side (the input is the image downsampled)"),
    ("--no-noise-augmentation", "noise_augmentation", {"action": "store_false"},
     "sr, the ablation: the low-res input un-noised (level 0) in training and sampling"),
    ("--max-aug-level", "max_aug_level", {"type": int}, "sr: noise augmentation levels drawn in 0..this"),
    ("--noise-level", "noise_level", {"type": int}, "sr: the exported cascade's fixed sampling augmentation level"),
    ("--text-length", "text_length", {"type": int}, "MiniLM tokens per caption (base; sr takes its base's)"),
    *(o for o in IMAGES if o[1] in ("image_size", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("prediction_type", "caption_dropout", "ema_decay", "sample_steps", "export_every")),
]
UNCLIP: list[Option] = [
    ("--prior", "prior", {"choices": ("diffusion", "ar")}, "unclip-prior: the diffusion prior (the paper's) or the "
     "autoregressive one (PCA of the image embedding quantized into codes, a causal transformer; sec. 2.2)"),
    ("--prior-preset", "prior_preset", {}, "prior transformer shape (t2i.nets.prior_transformer.PRIOR_PRESETS, "
     "or t2i.nets.ar_prior.AR_PRIOR_PRESETS with --prior ar: shapes_s, tiny; widths and text length the CLIP's)"),
    ("--decoder-preset", "decoder_preset", {}, "decoder U-Net shape (t2i.nets.unclip_unet.UNCLIP_UNET_PRESETS: "
     "shapes_decoder_32, tiny_decoder)"),
    ("--init", "init", {}, "an unCLIP model file whose weights start the nets (unclip-decoder: the unclip-prior "
     "run's model.safetensors, whose prior the exported model keeps)"),
    ("--text-dropout", "text_dropout", {"type": float}, "prior: share of empty captions (for CFG)"),
    ("--image-dropout", "image_dropout", {"type": float}, "decoder: share of image embeddings replaced by the learned "
     "null embedding (for CFG)"),
    ("--stats-images", "stats_images", {"type": int}, "prior: images whose CLIP embeddings give the normalisation"),
    *(o for o in IMAGES if o[1] in ("data", "data_path", "data_workers", "image_size", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("prediction_type", "caption_dropout", "ema_decay", "weight_decay", "sample_steps",
                                  "export_every")),
]
SD_UPSCALE: list[Option] = [
    ("--vae", "vae", {}, "the frozen autoencoder: a shapes LDM model file (its autoencoder) or a vae.safetensors; "
     "the model upscales by its factor"),
    ("--preset", "unet_preset", {}, "upscaler U-Net shape (t2i.train.sd_upscale.SR_UNET_PRESETS: shapes_sr, tiny)"),
    ("--max-noise-level", "max_noise_level", {"type": int}, "noise augmentation levels drawn in 0..this"),
    ("--no-noise-augmentation", "noise_augmentation", {"action": "store_false"},
     "the ablation: every low-res input at noise level 0"),
    ("--noise-level", "noise_level", {"type": int}, "the exported model's default sampling noise level"),
    ("--low-res", "low_res", {"choices": ("bsr", "bicubic")}, "how training makes the low-res inputs: the LDM-BSR "
     "degradations, or plain bicubic downsampling (the ablation; held-out inputs stay BSR)"),
    ("--base", "base", {}, "a text-to-image model (name or path) the exported upscaler finishes without an image"),
    ("--eval-every", "eval_every", {"type": int}, "held-out PSNR (and bicubic's) every N steps; 0: only at the end"),
    *(o for o in IMAGES if o[1] in ("image_size", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("caption_dropout", "ema_decay", "weight_decay", "min_snr_gamma", "sample_steps",
                                  "export_every")),
]
CONTROLNET: list[Option] = [
    ("--base", "base", {}, "the frozen model, a name (`t2i models`) or a path: a U-Net model (t2i-shapes, "
     "t2i/assets/default; SD) gets Zhang et al.'s ControlNet, a PixArt model PixArt-delta's; the conditioning "
     "image is each scene's box map"),
    ("--blocks", "blocks", {"type": int}, "PixArt: trainable copies of the first N blocks (0: half of them)"),
    ("--export-every", "export_every", {"type": int}, "write OUT/controlnet.safetensors every N steps"),
    *(o for o in IMAGES if o[1] in ("background_p", "image_every")),
    *(o for o in LDM if o[1] in ("caption_dropout", "weight_decay", "min_snr_gamma", "sample_steps")),
]
GLIDE: list[Option] = [
    ("--stage", "stage", {"choices": ("base", "up")}, "the cascade stage this run trains: base (text -> image) or up "
     "(text + the image at 1/--up-factor -> image)"),
    ("--preset", "preset", {}, "GLIDE network shape (t2i.nets.glide.GLIDE_PRESETS; unset: shapes_base_32 for base, "
     "shapes_up_64 for up)"),
    ("--base-from", "base_from", {}, "up: the cascade's base (the model.safetensors of a --stage base run), exported "
     "with the new upsampler"),
    ("--up-from", "up_from", {}, "base: a GLIDE model file whose upsampler is exported with the new base"),
    ("--up-factor", "up_factor", {"type": int}, "up: output side / input side (the input is the image downsampled)"),
    ("--text-length", "text_length", {"type": int}, "caption tokens ([BOS] + words + [PAD]; unset: the preset's)"),
    *(o for o in IMAGES if o[1] in ("image_size", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("prediction_type", "caption_dropout", "ema_decay", "sample_steps", "export_every")),
]
NOISY_CLIP: list[Option] = [
    ("--clip-from", "clip_from", {}, "the shapes CLIP file to start from (unset: the shipped one)"),
    ("--image-size", "image_size", {"type": int}, "side of the noised images (the guided GLIDE base's)"),
    *(o for o in IMAGES if o[1] == "background_p"),
    *(o for o in LDM if o[1] in ("weight_decay", "export_every")),
]
EDIFFI: list[Option] = [
    ("--base", "base", {}, "the shapes-LDM file trained over all noise levels that the experts are fine-tuned from"),
    ("--depth", "depth", {"type": int, "choices": (0, 1, 2, 3)}, "binary-tree depth: 0 one model fine-tuned on every "
     "timestep (the ablation's control), 1 two experts, 2 four (trained as 2 + 4 nodes)"),
    ("--steps-per-expert", "steps_per_expert", {"type": int}, "optimizer steps of every node of the tree"),
    *(o for o in RUN if o[1] != "steps"),
    *(o for o in IMAGES if o[1] in ("data", "data_path", "data_workers", "background_p", "image_every")),
    *(o for o in LDM if o[1] in ("caption_dropout", "ema_decay", "weight_decay", "min_snr_gamma", "bf16",
                                  "sample_steps", "export_every")),
]
# What each preset is for (their shapes are printed from the configs themselves).
PRESET_USE = {"shapes_f4": "the built-in model's", "shapes_s": "the built-in model's",
              "tiny": "tests and smoke runs: a fraction of a second per step on one CPU core"}


def _add(p: argparse.ArgumentParser, cfg: LoopConfig, options: list[Option]) -> None:
    """Add `options` with no argparse default (None: not given); help shows `cfg`'s value."""
    for flag, path, kw, text in options:
        default = get_path(cfg, path)
        shown = "" if default in (None, "") else f" (default: {default})"  # the text says what unset means
        p.add_argument(flag, dest=path, default=None, help=text + shown, **kw)


def subparser(sub: argparse._SubParsersAction, name: str, text: str, cfg: LoopConfig,
              options: list[Option]) -> argparse.ArgumentParser:
    """A family's subcommand: --out, --resume, --resume-lr and `options` (kept as args.options)."""
    p = sub.add_parser(name, help=text, description=text)
    p.set_defaults(options=options)
    p.add_argument("--out", required=True, help="run directory (checkpoints/, samples/, tb/, log.txt, the "
                   "exported weights)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest intact checkpoint in "
                   "--out, with the run's saved settings; only options given again here change (how long it "
                   "runs and how often it logs, samples, saves; any other must match)")
    p.add_argument("--resume-lr", type=float, help="with --resume: the learning rate from here on (e.g. lower, "
                   "late in a long run)")
    _add(p, cfg, options)
    return p


def _config(args: argparse.Namespace, cfg: LoopConfig, options: list[Option]) -> dict[str, str]:
    """Set the options given on the command line into `cfg`; returns them as {config path: flag}."""
    given = {}
    for flag, path, _, _ in options:
        value = getattr(args, path)
        if value is not None:
            set_path(cfg, path, value)
            given[path] = flag
    return given


def _presets(kind: str, presets: dict[str, Any], shape: Any) -> str:
    return f"{kind}: " + "; ".join(f"{name} = {shape(c)}" + (f" ({PRESET_USE[name]})" if name in PRESET_USE else "")
                                   for name, c in presets.items())


def _vae_shape(c: Any) -> str:
    return (f"block channels {tuple(c.block_channels)}, {c.latent_channels} latent channels, "
            f"f={c.downsample_factor}")


def _unet_shape(c: Any) -> str:
    return f"block channels {tuple(c.block_channels)}, attention {tuple(c.attention)}"


def _run_autoencoder(args: argparse.Namespace) -> int:
    from t2i.systems.shapes_ldm import VAE_PRESETS
    from t2i.train.autoencoder import AETrainConfig, load_vae, train_autoencoder

    cfg = AETrainConfig(out=args.out, vae=dataclasses.replace(VAE_PRESETS["shapes_f4"]))
    given = _config(args, cfg, args.options)
    if args.preset is not None:
        if args.preset not in VAE_PRESETS:
            raise ValueError(f"unknown autoencoder preset {args.preset!r}; choose from {sorted(VAE_PRESETS)}")
        cfg.vae, given["vae"] = dataclasses.replace(VAE_PRESETS[args.preset]), "--preset"
    if cfg.init_from:  # the starting weights decide the shape
        cfg.vae = load_vae(cfg.init_from).cfg
    return train_autoencoder(cfg, resume=args.resume, resume_lr=args.resume_lr, given=given)


def _run_ldm(args: argparse.Namespace) -> int:
    from t2i.train.ldm import LDMTrainConfig, train_ldm

    cfg = LDMTrainConfig(out=args.out)
    given = _config(args, cfg, args.options)
    if (args.vae_path is None) == (args.init_from is None) and not args.resume:
        raise ValueError("give exactly one of --vae (a new model) and --init-from (a warm start)")
    return train_ldm(cfg, resume=args.resume, resume_lr=args.resume_lr, given=given)


def _run_ddpm(args: argparse.Namespace) -> int:
    from t2i.train.ddpm import DDPMTrainConfig, train_ddpm

    cfg = DDPMTrainConfig(out=args.out)
    return train_ddpm(cfg, resume=args.resume, resume_lr=args.resume_lr, given=_config(args, cfg, args.options))


def _run_vqvae(args: argparse.Namespace) -> int:
    from t2i.train.vqvae import VQTrainConfig, check_network_options, tokenizer_preset, train_vqvae

    cfg = VQTrainConfig(out=args.out)
    if args.preset is not None or args.kind is not None:  # the shape first, so that --codes etc. apply on top
        cfg.vq = tokenizer_preset(args.kind or "vqvae", args.preset)
    check_network_options(cfg.vq, {path: flag for flag, path, _, _ in args.options if getattr(args, path) is not None})
    given = _config(args, cfg, args.options)
    if args.preset is not None:
        given["vq"] = "--preset"
    return train_vqvae(cfg, resume=args.resume, resume_lr=args.resume_lr, given=given)


def _run_preview(args: argparse.Namespace) -> int:
    from t2i.train.preview import PreviewTrainConfig, train_preview

    # Only the shape is taken from here: channels, upsamplings and latent scaling come from the model's VAE.
    cfg = PreviewTrainConfig(out=args.out)
    given = _config(args, cfg, args.options)
    return train_preview(cfg, resume=args.resume, resume_lr=args.resume_lr, given=given)


def _run_clip(args: argparse.Namespace) -> int:
    from t2i.train.clip import CLIPTrainConfig, train_clip

    cfg = CLIPTrainConfig(out=args.out)
    given = _config(args, cfg, args.options)
    cfg.model.text_width = cfg.model.embed_dim = cfg.model.vision_width  # one --width for both towers
    return train_clip(cfg, resume=args.resume, resume_lr=args.resume_lr, given=given)


def _run_layout_planner(args: argparse.Namespace) -> int:
    from t2i.train.layout_planner import PlannerTrainConfig, train_planner

    cfg = PlannerTrainConfig(out=args.out)
    return train_planner(cfg, resume=args.resume, resume_lr=args.resume_lr, given=_config(args, cfg, args.options))


def _run_layout_renderer(args: argparse.Namespace) -> int:
    from t2i.train.layout_ldm import LayoutLDMTrainConfig, train_layout_ldm

    cfg = LayoutLDMTrainConfig(out=args.out)
    return train_layout_ldm(cfg, resume=args.resume, resume_lr=args.resume_lr,
                            given=_config(args, cfg, args.options))


def run_plain(args: argparse.Namespace) -> int:
    """A family whose config is its options and nothing more: args.config (the config class) and
    args.train (its train function) set by its parser."""
    cfg = args.config(out=args.out)
    return args.train(cfg, resume=args.resume, resume_lr=args.resume_lr, given=_config(args, cfg, args.options))


def register(subparsers: argparse._SubParsersAction) -> None:
    from t2i.autoencoders.preview import PreviewDecoderConfig
    from t2i.systems.shapes_ldm import UNET_PRESETS, VAE_PRESETS
    from t2i.train.autoencoder import AETrainConfig
    from t2i.train.clip import CLIPTrainConfig
    from t2i.train.ldm import LDMTrainConfig
    from t2i.train.preview import PreviewTrainConfig

    text = ("train an autoencoder, a latent diffusion model, a pixel DDPM, a VQ-VAE tokenizer, a TAESD preview "
            "decoder or the shapes CLIP. On a CPU the "
            "default presets take seconds per step; --preset tiny with --image-size 16 runs a smoke test in "
            "seconds. Interrupt with Ctrl-C (a checkpoint is saved) and continue with --resume.")
    train = subparsers.add_parser("train", help=text.split(". ")[0], description=text)
    sub = train.add_subparsers(dest="train_command", required=True)

    ae = subparser(sub, "autoencoder", "KL autoencoder with L1 + KL + patch-GAN losses",
                   AETrainConfig(out="", vae=VAE_PRESETS["shapes_f4"]), RUN + IMAGES + AUTOENCODER)
    ae.add_argument("--preset", choices=sorted(VAE_PRESETS),
                    help=_presets("autoencoder shape", VAE_PRESETS, _vae_shape) + " (default: shapes_f4)")
    ae.set_defaults(func=_run_autoencoder)

    unet_preset = ("--preset", "unet_preset", {"choices": sorted(UNET_PRESETS)},
                   _presets("U-Net shape", UNET_PRESETS, _unet_shape))
    subparser(sub, "ldm", "latent diffusion U-Net on a frozen autoencoder and MiniLM text encoder",
              LDMTrainConfig(out=""), [*RUN, PARALLEL, *IMAGES, *LDM, unet_preset]).set_defaults(func=_run_ldm)

    from t2i.train.ddpm import DDPMTrainConfig

    subparser(sub, "ddpm", "pixel-space DDPM (eps prediction; text-conditional on MiniLM for the shapes world)",
              DDPMTrainConfig(out=""), [*RUN, PARALLEL, *IMAGES, *DDPM]).set_defaults(func=_run_ddpm)
    from t2i.autoencoders.vq import VQ_CONFIGS
    from t2i.train.vqvae import VQTrainConfig

    vq = subparser(sub, "vqvae", "image tokenizer: VQ-VAE (EMA codebook, dead-code restarts), VQGAN, ViT-VQGAN, dVAE "
                   "or VQ-VAE-2 (--kind)", VQTrainConfig(out=""), [*RUN, *IMAGES, *VQVAE])
    vq.add_argument("--preset", choices=sorted(VQ_CONFIGS), help=_presets(
        "tokenizer shape (--kind vqvae; the other kinds have presets of the same names and scale)", VQ_CONFIGS,
        lambda c: f"{_vae_shape(c)}, {c.num_codes} codes") + " (default: f4)")
    vq.set_defaults(func=_run_vqvae)
    from t2i.train.dalle import DalleTrainConfig, train_dalle
    from t2i.train.maskgit import MaskGITTrainConfig, train_maskgit

    subparser(sub, "maskgit", "MaskGIT: a masked token transformer on a frozen VQ tokenizer and MiniLM text states",
              MaskGITTrainConfig(out=""), [*RUN, *MASKGIT]
              ).set_defaults(func=run_plain, config=MaskGITTrainConfig, train=train_maskgit)
    subparser(sub, "dalle", "DALL-E: an autoregressive transformer over [caption words; VQ image tokens]",
              DalleTrainConfig(out=""), [*RUN, *DALLE]).set_defaults(func=run_plain, config=DalleTrainConfig,
                                                                     train=train_dalle)
    from t2i.train.muse import MuseSRTrainConfig, train_muse_sr

    subparser(sub, "muse-sr", "Muse's token super-resolution transformer over a MaskGIT base: the high-res image's "
              "tokens from the low-res ones and the text; exports the base + SR bundle", MuseSRTrainConfig(out=""),
              [*RUN, *MUSE_SR]).set_defaults(func=run_plain, config=MuseSRTrainConfig, train=train_muse_sr)
    from t2i.train.parti import PartiTrainConfig, train_parti

    subparser(sub, "parti", "Parti / DALL-E mini: a caption encoder and a causal VQ image-token decoder reading it by "
              "cross-attention", PartiTrainConfig(out=""), [*RUN, *PARTI]
              ).set_defaults(func=run_plain, config=PartiTrainConfig, train=train_parti)
    from t2i.train.dit import DiTTrainConfig, train_dit
    from t2i.train.pixart import PixArtTrainConfig, train_pixart

    subparser(sub, "dit", "DiT: a class-conditional diffusion transformer (adaLN-Zero) on the built-in autoencoder's "
              "latents of one-object shapes scenes, 40 classes 'a <colour> <shape>'", DiTTrainConfig(out=""),
              [*RUN, *DIT]).set_defaults(func=run_plain, config=DiTTrainConfig, train=train_dit)
    subparser(sub, "pixart", "PixArt-alpha: a text-conditional diffusion transformer (adaLN-single, cross-attention "
              "to MiniLM caption states) on the built-in autoencoder's latents", PixArtTrainConfig(out=""),
              [*RUN, *DIT]).set_defaults(func=run_plain, config=PixArtTrainConfig, train=train_pixart)
    from t2i.train.classifier import ClassifierTrainConfig, train_classifier

    subparser(sub, "classifier", "ADM's noise-aware classifier for classifier guidance: the pixel U-Net's encoder "
              "half on noised one-object shapes scenes, labelled by shape or colour", ClassifierTrainConfig(out=""),
              [*RUN, *CLASSIFIER]).set_defaults(func=run_plain, config=ClassifierTrainConfig, train=train_classifier)
    subparser(sub, "preview", "distil a tiny TAESD-like preview decoder from a model's VAE decoder",
              PreviewTrainConfig(out="", decoder=PreviewDecoderConfig()), RUN + IMAGES + PREVIEW
              ).set_defaults(func=_run_preview)
    subparser(sub, "clip", "the small shapes CLIP (t2i.eval.shapes_clip) on the shapes world",
              CLIPTrainConfig(out=""), RUN + CLIP).set_defaults(func=_run_clip)
    from t2i.train.layout_planner import PlannerTrainConfig

    subparser(sub, "layout-planner", "the layout planner (t2i.layout.planner): caption -> background and boxes, "
              "on the shapes world's scene truth", PlannerTrainConfig(out=""), RUN + PLANNER
              ).set_defaults(func=_run_layout_planner)
    from t2i.train.layout_ldm import LayoutLDMTrainConfig

    subparser(sub, "layout-renderer", "the layout renderer (t2i.systems.shapes_layout): a shapes LDM whose U-Net "
              "also reads boxes with phrases", LayoutLDMTrainConfig(out=""), [*RUN, PARALLEL, *RENDERER]
              ).set_defaults(func=_run_layout_renderer)
    from t2i.train.sd_upscale import SRTrainConfig, train_sd_upscale

    subparser(sub, "sd-upscale", "a latent super-resolution model (the SD x4 upscaler's layout) on the shapes world: "
              "BSR-degraded low-res inputs, noise augmentation level as class label", SRTrainConfig(out=""),
              [*RUN, *SD_UPSCALE]).set_defaults(func=run_plain, config=SRTrainConfig, train=train_sd_upscale)
    from t2i.train.lora import LoraTrainConfig
    from t2i.train.lora_run import train_lora
    from t2i.train.textual_inversion import TextualInversionConfig, train_textual_inversion

    subparser(sub, "lora", "a LoRA on a frozen model's U-Net (and CLIP text encoder), written in the kohya format "
              "A1111, ComfyUI and diffusers read", LoraTrainConfig(out=""), RUN + ADAPTER + LORA
              ).set_defaults(func=run_plain, config=LoraTrainConfig, train=train_lora)
    subparser(sub, "textual-inversion", "a new word's input vectors on a frozen model, written as an A1111 "
              "embedding (emb_params .safetensors)", TextualInversionConfig(out=""), RUN + ADAPTER + TEXTUAL_INVERSION
              ).set_defaults(func=run_plain, config=TextualInversionConfig, train=train_textual_inversion)
    from t2i.train.finetune import FinetuneConfig, train_finetune

    subparser(sub, "finetune", "full fine-tuning of a model's U-Net (an SD checkpoint's, or the shapes model's) with "
              "its VAE and text encoder frozen, written in the layout it was read from", FinetuneConfig(out=""),
              RUN + FINETUNE).set_defaults(func=run_plain, config=FinetuneConfig, train=train_finetune)
    from functools import partial

    from t2i.train.unclip import UnCLIPTrainConfig, train_unclip

    for part, what in (("prior", "the diffusion prior: shapes-CLIP text -> image embedding (x0 prediction)"),
                       ("decoder", "the decoder: an image from its shapes-CLIP image embedding and caption")):
        subparser(sub, f"unclip-{part}", f"unCLIP (DALL-E 2) {what}", UnCLIPTrainConfig(out="", train=part),
                  [*RUN, *UNCLIP]).set_defaults(func=run_plain, config=partial(UnCLIPTrainConfig, train=part),
                                                train=train_unclip)
    from t2i.train.deepfloyd_if import IFTrainConfig, train_if

    subparser(sub, "deepfloyd-if", "one stage of an Imagen / DeepFloyd IF pixel cascade on MiniLM text states: the "
              "32x32 base, or 32 -> 64 super-resolution with noise conditioning augmentation", IFTrainConfig(out=""),
              [*RUN, *DEEPFLOYD_IF]).set_defaults(func=run_plain, config=IFTrainConfig, train=train_if)
    from t2i.train.ediffi import EDiffITrainConfig, train_ediffi

    subparser(sub, "ediffi", "eDiff-I expert denoisers by binary-tree fine-tuning of a shapes LDM: split the timesteps "
              "in two, fine-tune the base on each half, split again (--depth); writes the experts and ediffi.json "
              "(OUT/model: `t2i generate --model OUT/model`); --resume continues at the node a stopped run was on",
              EDiffITrainConfig(out=""), EDIFFI).set_defaults(func=run_plain, config=EDiffITrainConfig,
                                                              train=train_ediffi)
    from t2i.train.glide import GlideTrainConfig, NoisyCLIPTrainConfig, train_glide, train_noisy_clip

    subparser(sub, "glide", "one stage of a GLIDE pixel cascade with its caption transformer trained from scratch: the "
              "32x32 base, or the 32 -> 64 upsampler", GlideTrainConfig(out=""), [*RUN, *GLIDE]
              ).set_defaults(func=run_plain, config=GlideTrainConfig, train=train_glide)
    subparser(sub, "noisy-clip", "GLIDE's noise-aware CLIP for CLIP guidance: the shapes CLIP's image tower fine-tuned "
              "on noised images", NoisyCLIPTrainConfig(out=""), [*RUN, *NOISY_CLIP]
              ).set_defaults(func=run_plain, config=NoisyCLIPTrainConfig, train=train_noisy_clip)
    from t2i.train.controlnet import ControlNetTrainConfig, train_controlnet

    subparser(sub, "controlnet", "a ControlNet on a frozen model (its family decides: U-Net or PixArt-delta), "
              "conditioned on the shapes scenes' box maps", ControlNetTrainConfig(out=""), [*RUN, *CONTROLNET]
              ).set_defaults(func=run_plain, config=ControlNetTrainConfig, train=train_controlnet)
