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

**Wan training** (:func:`wan_training_activation_bytes`; a Reg-DPO LoRA step, frozen bf16 weights, the LoRA on
``to_q``/``to_k``/``to_v``/``to_out.0`` of both attentions, SDPA's flash / memory-efficient attention, as
``training/train_regdpo.py`` runs it). What autograd keeps for the backward of one ``WanTransformerBlock``, per video
token of one sample, counted op by op (frozen linears keep nothing of their input, the LoRA's down projection keeps
it; Wan's norms run in float32):

=====================================================  ==========================================
kept for backward                                      bytes per video token
=====================================================  ==========================================
norm1, norm2, norm3 inputs (``hidden.float()``)        3 · 4·D
attn1: LoRA input; norm_q, norm_k inputs               2·D; 2 · 2·D (fp32 upcasts on the CPU: 2 · 4·D)
attn1 SDPA: q, k, v, output                            4 · 2·D
attn2: LoRA input; norm_q input; SDPA q, output        2·D; 2·D (CPU 4·D); 2 · 2·D
attn2, I2V: image attention output; their sum          2 · 2·D
feed-forward: GELU input                               2·F
SDPA log-sum-exp; LoRA down outputs; norm statistics   4·heads per attention; 6 · 2·r; 9 · 4
=====================================================  ==========================================

so 34·D + 2·F (+ 4·D with I2V's image attention) per token and block — about 43·D for the 14B models (F = 2.7·D),
against 2·D for the block's input alone under gradient checkpointing. The FFN LoRAs (``ffn.net.0.proj``,
``ffn.net.2``: the Reg-DPO trainer's Wan default) add their inputs and down outputs, 2·D + 2·F + 2 · 2·r (about 50·D
in all for the 14B models). Per context token: the cross-attention's
norm_k input and SDPA k, v (6·D; the image tokens' 4·D), and with I2V and a batch of two, the to_k/to_v LoRAs' own
copies of the strided text slice. Outside the blocks: norm_out's fp32 input, the prediction and the loss's fp32
difference, the rotary tables. The first block's input needs no gradient (its norm1 keeps nothing). A step keeps the
graphs of its forwards with gradient (winner and loser: one batch-2 forward, or two batch-1 forwards: the same bytes)
and peaks either in the no-grad reference forward that runs while they are alive or in the backward (plus, with
checkpointing, the recomputed block's saved tensors).

Those transients are measured: ``bench/memory.py --calibrate`` runs tiny Wan Reg-DPO steps on the CPU (bf16,
loaded with ``from_pretrained(torch_dtype=bfloat16)`` as the trainers do) through ``testing/memory_probe.py`` (a
saved-tensors hook and a dispatch-mode counter of live tensor bytes) at several widths, feed-forward widths and
token counts: a no-grad forward adds max(25.3·D, 10.9·D + 4·F) per token, a block's backward max(15.2·D,
4·F − 2.9·D), rounded up into ``WAN_FORWARD_*`` / ``WAN_BACKWARD_*``; the context terms are rough (they only matter
when the context rivals the video tokens, never at training sizes). The saved-tensor count matches the hook within
1% and the step's peak the live counter within 10% (``tests/test_wan_memory.py``). The CPU's composite RMSNorm
keeps an fp32 upcast where CUDA's fused kernel keeps its bf16 input (``fused_rms_norm``); the transients, measured
with the composite's float32 temporaries, lean high for a GPU.

**Full-parameter training** (``--train full``, ``full=True``): every weight needs a gradient, so every linear keeps its
input (as a LoRA on it would, less the LoRA's own tensors), the AdaLN modulation keeps the norms' outputs and the gates'
other operands, the embedders outside the blocks keep theirs and the first block's input needs a gradient too;
:data:`WAN_FULL` lists the terms, checked against the same saved-tensors hook.
"""

from __future__ import annotations

import dataclasses
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


# ------------------------------------------------------------------------------------------------ Wan training
WAN_TEXT_TOKENS = 512  # UMT5 prompt embeddings padded to 512 (diffusers' Wan pipelines; the I2V attention needs it)
WAN_IMAGE_TOKENS = 257  # CLIP ViT-H/14 penultimate layer at 224 px (Wan 2.1 I2V's image context)
# Transients on top of what is kept, in bytes per video token (× D, the width, or F, the feed-forward width) and per
# context token (text, image), per sample; measured on the CPU (see the module doc). A no-grad forward peaks in a
# block's attention or feed-forward; the backward of a block in its attention or in its feed-forward.
WAN_FORWARD_ATTENTION = 26  # · D
WAN_FORWARD_FFN = (11, 4)  # 11·D + 4·F
WAN_FORWARD_CONTEXT = (14, 6)  # · D per text token, per image token
WAN_BACKWARD_ATTENTION = 16  # · D
WAN_BACKWARD_FFN = (-2, 4)  # −2·D + 4·F
WAN_BACKWARD_CONTEXT = (6, 0)  # · D per text token, per image token


def wan_video_tokens(config, vae_config, num_frames: int, height: int, width: int) -> int:
    """Video tokens of a ``WanTransformer3DModel`` config at a pixel size: ``(F−1)//t + 1`` latent frames of
    ``H/s × W/s`` (``t``, ``s``: the VAE config's temporal and spatial scale factors), patchified by ``patch_size``."""
    config, vae_config = dict(config), dict(vae_config)
    p_t, p_h, p_w = config["patch_size"]
    t, s = vae_config.get("scale_factor_temporal", 4), vae_config.get("scale_factor_spatial", 8)
    return ((num_frames - 1) // t + 1) // p_t * (height // s // p_h) * (width // s // p_w)


def _wan_dims(config) -> dict:
    config = dict(config)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    return dict(D=heads * head_dim, F=config["ffn_dim"], H=heads, hd=head_dim, L=config["num_layers"],
                image=config.get("added_kv_proj_dim") is not None,
                out=config["out_channels"] * math.prod(config["patch_size"]))


def wan_block_saved_bytes(config, tokens: int, *, text_tokens: int = WAN_TEXT_TOKENS, image_tokens: int | None = None,
                          lora_rank: int = 16, fused_rms_norm: bool = True, first: bool = False,
                          batch: int = 1, ffn_lora: bool = True, full: bool = False) -> int:
    """Bytes autograd keeps for the backward of one ``WanTransformerBlock`` of one sample (the LoRA on ``to_q``,
    ``to_k``, ``to_v``, ``to_out.0`` of both attentions and, with ``ffn_lora`` (the Reg-DPO trainer's Wan default),
    on ``ffn.net.0.proj`` and ``ffn.net.2``; frozen bf16 weights; see the module doc's table).
    ``fused_rms_norm``: torch's fused RMSNorm (CUDA) keeps its bf16 input, the CPU's composite an fp32 upcast.
    ``first``: the first block, whose input needs no gradient (its norm1 keeps nothing). ``batch``: the forward's
    batch; with I2V and more than one sample the text context is a strided slice of ``[image; text]``, which the
    to_k / to_v LoRAs each copy (and keep) per block. ``full``: full-parameter training (see :data:`WAN_FULL`)."""
    d = _wan_dims(config)
    image_tokens = (WAN_IMAGE_TOKENS if d["image"] else 0) if image_tokens is None else image_tokens
    if full:
        no_lora = dict(text_tokens=text_tokens, image_tokens=image_tokens, lora_rank=0, fused_rms_norm=fused_rms_norm,
                       batch=batch, ffn_lora=True)
        normed = 0 if fused_rms_norm else 4  # the composite RMSNorm's fp32 normalised input, for its weight's gradient
        per_image = (2 if fused_rms_norm else 4) + normed + (4 if batch > 1 else 0)
        return (wan_block_saved_bytes(config, tokens, **no_lora)
                + d["D"] * (tokens * (WAN_FULL["modulation"] + 3 * normed) + text_tokens * normed
                            + (image_tokens * per_image if d["image"] else 0)))
    D, F, H, r = d["D"], d["F"], d["H"], lora_rank
    rms = 2 if fused_rms_norm else 4
    per_token = (D * (4 + 2 + 2 * rms + 8  # norm1 input (fp32), attn1: LoRA input, norm_q/norm_k inputs, SDPA q k v out
                      + 4 + 2 + rms + 4  # norm2 input (fp32), attn2: LoRA input, norm_q input, SDPA q out
                      + (4 if d["image"] else 0)  # I2V: the image attention's output, to_out's input (their sum)
                      + 4)  # norm3 input (fp32)
                 + 2 * F  # the feed-forward's GELU input
                 + 4 * H * (3 if d["image"] else 2)  # SDPA log-sum-exp (fp32)
                 + 2 * r * 6 + 4 * (2 * 3 + 3))  # LoRA down outputs; LayerNorm mean/rstd, RMSNorm rstd (fp32)
    if first:
        per_token -= 4 * D + 8
    per_text = D * (rms + 4) + 2 * r * 2 + 4  # attn2 norm_k input, SDPA k v; the to_k/to_v LoRA down outputs, rstd
    if d["image"] and batch > 1:  # the text slice of [image; text] is strided: each LoRA's linear keeps a copy
        per_text += 2 * 2 * D
    per_image = 4 * D  # the image attention's SDPA k v (its norm_added_k input needs no gradient)
    lora_copies = 2 * 8 * r * 2 * D  # the bf16 copies of the block's 8 LoRA pairs, kept by their linears
    if ffn_lora:  # the FFN LoRAs keep their inputs (norm3's modulated output, the GELU output) and down outputs
        per_token += 2 * D + 2 * F + 2 * r * 2
        lora_copies += 2 * 2 * r * (D + F)
    return tokens * per_token + text_tokens * per_text + image_tokens * per_image + lora_copies


# Full-parameter training (``--train full``; every weight trainable and, as FSDP gathers them, bf16), against a LoRA on
# every linear of the block (whose inputs the LoRAs keep, as the linears now do; no LoRA down outputs or weight copies):
# per video token, · D: the AdaLN modulation keeps norm1's and norm3's fp32 outputs (its scale needs a gradient: 8) and
# the gates their other operand (the attention output, bf16: 2; the feed-forward output's fp32 upcast: 4); per image
# token (Wan 2.1 I2V), · D: norm_added_k's input (its add_k_proj output needs a gradient; fp32 on the CPU) and, with
# a batch over one, add_k_proj's and add_v_proj's copies of the strided image slice (2 · 2); the CPU's composite
# RMSNorm also keeps its fp32 normalised input for the weight's gradient (4 per token of each of its inputs). Outside
# the blocks, per sample: the output AdaLN's fp32 norm output and proj_out's input (4 + 2 per video token), the text
# embedder's GELU and linear_2 inputs (2 + 2 per text token), the image embedder's norms (fp32), linears and GELU (10 ·
# image_dim + 4 · D per image token), and the first block's input needs a gradient. Checked against a saved-tensors hook
# (tests/test_wan_memory.py, within 3%; the step's live peak within 10%). The transients are the LoRA step's (measured
# for it); the weights' gradients are not activations (bench/memory.py counts them, sharded under FSDP).
WAN_FULL = {"modulation": 14, "outside": 6, "text": 4, "image": (10, 4)}


@dataclasses.dataclass(frozen=True)
class WanTrainingActivations:
    """Activation bytes of one training step of a Wan transformer on one device (see
    :func:`wan_training_activation_bytes`): ``graph`` kept after the forwards with gradient, the peaks while the
    no-grad reference forward runs and during the backward, and their maximum ``peak``."""

    graph: int
    reference: int
    backward: int

    @property
    def peak(self) -> int:
        return max(self.graph, self.reference, self.backward)


def wan_training_activation_bytes(config, video_tokens: int, *, batch: int = 2, forwards: int = 1,
                                  gradient_checkpointing: bool = False, context_parallel: int = 1,
                                  reference_forward: bool = True, text_tokens: int = WAN_TEXT_TOKENS,
                                  image_tokens: int | None = None, lora_rank: int = 16,
                                  fused_rms_norm: bool = True, ffn_lora: bool = True,
                                  full: bool = False) -> WanTrainingActivations:
    """Activations of a Reg-DPO step of a ``WanTransformer3DModel`` (bf16, LoRA, SDPA's flash / memory-efficient
    attention: no ``N × N`` matrix): ``forwards`` forwards with gradient of ``batch`` samples each, their graphs kept
    until one backward (pair-parallel: 1 forward of batch 2; winner then loser: 2 of batch 1), then as many no-grad
    reference forwards (``reference_forward``) while the graphs are alive, then the backward. Gradient
    checkpointing keeps only each block's input and recomputes one block at a time in the backward. Context
    parallelism splits the video tokens over ``context_parallel`` devices (the text and image context is whole on
    each). ``full``: full-parameter training (:func:`wan_block_saved_bytes`; outside the blocks the output AdaLN also
    keeps norm_out's fp32 output and proj_out its bf16 input). Per-token constants: see the module doc."""
    d = _wan_dims(config)
    D, F, L, hd = d["D"], d["F"], d["L"], d["hd"]
    n = -(-video_tokens // context_parallel)  # video tokens on this device
    image_tokens = (WAN_IMAGE_TOKENS if d["image"] else 0) if image_tokens is None else image_tokens
    kw = dict(text_tokens=text_tokens, image_tokens=image_tokens, lora_rank=lora_rank, fused_rms_norm=fused_rms_norm,
              batch=batch, ffn_lora=ffn_lora, full=full)
    block = wan_block_saved_bytes(config, n, **kw)
    # the context embeddings ([image; text] for I2V): the checkpointed blocks' argument, or kept by the to_k/to_v
    # LoRAs (but I2V with batch > 1 has them copy the text per block, counted in the block)
    shared = 2 * D * (text_tokens + image_tokens)
    if not gradient_checkpointing and d["image"] and batch > 1:
        shared = 0
    outside = n * (4 * D + 8 + 2 * d["out"])  # norm_out's fp32 input and its mean/rstd; the prediction (bf16)
    if full:  # WAN_FULL: the output AdaLN, proj_out; the text and image embedders (per sample)
        image_dim = dict(config).get("image_dim") or 0
        outside += (n * WAN_FULL["outside"] * D + text_tokens * WAN_FULL["text"] * D
                    + (image_tokens * (WAN_FULL["image"][0] * image_dim + WAN_FULL["image"][1] * D) if image_dim else 0))
    if gradient_checkpointing:
        per_sample = L * 2 * D * n + shared + outside  # each block's bf16 input
    else:
        per_sample = wan_block_saved_bytes(config, n, first=not full, **kw) + (L - 1) * block + shared + outside
    graph = forwards * (batch * per_sample + 8 * hd * n)  # + the rotary cos/sin tables (fp32, one per forward)
    tokens, context = batch * n, batch * D
    forward = (tokens * max(WAN_FORWARD_ATTENTION * D, WAN_FORWARD_FFN[0] * D + WAN_FORWARD_FFN[1] * F)
               + context * (WAN_FORWARD_CONTEXT[0] * text_tokens + WAN_FORWARD_CONTEXT[1] * image_tokens))
    backward = (tokens * max(WAN_BACKWARD_ATTENTION * D, WAN_BACKWARD_FFN[0] * D + WAN_BACKWARD_FFN[1] * F)
                + context * (WAN_BACKWARD_CONTEXT[0] * text_tokens + WAN_BACKWARD_CONTEXT[1] * image_tokens)
                + forwards * tokens * 4 * d["out"])  # the loss's fp32 difference
    recompute = batch * block if gradient_checkpointing else 0
    return WanTrainingActivations(graph=graph, reference=graph + forward if reference_forward else graph,
                                  backward=graph + recompute + backward)
