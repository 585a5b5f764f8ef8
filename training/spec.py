"""Model specifications: everything about a base model that training needs (finetrainers' "model specification").

A trainer asks its :class:`ModelSpec` and never branches on the base. A spec owns

* loading the components from a diffusers folder (:meth:`ModelSpec.load`);
* latent preparation (:meth:`~ModelSpec.latents`), text and image conditioning (:meth:`~ModelSpec.condition`),
  and what the precompute cache stores for them (:meth:`~ModelSpec.encode_text`, :meth:`~ModelSpec.encode_media`,
  :meth:`~ModelSpec.encode_image_condition`);
* the noise and timestep draw (:meth:`~ModelSpec.draw_noise`, :meth:`~ModelSpec.noisy`), the forward
  (:meth:`~ModelSpec.predict`), the training target (:meth:`~ModelSpec.target`) and the per-sample error the
  losses use (:meth:`~ModelSpec.error`);
* the LoRA target modules and the LoRA export key map (:attr:`~ModelSpec.default_lora_targets`,
  :meth:`~ModelSpec.export_lora`), and for full-parameter training the transformers' dtype and single-file format
  (:func:`transformer_dtype`, :meth:`~ModelSpec.export_transformer_file`).

Two implementations: :class:`CogVideoXSpec` below (DDPM, v-prediction) and :class:`~.spec_wan.WanSpec` (Wan 2.1/2.2,
flow matching). :func:`load_spec` picks the one a folder needs (``models/bases.py`` reads it from the folder).

CogVideoX conventions (as diffusers' pipelines and CogVideo's fine-tuning code):

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

import abc
import dataclasses

import torch

from ..models.sampler import rotary_embeddings
from ..models.text import t5_encode
from .config import InputError
from .losses import loss_weights, per_sample_mse, x0_from_v


def cached_key(key: str) -> str:
    """The batch key of the precompute cache's latents for the batch key ``key`` of pixels."""
    return "latents" if key == "pixels" else f"{key}_latents"


