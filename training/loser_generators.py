"""Loser generators of the GT-Pair builder: the base model that makes a pair's loser from the winner's first
frame and caption (``training/build_gt_pairs.py``).

One generator per diffusers folder, chosen by the folder's base (``models/bases.detect_base``):

* :class:`CogVideoXLoserGenerator`: the pack's own sampler (``models/sampler.sample_video``, DDIM or DPM), I2V
  when the folder is image-to-video.
* :class:`WanLoserGenerator`: diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` (``WanModel.pipeline()``);
  the image-conditioned variants (Wan 2.1 I2V, 2.2 I2V A14B, 2.2 TI2V-5B as image-to-video) start from the
  first frame.

What a run must refuse (an unknown or incomplete folder, a frame count or size the generator's VAE and patches
cannot take) is read from the folder's JSON, so it is checked before any weights load. ``loaded(settings)``
loads a generator's weights for a block of work and frees them afterwards (one generator in memory at a time).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import gc
import logging
import os
import re
from typing import ClassVar

import torch

from .config import InputError

logger = logging.getLogger(__name__)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a generator's name is part of its losers' file names


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How every generator of a run samples (the format is the pairs' own, shared by all generators)."""

    num_frames: int
    height: int
    width: int
    steps: int = 50
    cfg: float | None = None  # None: each generator's own default (CogVideoX 6, Wan 5)
    scheduler: str = "ddim"  # CogVideoX's sampler (ddim/dpm); Wan samples with its folder's scheduler
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "cpu"
    progress: bool = False


