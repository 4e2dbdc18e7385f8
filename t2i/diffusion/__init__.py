"""Diffusion processes: noise schedules, the denoiser contract and its loss, guidance."""
