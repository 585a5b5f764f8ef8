"""Activation memory of each stage, estimated from token counts and feature-map sizes.

Weights are counted exactly elsewhere (:func:`~.placement.module_bytes`); these are the live activations at the
peak of a stage, used by ``offload="auto"``, by the host's model manager (ComfyUI frees that much before a stage)
and by ``bench/memory.py``. ``e`` is the bytes per element of the stage's dtype.

* **Transformer, one forward** (the peak is inside a block; blocks run one after the other):
  ``BLOCK_UNITS · B · N · D · e`` with ``B`` the batch (2 with batched CFG, 1 when the negative prompt runs as a
  forward of its own), ``N`` = 226 text tokens + video tokens + extra stream tokens (face, reference) and ``D`` the
  width. The attention goes through SDPA's flash / memory-efficient kernels (no ``N × N`` matrix); the units are
  the block's live ``[B, N, D]`` tensors: residual stream, normed input, the ``[text; video]`` concatenation,
  q/k/v, RoPE's float32 temporaries, the attention output and the feed-forward's 4·D-wide hidden layer.
* **T5 encoder**: ``(4·L·d_model + 3·L·d_ff)·e + 2·heads·L²·4``: residual, normed input and attention in/out
  rows, the gated feed-forward's three ``d_ff`` rows, and the float32 scores and probabilities.
* **VAE decode**: ``DECODE_UNITS · C · F · h · w · e`` with ``C`` the channels of the decoder's last upsampler
  (256 for CogVideoX), ``F`` = 9 output frames (the decoder runs two latent frames at a time, the first batch
  three: 1 + 2·4 frames) and ``h × w`` the output size, or one tile's size with tiling.
* **VAE encode** (I2V first frame, subject reference): ``ENCODE_UNITS · C0 · h · w · e``, ``C0`` the first block's
  channels (one frame; the causal convolutions pad it to three).

The unit counts are measured, not guessed: peak resident memory (``VmHWM``, with ``MALLOC_MMAP_THRESHOLD_=65536``
so freed tensors leave) of one CogVideoX-5B block, the 5B VAE decoder and encoder on the CPU at two sizes each; the
slope between the two sizes divided by the unit gives 13.8 (block, bf16), 9.9 (decode, fp32) and 22.2 (encode,
fp32), rounded up here. oneDNN's CPU convolutions may keep more scratch memory than cuDNN, so the VAE figures lean
high. ``bench/memory.py --measure`` on a GPU reports ``torch.cuda.max_memory_allocated`` beside them.
"""

from __future__ import annotations

import math

TEXT_TOKENS = 226
BLOCK_UNITS = 14
DECODE_UNITS = 10
ENCODE_UNITS = 23


def video_tokens(config, num_frames: int, height: int, width: int, vae_scale: int = 8, vae_temporal: int = 4) -> int:
    """Video tokens of a ``CogVideoXTransformer3DModel`` config at a pixel size (1.5's frame padding included)."""
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    latent_frames = (num_frames - 1) // vae_temporal + 1
    return math.ceil(latent_frames / p_t) * (height // vae_scale // p) * (width // vae_scale // p)


def transformer_activation_bytes(config, num_frames: int, height: int, width: int, *, batch: int = 2,
                                 extra_tokens: int = 0, element_size: int = 2) -> int:
    """Peak activations of one transformer forward (see the module doc). ``config``: the transformer's config."""
    config = dict(config)
    tokens = TEXT_TOKENS + video_tokens(config, num_frames, height, width) + extra_tokens
    width_ = config["num_attention_heads"] * config["attention_head_dim"]
    return BLOCK_UNITS * batch * tokens * width_ * element_size


def t5_activation_bytes(d_model: int, d_ff: int, heads: int, tokens: int = TEXT_TOKENS, element_size: int = 2) -> int:
    """Peak activations of a T5 encoder forward on one prompt (see the module doc)."""
    return (4 * tokens * d_model + 3 * tokens * d_ff) * element_size + 2 * heads * tokens * tokens * 4


def vae_decode_activation_bytes(config, height: int, width: int, *, tiling: bool = False,
                                element_size: int = 2) -> int:
    """Peak activations of decoding a video of ``height × width`` pixels (any frame count; see the module doc)."""
    config = dict(config)
    channels = list(reversed(config["block_out_channels"]))[-2]
    frames = 2 * config.get("temporal_compression_ratio", 4) + 1
    if tiling:  # diffusers' CogVideoX tiles: half the sample size, at most the video's size
        height = min(height, config.get("sample_height", 480) // 2)
        width = min(width, config.get("sample_width", 720) // 2)
    return DECODE_UNITS * channels * frames * height * width * element_size


def vae_encode_activation_bytes(config, height: int, width: int, *, images: int = 1, element_size: int = 2) -> int:
    """Peak activations of encoding ``images`` single frames of ``height × width`` (see the module doc)."""
    return ENCODE_UNITS * dict(config)["block_out_channels"][0] * height * width * images * element_size
