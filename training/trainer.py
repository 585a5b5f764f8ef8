"""The shared training loop: accelerate, deterministic steps, atomic checkpoints, resume, logging.

A method (``train_magicmirror.py`` ...) subclasses :class:`Trainer` and says only what differs:

* ``config_class`` — its config dataclass (extends :class:`~training.config.TrainConfig`);
* ``required_inputs`` and ``validate_inputs()`` — check the config, data and paths before any model
  loads and return what was read (``self.inputs``); bad input raises one-line
  :class:`~training.config.InputError`s, which the command line prints and exits with status 2;
* ``build()`` — load frozen models, return the trainable :class:`torch.nn.Module`;
* ``dataset()`` — a map-style dataset; ``collate(items)`` — a batch;
* ``loss(module, batch, generator) -> (loss, logs)`` — one micro-step (``module`` is the prepared,
  possibly DDP-wrapped trainable module; call it, or its ``.module``, as the method needs);
* ``export(path)`` — write the file the nodes load; ``validate(step)`` — optional.

Reproducibility: the sample order and every random draw of a micro-step come from generators
seeded by (seed, step, micro-step, rank), never from global RNG state, so a run resumed from a
checkpoint produces the same weights as one that never stopped.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
import yaml
from tqdm.auto import tqdm

from .config import InputError

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step-"
VALIDATION_FPS = 8.0  # frame rate of the validation mp4s; their dynamics (px/s) are computed at it


def use_cpu() -> bool:
    """Train on the CPU when asked (ACCELERATE_USE_CPU) or when there is no CUDA device. Several CPU
    processes (``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``) then form a gloo
    process group."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integers (step, micro-step, rank, ...)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_indices(n: int, seed: int, position: int, count: int) -> list[tuple[int, int]]:
    """(epoch, dataset index) of stream positions ``position .. position+count`` of the endless
    stream of per-epoch permutations."""
    out = []
    for p in range(position, position + count):
        epoch, offset = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append((epoch, int(perm[offset])))
    return out