@dataclasses.dataclass
class NoiseDraw:
    """One step's noise: ``noise`` (the latents' shape), ``timesteps`` [B] as the transformer takes them, and for
    flow matching ``sigmas`` [B]; ``experts`` [B] says which transformer denoises each row (two-expert models)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    experts: torch.Tensor | None = None


def transformer_dtype(config, dtype: torch.dtype) -> torch.dtype:
    """The dtype the transformers load in: the mixed-precision ``dtype`` when they stay frozen (LoRA, adapters),
    float32 when every weight trains (``--train full``: fp32 master weights; accelerate's autocast computes in
    ``dtype``)."""
    return torch.float32 if getattr(config, "train", "lora") == "full" else dtype


def repeat_condition(condition: dict, times: int) -> dict:
    """``condition`` for a batch repeated ``times`` along the batch axis (pair-parallel forwards)."""
    return {k: None if v is None else torch.cat([v] * times) for k, v in condition.items()}


def concat_draws(draws: list[NoiseDraw]) -> NoiseDraw:
    """Draws of several batches as one (their rows in order)."""
    def cat(name):
        parts = [getattr(d, name) for d in draws]
        return None if parts[0] is None else torch.cat(parts)

    return NoiseDraw(*(cat(f.name) for f in dataclasses.fields(NoiseDraw)))


class ModelSpec(abc.ABC):
    """What a trainer needs of a base model (see the module docstring). Attributes every spec has:
    ``transformers`` (the denoisers a LoRA adapts: one, or Wan 2.2 A14B's two experts), ``vae``, ``text_encoder``,
    ``device``, ``dtype`` (the transformers' compute dtype)."""

    base: str = ""  # "cogvideox" | "wan"
    default_lora_targets: tuple = ()
    text_max_length: int = 0

    # ------------------------------------------------------------------ loading and what the folder is
    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, *, dtype: torch.dtype, device: torch.device, config) -> "ModelSpec":
        """Load the components of the diffusers folder ``path`` (weights in ``dtype``) for the trainer ``config``."""

    @staticmethod
    def check_config(config, folder_info: dict) -> None:
        """Refuse config values this base cannot honour (one :class:`InputError` line); nothing is loaded."""

    @staticmethod
    @abc.abstractmethod
    def split_lengths(folder_info: dict, num_frames: int, height: int, width: int) -> dict:
        """The sequences context parallelism splits for a clip of that size, ``{what: tokens}`` (read from the folder's
        configs, nothing loaded; see ``models/context_parallel.py``)."""

    @property
    @abc.abstractmethod
    def image_conditioned(self) -> bool:
        """Trained from a first frame (I2V)."""

    @property
    def expert_names(self) -> list[str]:
        """One name per transformer (``[""]`` for one transformer)."""
        return [""]

    @property
    def block_class(self) -> type:
        """The transformer block class: one FSDP unit each (accelerate's TRANSFORMER_BASED_WRAP)."""
        return type(self.transformers[0].blocks[0] if hasattr(self.transformers[0], "blocks")
                    else self.transformers[0].transformer_blocks[0])

    def offload_encoders(self, keep_vae: bool = False) -> None:
        """Move the text encoder (and the VAE unless ``keep_vae``) off the execution device (precompute cache)."""
        for module in (self.text_encoder, None if keep_vae else self.vae):
            if module is not None:
                module.to("cpu")

    # ------------------------------------------------------------------ text
    @abc.abstractmethod
    def tokenize(self, text: str, tokenizer=None) -> dict:
        """``{"input_ids": [L]}`` (and the attention mask when the encoder takes one) of a caption."""

    @abc.abstractmethod
    def encode_text(self, caption: str, tokenizer=None) -> dict:
        """``{"prompt_embeds": [L, D]}`` of a caption, as the pipeline encodes it (stored by the cache)."""

    @abc.abstractmethod
    def text_embeds(self, batch: dict) -> torch.Tensor:
        """Text embeddings [B, L, D]: cached (``prompt_embeds``) or encoded from the batch's tokens."""

    # ------------------------------------------------------------------ latents and conditions
    @abc.abstractmethod
    def latents(self, batch: dict, generator: torch.Generator, key: str = "pixels") -> torch.Tensor:
        """Clean latents of ``batch[key]`` (pixels [B, F, 3, H, W] in [-1, 1]) or of its cached posterior, in the
        layout the transformer takes, ready for :meth:`draw_noise`."""

    @abc.abstractmethod
    def condition(self, batch: dict, generator: torch.Generator, latents: torch.Tensor) -> dict:
        """Everything :meth:`predict` needs besides the noisy latents and the timestep: the text embeddings and,
        for image-conditioned models, the first frame's condition (tensors with a batch axis)."""

    def encode_media(self, pixels: torch.Tensor) -> dict:
        """What the cache stores of a clip [F, 3, H, W]: its VAE posterior ``{"mean", "logvar"}`` [C, T, h, w]."""
        from .cache import encode_latents

        return encode_latents(self.vae, pixels, self.device)

    @abc.abstractmethod
    def encode_image_condition(self, pixels: torch.Tensor, num_frames: int) -> dict:
        """What the cache stores of a first frame [1, 3, H, W] for clips of ``num_frames`` frames."""

    @abc.abstractmethod
    def image_condition_item(self, entry: dict, generator: torch.Generator) -> dict:
        """A dataset item's fields from a cached :meth:`encode_image_condition` entry."""

    def image_condition_key(self, num_frames: int) -> str | None:
        """What the cached image condition depends on besides the frame itself (part of its cache key)."""
        return None

    # ------------------------------------------------------------------ noise, forward, target, error
    @abc.abstractmethod
    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoiseDraw:
        """Noise and timesteps for clean ``latents``, drawn from ``generator`` (CPU)."""

    @abc.abstractmethod
    def noisy(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        """``latents`` noised as ``draw`` says."""

    @abc.abstractmethod
    def predict(self, noisy: torch.Tensor, condition: dict, draw: NoiseDraw, transformers=None) -> torch.Tensor:
        """The transformer's output for ``noisy`` (``transformers``: replace the spec's own, e.g. a frozen copy)."""

    @abc.abstractmethod
    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        """What :meth:`predict` is trained to output."""

    def error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-sample error the losses use: the mean squared error over every element: [B]."""
        return per_sample_mse(prediction, target)

    # ------------------------------------------------------------------ LoRA export
    @abc.abstractmethod
    def export_lora(self, path: str, layers: dict, metadata: dict) -> None:
        """Write LoRA ``layers`` (``{module path: LoraLayer}`` of one transformer) as the file users load."""

    def lora_file_names(self, stem: str) -> list[str]:
        """File names of an exported LoRA, one per transformer."""
        return [f"{stem}.safetensors"]

    # ------------------------------------------------------------------ full-parameter export
    @property
    def transformer_folders(self) -> list[str]:
        """The diffusers sub-folder of each of :attr:`transformers` (``transformer``; Wan 2.2 A14B's low-noise expert:
        ``transformer_2``)."""
        return ["transformer"]

    @abc.abstractmethod
    def export_transformer_file(self, path: str, state_dict: dict, metadata: dict) -> None:
        """Write one transformer's whole state dict as the single file the base's loader reads."""


@dataclasses.dataclass
class CogVideoXSpec(ModelSpec):
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # CogVideoXDDIMScheduler (training-time noise schedule)
    text_encoder: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype  # the transformer's compute dtype
    bundle: object = None  # the CogVideoXBundle it was made from (validation sampling, placement)
    tokenizer: object = None

    base = "cogvideox"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    text_max_length = 226

    @classmethod
    def from_bundle(cls, bundle, device: torch.device | None = None) -> "CogVideoXSpec":
        from diffusers import CogVideoXDDIMScheduler

        return cls(bundle.transformer, bundle.vae, CogVideoXDDIMScheduler.from_config(bundle.scheduler_config),
                   bundle.text_encoder, torch.device(device or bundle.device), bundle.dtype, bundle, bundle.tokenizer)

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype, device: torch.device, config) -> "CogVideoXSpec":
        """The frozen CogVideoX of ``path`` (the VAE in fp32 when ``dtype`` is fp16; the transformer in fp32 for
        ``--train full``, :func:`transformer_dtype`)."""
        from ..models.cogvideox import load_cogvideox

        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        bundle = load_cogvideox(path, dtype=transformer_dtype(config, dtype), device=device, vae_dtype=vae_dtype,
                                text_encoder_dtype=dtype)
        if config.gradient_checkpointing:
            bundle.transformer.enable_gradient_checkpointing()
        return cls.from_bundle(bundle, device)

    @staticmethod
    def check_config(config, folder_info: dict) -> None:
        defaults = (("flow_shift", 0.0), ("flow_sigma_density", "uniform"), ("flow_logit_mean", 0.0),
                    ("flow_logit_std", 1.0), ("experts", "all"))
        flow = [f"--{name}" for name, default in defaults if getattr(config, name, default) != default]
        if flow:
            raise InputError(f"{', '.join(flow)}: flow-matching options of Wan; CogVideoX draws DDPM timesteps "
                             "(t ~ U{0..999}) from one transformer — drop them for a CogVideoX --model_path")

    @staticmethod
    def split_lengths(folder_info: dict, num_frames: int, height: int, width: int) -> dict:
        """Both halves of the joint sequence: the 226 text tokens and the video tokens."""
        from ..models.memory import TEXT_TOKENS, video_tokens

        n = video_tokens({"patch_size": 2, **folder_info["transformer_config"]}, num_frames, height, width)
        return {"text tokens (CogVideoX's T5 prompt)": TEXT_TOKENS,
                f"video tokens of a {num_frames}x{height}x{width} clip": n}

    # ------------------------------------------------------------------ what the configs say
    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [self.transformer]

    @property
    def i2v(self) -> bool:
        c = self.transformer.config
        return c.in_channels == 2 * c.out_channels

    image_conditioned = i2v

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

    def offload_encoders(self, keep_vae: bool = False) -> None:
        placement = self.bundle.placement
        placement.offload(self.bundle.text_encoder)  # on the CPU; validation brings it in for its prompts
        if not keep_vae:
            placement.offload(self.bundle.vae)
        self.text_encoder = None

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, tokenizer=None) -> dict:
        from ..models.text import tokenize

        return {"input_ids": tokenize(tokenizer or self.tokenizer, text).input_ids[0]}

    def encode_text(self, caption: str, tokenizer=None) -> dict:
        from .cache import encode_text

        return encode_text(self.text_encoder, tokenizer or self.tokenizer, caption, self.text_max_length,
                           device=self.device)

    def text_embeds(self, batch: dict) -> torch.Tensor:
        """T5 embeddings [B, L, D]: cached (``prompt_embeds``) or encoded from ``input_ids``."""
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.device, self.dtype)
        with torch.no_grad():
            return t5_encode(self.text_encoder, batch["input_ids"].to(self.device)).to(self.dtype)

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

    def latents(self, batch: dict, generator: torch.Generator, key: str = "pixels") -> torch.Tensor:
        """Scaled, padded latents [B, T, C, h, w]."""
        return self.pad_frames(self.video_latents(batch, generator, key))

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

    def condition(self, batch: dict, generator: torch.Generator, latents: torch.Tensor) -> dict:
        image = None
        if self.i2v:
            image = self.image_condition(batch.get("first_frame"), latents.shape[1], generator,
                                         batch.get("first_frame_latents"))
        return {"text": self.text_embeds(batch), "image_latents": image}

    def encode_image_condition(self, pixels: torch.Tensor, num_frames: int) -> dict:
        """The first frame's VAE posterior (the condition does not depend on the clip's length)."""
        return self.encode_media(pixels)

    def image_condition_item(self, entry: dict, generator: torch.Generator) -> dict:
        from .cache import sample_latents

        return {"first_frame_latents": sample_latents(entry, generator)}

    # ------------------------------------------------------------------ noise, forward, targets
    def add_noise(self, latents: torch.Tensor, generator: torch.Generator):
        """``(noise, t, noisy)`` for clean ``latents`` [B, T, C, h, w]: ε ~ N(0, 1), then t ~ U{0..T-1}."""
        draw = self.draw_noise(latents, generator)
        return draw.noise, draw.timesteps, self.noisy(latents, draw)

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoiseDraw:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator).to(latents.device)
        return NoiseDraw(noise, t)

    def noisy(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        return self.scheduler.add_noise(latents, draw.noise, draw.timesteps)

    def rotary(self, latents: torch.Tensor):
        """RoPE tables for latents [B, T, C, h, w] (None for models with absolute positions)."""
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        h, w, s = latents.shape[-2], latents.shape[-1], self.vae_scale
        return rotary_embeddings(self.transformer, h * s, w * s, latents.shape[1], s, self.device)

    def forward(self, noisy: torch.Tensor, text: torch.Tensor, t: torch.Tensor,
                image_latents: torch.Tensor | None = None, transformer=None) -> torch.Tensor:
        """The transformer's v-prediction [B, T, C, h, w] (through the block runner and whatever is registered
        on it); I2V models get ``image_latents`` on the channel axis, 1.5 I2V models ``ofs = 2``."""
        transformer = transformer or self.transformer
        x = noisy if image_latents is None else torch.cat([noisy, image_latents.to(noisy.dtype)], dim=2)
        ofs = noisy.new_full((noisy.shape[0],), 2.0) if transformer.config.ofs_embed_dim is not None else None
        return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs,
                           image_rotary_emb=self.rotary(noisy), return_dict=False)[0]

    def predict(self, noisy: torch.Tensor, condition: dict, draw: NoiseDraw, transformers=None) -> torch.Tensor:
        return self.forward(noisy, condition["text"], draw.timesteps, condition.get("image_latents"),
                            (transformers or [None])[0])

    def x0(self, noisy: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from the v-prediction (float32)."""
        return x0_from_v(self.scheduler, noisy, v.float(), t)

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target."""
        return self.scheduler.get_velocity(latents, noise, t)

    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        return self.velocity(latents, draw.noise, draw.timesteps)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """CogVideoX's x0-space weight 1 / (1 − ᾱ_t): [B]."""
        return loss_weights(self.scheduler, t)

    # ------------------------------------------------------------------ LoRA export
    def export_lora(self, path: str, layers: dict, metadata: dict) -> None:
        """A diffusers-format LoRA (``transformer.<path>.lora_A/B``, alpha baked), for the pack's LoRA Loader node,
        diffusers' ``load_lora_weights`` and kijai's wrapper."""
        from ..models.cogvideox import BASE_MODEL_KEY, base_model_of
        from ..models.lora import save_lora

        save_lora(path, layers, {**metadata, BASE_MODEL_KEY: base_model_of(self.transformer)})

    def export_transformer_file(self, path: str, state_dict: dict, metadata: dict) -> None:
        """diffusers' key names, no prefix: the single-file transformer the CogVideoX Model Loader's
        ``transformer_file`` (``models/cogvideox.load_transformer_file``) reads from ``diffusion_models/``."""
        from ..models.cogvideox import write_safetensors

        write_safetensors(path, state_dict, {"format": "diffusers", **metadata})


def spec_class(base: str) -> type[ModelSpec]:
    """The specification of a base (``models/bases.py``'s names)."""
    if base == "wan":
        from .spec_wan import WanSpec

        return WanSpec
    return CogVideoXSpec


def load_spec(path: str, *, dtype: torch.dtype, device: torch.device, config) -> ModelSpec:
    """Load the diffusers folder ``path`` with the specification of the base it holds."""
    from ..models.bases import detect_base

    return spec_class(detect_base(path)).load(path, dtype=dtype, device=device, config=config)
