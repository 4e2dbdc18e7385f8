"""Networks and the building blocks they share.

The SD U-Net, the SD KL autoencoder and the later pixel-space U-Nets (GLIDE, Imagen) are all
made of the same few pieces, one module per concept:

- `embeddings`: the sinusoidal timestep embedding and its MLP.
- `conv`: `Conv2d`, `nn.Conv2d` with a fast inference path on small, wide maps.
- `resnet`: the GroupNorm-SiLU-conv residual block.
- `resample`: strided-conv downsampling, nearest-neighbour upsampling (fused with its conv).
- `attention`: multi-head attention over tokens, the one implementation every family shares.
- `spatial_attention`: the "spatial transformer" (self-, cross-attention to the text tokens,
  GEGLU feed-forward over the pixels of a feature map; LDM Sec. 3.3) and the VAE's self-attention.
- `levels`: a resolution level (down, up, middle) wired from already built blocks.
- `unet`, `transformer`, `vit`: the networks.

Attribute names follow the diffusers layout (`norm1`, `conv1`, `time_emb_proj`, `proj_in`,
`transformer_blocks`, `ff.net.0.proj`, ...) so a diffusers state dict loads with `strict=True`;
the checkpoint layer adapts every other layout.
"""