class LoserGenerator(abc.ABC):
    """A base model that generates losers: ``generate(caption, first_frame, seed)`` -> frames [F, H, W, 3] 0..1.

    Built from a folder (weights loaded by :meth:`loaded`) or around a model already loaded (kept loaded).
    """

    base: ClassVar[str]
    #: the pairs' format and guidance this base is sampled at unless the user says otherwise
    defaults: ClassVar[dict]

    @staticmethod
    @abc.abstractmethod
    def missing_components(folder: str) -> list[str]:
        """The sub-folders ``folder`` lacks for this base (empty when complete)."""

    def __init__(self, name: str, folder: str | None = None, model=None):
        self.name, self.folder, self.model = name, folder, model
        self.settings: GenerationSettings | None = None

    # ---- what the configs say (no weights)
    @property
    @abc.abstractmethod
    def variant(self) -> str:
        """The model's variant in words (e.g. ``CogVideoX-5B I2V``, ``Wan2.1-I2V-14B``)."""

    @property
    @abc.abstractmethod
    def image_conditioned(self) -> bool:
        """True when the loser starts from the winner's first frame (else from the caption alone)."""

    @property
    @abc.abstractmethod
    def factors(self) -> tuple[int, int, int, str]:
        """(temporal VAE factor, height multiple, width multiple, how the multiples arise)."""

    def check_format(self, num_frames: int, height: int, width: int,
                     options: tuple = ("--num_frames", "--height", "--width")) -> None:
        """The frame count is 4k+1 for the generator's VAE (k = its temporal factor) and the sides multiples of its
        VAE spatial factor × patch size; else one InputError line naming the option and the nearest valid values."""
        temporal, mult_h, mult_w, why = self.factors
        if num_frames < 1 or (num_frames - 1) % temporal:
            lo = max(1, (num_frames - 1) // temporal * temporal + 1)
            raise InputError(f"{options[0]}: num_frames={num_frames} is not of the form {temporal}k+1 for generator "
                             f"{self.name} ({self.variant}: its VAE compresses time by {temporal}); use {lo} or "
                             f"{lo + temporal}")
        for option, side, value, mult in (options[1:2] + ("height", height, mult_h),
                                          options[2:3] + ("width", width, mult_w)):
            if value < mult or value % mult:
                lo = max(mult, value // mult * mult)
                raise InputError(f"{option}: {side}={value} is not a multiple of {mult} for generator {self.name} "
                                 f"({self.variant}: {why}); use {lo} or {lo + mult}")

    # ---- weights
    @contextlib.contextmanager
    def loaded(self, settings: GenerationSettings):
        """The generator ready to :meth:`generate` with ``settings``; weights it loaded are freed on exit."""
        owned = self.model is None
        if owned:
            logger.info("loading loser generator %s (%s) from %s", self.name, self.variant, self.folder)
            self.model = self._load(settings)
        self.settings = settings
        try:
            self._prepare()
            yield self
        finally:
            self._release()
            self.settings = None
            if owned:
                self.model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @abc.abstractmethod
    def _load(self, settings: GenerationSettings):
        """Load the folder's weights in ``settings.dtype`` on ``settings.device``."""

    def _prepare(self) -> None:
        """Set up what :meth:`generate` runs on, once the model is loaded."""

    def _release(self) -> None:
        """Drop what :meth:`_prepare` set up."""

    @property
    def cfg(self) -> float:
        return self.defaults["cfg"] if self.settings.cfg is None else self.settings.cfg

    @abc.abstractmethod
    def generate(self, caption: str, first_frame: torch.Tensor, seed: int) -> torch.Tensor:
        """The loser for ``caption`` from ``first_frame`` ([H, W, 3] 0..1; used by image-conditioned generators)
        with a CPU generator seeded ``seed``: frames [num_frames, height, width, 3] float 0..1."""


class CogVideoXLoserGenerator(LoserGenerator):
    """CogVideoX 1.0 / 1.5, T2V or I2V, through the pack's sampler and VAE decode."""

    base = "cogvideox"
    defaults = {"num_frames": 49, "fps": 8.0, "height": 480, "width": 720, "cfg": 6.0}

    @staticmethod
    def missing_components(folder):
        from ..models.cogvideox import missing_components

        return missing_components(folder)

    def __init__(self, name: str, folder: str | None = None, model=None):
        super().__init__(name, folder, model)
        if model is not None:
            self.transformer_config, self.vae_config = dict(model.transformer.config), dict(model.vae.config)
        else:
            self.transformer_config = _read_config(folder, "transformer")
            self.vae_config = _read_config(folder, "vae")

    @property
    def variant(self) -> str:
        from ..models.cogvideox import variant_of

        return str(variant_of(_Config(self.transformer_config)))

    @property
    def image_conditioned(self) -> bool:
        return self.transformer_config["in_channels"] == 2 * self.transformer_config["out_channels"]

    @property
    def factors(self):
        vae = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        patch = self.transformer_config["patch_size"]
        return (self.vae_config.get("temporal_compression_ratio", 4), vae * patch, vae * patch,
                f"{vae}x VAE downsampling times {patch}x{patch} patches")

    def _load(self, settings):
        from ..models.cogvideox import load_cogvideox

        return load_cogvideox(self.folder, dtype=settings.dtype, device=settings.device)

    def generate(self, caption, first_frame, seed):
        from ..models.sampler import decode_latents, sample_video
        from ..models.text import encode_prompt

        s = self.settings
        latents = sample_video(self.model, encode_prompt(self.model, caption), num_frames=s.num_frames,
                               height=s.height, width=s.width, steps=s.steps, cfg=self.cfg, seed=seed,
                               scheduler=s.scheduler, image=first_frame[None] if self.image_conditioned else None)
        return decode_latents(self.model, latents)[0]


class WanLoserGenerator(LoserGenerator):
    """Wan 2.1 / 2.2 (T2V, I2V, A14B's two experts, TI2V-5B as image-to-video) through diffusers' own pipeline."""

    base = "wan"
    defaults = {"num_frames": 81, "fps": 16.0, "height": 480, "width": 832, "cfg": 5.0}

    @staticmethod
    def missing_components(folder):  # the five every Wan has, A14B's transformer_2/, Wan 2.1 I2V's CLIP branch
        from ..models.wan import missing_components

        return missing_components(folder)

    def __init__(self, name: str, folder: str | None = None, model=None):
        super().__init__(name, folder, model)
        if model is not None:
            self.wan_variant = model.variant
            self.transformer_config, self.vae_config = dict(model.transformer.config), dict(model.vae.config)
        else:
            from ..models.wan import folder_variant

            self.wan_variant = folder_variant(folder)
            self.transformer_config = _read_config(folder, "transformer")
            self.vae_config = _read_config(folder, "vae")
        self.pipe = None

    @property
    def variant(self) -> str:
        return str(self.wan_variant)

    @property
    def image_conditioned(self) -> bool:
        return self.wan_variant.image_conditioned

    @property
    def factors(self):  # as diffusers' Wan pipelines compute their multiples
        vae = self.vae_config.get("scale_factor_spatial") or 8
        _, p_h, p_w = self.transformer_config["patch_size"]
        return (self.vae_config.get("scale_factor_temporal") or 4, vae * p_h, vae * p_w,
                f"{vae}x VAE downsampling times {p_h}x{p_w} patches")

    def _load(self, settings):
        from ..models.wan import load_wan

        return load_wan(self.folder, dtype=settings.dtype, device=settings.device)

    def _prepare(self):
        self.pipe = self.model.pipeline()
        self.pipe.set_progress_bar_config(disable=not self.settings.progress, leave=False)

    def _release(self):
        self.pipe = None

    def generate(self, caption, first_frame, seed):
        from PIL import Image

        s = self.settings
        kwargs = dict(prompt=caption, height=s.height, width=s.width, num_frames=s.num_frames,
                      num_inference_steps=s.steps, guidance_scale=self.cfg,
                      generator=torch.Generator().manual_seed(seed), output_type="np")
        if self.image_conditioned:  # the first frame as the PNG the manifest lists holds it
            kwargs["image"] = Image.fromarray((first_frame * 255).round().to(torch.uint8).cpu().numpy())
        return torch.from_numpy(self.pipe(**kwargs).frames[0])  # [F, H, W, 3] 0..1


GENERATORS = {g.base: g for g in (CogVideoXLoserGenerator, WanLoserGenerator)}


class _Config(dict):
    """A config dict read like a diffusers FrozenDict (attribute access), for ``variant_of``."""

    def __getattr__(self, key):
        return self.get(key)


def _read_config(folder: str, component: str) -> dict:
    from ..models.bases import read_json

    return read_json(os.path.join(folder, component, "config.json"))


def folder_generator(path: str, name: str | None = None, option: str = "--model_path") -> LoserGenerator:
    """The generator of a diffusers CogVideoX or Wan folder, from its JSON only (nothing loaded). Bad input
    (no folder, an unknown base, a missing component, a name unfit for file names) is one InputError line."""
    from ..models.bases import BASE_NAMES, UnknownBaseError, detect_base

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise InputError(f"{option}: model folder not found: {path} (pass a diffusers CogVideoX or Wan folder)")
    name = name or os.path.basename(os.path.normpath(path))
    check_name(name, option)
    try:
        base = detect_base(path)
    except UnknownBaseError as e:
        raise InputError(f"{option}: {e}; pass a diffusers CogVideoX or Wan folder") from None
    cls = GENERATORS[base]
    missing = cls.missing_components(path)
    if missing:
        raise InputError(f"{option}: {path} is not a complete diffusers {BASE_NAMES[base]} folder: missing "
                         f"{', '.join(m + '/' for m in missing)} (download every sub-folder of the model's diffusers "
                         "repository)")
    try:
        return cls(name, folder=path)
    except UnknownBaseError as e:  # an unreadable config.json
        raise InputError(f"{option}: {e}") from None


def loaded_generator(model, name: str | None = None) -> LoserGenerator:
    """A generator around a model already loaded (a ``CogVideoXBundle`` or a ``WanModel``); it stays loaded."""
    from ..models.cogvideox import CogVideoXBundle
    from ..models.wan import WanModel

    for cls, kind in ((CogVideoXLoserGenerator, CogVideoXBundle), (WanLoserGenerator, WanModel)):
        if isinstance(model, kind):
            return cls(name or model.name or cls.base, model=model)
    raise TypeError(f"expected a loaded CogVideoXBundle or WanModel, got {type(model).__name__}")


def check_name(name: str, option: str) -> None:
    if not NAME_PATTERN.match(name):
        raise InputError(f"{option}: generator name {name!r} cannot be part of a file name; use letters, digits, "
                         "'.', '_' and '-' (--generator NAME=PATH names it)")
