"""The Wan 2.1 / 2.2 training specification (flow matching), the second implementation of :class:`~.spec.ModelSpec`.

Conventions, as diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` prepare their inputs:

* video latents are a VAE posterior draw normalised per channel, ``(z − latents_mean) / latents_std`` (the VAE
  config's lists), laid out ``[B, C, T, h, w]``;
* text: UMT5 over the cleaned prompt (``prompt_clean``), 512 tokens, embeddings past the prompt's length zeroed;
* image conditioning of Wan 2.1 I2V and Wan 2.2 I2V A14B: the VAE mode of ``[first frame, F − 1 black frames]``,
  normalised, behind 4 mask channels (1 on the first latent frame) on the channel axis (36 input channels);
  Wan 2.1 I2V adds the CLIP image encoder's penultimate hidden states of the first frame (through the
  transformer's image projection); Wan 2.2 TI2V-5B puts the normalised VAE mode of the first frame in place of
  the first noisy latent frame, whose timestep is 0 (``expand_timesteps``), and its error counts the generated
  frames only;
* flow matching: ``u`` drawn from a density on (0, 1) (``uniform``, or ``logit_normal``: sigmoid of N(mean, std)),
  shifted ``σ = shift·u / (1 + (shift − 1)·u)`` as ``FlowMatchEulerDiscreteScheduler`` shifts its sigmas,
  ``x_t = (1 − σ)·x0 + σ·ε``, timestep ``1000·σ``, target the velocity ``ε − x0``;
* Wan 2.2 A14B: a row whose timestep is at least ``boundary_ratio · 1000`` is denoised by the high-noise expert
  (``transformer``), the others by the low-noise one (``transformer_2``), as the pipelines switch. Training one
  expert draws σ from its range only (the density truncated at the boundary); training both sends each row to
  the expert of its σ, and each expert's LoRA is exported on its own.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import InputError
from .spec import ModelSpec, NoiseDraw, cached_key, transformer_dtype

EXPERTS = ("high_noise", "low_noise")  # Wan 2.2 A14B: transformer, transformer_2


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift·u / (1 + (shift − 1)·u)``: the flow shift of diffusers' flow-matching schedulers."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma: float, shift: float) -> float:
    """The inverse of :func:`shift_sigmas`."""
    return sigma / (shift - (shift - 1) * sigma)


@dataclasses.dataclass
class WanSpec(ModelSpec):
    model: object  # models.wan.WanModel
    device: torch.device
    dtype: torch.dtype
    flow_shift: float
    sigma_density: str = "uniform"  # "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    experts: tuple = ("",)  # trained experts: ("",) for one transformer, else a subset of EXPERTS

    base = "wan"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    text_max_length = 512

    # ------------------------------------------------------------------ loading and what the folder is
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype, device: torch.device, config) -> "WanSpec":
        from ..models.wan import folder_variant, load_wan

        variant = folder_variant(path)
        experts = cls.trained_experts(variant, getattr(config, "experts", "all"))
        model = load_wan(path, dtype=transformer_dtype(config, dtype), device=device, text_encoder_dtype=dtype,
                         experts=experts if variant.experts == 2 else None)
        for transformer in model.transformers:
            if config.gradient_checkpointing:
                transformer.enable_gradient_checkpointing()
        shift = getattr(config, "flow_shift", 0.0) or model.scheduler_config.get(
            "flow_shift", model.scheduler_config.get("shift", 1.0))
        return cls(model, torch.device(device), transformer_dtype(config, dtype), float(shift),
                   getattr(config, "flow_sigma_density", "uniform"), getattr(config, "flow_logit_mean", 0.0),
                   getattr(config, "flow_logit_std", 1.0), experts)

    @staticmethod
    def split_lengths(folder_info: dict, num_frames: int, height: int, width: int) -> dict:
        """The video tokens (diffusers' Wan plan keeps the text and image context whole)."""
        from ..models.memory import wan_video_tokens

        config = folder_info["transformer_config"]
        vae = {"scale_factor_spatial": folder_info["spatial_multiple"] // config.get("patch_size", [1, 2, 2])[-1]}
        return {f"video tokens of a {num_frames}x{height}x{width} clip": wan_video_tokens(
            {"patch_size": [1, 2, 2], **config}, vae, num_frames, height, width)}

    @staticmethod
    def trained_experts(variant, option: str) -> tuple:
        if variant.experts == 1:
            return ("",)
        return EXPERTS if option == "all" else (option,)

    @staticmethod
    def check_config(config, folder_info: dict) -> None:
        import importlib.util

        variant = folder_info["variant"]
        if importlib.util.find_spec("ftfy") is None:  # diffusers' Wan prompt cleaning (prompt_clean) needs it
            raise InputError(f"{variant} prompts are cleaned as diffusers' Wan pipelines clean them, which needs the "
                             "ftfy package: pip install ftfy (or pip install 'magicmirror-video[train]')")
        option = getattr(config, "experts", "all")
        if option != "all" and variant.experts == 1:
            raise InputError(f"--experts {option}: {variant} has one transformer; --experts applies to Wan 2.2 A14B "
                             "(two experts) — drop it")
        multiple = folder_info["spatial_multiple"]
        for name in ("height", "width"):
            value = getattr(config, name)
            if value % multiple:
                raise InputError(f"--{name} {value}: {variant} needs multiples of {multiple} (VAE x patch); use "
                                 f"{max(multiple, value // multiple * multiple)}")
        if getattr(config, "flow_logit_std", 1.0) <= 0:
            raise InputError(f"--flow_logit_std {config.flow_logit_std}: must be positive")

    @property
    def variant(self):
        return self.model.variant

    @property
    def transformers(self) -> list[torch.nn.Module]:
        """The trained transformers, in :attr:`expert_names` order."""
        if self.experts == ("",):
            return [self.model.transformer]
        return [self.model.transformer if e == "high_noise" else self.model.transformer_2 for e in self.experts]

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @property
    def vae(self):
        return self.model.vae

    @property
    def text_encoder(self):
        return self.model.text_encoder

    @property
    def image_conditioned(self) -> bool:
        return self.variant.image_conditioned

    @property
    def ti2v(self) -> bool:
        return self.model.expand_timesteps

    @property
    def temporal_scale(self) -> int:
        return self.vae.config.scale_factor_temporal

    def offload_encoders(self, keep_vae: bool = False) -> None:
        super().offload_encoders(keep_vae)
        if self.model.image_encoder is not None:
            self.model.image_encoder.to("cpu")

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, tokenizer=None) -> dict:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        enc = (tokenizer or self.model.tokenizer)(
            prompt_clean(text), padding="max_length", max_length=self.text_max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return {"input_ids": enc.input_ids[0], "attention_mask": enc.attention_mask[0]}

    @torch.no_grad()
    def umt5(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """UMT5 embeddings [B, L, D] with the rows past each prompt's length zeroed (as the pipelines); UMT5 runs on
        the execution device, where :meth:`load` put it (:meth:`offload_encoders` ends its use)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        embeds = self.text_encoder(input_ids, attention_mask).last_hidden_state
        return embeds * attention_mask[..., None].to(embeds.dtype)

    def encode_text(self, caption: str, tokenizer=None) -> dict:
        tokens = self.tokenize(caption, tokenizer)
        return {"prompt_embeds": self.umt5(tokens["input_ids"][None], tokens["attention_mask"][None])[0]}

    def text_embeds(self, batch: dict) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.device, self.dtype)
        return self.umt5(batch["input_ids"], batch["attention_mask"]).to(self.device, self.dtype)

    # ------------------------------------------------------------------ latents
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z − latents_mean) / latents_std`` per channel of latents [B, C, T, h, w]."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        return (z - mean) * inv_std

    @torch.no_grad()
    def posterior(self, video: torch.Tensor):
        """``video`` [B, 3, F, H, W] in [-1, 1] -> the VAE's latent distribution [B, C, T, h, w] (the VAE on the
        execution device, where :meth:`load` put it)."""
        return self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist

    def latents(self, batch: dict, generator: torch.Generator, key: str = "pixels") -> torch.Tensor:
        """Normalised latents [B, C, T, h, w] of ``batch[key]`` (pixels [B, F, 3, H, W]) or of a cached draw."""
        if cached_key(key) in batch:
            z = batch[cached_key(key)].to(self.device).float()
        else:
            post = self.posterior(batch[key].permute(0, 2, 1, 3, 4))
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(post.mean.device,
                                                                                           post.mean.dtype)
        return self.normalize(z.to(self.device).float()).to(self.dtype)

    @torch.no_grad()
    def image_latents(self, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The normalised VAE mode of the first frame [B, 3, H, W] followed by ``num_frames − 1`` black frames
        (TI2V: of the first frame alone): [B, C, T, h, w], float32."""
        video = first_frame[:, :, None].float()
        if not self.ti2v:
            video = torch.cat([video, video.new_zeros(video.shape[0], 3, num_frames - 1, *video.shape[-2:])], dim=2)
        z = self.posterior(video).mode()
        return self.normalize(z.to(self.device).float())

    @torch.no_grad()
    def clip_image_embeds(self, first_frame: torch.Tensor) -> torch.Tensor:
        """The CLIP image encoder's penultimate hidden states [B, N, D] of the first frames [B, 3, H, W] in [-1, 1],
        prepared by the folder's image processor as the pipeline prepares a PIL image."""
        pixels = ((first_frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        inputs = self.model.image_processor(images=list(pixels.cpu().numpy()), return_tensors="pt")
        encoder = self.model.image_encoder
        inputs = inputs.to(self.device)  # (the image encoder is where load put it)
        return encoder(**inputs, output_hidden_states=True).hidden_states[-2].to(self.device)

    def mask_channels(self, latents: torch.Tensor) -> torch.Tensor:
        """The I2V mask [B, 4, T, h, w]: the first latent frame's 4 temporally packed pixel frames are given."""
        b, _, t, h, w = latents.shape
        mask = latents.new_zeros(b, self.temporal_scale, t, h, w)
        mask[:, :, 0] = 1
        return mask

    def pixel_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_scale + 1

    def condition(self, batch: dict, generator: torch.Generator, latents: torch.Tensor) -> dict:
        out = {"text": self.text_embeds(batch)}
        if not self.image_conditioned:
            return out
        if "first_frame_condition" in batch:
            image = batch["first_frame_condition"].to(self.device).float()
            embeds = batch.get("first_frame_image_embeds")
        else:
            image = self.image_latents(batch["first_frame"], self.pixel_frames(latents.shape[2]))
            embeds = self.clip_image_embeds(batch["first_frame"]) if self.model.image_encoder is not None else None
        if self.ti2v:
            out["first_frame"] = image.to(self.dtype)  # [B, C, 1, h, w]
        else:
            out["image_latents"] = torch.cat([self.mask_channels(latents).float(), image], dim=1).to(self.dtype)
        if embeds is not None:
            out["image_embeds"] = embeds.to(self.device, self.dtype)
        return out

    def encode_image_condition(self, pixels: torch.Tensor, num_frames: int) -> dict:
        entry = {"condition": self.image_latents(pixels.to(self.device), num_frames)[0]}
        if self.model.image_encoder is not None:
            entry["image_embeds"] = self.clip_image_embeds(pixels.to(self.device))[0]
        return entry

    def image_condition_item(self, entry: dict, generator: torch.Generator) -> dict:
        item = {"first_frame_condition": entry["condition"]}
        if "image_embeds" in entry:
            item["first_frame_image_embeds"] = entry["image_embeds"]
        return item

    def image_condition_key(self, num_frames: int) -> str:
        return f"wan-{self.variant.task.lower()}" + ("" if self.ti2v else f"-{num_frames}")

    # ------------------------------------------------------------------ noise, forward, target, error
    @property
    def boundary(self) -> float | None:
        """σ at which Wan 2.2 A14B switches experts (``boundary_ratio``; timestep = 1000·σ)."""
        return self.model.boundary_ratio

    def density_quantile(self, p: torch.Tensor) -> torch.Tensor:
        """The density's inverse CDF on (0, 1): ``u`` for uniform ``p``."""
        if self.sigma_density == "uniform":
            return p
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(p))

    def density_cdf(self, u: float) -> float:
        if self.sigma_density == "uniform":
            return u
        z = (torch.logit(torch.tensor(u, dtype=torch.float64)) - self.logit_mean) / self.logit_std
        return float(torch.special.ndtr(z))

    def sigma_range(self) -> tuple[float, float]:
        """The range of the uniform draw ``p`` that gives the trained experts' σ (the whole (0, 1) unless one
        Wan 2.2 A14B expert is trained)."""
        if self.experts in (("",), EXPERTS):
            return 0.0, 1.0
        p = self.density_cdf(unshift_sigmas(self.boundary, self.flow_shift))
        return (p, 1.0) if self.experts == ("high_noise",) else (0.0, p)

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoiseDraw:
        """ε ~ N(0, 1), then ``p`` uniform on :meth:`sigma_range`, ``u`` = the density's quantile of ``p`` and
        ``σ = shift(u)`` (all from ``generator``)."""
        noise = torch.randn(latents.shape, generator=generator)
        lo, hi = self.sigma_range()
        p = lo + (hi - lo) * torch.rand(latents.shape[0], generator=generator, dtype=torch.float64)
        sigmas = shift_sigmas(self.density_quantile(p.clamp(1e-6, 1 - 1e-6)), self.flow_shift).float()
        return self.draw_at(noise.to(latents.device, latents.dtype), sigmas.to(latents.device))

    def draw_at(self, noise: torch.Tensor, sigmas: torch.Tensor) -> NoiseDraw:
        """The draw of ``noise`` at ``sigmas`` [B]: timesteps ``1000·σ`` and, training both Wan 2.2 A14B experts,
        each row's expert (0: high noise, ``t ≥ boundary_ratio·1000``; 1: low noise)."""
        timesteps = sigmas * 1000.0
        experts = (timesteps < self.boundary * 1000.0).long() if len(self.experts) == 2 else None
        return NoiseDraw(noise, timesteps, sigmas, experts)

    def noisy(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        sigma = draw.sigmas.view(-1, 1, 1, 1, 1).to(latents.dtype)
        return (1 - sigma) * latents + sigma * draw.noise

    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        """The velocity ``ε − x0``."""
        return draw.noise - latents

    def error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample over the generated frames (TI2V image-to-video: all but the given first)."""
        if self.ti2v and self.image_conditioned:
            prediction, target = prediction[:, :, 1:], target[:, :, 1:]
        return super().error(prediction, target)

    def forward(self, transformer, noisy: torch.Tensor, condition: dict, timesteps: torch.Tensor) -> torch.Tensor:
        """One transformer's prediction for ``noisy`` [B, C, T, h, w] (the model input laid out as the pipelines)."""
        x, t = noisy, timesteps
        if "image_latents" in condition:
            x = torch.cat([noisy, condition["image_latents"].to(noisy.dtype)], dim=1)
        if "first_frame" in condition:  # TI2V: the first frame given, its tokens at timestep 0
            mask = torch.ones_like(noisy[:1, :1])
            mask[:, :, 0] = 0
            x = (1 - mask) * condition["first_frame"].to(noisy.dtype) + mask * noisy
            _, p_h, p_w = transformer.config.patch_size
            t = mask[0, 0, :, ::p_h, ::p_w].flatten()[None].to(timesteps.dtype) * timesteps[:, None]
        return transformer(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=condition["text"],
                           encoder_hidden_states_image=condition.get("image_embeds"), return_dict=False)[0]

    def predict(self, noisy: torch.Tensor, condition: dict, draw: NoiseDraw, transformers=None) -> torch.Tensor:
        transformers = transformers or self.transformers
        if draw.experts is None:
            return self.forward(transformers[0], noisy, condition, draw.timesteps)
        out = None
        for index, transformer in enumerate(transformers):
            rows = (draw.experts == index).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = self.forward(transformer, noisy[rows], {k: v[rows] for k, v in condition.items()},
                                draw.timesteps[rows])
            if rows.numel() == noisy.shape[0]:
                return part
            out = part.new_zeros(noisy.shape[0], *part.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, part)
        return out

    # ------------------------------------------------------------------ LoRA export
    def export_lora(self, path: str, layers: dict, metadata: dict) -> None:
        """ComfyUI's Wan LoRA layout (original Wan names under ``diffusion_model.``), which core's LoRA loader and
        diffusers' Wan LoRA loader both read."""
        from ..models.wan_lora import save_wan_lora

        save_wan_lora(path, layers, {**metadata, "base_model": str(self.variant)})

    def lora_file_names(self, stem: str) -> list[str]:
        return [f"{stem}{'_' + e if e else ''}.safetensors" for e in self.experts]

    # ------------------------------------------------------------------ full-parameter export
    @property
    def transformer_folders(self) -> list[str]:
        return ["transformer_2" if e == "low_noise" else "transformer" for e in self.experts]

    def export_transformer_file(self, path: str, state_dict: dict, metadata: dict) -> None:
        """The original Wan names (``models/wan_single_file.py``), which ComfyUI's Load Diffusion Model detects as Wan
        and diffusers' ``from_single_file`` converts back."""
        from ..models.wan_single_file import save_wan_transformer_file

        save_wan_transformer_file(path, state_dict, {**metadata, "base_model": str(self.variant)})
