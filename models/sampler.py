"""The CogVideoX sampling loop shared by the ComfyUI nodes, the trainers' validation and the demo.

It follows diffusers' ``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline`` step for step
(same noise draw order, timesteps, CFG and scheduler calls), so for the same seed the two give
the same latents; tests hold it to that. Patches recorded on the bundle are applied for the run
and always removed afterwards. A run checks its interrupt before every transformer block (and the decode before every
decoder call), and a request whose activations (:mod:`.memory`) cannot fit on the execution device is refused before
anything runs, naming the largest size that fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch

from .block_runner import block_runner, checked_calls
from .memory import transformer_activation_bytes, vae_decode_activation_bytes, vae_encode_activation_bytes
from .patches import SamplingContext, applied_patches, conditional_only, patch_models, patch_outputs
from .placement import GIB, STREAMED_MODES
from .speed import applied_speed, check_speed, check_steps
from .text import TextConditioning

logger = logging.getLogger(__name__)
SCHEDULERS = ("ddim", "dpm")


class SamplingInputError(ValueError):
    """Bad sampling parameters (frame count, size, missing image...)."""


def check_video_size(num_frames: int, height: int, width: int) -> None:
    """CogVideoX needs 4k+1 frames and sides that are multiples of 16 (8x VAE, 2x2 patches)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        lo = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise SamplingInputError(
            f"num_frames={num_frames} is not of the form 4k+1 (the VAE compresses time by 4); "
            f"use {lo} or {lo + 4}.")
    for side, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            lo = max(16, v // 16 * 16)
            raise SamplingInputError(
                f"{side}={v} is not a multiple of 16 (8x VAE downsampling times 2x2 patches); use {lo} or {lo + 16}.")


class ActivationMemoryError(SamplingInputError):
    """A request whose estimated activations exceed the memory the execution device can give them."""


def _gib(n: int) -> str:
    """Bytes for a message: GiB, or MiB below a tenth of one."""
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _largest_fitting(fits: Callable[[int, int, int], bool], num_frames: int, height: int, width: int):
    """``((height, width), frames)``: the largest size in multiples of 16 at ``height:width``'s aspect ratio with
    ``num_frames`` frames, and the largest 4k+1 frame count at ``height × width``, that ``fits(frames, height,
    width)``; None where nothing smaller fits."""
    size, long_side = None, max(height, width)
    for side in range(long_side - 16, 15, -16):
        h, w = (max(16, round(v * side / long_side / 16) * 16) for v in (height, width))
        if fits(num_frames, h, w):
            size = (h, w)
            break
    frames = next((f for f in range(num_frames - 4, 0, -4) if fits(f, height, width)), None)
    return size, frames


def check_activation_memory(device, stages, num_frames: int, height: int, width: int, *, frames_matter: bool = True,
                            hint: str = "", capacity_is: str = "free or held by models that can be unloaded") -> None:
    """Refuse a request, before anything runs, whose activations cannot fit on ``device``.

    ``stages``: ``[(what, memory, need(frames, height, width) -> bytes)]``, each stage's activation estimate
    (:mod:`.memory`) and ``memory``: ``(capacity, weights)`` of the device for that stage
    (:meth:`~.placement.Placement.memory_for`; None on the CPU: nothing is refused). A stage whose estimate exceeds
    ``capacity - weights`` is refused with one line: the estimate, that room, and the largest size (16-multiple sides
    at the aspect ratio, or fewer 4k+1 frames) for which every stage fits."""
    if any(memory is None for _, memory, _ in stages):
        return

    def fits(f, h, w):
        return all(need(f, h, w) <= capacity - weights for _, (capacity, weights), need in stages)

    for what, (capacity, weights), need in stages:
        estimate, room = need(num_frames, height, width), capacity - weights
        logger.info("%s at %d frames of %dx%d: about %s of activations, %s of room on %s", what, num_frames, width,
                    height, _gib(estimate), _gib(room), device)
        if estimate <= room:
            continue
        size, frames = _largest_fitting(fits, num_frames, height, width)
        options = []
        if size is not None:
            options.append(f"{size[1]}x{size[0]}" + (f" at {num_frames} frames" if frames_matter else ""))
        if frames is not None and frames_matter:
            options.append(f"{frames} frames at {width}x{height}")
        largest = (f"the largest size that fits is {' or '.join(options)}" if options else
                   "no smaller size fits either: free memory (unload other models)")
        less = f", less {_gib(weights)} of weights" if weights else ""
        raise ActivationMemoryError(
            f"{what} needs about {_gib(estimate)} of activations for "
            + (f"{num_frames} frames of " if frames_matter else "") + f"{width}x{height} (width x height), but "
            f"{device} can give it {_gib(max(room, 0))} ({_gib(capacity)} {capacity_is}{less}): {largest}{hint}.")


def make_scheduler(bundle, name: str):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
    if name not in classes:
        raise SamplingInputError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    return classes[name].from_config(bundle.scheduler_config)


def rotary_embeddings(transformer, height: int, width: int, latent_frames: int, vae_scale: int, device):
    """3D RoPE tables for a latent grid, as the diffusers CogVideoX pipelines compute them."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = transformer.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid_h, grid_w = height // (vae_scale * p), width // (vae_scale * p)
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def cfg_batch(bundle, cfg: float) -> int:
    """The transformer forward's batch: 2 with CFG (negative and positive prompt together), 1 without or when a patch
    runs the negative prompt as a forward of its own."""
    return 2 if cfg > 1.0 and not conditional_only(bundle.patches) else 1


def sampling_memory(bundle, num_frames: int, height: int, width: int, cfg: float) -> int:
    """The sampling stage's activation estimate (:mod:`.memory`): one transformer forward of the CFG batch (1 when
    a patch runs the negative prompt as a forward of its own), with the tokens the patches add (face tokens,
    reference tokens)."""
    cfg_t = bundle.transformer.config
    batch = cfg_batch(bundle, cfg)
    extra = sum(p.extra_tokens(cfg_t) for p in bundle.patches if hasattr(p, "extra_tokens"))
    return transformer_activation_bytes(cfg_t, num_frames, height, width, batch=batch, extra_tokens=extra,
                                        element_size=bundle.dtype.itemsize)


def decode_memory(bundle, height: int, width: int, tiling: bool) -> int:
    """The decode stage's activation estimate (:mod:`.memory`) for a ``height × width`` video."""
    vae = bundle.vae
    return vae_decode_activation_bytes(vae.config, height, width, tiling=tiling, element_size=vae.dtype.itemsize)


