"""The CogVideoX training specification every trainer shares (finetrainers' "model specification").

Everything about CogVideoX itself lives here, read from the loaded model's own configs: latent
preparation (VAE scale, ``invert_scale_latents``, CogVideoX 1.5's frame padding, I2V first-frame
conditioning), noise and timestep draws, RoPE, the forward through the block runner (with whatever
method is registered on it), and the x0-space target. A trainer keeps only what differs: its data, its
loss and its trainable parts.

Conventions (as diffusers' pipelines and CogVideo's fine-tuning code):

* video latents are ``z · scaling_factor`` (the pipelines decode ``latents / scaling_factor``);
* the I2V first-frame latent is a posterior sample of the first frame alone, multiplied by the scaling
  factor, or divided by it when the VAE config sets ``invert_scale_latents`` (CogVideoX 1.5 I2V), then
  followed by zero frames; with ``patch_size_t`` (1.5) an odd latent-frame count is padded in front, by
  copies of the first latent frame for the target (CogVideo's fine-tuning) and of the first image frames
  for the condition (``CogVideoXImageToVideoPipeline.prepare_latents``);
* timesteps ``t ~ U{0..T-1}`` and noise ``N(0, 1)`` are drawn from the step's generator on the CPU, so
  every rank and every resumed run draws the same.
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.sampler import rotary_embeddings
from ..models.text import t5_encode
from .losses import loss_weights, x0_from_v


def cached_key(key: str) -> str:
    """The batch key of the precompute cache's latents for the batch key ``key`` of pixels."""
    return "latents" if key == "pixels" else f"{key}_latents"


@dataclasses.dataclass
class CogVideoXSpec:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # CogVideoXDDIMScheduler (training-time noise schedule)
    text_encoder: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype  # the transformer's compute dtype

    @classmethod
    def from_bundle(cls, bundle, device: torch.device | None = None) -> "CogVideoXSpec":
        from diffusers import CogVideoXDDIMScheduler

        return cls(bundle.transformer, bundle.vae, CogVideoXDDIMScheduler.from_config(bundle.scheduler_config),
                   bundle.text_encoder, torch.device(device or bundle.device), bundle.dtype)

    # ------------------------------------------------------------------ what the configs say
    @property
    def i2v(self) -> bool:
        c = self.transformer.config
        return c.in_channels == 2 * c.out_channels

    @property
    def patch_size_t(self) -> int | None:
        return self.transformer.config.patch_size_t

    @property
    def vae_scale(self) -> int:
        """Spatial compression of the VAE (8 for every CogVideoX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def scale_image_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The I2V condition's scaling, as ``CogVideoXImageToVideoPipeline.prepare_latents``."""
        factor = self.vae.config.scaling_factor
        return (1 / factor) * z if getattr(self.vae.config, "invert_scale_latents", False) else factor * z

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor):
        """``pixels`` [B, F, 3, H, W] in [-1, 1] -> the VAE's latent distribution ([B, C, T, h, w])."""
        return self.vae.encode(pixels.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4)).latent_dist

    @staticmethod
    def draw(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A posterior sample ``mean + std · ε`` with ε from ``generator`` (CPU), any batch."""
        return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)

    def video_latents(self, batch: dict, generator: torch.Generator, key: str = "pixels") -> torch.Tensor:
        """Scaled latents [B, T, C, h, w] of ``batch[key]`` (pixels [B, F, 3, H, W]), or of a cached posterior
        draw (``batch[cached_key(key)]`` [B, C, T, h, w], unscaled) when the batch carries one."""
        if cached_key(key) in batch:
            z = batch[cached_key(key)].to(self.device)
        else:
            post = self.posterior(batch[key])
            z = self.draw(post.mean, post.std, generator)
        return (z * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).to(self.dtype)

    def pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """CogVideoX 1.5 patches pairs of latent frames: an odd count gets copies of the first frame in front."""
        p_t = self.patch_size_t
        extra = (-latents.shape[1]) % p_t if p_t is not None else 0
        if not extra:
            return latents
        return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)

    @torch.no_grad()
    def image_condition(self, first_frame: torch.Tensor | None, frames: int, generator: torch.Generator,
                        cached: torch.Tensor | None = None) -> torch.Tensor:
        """I2V conditioning latents [B, frames', C, h, w] for ``first_frame`` [B, 3, H, W] in [-1, 1] (or a
        cached posterior draw [B, C, 1, h, w], unscaled), laid out as the pipeline's: the scaled first-frame
        latent, zeros for the other ``frames - 1`` latent frames, and with ``patch_size_t`` the first
        ``frames % p_t`` of those repeated in front."""
        z = cached.to(self.device) if cached is not None else self.posterior(first_frame[:, None]).sample(generator)
        z = self.scale_image_latents(z.to(self.dtype).permute(0, 2, 1, 3, 4))  # [B, 1, C, h, w]
        latents = torch.cat([z, z.new_zeros(z.shape[0], frames - 1, *z.shape[2:])], dim=1)
        if self.patch_size_t is not None:
            latents = torch.cat([latents[:, : latents.shape[1] % self.patch_size_t], latents], dim=1)
        return latents

    def text_embeds(self, batch: dict) -> torch.Tensor:
        """T5 embeddings [B, L, D]: cached (``prompt_embeds``) or encoded from ``input_ids``."""
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.device, self.dtype)
        with torch.no_grad():
            return t5_encode(self.text_encoder, batch["input_ids"].to(self.device)).to(self.dtype)

    # ------------------------------------------------------------------ noise, forward, targets
    def add_noise(self, latents: torch.Tensor, generator: torch.Generator):
        """``(noise, t, noisy)`` for clean ``latents`` [B, T, C, h, w]: ε ~ N(0, 1), then t ~ U{0..T-1}."""
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator).to(latents.device)
        return noise, t, self.scheduler.add_noise(latents, noise, t)

    def rotary(self, latents: torch.Tensor):
        """RoPE tables for latents [B, T, C, h, w] (None for models with absolute positions)."""
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        h, w, s = latents.shape[-2], latents.shape[-1], self.vae_scale
        return rotary_embeddings(self.transformer, h * s, w * s, latents.shape[1], s, self.device)

    def predict(self, noisy: torch.Tensor, text: torch.Tensor, t: torch.Tensor,
                image_latents: torch.Tensor | None = None, transformer=None) -> torch.Tensor:
        """The transformer's v-prediction [B, T, C, h, w] (through the block runner and whatever is registered
        on it); I2V models get ``image_latents`` on the channel axis, 1.5 I2V models ``ofs = 2``."""
        transformer = transformer or self.transformer
        x = noisy if image_latents is None else torch.cat([noisy, image_latents.to(noisy.dtype)], dim=2)
        ofs = noisy.new_full((noisy.shape[0],), 2.0) if transformer.config.ofs_embed_dim is not None else None
        return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs,
                           image_rotary_emb=self.rotary(noisy), return_dict=False)[0]

    def x0(self, noisy: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from the v-prediction (float32)."""
        return x0_from_v(self.scheduler, noisy, v.float(), t)

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target."""
        return self.scheduler.get_velocity(latents, noise, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """CogVideoX's x0-space weight 1 / (1 − ᾱ_t): [B]."""
        return loss_weights(self.scheduler, t)
