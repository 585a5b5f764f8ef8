"""Wan 2.1 / 2.2 from a diffusers folder: what variant it is, what it lacks, and its loaded components.

Variants (as the Wan-AI diffusers folders lay them out):

* Wan 2.1 T2V (1.3B, 14B): ``WanPipeline``; 16 latent channels in and out.
* Wan 2.1 I2V (14B 480p/720p): ``WanImageToVideoPipeline``; 36 input channels (noisy latents, 4 mask channels,
  first-frame condition latents) and a CLIP image branch (``image_encoder/``, ``image_processor/``; the
  transformer's ``image_dim`` and ``added_kv_proj_dim``).
* Wan 2.2 T2V / I2V A14B: two experts, ``transformer`` for high noise and ``transformer_2`` for low noise, split
  at ``boundary_ratio · num_train_timesteps`` (model_index.json); the I2V expert has 36 input channels but no
  CLIP branch.
* Wan 2.2 TI2V-5B: ``expand_timesteps`` (model_index.json), a 48-channel patchified VAE (spatial factor 16),
  the first-frame latent in place of the first noisy frame for image-to-video.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from .bases import read_json

logger = logging.getLogger(__name__)

REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXPERT_FOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}  # Wan 2.2 A14B


class WanFolderError(FileNotFoundError):
    """A Wan folder that is missing or incomplete."""


@dataclasses.dataclass(frozen=True)
class WanVariant:
    """What kind of Wan a folder holds, read from its configs."""

    version: str  # "2.1" | "2.2"
    task: str  # "T2V" | "I2V" | "TI2V"
    experts: int  # 2 for Wan 2.2 A14B
    size: str  # "1.3B" | "14B" | "5B" | "<width>w" for unusual (tiny) models

    @property
    def image_conditioned(self) -> bool:
        """Trained and sampled from a first frame (I2V; TI2V-5B as image-to-video)."""
        return self.task in ("I2V", "TI2V")

    def __str__(self) -> str:
        size = f"A{self.size}" if self.experts == 2 else self.size
        return f"Wan{self.version}-{self.task}-{size}"


def _size(config: dict) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return {1536: "1.3B", 5120: "14B", 3072: "5B"}.get(width, f"{width}w")


def variant_of(transformer_config: dict, index: dict | None = None) -> WanVariant:
    """The variant of a Wan transformer config (and the folder's ``model_index.json``, which says whether there
    are two experts and whether timesteps are expanded)."""
    index = index or {}
    two = bool(index.get("boundary_ratio")) or (index.get("transformer_2") or [None])[0] is not None
    if index.get("expand_timesteps"):
        return WanVariant("2.2", "TI2V", 1, _size(transformer_config))
    i2v = transformer_config["in_channels"] != transformer_config.get("out_channels", transformer_config["in_channels"])
    return WanVariant("2.2" if two else "2.1", "I2V" if i2v else "T2V", 2 if two else 1, _size(transformer_config))


def folder_variant(folder: str) -> WanVariant:
    """The variant of a diffusers Wan folder (configs only)."""
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path) if os.path.isfile(index_path) else {}
    return variant_of(read_json(os.path.join(folder, "transformer", "config.json")), index)


def missing_components(folder: str) -> list[str]:
    """The sub-folders a diffusers Wan folder lacks (empty when complete): the five every Wan has, the second
    expert of a Wan 2.2 A14B folder and the CLIP image branch of Wan 2.1 I2V."""
    missing = [p for p in REQUIRED if not os.path.isdir(os.path.join(folder, p))]
    if "transformer" in missing:
        return missing
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path) if os.path.isfile(index_path) else {}
    config = read_json(os.path.join(folder, "transformer", "config.json"))
    needed = []
    if variant_of(config, index).experts == 2:
        needed.append("transformer_2")
    if config.get("image_dim"):
        needed += ["image_encoder", "image_processor"]
    return missing + [p for p in needed if not os.path.isdir(os.path.join(folder, p))]


@dataclasses.dataclass
class WanModel:
    """A loaded diffusers Wan folder (the modules frozen, in eval mode)."""

    transformer: torch.nn.Module | None  # WanTransformer3DModel (the high-noise expert of Wan 2.2 A14B; None when
    # only the low-noise expert was loaded)
    vae: torch.nn.Module  # AutoencoderKLWan
    text_encoder: torch.nn.Module  # UMT5EncoderModel
    tokenizer: object
    scheduler_config: dict
    variant: WanVariant
    dtype: torch.dtype
    device: torch.device
    transformer_2: torch.nn.Module | None = None  # Wan 2.2 A14B: the low-noise expert
    image_encoder: torch.nn.Module | None = None  # Wan 2.1 I2V: CLIPVisionModel
    image_processor: object = None  # Wan 2.1 I2V: CLIPImageProcessor
    boundary_ratio: float | None = None  # Wan 2.2 A14B
    expand_timesteps: bool = False  # Wan 2.2 TI2V-5B
    name: str = ""

    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]

    def pipeline(self):
        """The diffusers pipeline over these modules (``WanImageToVideoPipeline`` for image-conditioned variants)."""
        import diffusers

        cls = diffusers.WanImageToVideoPipeline if self.variant.image_conditioned else diffusers.WanPipeline
        from diffusers import UniPCMultistepScheduler

        kwargs = dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                      scheduler=UniPCMultistepScheduler.from_config(self.scheduler_config),
                      transformer=self.transformer,
                      transformer_2=self.transformer_2, boundary_ratio=self.boundary_ratio,
                      expand_timesteps=self.expand_timesteps)
        if cls is diffusers.WanImageToVideoPipeline:
            kwargs.update(image_encoder=self.image_encoder, image_processor=self.image_processor)
        return cls(**kwargs)


def load_wan(folder: str, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
             vae_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None,
             experts: tuple | None = None) -> WanModel:
    """Load a complete diffusers Wan folder (every variant above). The VAE defaults to float32 as diffusers'
    Wan examples load it. ``experts`` (Wan 2.2 A14B): the experts to load, of ``("high_noise", "low_noise")``
    (default both); the other stays None."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    missing = missing_components(folder) if os.path.isdir(folder) else ["the folder itself"]
    if missing:
        raise WanFolderError(f"{folder} is not a complete diffusers Wan folder: missing "
                             f"{', '.join(m + '/' for m in missing)}")
    device = torch.device(device)
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path) if os.path.isfile(index_path) else {}

    def sub(name):
        return os.path.join(folder, name)

    try:
        wanted = experts or EXPERT_FOLDERS
        parts = dict(
            transformer=WanTransformer3DModel.from_pretrained(sub("transformer"), torch_dtype=dtype)
            if "high_noise" in wanted else None,
            vae=AutoencoderKLWan.from_pretrained(sub("vae"), torch_dtype=vae_dtype or torch.float32),
            text_encoder=UMT5EncoderModel.from_pretrained(sub("text_encoder"), dtype=text_encoder_dtype or dtype),
            tokenizer=AutoTokenizer.from_pretrained(sub("tokenizer")),
            scheduler_config=read_json(os.path.join(sub("scheduler"), "scheduler_config.json")))
        config = read_json(os.path.join(sub("transformer"), "config.json"))
        variant = variant_of(config, index)
        if variant.experts == 2 and "low_noise" in wanted:
            parts["transformer_2"] = WanTransformer3DModel.from_pretrained(sub("transformer_2"), torch_dtype=dtype)
        if config.get("image_dim"):
            from transformers import CLIPImageProcessor, CLIPVisionModel

            parts["image_encoder"] = CLIPVisionModel.from_pretrained(sub("image_encoder"), dtype=torch.float32)
            parts["image_processor"] = CLIPImageProcessor.from_pretrained(sub("image_processor"))
    except (OSError, EnvironmentError) as e:
        raise WanFolderError(f"could not load Wan from {folder}: {' '.join(str(e).split())}") from e
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval().to(device)
    model = WanModel(**parts, variant=variant, dtype=dtype, device=device,
                     boundary_ratio=index.get("boundary_ratio") if variant.experts == 2 else None,
                     expand_timesteps=bool(index.get("expand_timesteps")),
                     name=os.path.basename(os.path.normpath(folder)))
    logger.info("loaded %s from %s (%s)", variant, folder, dtype)
    return model