def encode_first_frame(bundle, image: torch.Tensor, height: int, width: int, generator) -> torch.Tensor:
    """IMAGE [1,H,W,3] in 0..1 -> scaled VAE latent [1, 1, C, h, w] of the first frame (I2V)."""
    x = image[:1].permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                            antialias=True)
    x = (x * 2 - 1).unsqueeze(2)  # [1, 3, 1, H, W]
    vae = bundle.vae
    need = vae_encode_activation_bytes(vae.config, height, width, element_size=vae.dtype.itemsize)
    with torch.no_grad(), bundle.placement.run(vae, memory_required=need):
        latent = vae.encode(x.to(bundle.placement.device_of(vae), vae.dtype)).latent_dist.sample(generator)
    latent = latent.to(bundle.dtype).permute(0, 2, 1, 3, 4)  # [1, 1, C, h, w]
    scale = bundle.vae.config.scaling_factor
    # CogVideoX 1.5 I2V's VAE sets invert_scale_latents: the condition is divided by the factor (written as the
    # pipeline writes it, (1 / s) * z, so the result is bit-identical)
    return (1 / scale) * latent if bundle.vae.config.invert_scale_latents else scale * latent


@dataclasses.dataclass
class StepInfo:
    """Passed to the per-step callback (progress bars, interrupts, recording)."""

    step: int
    total: int
    timestep: int
    latents: torch.Tensor  # [B, T, C, H, W] (diffusers layout)