def fetch(data, epoch: int, index: int):
    """``data[index]`` as seen in ``epoch`` (datasets with ``set_epoch`` vary random crops per epoch)."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    return data[index]


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


class TrainingModule(torch.nn.Module):
    """A method's trainable module; its forward computes the loss of one micro-batch (so DDP/FSDP wrappers see
    the forward). The CogVideoX specification and other frozen models (``frozen``) are plain attributes: not
    parameters of this module, so not in checkpoints, not synchronised by DDP and not moved by accelerate."""

    def __init__(self, spec, config, **frozen):
        super().__init__()
        self.spec, self.config, self.frozen = spec, config, frozen


class TrainingDataset(torch.utils.data.Dataset):
    """A method's dataset over manifest rows. Items read media and captions through the trainer
    (:meth:`Trainer.media`, :meth:`Trainer.caption`), so with ``precompute_cache`` they come from the cache;
    :meth:`cache_specs` lists what an item reads (the trainer fills the cache with it first)."""

    def __init__(self, trainer, samples, buckets):
        self.trainer, self.samples, self.config, self.epoch = trainer, samples, trainer.config, 0
        self.buckets = list(buckets)  # each item's shape (training/buckets.py; Trainer.assign_buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def generator(self, index: int) -> torch.Generator:
        from .data import item_generator

        return item_generator(self.config.seed, self.epoch, index)

    def pick(self, index: int, sampling: str | None = None) -> dict:
        """How item ``index``'s clip is read: its bucket's ``num_frames``, ``height``, ``width`` and ``sampling`` (by
        default the config's ``frame_sampling``)."""
        return dict(self.buckets[index].pick, sampling=sampling or self.config.frame_sampling)

    # Subclasses define ``cache_specs(index) -> (media, captions)``: what item ``index`` reads, the media as
    # dicts of path, num_frames, height, width, sampling (and per_frame), the captions as encoded.


class Trainer(abc.ABC):
    config_class = None
    method = "base"
    required_inputs: dict = {"model_path": "a diffusers CogVideoX folder"}  # field -> what to pass
    supported_bases: tuple = ("cogvideox",)  # models/bases.py names of the bases the method trains
    title = "this trainer"  # the method's name in messages

    def __init__(self, config):
        self.config = config
        self.accelerator = None
        self.step = 0
        self._inputs = None

    # ---------------------------------------------------------------- method hooks
    def validate_inputs(self) -> dict:
        """Check the config, model folder, data and media before anything loads or is written; return
        what was read (manifests, the transformer config) for :meth:`build`. Methods extend it (call
        ``super()``). Raises :class:`~training.config.InputError` (one line) on bad input."""
        from .inputs import check_model_folder, check_required, check_size
        from .spec import spec_class

        c = self.config
        check_required(c, self.required_inputs)
        check_size(c.num_frames, c.height, c.width)
        self.bucket_list = self.check_buckets(c.buckets)
        if c.validation_prompts:
            check_size(c.validation_num_frames, c.height, c.width, ("--validation_num_frames", "--height", "--width"))
        for name in self.batch_size_fields():
            if getattr(c, name) < 1:
                raise InputError(f"--{name}={getattr(c, name)}: must be at least 1")
        if c.gradient_accumulation_steps < 1 or c.max_steps < 1:
            raise InputError("--gradient_accumulation_steps and --max_steps must be at least 1")
        if c.precompute_cache and c.frame_sampling == "random":
            raise InputError("--precompute_cache with --frame_sampling random: a cache entry would freeze one random "
                             "window; use --frame_sampling uniform or start, or --no-precompute_cache")
        which = str(c.resume_from).strip()
        if which and which != "latest" and not which.isdigit():
            raise InputError(f"--resume_from={which!r}: use 'latest', a step number, or leave it empty")
        if which.isdigit():  # 'latest' without checkpoints starts fresh (with a warning, see resume)
            steps = [step for step, _ in list_checkpoints(self.checkpoint_dir)]
            if int(which) not in steps:
                raise InputError(f"--resume_from={which}: no checkpoint of step {int(which)} in {self.checkpoint_dir} "
                                 f"(available steps: {', '.join(map(str, steps)) or 'none'}); pass one of them, "
                                 "'latest', or leave it empty for a fresh run")
        if os.path.isfile(c.output_dir):
            raise InputError(f"--output_dir {c.output_dir} is a file; pass a folder (it is created if missing)")
        needs = {"tensorboard": (c.report_to == "tensorboard", "--report_to tensorboard", "or pass --report_to none"),
                 "bitsandbytes": (c.use_8bit_adam, "--use_8bit_adam", "CUDA only; or pass --no-use_8bit_adam")}
        for package, (wanted, option, hint) in needs.items():
            if wanted and importlib.util.find_spec(package) is None:
                raise InputError(f"{option} needs the {package} package: pip install {package} ({hint})")
        folder = check_model_folder(c.model_path, bases=self.supported_bases, method=self.title)
        spec = spec_class(folder["base"])
        spec.check_config(c, folder)
        self.spatial_multiple = folder["spatial_multiple"]
        self.check_bucket_sides(self.bucket_list)
        from .parallel import check_context_parallel

        self.check_context_parallel = functools.partial(check_context_parallel, c.cp_degree, spec, folder)
        self.check_context_parallel(self.sequence_shapes())
        return folder

    # ---------------------------------------------------------------- buckets (training/buckets.py)
    spatial_multiple = 16  # the model folder's (validate_inputs)
    check_context_parallel = None  # training/parallel.py's check for this model and --cp_degree (validate_inputs)
    bucket_list: list | str = []  # --buckets as read (validate_inputs)

    @staticmethod
    def check_buckets(values, option: str = "--buckets", *, spatial: bool = False):
        """``--buckets`` read and each shape checked (4k+1 frames, sides multiples of 16): a list of buckets, ``auto``
        or ``[]``."""
        from .buckets import parse_buckets
        from .inputs import check_size

        buckets = parse_buckets(values, option, spatial=spatial)
        for b in buckets if isinstance(buckets, list) else []:
            check_size(b.frames, b.height, b.width, (f"{option} {b}",) * 3)
        return buckets

    def check_bucket_sides(self, buckets, option: str = "--buckets") -> None:
        """Bucket sides the base's VAE and patch size divide (Wan 2.2 TI2V-5B: 32)."""
        m = self.spatial_multiple
        for b in buckets if isinstance(buckets, list) else []:
            if b.height % m or b.width % m:
                raise InputError(f"{option} {b}: this model needs sides that are multiples of {m} (VAE x patch); use "
                                 f"e.g. {b.frames}x{max(m, b.height // m * m)}x{max(m, b.width // m * m)}")

    @property
    def checked_frames(self) -> int:
        """The frames every clip must have (``check_media``): ``num_frames``, or 1 with buckets (a clip shorter than
        every bucket is left out by :meth:`assign_buckets`)."""
        return 1 if self.bucket_list else self.config.num_frames

    def assign_buckets(self, samples, option: str, *, keys=("media",), images: bool = False, buckets=None,
                       bucket_option: str = "--buckets", default=None) -> tuple[list, list]:
        """``(samples, their buckets)`` for a dataset: with ``--buckets`` (or ``buckets``, given as
        ``bucket_option``) each sample's nearest (samples no bucket fits left out; none fitting is an
        :class:`InputError`), ``images``: the buckets' sizes at one frame; without, every sample at ``default`` (the
        config's shape; images: 1 frame)."""
        from .buckets import AUTO, Bucket, derive_buckets, media_shape
        from .buckets import assign_buckets as assign

        c = self.config
        buckets = self.bucket_list if buckets is None else buckets
        if not buckets:
            default = default or Bucket(1 if images else c.num_frames, c.height, c.width)
            return list(samples), [default] * len(samples)
        shape_of = functools.cache(media_shape)  # each file's header read once (auto buckets, then assignment)
        if buckets == AUTO:
            buckets = derive_buckets([shape_of(s.media) for s in samples], num_frames=1 if images else c.num_frames,
                                     height=c.height, width=c.width, multiple=self.spatial_multiple)
        if images:
            buckets = list(dict.fromkeys(b.still() for b in buckets))
        samples, assigned = assign(samples, buckets, option=option, keys=keys, shape_of=shape_of)
        if self.check_context_parallel is not None:  # --cp_degree must split every bucket a sample trains at
            try:
                self.check_context_parallel([(b.frames, b.height, b.width) for b in assigned],
                                            sizes_from=f"{bucket_option} entry")
            except InputError as e:
                raise InputError(f"{bucket_option} (the samples of {option}): {e}") from None
        return samples, assigned

    @property
    def inputs(self) -> dict:
        """What :meth:`validate_inputs` read (validated on first use)."""
        if self._inputs is None:
            self._inputs = self.validate_inputs()
        return self._inputs

    def batch_size_fields(self) -> tuple:
        """Config fields holding batch sizes (samples per device per micro-step)."""
        return ("batch_size",)

    def sequence_shapes(self) -> list[tuple[int, int, int]]:
        """(frames, height, width) of every clip size the method trains on (context parallelism must split each)."""
        c = self.config
        return [(c.num_frames, c.height, c.width)]

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel groups: the processes over the context-parallel degree (each CP group shares its samples)."""
        return self.accelerator.num_processes // self.config.cp_degree

    @property
    def data_parallel_rank(self) -> int:
        """This process's data-parallel group (consecutive ranks form a CP group, ``training/parallel.py``)."""
        return self.accelerator.process_index // self.config.cp_degree

    def effective_batch(self) -> str:
        c, n = self.config, self.data_parallel_size if self.accelerator else 1
        return ", ".join(f"{name} {getattr(c, name) * c.gradient_accumulation_steps * n}"
                         for name in self.batch_size_fields())

    @abc.abstractmethod
    def build(self) -> torch.nn.Module:
        """Load the frozen models and return the trainable module (its forward computes the loss)."""

    @abc.abstractmethod
    def dataset(self):
        """A map-style dataset of training items."""

    def collate(self, items: list) -> dict:
        return torch.utils.data.default_collate(items)

    def next_batch(self, data, step: int, micro: int) -> dict:
        """The batch of (step, micro-step) for this rank: one bucket, a deterministic slice of its shuffled stream
        (:class:`~.buckets.BucketSampler`; the ranks of a context-parallel group draw the same slice)."""
        c = self.config
        slot = step * c.gradient_accumulation_steps + micro
        picks = self.sampler(data).indices(slot, self.data_parallel_rank, self.data_parallel_size, c.batch_size)
        return self.collate([fetch(data, e, i) for e, i in picks])

    def sampler(self, data, stream: int = 0):
        """The :class:`~.buckets.BucketSampler` of ``data`` (its items' ``buckets``); ``stream`` keeps the draws of
        several datasets apart."""
        from .buckets import BucketSampler

        samplers = self.__dict__.setdefault("_samplers", {})
        if stream not in samplers or samplers[stream][0] is not data:  # (a dataset's buckets are fixed when built)
            buckets = list(getattr(data, "buckets", None) or [None] * len(data))
            samplers[stream] = (data, BucketSampler(buckets, self.config.seed, stream))
        return samplers[stream][1]

    def backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` of a micro-step's loss. With context parallelism each rank's gradients are its
        sequence share's part of the gradient: the loss is multiplied by the CP degree, so DDP's / FSDP's mean over
        all processes becomes the sum over each CP group averaged over the data-parallel groups."""
        cp = self.config.cp_degree
        self.accelerator.backward(loss * cp if cp > 1 else loss)

    def before_optimizer_step(self, step: int) -> None:
        """Optional: edit gradients after backward (all micro-steps), before the optimizer step."""

    def after_step(self, step: int, logs: dict) -> None:
        """Optional per-step work after the optimizer step (e.g. monitors); may add to ``logs``."""

    def before_export(self) -> None:
        """Optional work on every process before the main process exports (e.g. gathering sharded weights)."""

    def finish(self) -> None:
        """Optional work on the main process after export (plots, reports)."""

    def loss(self, module, batch, generator) -> tuple[torch.Tensor, dict]:
        """One micro-step: (loss, logs). By default the prepared module's forward computes it, so
        DDP/FSDP wrappers see the forward and synchronise gradients."""
        return module(batch, generator)

    @abc.abstractmethod
    def export(self, path: str) -> list[str] | None:
        """Write the trained weights in the format the nodes load, at ``path`` (or several files beside it: return
        their paths)."""

    def export_name(self) -> str:
        return f"{self.method}.safetensors"

    def validate(self, step: int) -> None:
        """Optional: validation videos through the nodes' sampler (see :meth:`validation_videos`)."""

    def validation_videos(self, model, step: int, *, trigger: str | None = None, image=None) -> list[torch.Tensor]:
        """Sample every validation prompt with ``model`` (the bundle with the method's patch) through the nodes'
        sampler, write ``validation/step-<step>-<i>.mp4`` and return the frames [F, H, W, 3] in 0..1."""
        from ..models.sampler import decode_latents, sample_video
        from ..models.text import encode_prompt
        from ..models.video_io import write_video

        c, videos = self.config, []
        for i, prompt in enumerate(c.validation_prompts):
            positive = encode_prompt(self.bundle, prompt, trigger=trigger)
            latents = sample_video(model, positive, num_frames=c.validation_num_frames, height=c.height, width=c.width,
                                   steps=c.validation_steps_sampling, cfg=6.0, seed=c.seed, image=image)
            frames = decode_latents(self.bundle, latents)[0]
            write_video(os.path.join(c.output_dir, "validation", f"step-{step:08d}-{i}.mp4"), frames, fps=VALIDATION_FPS)
            videos.append(frames)
        return videos

    def clip_i_metrics(self, clip_model, videos: list, reference: torch.Tensor) -> list:
        """``VideoMetrics`` of each video under ``validation_protocol``: its CLIP-I to ``reference`` (IMAGE
        [1, H, W, 3]) on the protocol's frames, dynamics and dynamic degree (at the validation files' frame rate)."""
        from ..models.metrics import evaluate_video

        return [evaluate_video(v, protocol=self.config.validation_protocol, fps=VALIDATION_FPS, clip_model=clip_model,
                               clip_references=reference) for v in videos]

    def log_validation_metrics(self, step: int, metrics: list) -> dict:
        """The mean of each metric (``VideoMetrics.scalars()``) over the validation videos: logged as
        ``validation/<name>`` (TensorBoard) and written to ``validation/step-<step>.json``; returned."""
        import json

        names = {k for m in metrics for k in m.scalars()}
        means = {f"validation/{k}": sum(v) / len(v) for k in sorted(names)
                 if (v := [m.scalars()[k] for m in metrics if k in m.scalars()])}
        if self.config.report_to != "none" and means:
            self.accelerator.log(means, step=step)
        folder = os.path.join(self.config.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step-{step:08d}.json"), "w") as f:
            json.dump({"step": step, "means": means, "videos": [m.as_dict() for m in metrics]}, f, indent=2)
        return means

    # ---------------------------------------------------------------- setup
    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision, torch.float32)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.config.output_dir, "checkpoints")

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        c = self.config
        log_with = "tensorboard" if c.report_to == "tensorboard" else None  # installed: see validate_inputs
        from accelerate.utils import DistributedDataParallelKwargs

        # Some adapter parts (e.g. identity-token fusion) are unused by samples without a trigger word.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        return Accelerator(cpu=use_cpu(), mixed_precision=c.mixed_precision, log_with=log_with, kwargs_handlers=[ddp],
                           gradient_accumulation_steps=c.gradient_accumulation_steps,
                           project_config=ProjectConfiguration(project_dir=c.output_dir,
                                                               logging_dir=os.path.join(c.output_dir, "logs")))

    def _optimizer(self, params):
        c = self.config
        kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay,
                      eps=c.adam_epsilon)
        if c.use_8bit_adam:
            import bitsandbytes as bnb  # installed: see validate_inputs

            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _scheduler(self, optimizer):
        from diffusers.optimization import get_scheduler

        c = self.config
        n = self.accelerator.num_processes  # accelerate steps a prepared scheduler once per process
        return get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps * n,
                             num_training_steps=c.max_steps * n, num_cycles=c.lr_num_cycles)

    def load_base(self):
        """Load the frozen base model of ``model_path`` through its training specification (:func:`~.spec.load_spec`:
        CogVideoX or Wan, weights in the mixed-precision dtype) as ``self.spec`` and return it; CogVideoX's bundle
        (validation sampling) is ``self.bundle``."""
        from .spec import load_spec

        self.spec = load_spec(self.config.model_path, dtype=self.weight_dtype, device=self.device, config=self.config)
        self.bundle = getattr(self.spec, "bundle", None)
        return self.spec

    def context_parallel_models(self, module: torch.nn.Module) -> list:
        """The transformers context parallelism splits: the specification's (methods add frozen copies they run)."""
        return list(self.spec.transformers)

    def enable_context_parallel(self, module: torch.nn.Module) -> None:
        """With ``--cp_degree N > 1``: diffusers' context parallelism on :meth:`context_parallel_models` (see
        ``training/parallel.py``)."""
        from .parallel import enable_context_parallel

        if self.config.cp_degree > 1:
            enable_context_parallel(self.context_parallel_models(module), self.config.cp_degree, self.device.type,
                                    self.accelerator.num_processes)

    def shard_frozen_model(self, module: torch.nn.Module) -> None:
        """Under FSDP, make the frozen transformers part of the wrapped module, so they are sharded too (each block its
        own FSDP unit with the accelerate config's TRANSFORMER_BASED_WRAP on the spec's ``block_class``: fsdp.yaml
        for CogVideoXBlock, fsdp_wan.yaml for WanTransformerBlock); otherwise they stay outside (DDP would only
        replicate them)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            module.transformers = torch.nn.ModuleList(self.spec.transformers)

    def single_process(self):
        """A block that runs on one process (validation sampling): the transformers without context parallelism."""
        import contextlib

        from ..models.context_parallel import context_parallel_suspended

        if self.config.cp_degree == 1:
            return contextlib.nullcontext()
        return context_parallel_suspended(self.context_parallel_models(self.module))

    # ---------------------------------------------------------------- media and captions (precompute cache)
    cache = None
    vae_needed_with_cache = False  # the loss decodes latents (MagicMirror's identity loss)

    def media(self, key: str, path: str, *, num_frames: int, height: int, width: int, sampling: str,
              generator: torch.Generator, per_frame: bool = False, mode: bool = False) -> dict:
        """``{key: pixels [F, 3, H, W]}``, or with the cache ``{cached_key(key): latents}``: a posterior draw from
        ``generator`` (``mode``: the posterior mean), [C, T, h, w] (``per_frame``: [F, C, h, w], every picked
        frame encoded alone)."""
        from .data import load_media
        from .spec import cached_key

        pick = dict(num_frames=num_frames, height=height, width=width, sampling=sampling)
        if self.cache is None:
            return {key: load_media(path, generator=generator, **pick)}
        return {cached_key(key): self.cache.latents(path, generator, per_frame=per_frame, mode=mode, **pick)}

    def image_condition(self, path: str, *, clip_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict:
        """The first frame of ``path`` as the image condition of a ``clip_frames``-frame clip: ``{"first_frame":
        [3, H, W]}``, or with the cache what the specification made of it (:meth:`~.spec.ModelSpec.
        image_condition_item`)."""
        from .data import load_media

        if self.cache is None:
            return {"first_frame": load_media(path, num_frames=1, height=height, width=width, sampling="start")[0]}
        entry = self.cache.image_condition(path, clip_frames=clip_frames, height=height, width=width)
        return self.spec.image_condition_item(entry, generator)

    def caption(self, text: str, tokenizer=None) -> dict:
        """The caption's tokens for the text encoder (``tokenizer``: a copy of the model's, e.g. with extra
        tokens), or with the cache ``{"prompt_embeds"}``."""
        if self.cache is None:
            return self.spec.tokenize(text, tokenizer)
        return {"prompt_embeds": self.cache.text(text)}

    def fill_cache(self) -> None:
        """Encode what every dataset item reads (main process first, the others read it), then move the text
        encoder (and the VAE unless the loss decodes) off the device."""
        from .cache import TrainingCache

        c, acc, spec = self.config, self.accelerator, self.spec
        data = self.dataset()
        media, captions = [], []
        for ds in data.values() if isinstance(data, dict) else [data]:
            for i in range(len(ds)):
                m, t = ds.cache_specs(i)
                media += m
                captions += t
        media = list({tuple(sorted(m.items())): m for m in media}.values())
        captions = list(dict.fromkeys(captions))
        self.cache = TrainingCache(c.cache_dir or os.path.join(c.output_dir, "cache"),
                                   model_id=os.path.abspath(c.model_path), spec=spec)
        with acc.main_process_first():
            self.cache.fill(media, captions, tokenizer=getattr(self, "tokenizer", None), progress=acc.is_main_process)
        spec.offload_encoders(keep_vae=self.vae_needed_with_cache)  # validation brings them back for its prompts
        logger.info("precompute cache: %d media and %d captions in %s", len(media), len(captions),
                    self.cache.store.root)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Save a resumable checkpoint atomically: written to a temp folder, then renamed."""
        acc = self.accelerator
        final = os.path.join(self.checkpoint_dir, f"{CHECKPOINT_PREFIX}{self.step:08d}")
        tmp = os.path.join(self.checkpoint_dir, f".tmp-{CHECKPOINT_PREFIX}{self.step:08d}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        if acc.is_main_process:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": self.step, "method": self.method, "config": dataclasses.asdict(self.config)}, f,
                          indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            limit = self.config.checkpoints_total_limit
            if limit > 0:
                for _, old in list_checkpoints(self.checkpoint_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        which = str(self.config.resume_from).strip()
        if not which:
            return
        found = list_checkpoints(self.checkpoint_dir)
        if which == "latest":
            if not found:
                logger.warning("resume_from=latest: no checkpoint in %s, starting fresh", self.checkpoint_dir)
                return
            step, path = found[-1]
        else:
            matches = [(s, p) for s, p in found if s == int(which)]
            if not matches:
                raise SystemExit(f"resume_from={which}: no such checkpoint in {self.checkpoint_dir} "
                                 f"(available steps: {[s for s, _ in found] or 'none'})")
            step, path = matches[0]
        self.accelerator.load_state(path)
        self.step = step
        logger.info("resumed from %s (step %d)", path, step)

    def check_ranks_in_sync(self, params) -> None:
        """With several processes, verify every rank ends with the same trainable weights."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        sums = torch.stack([p.detach().double().sum() for p in params] +
                           [p.detach().double().square().sum() for p in params]).to(acc.device)
        gathered = acc.gather(sums[None]).cpu()  # [world, 2 * n_params]
        if acc.is_main_process:
            if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
                raise RuntimeError("trainable weights differ between ranks after training")
            logger.info("all %d ranks hold identical trainable weights (checksum %.12e)", acc.num_processes,
                        float(gathered[0].sum()))

    # ---------------------------------------------------------------- loop
    def train(self) -> str:
        c = self.config
        self.inputs  # noqa: B018 - bad input stops here: before any model loads or anything is written
        self.accelerator = acc = self._make_accelerator()
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.makedirs(c.output_dir, exist_ok=True)
        if acc.is_main_process:
            with open(os.path.join(c.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(dataclasses.asdict(c), f, sort_keys=False)
        torch.manual_seed(c.seed)  # parameter init of new modules is reproducible too
        module = self.build()
        self.enable_context_parallel(module)
        if c.precompute_cache:
            self.fill_cache()
        self.shard_frozen_model(module)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        scheduler = self._scheduler(optimizer)
        module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
        self.module = module
        data = self.dataset()
        n_samples = sum(map(len, data.values())) if isinstance(data, dict) else len(data)
        if n_samples == 0:
            raise SystemExit(f"no training samples in {c.data}")
        self.resume()
        if acc.is_main_process and c.report_to != "none":
            acc.init_trackers(self.method, config={k: v for k, v in dataclasses.asdict(c).items()
                                                   if isinstance(v, (int, float, str, bool))})
        n_params = sum(p.numel() for p in params)
        logger.info("%s: %d trainable parameters, %d samples, %d steps (effective batch: %s)", self.method, n_params,
                    n_samples, c.max_steps, self.effective_batch())
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not acc.is_main_process, desc=self.method)
        module.train()
        rank, ranks = self.data_parallel_rank, self.data_parallel_size  # a CP group's ranks share samples and noise
        started = time.perf_counter()
        while self.step < c.max_steps:
            logs_sum: dict = {}
            for micro in range(c.gradient_accumulation_steps):
                batch = self.next_batch(data, self.step, micro)
                # keyed by the sample's place in the global batch: N processes x 1 micro-step draw what 1 process
                # x N micro-steps draws, so data-parallel runs reproduce single-process runs
                generator = step_generator(c.seed, self.step, micro * ranks + rank)
                with acc.accumulate(module):
                    loss, logs = self.loss(module, batch, generator)
                    self.backward(loss)
                    if acc.sync_gradients:
                        self.before_optimizer_step(self.step)
                    if acc.sync_gradients and c.max_grad_norm > 0:
                        acc.clip_grad_norm_([p for p in params if p.grad is not None], c.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **logs}.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / c.gradient_accumulation_steps
            self.step += 1
            bar.update(1)
            logs_sum["lr"] = scheduler.get_last_lr()[0]
            self.after_step(self.step, logs_sum)
            self.last_logs = logs_sum
            if not math.isfinite(logs_sum["loss"]):
                raise SystemExit(f"loss became {logs_sum['loss']} at step {self.step}; lower the learning rate")
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs_sum.items() if k in ("loss", "lr")})
            if c.logging_steps and self.step % c.logging_steps == 0 and c.report_to != "none":
                acc.log(logs_sum, step=self.step)
            if c.checkpointing_steps and self.step % c.checkpointing_steps == 0:
                self.save_checkpoint()
            if c.validation_steps and self.step % c.validation_steps == 0 and acc.is_main_process:
                with self.single_process():
                    self.validate(self.step)
        bar.close()
        acc.wait_for_everyone()
        self.check_ranks_in_sync(params)
        self.before_export()
        out = os.path.join(c.output_dir, self.export_name())
        self.exported = [out]
        if acc.is_main_process:
            self.exported = self.export(out) or [out]
            if c.validation_prompts and not c.validation_steps:
                with self.single_process():
                    self.validate(self.step)
            self.finish()
            logger.info("trained %d steps in %.1f s; exported %s", self.step, time.perf_counter() - started,
                        ", ".join(self.exported))
        acc.end_training()
        return self.exported[0]


def cli_main(trainer_class, argv, presets: dict, *, description: str, build_tiny=None, use_hint: str = "") -> int:
    """The command line of a trainer: resolve the config, build the tiny demo data when asked, train
    (inputs are validated first), and say where the export goes. Bad input prints one line to stderr
    and returns 2. Returns the process exit code (console entry points pass it to ``sys.exit``)."""
    from .config import load_config

    try:
        config = load_config(trainer_class.config_class, argv, presets, description=description)
        if getattr(config, "tiny_demo", False) and build_tiny is not None:
            config = build_tiny(config)
        trainer = trainer_class(config)
        exported = [trainer.train()]
    except InputError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    use_hint = getattr(trainer, "use_hint", None) or use_hint  # a trainer may say where its export goes
    print(f"exported {' and '.join(getattr(trainer, 'exported', exported))}{': ' + use_hint if use_hint else ''}")
    return 0


class TaskSwitchingTrainer(Trainer):
    """Two datasets, one task per optimizer step: ``second`` with probability ``switch_prob``.

    ``dataset()`` returns ``{first: ds, second: ds}``; the task of a step comes from (seed, step),
    so every rank and every resumed run agree, and each task walks its own shuffled stream with its
    own batch size (``task_batch_sizes``: task -> config field).
    """

    tasks: tuple = ("first", "second")
    task_batch_sizes: dict = {}

    @property
    def switch_prob(self) -> float:
        raise AttributeError  # pragma: no cover - subclasses define it

    def batch_size_fields(self) -> tuple:
        return tuple(self.task_batch_sizes[t] for t in self.tasks)

    def task_of(self, step: int) -> str:
        u = torch.rand(1, generator=step_generator(self.config.seed, step, -1)).item()
        return self.tasks[1] if u < self.switch_prob else self.tasks[0]

    def next_batch(self, data, step: int, micro: int) -> dict:
        c = self.config
        kind = self.task_of(step)
        size = getattr(c, self.task_batch_sizes[kind])
        if not hasattr(self, "_task_counts"):
            self._task_counts = [0]  # _task_counts[s] = earlier steps of task tasks[1] before step s
        while len(self._task_counts) <= step:
            s = len(self._task_counts) - 1
            self._task_counts.append(self._task_counts[-1] + (self.task_of(s) == self.tasks[1]))
        done = self._task_counts[step] if kind == self.tasks[1] else step - self._task_counts[step]
        slot = done * c.gradient_accumulation_steps + micro
        picks = self.sampler(data[kind], self.tasks.index(kind)).indices(slot, self.data_parallel_rank,
                                                                          self.data_parallel_size, size)
        return self.collate([fetch(data[kind], e, i) for e, i in picks], kind)