def sample_video(
    bundle,
    positive: TextConditioning,
    negative: TextConditioning | None = None,
    *,
    num_frames: int = 49,
    height: int = 480,
    width: int = 720,
    steps: int = 50,
    cfg: float = 6.0,
    seed: int = 0,
    scheduler: str = "ddim",
    use_dynamic_cfg: bool = False,
    eta: float = 0.0,
    image: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    interrupt: Callable[[], None] | None = None,
    outputs: dict | None = None,
) -> torch.Tensor:
    """Generate a video latent. Returns ComfyUI LATENT samples ``[B, C, T, H, W]`` (VAE-scaled).

    ``image`` (IMAGE ``[1,H,W,3]``, 0..1) is the first frame for I2V models and required by them.
    ``negative`` defaults to the empty prompt, as in diffusers. ``callback`` runs after every step
    and may raise to stop; ``interrupt`` is called before every transformer block and raises to stop (ComfyUI's
    cancel), so a cancel lands within one block's time. Patches are removed either way. ``outputs``, if
    given, receives what the patches report about the run (e.g. ``dualreal_alpha``) and what the speed options do
    (mag cache's calibrated ``mag_ratios``).

    Speed options recorded on the bundle (:class:`~.speed.SpeedOptions`) are applied after the patches and removed
    with them; with a cache, each transformer call runs in diffusers' ``cache_context`` (``"cond_uncond"`` for the
    batched call, as diffusers' pipelines; ``"uncond"`` / ``"cond"`` when CFG runs as two forwards).

    With CFG the negative and positive prompts run as one batch ``[negative, positive]``, as diffusers
    does, unless a patch acts on the positive prompt only and needs the negative one as a forward of its
    own (MagicMirror's two-way face attention).

    Before anything runs, a request whose activations (:mod:`.memory`) exceed what the execution device can give
    them is refused (:class:`ActivationMemoryError`, naming the largest size that fits).
    """
    check_video_size(num_frames, height, width)
    transformer = bundle.transformer
    cfg_t = transformer.config
    i2v = cfg_t.in_channels == 2 * cfg_t.out_channels
    if i2v and image is None:
        raise SamplingInputError(f"{bundle.variant} is an image-to-video model: connect a first-frame image.")
    if image is not None and not i2v:
        raise SamplingInputError(
            f"{bundle.variant} is a text-to-video model and cannot take a first-frame image; "
            "load an I2V model (e.g. CogVideoX-5b-I2V) or disconnect the image.")
    if steps < 1:
        raise SamplingInputError(f"steps must be at least 1, got {steps}")

    device, dtype = bundle.device, bundle.dtype
    do_cfg = cfg > 1.0
    separate = do_cfg and conditional_only(bundle.patches)  # negative prompt as a forward of its own
    check_sampling_memory(bundle, num_frames, height, width, cfg=cfg, image=i2v)
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    if do_cfg and negative is None:
        from .text import encode_prompt

        negative = encode_prompt(bundle, "", max_length=positive.embeds.shape[1])
    prompt_embeds = positive.embeds
    if do_cfg:
        prompt_embeds = torch.cat([negative.embeds, positive.embeds], dim=0)
    prompt_embeds = prompt_embeds.to(device, dtype)

    sched = make_scheduler(bundle, scheduler)
    sched.set_timesteps(steps, device=device)
    timesteps = sched.timesteps
    check_steps(bundle.speed, timesteps)  # (before the first frame is encoded)

    vae_t, vae_s = bundle.vae_scale_factor_temporal, bundle.vae_scale_factor_spatial
    latent_frames = (num_frames - 1) // vae_t + 1
    p_t = cfg_t.patch_size_t
    extra = (p_t - latent_frames % p_t) % p_t if p_t is not None else 0  # CogVideoX 1.5 frame padding
    lat_h, lat_w = height // vae_s, width // vae_s
    out_c = cfg_t.out_channels

    image_latents = None
    if i2v:
        first = encode_first_frame(bundle, image, height, width, generator)  # draws from generator first
        n = latent_frames + extra
        noise_frames = n + n % p_t if p_t is not None else n  # diffusers' I2V 1.5 shape rule
        image_latents = torch.cat([first, first.new_zeros(1, n - 1, out_c, lat_h, lat_w)], dim=1)
        if p_t is not None:
            image_latents = torch.cat([image_latents[:, : image_latents.size(1) % p_t], image_latents], dim=1)
        image_latents = image_latents.to(device)
    else:
        noise_frames = latent_frames + extra
    shape = (1, noise_frames, out_c, lat_h, lat_w)
    latents = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    latents = latents * sched.init_noise_sigma

    rope = None
    if cfg_t.use_rotary_positional_embeddings:
        rope = rotary_embeddings(transformer, height, width, latents.size(1), vae_s, device)
    ofs = latents.new_full((1,), 2.0) if cfg_t.ofs_embed_dim is not None else None
    step_kwargs = {"eta": eta, "generator": generator}
    is_dpm = scheduler == "dpm"

    context = SamplingContext(positive=positive, negative=negative, device=device, dtype=dtype)
    runner = block_runner(transformer)
    need = sampling_memory(bundle, num_frames, height, width, cfg)
    calls = [(("negative",), slice(0, 1), "uncond"), (("positive",), slice(1, 2), "cond")] if separate else \
        [(("negative", "positive") if do_cfg else ("positive",), slice(None), "cond_uncond")]
    for note in check_speed(bundle.speed, bundle.patches, bundle):
        logger.info(note)

    def predict(model_in, t, speed):
        preds = []
        for roles, rows, cache_context in calls:
            with runner.roles(roles), speed.context(cache_context):
                x = model_in[rows]
                preds.append(transformer(hidden_states=x, encoder_hidden_states=prompt_embeds[rows],
                                         timestep=t.expand(x.shape[0]), ofs=ofs, image_rotary_emb=rope,
                                         return_dict=False)[0].float())
        return preds[0] if len(preds) == 1 else torch.cat(preds)

    guidance = do_cfg and not separate
    with torch.no_grad(), bundle.placement.run(transformer, *patch_models(bundle.patches), memory_required=need), \
            applied_patches(transformer, bundle.patches, context), \
            applied_speed(transformer, bundle.speed, timesteps, dtype=dtype, guidance=guidance) as speed, \
            runner.interrupts(interrupt):
        old_pred = None
        for i, t in enumerate(timesteps):
            speed.step(t)
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            if image_latents is not None:
                img_in = torch.cat([image_latents] * 2) if do_cfg else image_latents
                model_in = torch.cat([model_in, img_in], dim=2)
            noise_pred = predict(model_in, t, speed)
            scale = cfg
            if use_dynamic_cfg:
                scale = 1 + cfg * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + scale * (cond - uncond)
            if is_dpm:
                prev_t = timesteps[i - 1] if i > 0 else None
                latents, old_pred = sched.step(noise_pred, old_pred, t, prev_t, latents, **step_kwargs,
                                               return_dict=False)
            else:
                latents = sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            latents = latents.to(dtype)
            if callback is not None:
                callback(StepInfo(step=i + 1, total=len(timesteps), timestep=int(t), latents=latents))
            if interrupt is not None:
                interrupt()

        if outputs is not None:
            outputs.update(patch_outputs(bundle.patches))
            outputs.update(speed.outputs())
    latents = latents[:, extra:]  # drop CogVideoX 1.5 padding frames, as diffusers does
    return latents.permute(0, 2, 1, 3, 4).contiguous()  # [B, C, T, H, W]


def check_sampling_memory(bundle, num_frames: int, height: int, width: int, *, cfg: float = 6.0,
                          image: bool = False) -> None:
    """Refuse (:class:`ActivationMemoryError`) a sampling request whose transformer activations
    (:func:`sampling_memory`: the CFG batch, the patches' extra tokens) or, with a first-frame ``image``, whose image
    encoding cannot fit on the device each runs on."""
    transformer, vae = bundle.transformer, bundle.vae
    batch = cfg_batch(bundle, cfg)
    placement = bundle.placement
    stages = [("the transformer" + (" (CFG batch of 2)" if batch == 2 else ""),
               placement.memory_for(transformer, *patch_models(bundle.patches)),
               lambda f, h, w: sampling_memory(bundle, f, h, w, cfg))]
    if image:
        stages.append(("encoding the first frame", placement.memory_for(vae),
                       lambda f, h, w: vae_encode_activation_bytes(vae.config, h, w, element_size=vae.dtype.itemsize)))
    hint = "" if placement.mode in STREAMED_MODES else \
        "; or let the weights stream (the loader's offload 'block' or 'sequential')"
    check_activation_memory(placement.device_of(transformer), stages, num_frames, height, width, hint=hint)


def decode_latents(bundle, samples: torch.Tensor, *, tiling: bool = False, slicing: bool = False,
                   interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """LATENT samples ``[B, C, T, H, W]`` -> frames ``[B, F, H, W, 3]`` float 0..1, F = 4(T-1)+1.

    CogVideoX's causal VAE maps 4k+1 frames to k+1 latent frames. diffusers' decoder, which works
    in batches of two latent frames, returns 4T frames when T is even; we keep the first 4(T-1)+1,
    i.e. exactly the ``num_frames`` that was sampled. Tiling/slicing are switched on only for this
    call (the VAE is shared with other nodes). ``interrupt`` is called before each of the decoder's calls (a batch of
    latent frames, of a tile with tiling) and raises to stop. A decode whose activations cannot fit on the execution
    device is refused before it starts (:class:`ActivationMemoryError`: tiling, or the largest size that fits).
    """
    vae = bundle.vae
    if samples.ndim != 5 or samples.shape[1] != vae.config.latent_channels:
        raise SamplingInputError(
            f"expected a CogVideoX latent [B, {vae.config.latent_channels}, T, H, W], got shape {tuple(samples.shape)}")
    scale = bundle.vae_scale_factor_spatial
    height, width = samples.shape[3] * scale, samples.shape[4] * scale

    def decode_need(h, w, tiled=tiling):
        return decode_memory(bundle, h, w, tiled)

    memory = bundle.placement.memory_for(vae)
    hint = ""
    if not tiling and memory is not None and decode_need(height, width, True) <= memory[0] - memory[1]:
        hint = f"; or turn tiling on (about {_gib(decode_need(height, width, True))})"
    frames = bundle.vae_scale_factor_temporal * (samples.shape[2] - 1) + 1
    check_activation_memory(bundle.placement.device_of(vae), [("decoding" + (" in tiles" if tiling else ""), memory,
                                                       lambda f, h, w: decode_need(h, w))],
                            frames, height, width, frames_matter=False, hint=hint)
    saved = (vae.use_tiling, vae.use_slicing)
    vae.use_tiling, vae.use_slicing = tiling, slicing
    need = decode_memory(bundle, height, width, tiling)
    try:
        with torch.no_grad(), bundle.placement.run(vae, memory_required=need), checked_calls([vae.decoder], interrupt):
            z = samples.to(bundle.placement.device_of(vae), vae.dtype) / vae.config.scaling_factor
            video = vae.decode(z).sample  # [B, 3, F, H, W] in -1..1
    finally:
        vae.use_tiling, vae.use_slicing = saved
    video = video[:, :, : bundle.vae_scale_factor_temporal * (samples.shape[2] - 1) + 1]
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    return video.permute(0, 2, 3, 4, 1).cpu()
