"""GPU memory of CogVideoX-5B at 49x480x720 in bf16: what sits on the execution device at the peak of each stage,
per offload mode and method, beside the paper's figures (A800: 24.9 GiB base, 28.6 GiB MagicMirror).

Estimate (default; no GPU, nothing allocated): every model is built on the meta device from its real config and its
weights are counted exactly in bf16 — the transformer and VAE from ``testing/reference/cogvideox/``, T5-XXL from the
numbers below (transformers' ``T5Config`` of google/t5-v1_1-xxl), the MagicMirror adapter, the DualReal adapters, the
subject LoRA (rank 128 on the method's targets), MagicMirror's face encoder (CLIP ViT-L/14 + PhotoMaker-V2 ID
perceiver) and DualReal's CLIP ViT-H/14. Activations come from token counts and feature-map sizes
(``models/memory.py`` documents the formulas and how their constants were measured). At a stage's peak:

* weights: ``none`` keeps transformer + T5 + VAE resident; ``model`` holds the stage's component; ``sequential``
  streams the transformer and T5 (two leaves at a time: the running one and the prefetched one) and moves the VAE
  whole; the method's adapters join the sampling stage and its encoder (face encoder, CLIP, VAE) the ``prep``
  stage, in every mode;
* activations of the stage: T5 on 226 tokens; one transformer forward (CFG batch 2, or 1 when the negative prompt
  runs on its own, as with MagicMirror's two-way face attention; MagicMirror adds 32 face tokens, a 480x720 subject
  reference 1350 reference tokens); the VAE decode with tiling (the Decode node's default; untiled in a note);
* not counted: the CUDA context (~0.3-0.5 GiB), the caching allocator's slack, latents and prompt embeddings (MBs).

Each mode comes three times: transformer weights stored in bf16, in fp8 (``weight_storage`` fp8_e4m3fn: diffusers'
layerwise casting, computed in bf16; its skip patterns keep the patch embedding, norms/AdaLN modulation and output
layer in bf16) and in fp8 with the modulation too (``fp8_e4m3fn_all``), counted exactly on the meta device. ``block``
streams the transformer block by block (two blocks at a time, plus the layers outside the blocks during a forward)
and T5 leaf by leaf.

``--measure`` (CUDA): the same configs with random bf16 weights run for real, every mode x method x stage, and
``torch.cuda.max_memory_allocated`` of each stage is printed beside the estimate (``--steps`` sampling steps; the
peak of a step does not depend on how many run; ~22 GB of host RAM hold the random weights). ``--tiny`` runs the
measuring code on tiny models (any device).

``--flags`` (with ``--comfyui`` / ``COMFYUI_PATH``): ComfyUI's launch flags x offload modes with core's own
``comfy.model_management`` deciding on a simulated card (``testing/comfy_sim.py`` in ComfyUI's Python, one process per
flag): per stage, how each module is held and the GiB of weights on the card (``--card``, ``--stacks``).

``--training``: Reg-DPO LoRA training of Wan2.1-T2V-14B and Wan2.1-I2V-14B-720P per GPU on 8 GPUs (FSDP), row by row
as the Reg-DPO paper's memory techniques are added (Appendix A.2), beside its claims; see :func:`print_training`; then
the same rows for full-parameter Reg-DPO (``--train full``) beside the LoRA run's totals (:func:`print_full_training`).
``--calibrate``: the measurements behind ``models/memory.py``'s Wan training constants, on tiny Wan models on the
CPU (a saved-tensors hook and a live-tensor counter, ``testing/memory_probe.py``), beside the formulas.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys

import torch
from common import load_reference_config, load_wan_reference_config

from magicmirror_video.models.context_parallel import unsplittable
from magicmirror_video.models.memory import (
    t5_activation_bytes,
    transformer_activation_bytes,
    vae_decode_activation_bytes,
    vae_encode_activation_bytes,
    video_tokens,
)
from magicmirror_video.models.placement import largest_leaf_bytes, module_bytes, streamed_bytes
from magicmirror_video.models.speed import apply_weight_storage, storage_skip_patterns, store_adapter_like

GIB = 2**30
FRAMES, HEIGHT, WIDTH = 49, 480, 720
MODES = ("none", "model", "sequential", "block")
STORAGES = ("bf16", "fp8", "fp8_all")  # transformer weights (fp8: diffusers' layerwise casting, computed in bf16)
METHODS = ("base", "magicmirror", "dualreal", "subject")
STAGES = ("prep", "t5", "sampling", "decode")
# google/t5-v1_1-xxl (transformers' T5Config): CogVideoX's text encoder, of which only the encoder is loaded
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  patch_size=14, image_size=224)  # PhotoMaker-V2's tower (MagicMirror's face encoder)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")  # OpenCLIP ViT-H/14 (DualReal)
SUBJECT_LORA_RANK = 128
PAPER_GIB = {"base": 24.9, "magicmirror": 28.6}  # MagicMirror paper, Table: 49x480x720 on an A800


def build_models(device="meta", dtype=torch.bfloat16, tiny_models=False, fp8=True) -> dict:
    """Every model the table needs, in ``dtype`` on ``device`` (meta: nothing allocated); ``fp8=False`` leaves out
    the fp8-stored transformers and adapters."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, T5Config, T5EncoderModel

    from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig
    from magicmirror_video.models.id_encoder import IDEncoder, IDPerceiver, IDPerceiverConfig
    from magicmirror_video.models.lora import LoraLayer, LoraWeights, find_lora_targets
    from magicmirror_video.models.magicmirror import MagicMirrorAdapter, MagicMirrorConfig
    from magicmirror_video.models.subject import LORA_TARGETS
    from magicmirror_video.testing import tiny

    if tiny_models:
        tcfg, vcfg = tiny.transformer_config(text_dim=32), tiny.vae_config()
        t5cfg = dict(tiny.t5_config(600).to_dict(), is_encoder_decoder=False)
        vit_l = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=1, patch_size=14,
                     image_size=56)
        vit_h, perceiver = dict(vit_l, projection_dim=16), IDPerceiverConfig(dim=256, clip_dim=64, depth=1)
        mm_kw = dict(id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32,
                     fuse_hidden=32)
        dr_kw, rank = dict(condition_dim=16, hidden_dim=8, n_groups=1), 4
    else:
        tcfg, vcfg, t5cfg = (load_reference_config("transformer_config_5b.json"),
                             load_reference_config("vae_config.json"), T5_XXL)
        vit_l, vit_h, perceiver, mm_kw, dr_kw, rank = CLIP_VIT_L, CLIP_VIT_H, IDPerceiverConfig(), {}, {}, \
            SUBJECT_LORA_RANK
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype (no fp32 copy of 10 GB)
    try:
        with torch.device(device):
            storages = ("", "_fp8", "_fp8_all") if fp8 else ("",)
            m = {f"transformer{s}": CogVideoXTransformer3DModel.from_config(tcfg) for s in storages}
            m.update(vae=AutoencoderKLCogVideoX.from_config(vcfg), t5=T5EncoderModel(T5Config(**t5cfg)))
            for key in (f"magicmirror{s}" for s in storages):
                m[key] = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(m["transformer"], **mm_kw))
            m["dualreal"] = DualRealAdapters(DualRealConfig.for_transformer(m["transformer"], **dr_kw))
            m["face_encoder"] = IDEncoder(CLIPVisionModel(CLIPVisionConfig(**vit_l)), IDPerceiver(perceiver))
            m["clip_h"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_h))
            modules = dict(m["transformer"].named_modules())
            layers = {}
            for path in find_lora_targets(m["transformer"], list(LORA_TARGETS)):
                w = modules[path].weight  # [out, in] (Linear) or [out, in, k, k] (the patch embedding's Conv2d)
                up = torch.zeros(w.shape[0], rank, 1, 1) if w.ndim == 4 else torch.zeros(w.shape[0], rank)
                layers[path] = LoraLayer(torch.zeros(rank, *w.shape[1:]), up, 1.0)
            m["subject_lora"] = LoraWeights("subject", layers)
    finally:
        torch.set_default_dtype(default)
    for module in m.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    for storage in ("fp8", "fp8_all") if fp8 else ():  # the loader's weight_storage fp8_e4m3fn, fp8_e4m3fn_all
        apply_weight_storage(m[f"transformer_{storage}"], torch.float8_e4m3fn, dtype,
                             storage_skip_patterns(f"fp8_e4m3fn{storage[3:]}"))
        store_adapter_like(m[f"magicmirror_{storage}"], m[f"transformer_{storage}"])  # as MagicMirror Apply does
    return m


def block_stream_bytes(transformer) -> int:
    """Bytes a block-level stream holds during a forward: the layers outside the blocks and two blocks (the running
    one and the prefetched one): ``models/placement.streamed_bytes``."""
    return streamed_bytes(transformer, "block")


def lora_bytes(lora) -> int:
    return sum(t.numel() * t.element_size() for layer in lora.layers.values() for t in (layer.down, layer.up))


def estimate(m: dict, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> tuple[dict, dict, dict]:
    """(weights, activations, table): table[(mode, storage)][method][stage] = (weights resident, total) in bytes."""
    tcfg, vcfg, t5 = m["transformer"].config, m["vae"].config, m["t5"].config
    transformers = tuple(k for k in ("transformer", "transformer_fp8", "transformer_fp8_all") if k in m)
    adapters = tuple(k for k in ("magicmirror_fp8", "magicmirror_fp8_all") if k in m)  # stored as the fp8
    # transformers (MagicMirror Apply); absent when built with fp8=False
    w = {**{t: module_bytes(m[t]) for t in (*transformers, *adapters)}, "t5": module_bytes(m["t5"]), "vae": module_bytes(m["vae"]),
         "magicmirror": module_bytes(m["magicmirror"]), "dualreal": module_bytes(m["dualreal"]),
         "subject": lora_bytes(m["subject_lora"]), "face_encoder": module_bytes(m["face_encoder"]),
         "clip_h": module_bytes(m["clip_h"])}
    leaf = {k: 2 * largest_leaf_bytes(m[k]) for k in (*transformers, "t5")}
    stream = {"sequential": leaf, "block": {**leaf, **{t: block_stream_bytes(m[t]) for t in transformers}}}
    vae_scale = 2 ** (len(vcfg.block_out_channels) - 1)
    reference_tokens = video_tokens(dict(tcfg), 1, height, width, vae_scale)  # one reference image, the video's size
    vit = lambda cfg: 14 * 257 * cfg.hidden_size * 2  # noqa: E731 (BLOCK_UNITS x 257 tokens x width, one image)
    a = {"t5": t5_activation_bytes(t5.d_model, t5.d_ff, t5.num_heads),
         "sampling": {"base": transformer_activation_bytes(tcfg, frames, height, width, batch=2),
                      "magicmirror": transformer_activation_bytes(tcfg, frames, height, width, batch=1,
                                                                  extra_tokens=m["magicmirror"].config.face_queries),
                      "dualreal": transformer_activation_bytes(tcfg, frames, height, width, batch=2),
                      "subject": transformer_activation_bytes(tcfg, frames, height, width, batch=2,
                                                              extra_tokens=reference_tokens)},
         "decode": vae_decode_activation_bytes(vcfg, height, width, tiling=True),
         "decode_untiled": vae_decode_activation_bytes(vcfg, height, width, tiling=False),
         "prep": {"base": 0, "magicmirror": vit(m["face_encoder"].clip.config), "dualreal": vit(m["clip_h"].config),
                  "subject": vae_encode_activation_bytes(vcfg, height, width)}}
    prep_weights = {"base": {}, "magicmirror": {"face_encoder": w["face_encoder"]}, "dualreal": {"clip_h": w["clip_h"]},
                    "subject": {"vae": w["vae"]}}
    stage_component = {"t5": "t5", "sampling": "transformer", "decode": "vae"}
    table = {}
    for storage in (st for st in STORAGES if st == "bf16" or f"transformer_{st}" in m):
        transformer = "transformer" if storage == "bf16" else f"transformer_{storage}"
        for mode in MODES:
            for method in METHODS:
                for stage in STAGES:
                    held = {k: w[k] for k in (transformer, "t5", "vae")} if mode == "none" else {}
                    comp = stage_component.get(stage)
                    comp = transformer if comp == "transformer" else comp
                    if comp and mode != "none":
                        held[comp] = stream[mode][comp] if mode in stream and comp in stream[mode] else w[comp]
                    if stage == "sampling" and method != "base":
                        held[method] = w.get(f"{method}_{storage}", w[method])
                    if stage == "prep":
                        held.update(prep_weights[method])
                    act = a[stage] if stage in ("t5", "decode") else a[stage][method]
                    weights = sum(held.values())
                    table.setdefault((mode, storage), {}).setdefault(method, {})[stage] = (weights, weights + act)
    return w, a, table


def gib(x) -> str:
    return f"{x / GIB:5.2f}"


def print_estimate(m: dict) -> None:
    w, a, table = estimate(m)
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e9  # noqa: E731
    print(f"CogVideoX-5B, {FRAMES}x{HEIGHT}x{WIDTH}, bf16, CFG 6, tiled decode (the Decode node's default)")
    print(f"weights (exact): transformer {count(m['transformer']):.2f}B = {gib(w['transformer'])} GiB (fp8 storage: "
          f"{gib(w['transformer_fp8'])} GiB, modulation in fp8 too: {gib(w['transformer_fp8_all'])} GiB), T5-XXL "
          f"encoder {count(m['t5']):.2f}B = {gib(w['t5'])} GiB, VAE "
          f"{count(m['vae']):.3f}B = {gib(w['vae'])} GiB")
    print(f"  adapters: MagicMirror {count(m['magicmirror']):.3f}B = {gib(w['magicmirror'])} GiB (stored as the fp8 "
          f"transformer: {gib(w['magicmirror_fp8'])} GiB, modulation too {gib(w['magicmirror_fp8_all'])}), DualReal "
          f"{count(m['dualreal']):.3f}B = {gib(w['dualreal'])} GiB, subject LoRA rank {SUBJECT_LORA_RANK} "
          f"{w['subject'] / 2e9:.3f}B = {gib(w['subject'])} GiB")
    print(f"  encoders: MagicMirror face encoder (CLIP ViT-L/14 + ID perceiver) {count(m['face_encoder']):.3f}B = "
          f"{gib(w['face_encoder'])} GiB, DualReal CLIP ViT-H/14 {count(m['clip_h']):.3f}B = {gib(w['clip_h'])} GiB")
    s = a["sampling"]
    print(f"activations (models/memory.py): T5 {gib(a['t5'])}, sampling base {gib(s['base'])} / MagicMirror "
          f"{gib(s['magicmirror'])} / DualReal {gib(s['dualreal'])} / subject {gib(s['subject'])}, decode tiled "
          f"{gib(a['decode'])} (untiled {gib(a['decode_untiled'])}), subject reference encode "
          f"{gib(a['prep']['subject'])} GiB")
    print()
    print("GiB on the execution device at each stage's peak: weights / weights + activations")
    header = f"{'mode':<11}{'weights':<9}{'method':<12}" + "".join(f"{s:>16}" for s in ("prep", "T5 encode",
                                                                                           "sampling", "decode"))
    print(header + f"{'peak':>8}{'paper':>8}")
    for storage in STORAGES:
        for mode in MODES:
            for method in METHODS:
                row = table[(mode, storage)][method]
                cells = "".join(f"{gib(wt)} / {gib(tot)}" .rjust(16) for wt, tot in (row[s] for s in STAGES))
                peak = max(tot for _, tot in row.values())
                paper = f"{PAPER_GIB[method]:8.1f}" if (mode, storage) == ("none", "bf16") and method in PAPER_GIB \
                    else ""
                print(f"{mode:<11}{storage:<9}{method:<12}{cells}{gib(peak):>8}{paper}")
    mm = {key: table[key]["magicmirror"]["sampling"][0] for key in table}
    print(f"\ngoal, MagicMirror sampling weights resident: model {gib(mm[('model', 'bf16')])} GiB (<= 12), sequential "
          f"{gib(mm[('sequential', 'bf16')])} GiB (<= 4), model with fp8 storage {gib(mm[('model', 'fp8')])} GiB "
          "(<= 7), "
          f"with fp8 storage of the modulation too {gib(mm[('model', 'fp8_all')])} GiB (<= 7)")
    print("paper: the whole run's peak with its own implementation (A800); 'peak' here is this pack's, without the "
          "CUDA context and allocator slack (none mode keeps every component resident, like the paper's pipeline)")


# ---------------------------------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def stage_peak(row: dict, stage: str, cuda: bool):
    """``row[stage]`` = ``torch.cuda.max_memory_allocated`` over the block (None on the CPU: nothing measured)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if cuda:
        torch.cuda.synchronize()
    row[stage] = torch.cuda.max_memory_allocated() if cuda else None


def measure_method(bundle, m: dict, method: str, side, cuda: bool, size: tuple, steps: int, storage: str) -> dict:
    """Peak per stage of one method's run: its encoder (prep), T5 encode, sampling, decode."""
    from magicmirror_video.models.clip_vision import image_embeds
    from magicmirror_video.models.dualreal import DualRealPatch
    from magicmirror_video.models.lora import LoraPatch
    from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorPatch
    from magicmirror_video.models.sampler import decode_latents, sample_video
    from magicmirror_video.models.subject import NORM_LORA_MODULES, SubjectReferencePatch, encode_reference
    from magicmirror_video.models.text import encode_prompt

    frames, height, width = size
    device, dtype, g = bundle.device, bundle.dtype, torch.Generator().manual_seed(0)
    row, patches = {}, []
    if method == "magicmirror":  # the face encoder's torch part on a random aligned crop
        enc = m["face_encoder"]
        crops = torch.rand(1, 3, enc.image_size, enc.image_size, generator=g).to(device, dtype)
        arcface = torch.randn(1, 512, generator=g).to(device, dtype)
        with stage_peak(row, "prep", cuda), side.run(enc):
            x_id, penultimate = enc(crops, arcface)
        faces = FaceEmbeds(arcface=arcface.float().cpu(), x_id=x_id.float().cpu(),
                           clip_penultimate=penultimate.float().cpu())
        patches = [MagicMirrorPatch(m.get(f"magicmirror_{storage}", m["magicmirror"]), faces)]
    elif method == "dualreal":
        with stage_peak(row, "prep", cuda), side.run(m["clip_h"]):
            embeds = image_embeds(m["clip_h"], torch.rand(1, 224, 224, 3, generator=g), device=device)
        patches = [DualRealPatch(m["dualreal"], embeds[:, None])]
    elif method == "subject":
        with stage_peak(row, "prep", cuda):
            latents = encode_reference(bundle, torch.rand(1, height, width, 3, generator=g))
        patches = [LoraPatch(m["subject_lora"], reference_only=NORM_LORA_MODULES),
                   SubjectReferencePatch(latents, vae_scale=bundle.vae_scale_factor_spatial)]
    model = bundle
    for p in patches:
        model = model.with_patch(p)
    bundle.text_cache._items.clear()  # encode for real
    with stage_peak(row, "t5", cuda):
        conds = encode_prompt(bundle, "a man img is walking", trigger="img"), encode_prompt(bundle, "")
    with stage_peak(row, "sampling", cuda):
        out = sample_video(model, *conds, num_frames=frames, height=height, width=width, steps=steps, cfg=6.0, seed=0)
    with stage_peak(row, "decode", cuda):
        decode_latents(bundle, out, tiling=True)
    return row


def measure(args) -> None:
    from magicmirror_video.models.cogvideox import CogVideoXBundle
    from magicmirror_video.models.placement import Placement
    from magicmirror_video.testing import tiny

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = (9, 32, 32) if args.tiny else (FRAMES, HEIGHT, WIDTH)
    tokenizer = tiny.build_tokenizer()  # (no download; the prompts are 226 ids whatever the vocabulary)
    estimates = estimate(build_models("meta", dtype, args.tiny), *size)[2]
    print(f"measured on {torch.cuda.get_device_name() if cuda else 'the CPU (no CUDA: nothing measured)'}; "
          f"{'x'.join(map(str, size))}, {args.steps} steps")
    print(f"{'mode':<11}{'weights':<9}{'method':<12}" + "".join(f"{s:>20}" for s in STAGES)
          + "   (GiB: measured / estimate)")
    for mode, storage in [(mode, storage) for storage in STORAGES for mode in MODES]:
        m = build_models("cpu", dtype, args.tiny)  # random weights on the CPU; the placements move them
        transformer = m["transformer" if storage == "bf16" else f"transformer_{storage}"]
        bundle = CogVideoXBundle(transformer=transformer, vae=m["vae"], text_encoder=m["t5"], tokenizer=tokenizer,
                                 scheduler_config=load_reference_config("scheduler_config_5b.json"), dtype=dtype,
                                 device=device, offload=mode)
        side = Placement(device, "cpu", "model")  # the encoders outside the bundle, placed as the nodes place them
        for method in METHODS:
            row = measure_method(bundle, m, method, side, cuda, size, args.steps, storage)
            cells = ""
            for stage in STAGES:
                est = gib(estimates[(mode, storage)][method][stage][1])
                got = "-" if stage not in row else "n/a" if row[stage] is None else gib(row[stage])
                cells += ("-" if got == "-" else f"{got} / {est}").rjust(20)
            print(f"{mode:<11}{storage:<9}{method:<12}{cells}", flush=True)
        del bundle, m, side
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ Wan training

# google/umt5-xxl as the Wan-AI diffusers folders ship it (text_encoder/config.json, transformers' UMT5Config; only the
# encoder is loaded)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                use_cache=False)
WAN_CLIP = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
                image_size=224, hidden_act="gelu")  # Wan 2.1 I2V's image_encoder (CLIPVisionModel, ViT-H/14)
WAN_MODELS = {"Wan2.1-T2V-14B": "transformer_config_wan2.1_t2v_14b.json",
              "Wan2.1-I2V-14B-720P": "transformer_config_wan2.1_i2v_14b_720p.json"}
TRAINING_SIZES = ((81, 720, 1280), (200, 720, 1280))
GPUS, PAPER_CP, GPU_GIB = 8, 4, 80  # the paper's 8x H100 80GB, CP=4
# (label, what is added); each row keeps every technique of the rows above it
TRAINING_ROWS = (("a", "FSDP only (2 forwards; UMT5, VAE, CLIP resident)", {}),
                 ("b", "+ pair-parallel (one batch-2 forward)", {"pair": True}),
                 ("c", "+ prompt pre-encoding (no UMT5)", {"pre_encoded": True}),
                 ("d", "+ frozen-module offload (VAE, CLIP, copy)", {"offload": True}),
                 ("e", "+ gradient checkpointing", {"checkpointing": True}),
                 ("f", f"+ context parallelism CP={PAPER_CP} (the paper's)", {"cp": PAPER_CP}))


def keep_in_fp32_like_from_pretrained(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the parameters and buffers whose name has a part in the class's ``_keep_in_fp32_modules`` (modules such
    as ``rope``, ``norm2`` or tensors such as ``scale_shift_table``) to float32, as diffusers'
    ``from_pretrained(torch_dtype=bfloat16)`` loads them (works on the meta device)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for module_name, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None and keep & set(f"{module_name}.{name}".split(".")):
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.float()
                    else:
                        tensors[name] = t.float()
    return model


def build_wan_models(device="meta") -> dict:
    """Every model of the training table on ``device`` as the pack loads it: the transformers in bf16 (their
    float32 tables kept as diffusers keeps them), UMT5-XXL's encoder in bf16, the VAE and CLIP in float32
    (``models/wan.load_wan``'s defaults), and the LoRA the Reg-DPO trainer puts on each transformer."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from magicmirror_video.models.lora import find_lora_targets
    from magicmirror_video.training.spec_wan import WanSpec
    from magicmirror_video.training.train_regdpo import RegDPOTrainConfig

    lora = RegDPOTrainConfig()
    targets = list(lora.lora_targets or WanSpec.default_lora_targets)  # the trainer's default on Wan
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            m = {"transformers": {name: keep_in_fp32_like_from_pretrained(
                WanTransformer3DModel.from_config(load_wan_reference_config(cfg))) for name, cfg in WAN_MODELS.items()},
                 "umt5": UMT5EncoderModel(UMT5Config(**UMT5_XXL))}
        torch.set_default_dtype(torch.float32)
        with torch.device(device):
            m["vae"] = AutoencoderKLWan.from_config(load_wan_reference_config("vae_config_wan2.1.json"))
            m["clip"] = CLIPVisionModel(CLIPVisionConfig(**WAN_CLIP))
    finally:
        torch.set_default_dtype(default)
    m["vae_config"] = load_wan_reference_config("vae_config_wan2.1.json")
    m["lora"] = {"rank": lora.lora_rank, "alpha": lora.lora_alpha, "targets": targets}
    m["lora_params"] = {}
    for name, transformer in m["transformers"].items():
        modules = dict(transformer.named_modules())
        m["lora_params"][name] = sum(lora.lora_rank * (modules[p].in_features + modules[p].out_features)
                                     for p in find_lora_targets(transformer, targets))
    m["weights"] = {name: training_weights(m, name) for name in m["transformers"]}
    return m


def training_weights(m: dict, name: str) -> dict:
    """Bytes per GPU of each weight-like part (see :func:`print_training`)."""
    transformer = m["transformers"][name]
    blocks = [module_bytes(b) for b in transformer.blocks]
    lora = m["lora_params"][name]
    image = transformer.config.image_dim is not None
    return {"shard": module_bytes(transformer) / GPUS, "block": max(blocks),
            "params": sum(p.numel() for p in transformer.parameters()),
            "root": module_bytes(transformer) - sum(blocks),  # the layers outside the blocks: FSDP's root unit
            "lora": 4 * lora, "lora_state": 16 * lora / GPUS,  # fp32 weights gathered; weights, grads, AdamW sharded
            "lora_grad": 4 * lora,  # the unsharded LoRA gradient during the backward
            "umt5": module_bytes(m["umt5"]), "vae": module_bytes(m["vae"]),
            "clip": module_bytes(m["clip"]) if image else 0}


def training_step(m: dict, name: str, frames: int, height: int, width: int, *, reference: str, pair=False,
                  pre_encoded=False, offload=False, checkpointing=False, cp=1) -> dict:
    """Peak bytes on one GPU of a Reg-DPO step: ``{"peak", "phase", "weights", "activations"}`` at the peak."""
    from magicmirror_video.models.memory import wan_training_activation_bytes, wan_video_tokens

    transformer, w = m["transformers"][name], m["weights"][name]
    tokens = wan_video_tokens(transformer.config, m["vae_config"], frames, height, width)
    act = wan_training_activation_bytes(transformer.config, tokens, batch=2 if pair else 1, forwards=1 if pair else 2,
                                        gradient_checkpointing=checkpointing, context_parallel=cp,
                                        lora_rank=m["lora"]["rank"])
    copy = reference == "copy"
    resident = w["shard"] + w["root"] + w["lora"] + w["lora_state"]  # FSDP keeps the root unit gathered all step
    resident += (0 if pre_encoded else w["umt5"]) + (0 if offload else w["vae"] + w["clip"])
    resident += w["shard"] if copy and not offload else 0
    # the reference forward gathers one block of the transformer (LoRA off) or of the copy (its root unit too, and
    # its shard when offloaded); the backward holds the block it computes and the prefetched one
    reference_weights = w["block"] + ((w["root"] + (w["shard"] if offload else 0)) if copy else 0)
    phases = {"reference": (resident + reference_weights, act.reference),
              "backward": (resident + 2 * w["block"] + w["lora_grad"], act.backward)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    weights, activations = phases[phase]
    return {"peak": weights + activations, "phase": phase, "weights": weights, "activations": activations,
            "tokens": tokens}


def max_frames(m: dict, name: str, height: int, width: int, budget: float, step=None, **kw) -> int:
    """The most frames (1 + 4k) whose ``step`` (:func:`training_step`) fits in ``budget`` bytes (0: not even one)."""
    step, frames = step or training_step, 0
    while frames < 4001 and step(m, name, frames + 1 if frames == 0 else frames + 4, height, width,
                                 **kw)["peak"] <= budget:
        frames = 1 if frames == 0 else frames + 4
    return frames


def print_training(m: dict) -> None:
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e9  # noqa: E731
    lora = m["lora"]
    budget = GPU_GIB * GIB
    print(f"Reg-DPO LoRA training per GPU: {GPUS} GPUs, FSDP FULL_SHARD (one unit per block), bf16 weights, LoRA rank "
          f"{lora['rank']} alpha {lora['alpha']:g} on {'/'.join(lora['targets'])} (fp32, AdamW), one GT-Pair per "
          "step, SDPA flash attention; the reference: a frozen copy (plain DPO) or the same transformer with the LoRA "
          "off (this pack)")
    print(f"weights (exact, meta device): UMT5-XXL encoder {count(m['umt5']):.2f}B = {gib(module_bytes(m['umt5']))} "
          f"GiB bf16, Wan VAE {count(m['vae']):.3f}B = {gib(module_bytes(m['vae']))} GiB fp32, CLIP ViT-H/14 (I2V) "
          f"{count(m['clip']):.3f}B = {gib(module_bytes(m['clip']))} GiB fp32")
    results = {}
    for name, transformer in m["transformers"].items():
        w = m["weights"][name]
        print(f"\n{name}: transformer {count(transformer):.2f}B = {gib(module_bytes(transformer))} GiB "
              f"({gib(w['shard'])} per GPU sharded, one block {gib(w['block'])}, root unit {gib(w['root'])}); LoRA "
              f"{m['lora_params'][name] / 1e6:.1f}M parameters")
        sizes = [(f, h, wd) for f, h, wd in TRAINING_SIZES]
        head = "".join(f"{f'{f}x{h}x{wd}':>27}" for f, h, wd in sizes)
        print(f"{'GiB per GPU at the peak: activations,':<50}{head}{f'frames in {GPU_GIB} GiB':>20}")
        sub = "".join(f"{'act.':>9}{'copy':>9}{'LoRA off':>9}" for _ in sizes)
        print(f"{'total with a frozen copy / the LoRA off':<50}{sub}{'copy':>11}{'LoRA off':>9}")
        flags = {}
        for label, text, add in TRAINING_ROWS:
            flags.update(add)
            cells, row = "", {}
            for size in sizes:
                copy = training_step(m, name, *size, reference="copy", **flags)
                own = training_step(m, name, *size, reference="lora_disabled", **flags)
                row[size] = (copy, own)
                cells += f"{gib(own['activations']):>9}{gib(copy['peak']):>9}{gib(own['peak']):>9}"
            frames = {ref: max_frames(m, name, 720, 1280, budget, reference=ref, **flags)
                      for ref in ("copy", "lora_disabled")}
            results.setdefault(name, {})[label] = (row, frames, dict(flags))
            print(f"{label} {text:<48}{cells}{frames['copy']:>11}{frames['lora_disabled']:>9}")
        tokens = {size: training_step(m, name, *size, reference="copy")["tokens"] for size in sizes}
        print("  video tokens: " + ", ".join(f"{f}x{h}x{wd} -> {t}" for (f, h, wd), t in tokens.items())
              + f" (latent frames (F-1)//4+1, /8 spatially, patch 1x2x2; CP={PAPER_CP}: a quarter per GPU)")
        rows = results[name]
        for ref, col in (("copy", 0), ("lora_disabled", 1)):
            a, f = rows["a"][1][ref], rows["f"][1][ref]
            ckpt_only = max_frames(m, name, 720, 1280, budget, reference=ref, checkpointing=True)
            peak_a, peak_f = (rows[k][0][sizes[0]][col]["peak"] for k in ("a", "f"))
            print(f"  {'frozen copy' if ref == 'copy' else 'LoRA off'}: frames in {GPU_GIB} GiB, row f / row a = "
                  f"{f} / {a} = {f'{f / a:.0f}x' if a else 'unbounded'}; row f / FSDP + gradient checkpointing only "
                  f"= {f} / {ckpt_only} = {f / ckpt_only:.1f}x;\n    peak at {sizes[0][0]} frames, row a / row f = "
                  f"{peak_a / peak_f:.1f}x (paper: nearly 3x the training capacity of FSDP alone)")
        f200 = rows["f"][0][sizes[1]]
        fits = {ref: f200[col]["peak"] <= budget for ref, col in (("copy", 0), ("lora_disabled", 1))}
        print(f"  {sizes[1][0]}x720x1280 with everything on (row f): {gib(f200[0]['peak'])} GiB with a frozen copy "
              f"({'fits' if fits['copy'] else 'does not fit'}), {gib(f200[1]['peak'])} GiB with the LoRA off "
              f"({'fits' if fits['lora_disabled'] else 'does not fit'}) in {GPU_GIB} GiB (paper: fits, I2V-14B-720P "
              "on 8x H100 80GB)")
    print(TRAINING_NOTE)


TRAINING_NOTE = """
Estimated: weights are counted exactly on the meta device (the real configs in testing/reference/wan, UMT5-XXL from its
config); activations come from models/memory.py's formulas (what autograd keeps per block, counted op by op and checked
against a saved-tensors hook; the transients measured on tiny CPU models: bench/memory.py --calibrate). Per GPU and
phase: the transformer's 1/8 shard, FSDP's root unit (the layers outside the blocks and the LoRA, gathered all step),
one gathered block in the reference forward and two in the backward (the computed one and the prefetched one), the
LoRA's sharded fp32 weights, grads and AdamW moments and its unsharded gradient in the backward; the frozen copy's 1/8
shard (resident, or brought in for its forward once offloaded) and its gathered root unit and block in its forward.
Peak = the larger of the reference forward (graph + a no-grad forward) and the backward (graph + the recomputed block
with checkpointing + the backward's transients). The reference forward runs after the policy's forward, while its
graph is alive, as training/train_regdpo.py does.
Pair-parallel: two graphs of batch 1 or one graph of batch 2 keep the same tensors, so b's peak is no lower than a's
(its no-grad reference forward is batch 2 instead of two batch-1 ones); the paper reports ~50% lower peak under FSDP,
which it attributes to redundant gradient graphs of its sequential pipeline, an effect this estimate has no term for.
CP: video tokens / 4 per GPU (the text and image context whole on each; the ring's K/V exchange buffers not counted),
weights unchanged. Frames in 80 GiB: the most 1+4k frames at 720x1280 whose peak fits.
Not counted: the CUDA context (~0.5 GiB), NCCL buffers, the caching allocator's slack (the paper's 'graph and memory
management' item, ~3 GiB) and, under FSDP1 with use_orig_params, gradient memory for the frozen layers sharing the root
unit with the LoRA (<= 0.5 GiB); the VAE encode, UMT5 and CLIP forwards of rows a-d run before the transformer's and
peak lower. Flash attention is assumed throughout (the paper's setting): no row keeps an N x N matrix."""


# ------------------------------------------------------------------------------ Wan full-parameter training
# torch's foreach AdamW (the default for CUDA parameters) makes one fp32 temporary the size of the parameters it steps
# (sqrt of the second moment), in bytes per parameter; measured with testing/memory_probe.LiveTensorBytes on the CPU
# (foreach=True): the peak of a step after the first is 1.00x the parameters' fp32 bytes (the first step also creates
# the two moments, counted as resident here)
ADAMW_STEP_TRANSIENT = 4


def full_training_step(m: dict, name: str, frames: int, height: int, width: int, *, pair=False, pre_encoded=False,
                       offload=False, checkpointing=False, cp=1, **_) -> dict:
    """Peak bytes on one GPU of a full-parameter Reg-DPO step (``--train full``) under FSDP FULL_SHARD on ``GPUS``
    GPUs, bf16 mixed precision, as ``training/train_regdpo.py`` runs it: ``{"peak", "phase", "weights",
    "activations", "tokens"}`` at the peak. Per GPU: the fp32 master weights and AdamW's two fp32 moments sharded
    (12 bytes per parameter / GPUS, all step), their fp32 gradient shard (4 / GPUS, from the backward until the
    optimizer step: zero_grad sets it to None), the frozen bf16 reference copy sharded the same way (the trainer never
    offloads it under FSDP, so ``offload`` moves only the VAE and CLIP), FSDP's root unit gathered in bf16 all step
    (the layers outside the blocks of the trained transformer and of the copy); one gathered block in the reference
    forward; in the backward the computed and the prefetched block and the computed block's unsharded bf16 gradient
    (before its reduce-scatter) and the root unit's; in the optimizer step the foreach AdamW temporary. Activations:
    ``wan_training_activation_bytes(full=True)``."""
    from magicmirror_video.models.memory import wan_training_activation_bytes, wan_video_tokens

    transformer, w = m["transformers"][name], m["weights"][name]
    tokens = wan_video_tokens(transformer.config, m["vae_config"], frames, height, width)
    act = wan_training_activation_bytes(transformer.config, tokens, batch=2 if pair else 1, forwards=1 if pair else 2,
                                        gradient_checkpointing=checkpointing, context_parallel=cp, full=True)
    shard = w["params"] / GPUS  # parameters per GPU
    states, grads = 12 * shard, 4 * shard
    resident = states + w["shard"] + 2 * w["root"]
    resident += (0 if pre_encoded else w["umt5"]) + (0 if offload else w["vae"] + w["clip"])
    phases = {"reference": (resident + w["block"], act.reference),
              "backward": (resident + grads + 3 * w["block"] + w["root"], act.backward),
              "optimizer": (resident + grads + ADAMW_STEP_TRANSIENT * shard, 0)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    weights, activations = phases[phase]
    return {"peak": weights + activations, "phase": phase, "weights": weights, "activations": activations,
            "tokens": tokens, "states": states, "grads": grads}


def print_full_training(m: dict) -> None:
    """Full-parameter Reg-DPO (``--train full``) per GPU, row by row as :func:`print_training`'s, beside the LoRA
    run's total (the trainer's defaults: a LoRA with the reference as the LoRA off; full: a frozen copy)."""
    budget = GPU_GIB * GIB
    print(f"\nFull-parameter Reg-DPO (--train full) per GPU: {GPUS} GPUs, FSDP FULL_SHARD (one unit per block), bf16 "
          f"mixed precision; fp32 master weights, gradients and AdamW moments sharded (16 bytes per parameter / "
          f"{GPUS}); the reference a frozen bf16 copy, sharded the same way; LoRA = the table above, LoRA off")
    for name in m["transformers"]:
        w, sizes = m["weights"][name], list(TRAINING_SIZES)
        one = full_training_step(m, name, *sizes[0])
        print(f"\n{name}: per GPU fp32 master weights + AdamW moments {gib(one['states'])} GiB, fp32 gradients "
              f"{gib(one['grads'])} GiB, frozen copy {gib(w['shard'])} GiB, root units gathered {gib(2 * w['root'])} "
              f"GiB")
        head = "".join(f"{f'{f}x{h}x{wd}':>36}" for f, h, wd in sizes)
        print(f"{'GiB per GPU at the peak (phase: r reference,':<50}{head}{f'frames in {GPU_GIB} GiB':>18}")
        sub = "".join(f"{'act.':>9}{'weights':>9}{'full':>10}{'LoRA':>8}" for _ in sizes)
        print(f"{'b backward, o optimizer step)':<50}{sub}{'full':>9}{'LoRA':>9}")
        flags, rows = {}, {}
        for label, text, add in TRAINING_ROWS:
            flags.update(add)
            cells = ""
            for size in sizes:
                full = full_training_step(m, name, *size, **flags)
                lora = training_step(m, name, *size, reference="lora_disabled", **flags)
                cells += (f"{gib(full['activations']):>9}{gib(full['weights']):>9}{gib(full['peak']):>8} "
                          f"{full['phase'][0]}{gib(lora['peak']):>8}")
            frames = (max_frames(m, name, 720, 1280, budget, step=full_training_step, **flags),
                      max_frames(m, name, 720, 1280, budget, reference="lora_disabled", **flags))
            rows[label] = frames, full_training_step(m, name, *sizes[0], **flags)["peak"]
            print(f"{label} {text:<48}{cells}{frames[0]:>9}{frames[1]:>9}")
        ckpt_only = max_frames(m, name, 720, 1280, budget, step=full_training_step, checkpointing=True)
        (fa, _), peak_a = rows["a"]
        (ff, lf), peak_f = rows["f"]
        print(f"  full: frames in {GPU_GIB} GiB, row f / row a = {ff} / {fa} = "
              f"{f'{ff / fa:.0f}x' if fa else 'unbounded'}; row f / FSDP + gradient checkpointing only = {ff} / "
              f"{ckpt_only} = {f'{ff / ckpt_only:.1f}x' if ckpt_only else 'unbounded'}; peak at {sizes[0][0]} frames, "
              f"row a / row f = {peak_a / peak_f:.1f}x (paper: nearly 3x the capacity of FSDP alone); full / LoRA at "
              f"row f: {ff} / {lf} frames")
    print(FULL_TRAINING_NOTE)


FULL_TRAINING_NOTE = """
Full-parameter rows: weights are the exact parameter counts (meta device) at 16 bytes each for the trained transformer
(fp32 master weight, fp32 gradient, AdamW's two fp32 moments), sharded over the GPUs, plus the bf16 frozen copy's shard;
activations come from models/memory.py's full=True formulas (every linear keeps its input, the AdaLN modulation and the
embedders theirs; checked against a saved-tensors hook on tiny models, tests/test_wan_memory.py). The gradient shard is
counted whole from the start of the backward (it fills block by block) and FSDP1 gathers the fp32-kept tables in bf16
(the formulas were measured with them in fp32): both lean high. The optimizer step's peak (o) holds no activations.
Row d offloads the VAE and CLIP only: under FSDP the trainer keeps the copy sharded (it streams it from the CPU only
without FSDP), so its shard is in every full row.
Not counted: what the LoRA table leaves out, and the fp32 gradients' own reduce-scatter buffers (one block's worth)."""


CP_DEGREES = (1, 2, 4)
# (what runs beside context parallelism, flags); "rows b-e": every technique of print_training's rows b to e
CP_GROUPS = (("FSDP", {}), ("FSDP + gradient checkpointing", {"checkpointing": True}),
             ("FSDP + rows b-e (ckpt, offload, ...)",
              {k: v for label, _, add in TRAINING_ROWS if label in "bcde" for k, v in add.items()}))


def print_context_parallel(m: dict) -> None:
    """Context parallelism (``--cp_degree``, diffusers' Ulysses) beside FSDP alone: CP = 1, 2, 4 with FSDP over the
    same 8 GPUs (8 / CP data-parallel groups, so 8 / CP GT-Pairs per step), per GPU at the peak."""
    budget = GPU_GIB * GIB
    for name in m["transformers"]:
        print(f"\n{name} Reg-DPO with context parallelism (--cp_degree: diffusers' Ulysses) and FSDP on {GPUS} GPUs; "
              f"GiB per GPU at the peak with a frozen copy / with the LoRA off")
        sizes = TRAINING_SIZES
        head = "".join(f"{f'{f}x{h}x{w}':>18}" for f, h, w in sizes)
        print(f"{'':<38}{'CP':>3}{'pairs/step':>11}{head}{f'frames in {GPU_GIB} GiB':>18}{'capacity':>10}")
        base = [max_frames(m, name, 720, 1280, budget, reference=ref, **CP_GROUPS[1][1])
                for ref in ("copy", "lora_disabled")]  # FSDP + gradient checkpointing, CP = 1: the capacity unit
        for group, flags in CP_GROUPS:
            for cp in CP_DEGREES:
                cells = ""
                for size in sizes:
                    peaks = [training_step(m, name, *size, reference=ref, cp=cp, **flags)["peak"]
                             for ref in ("copy", "lora_disabled")]
                    cells += f"{' / '.join(gib(p).strip() for p in peaks):>18}"
                frames = [max_frames(m, name, 720, 1280, budget, reference=ref, cp=cp, **flags)
                          for ref in ("copy", "lora_disabled")]
                capacity = f"{frames[0] / base[0]:.1f}x"
                label = group if cp == CP_DEGREES[0] else ""
                print(f"{label:<38}{cp:>3}{GPUS // cp:>11}{cells}{' / '.join(map(str, frames)):>18}{capacity:>10}")
        tokens = {size: training_step(m, name, *size, reference="copy")["tokens"] for size in sizes}
        heads = m["transformers"][name].config.num_attention_heads
        lengths = {f"{f}x{h}x{w}": t for (f, h, w), t in tokens.items()}
        split = [cp for cp in CP_DEGREES if unsplittable(cp, heads, lengths) is None]  # (the trainers' rule)
        print("  Ulysses splits " + ", ".join(f"{f}x{h}x{w}: {t} video tokens" for (f, h, w), t in tokens.items())
              + f" and {heads} heads; CP = {', '.join(map(str, split))} divide them all")
    print(CP_NOTE)


CP_NOTE = f"""
Context parallelism splits the video tokens over CP GPUs (Ulysses: each GPU attends over the whole sequence with 1/CP
of the heads after an all-to-all; the text and image context stay whole on each, as diffusers' Wan plan has it) and
leaves the weights as they are: FSDP still shards them over all {GPUS} GPUs, which form {GPUS}/CP data-parallel
groups of CP (pairs/step = GT-Pairs per optimizer step at one pair per group). Activations are models/memory.py's
per-token formulas at tokens/CP; Ulysses keeps the same tensors per token (query, key, value and output re-laid out
by heads), its all-to-all staging copies (transient, a few tokens x width per attention) and NCCL buffers are not
counted. Frames in {GPU_GIB} GiB: the most 1+4k frames at 720x1280 whose peak fits (frozen copy / LoRA off);
capacity: those frames (frozen copy) over FSDP + gradient checkpointing at CP=1 (a 14B model does not train without
checkpointing: FSDP alone fits no 720x1280 clip), the comparison behind the Reg-DPO paper's "nearly 3x the training
capacity of FSDP alone" (A.2). 200 frames is the paper's count (the trainers take 1+4k frames: 197 or 201)."""


def calibrate() -> None:
    """Tiny Wan Reg-DPO steps on the CPU, measured (``testing/memory_probe.py``) beside ``models/memory.py``'s
    formulas with the CPU's composite RMSNorm (``fused_rms_norm=False``); the transients per video token in units
    of the width D are what the WAN_FORWARD_* / WAN_BACKWARD_* constants were fitted to."""
    import tempfile

    from magicmirror_video.models import memory
    from magicmirror_video.testing import tiny_wan
    from magicmirror_video.testing.memory_probe import wan_lora_transformer, wan_regdpo_step

    print(f"constants: forward max({memory.WAN_FORWARD_ATTENTION}·D, {memory.WAN_FORWARD_FFN[0]}·D + "
          f"{memory.WAN_FORWARD_FFN[1]}·F) + context {memory.WAN_FORWARD_CONTEXT}·D; backward "
          f"max({memory.WAN_BACKWARD_ATTENTION}·D, {memory.WAN_BACKWARD_FFN[0]}·D + {memory.WAN_BACKWARD_FFN[1]}·F) "
          f"+ context {memory.WAN_BACKWARD_CONTEXT}·D (bytes per token per sample)")
    print(f"{'variant':<11}{'F/D':>5}{'text':>5}{'tokens':>7}{'ckpt':>5}{'pair':>5}{'saved / graph formula':>24}"
          f"{'peak measured / formula':>26}{'fwd, bwd transient /(tokens·D)':>32}")
    runs = [("wan2.1-t2v", 172, 16, 3, 16, True, True), ("wan2.1-t2v", 172, 16, 3, 16, False, True),
            ("wan2.1-t2v", 172, 16, 3, 16, True, False), ("wan2.1-t2v", 172, 16, 3, 16, False, False),
            ("wan2.1-t2v", 384, 16, 3, 16, True, True), ("wan2.1-t2v", 512, 16, 3, 16, False, True),
            ("wan2.1-t2v", 172, 16, 5, 16, True, True), ("wan2.1-t2v", 172, 512, 3, 16, True, True),
            ("wan2.1-i2v", 172, 512, 3, 16, True, True), ("wan2.1-i2v", 172, 512, 3, 32, True, True),
            ("wan2.1-i2v", 172, 512, 3, 32, False, True)]
    for variant, ffn, text, frames, size, ckpt, pair in runs:
        cfg = dict(tiny_wan.transformer_config(variant, heads=2, head_dim=32, num_layers=2, text_dim=32), ffn_dim=ffn)
        with tempfile.TemporaryDirectory() as folder:
            transformer, lora = wan_lora_transformer(cfg, folder, gradient_checkpointing=ckpt)
            got = wan_regdpo_step(transformer, lora, frames=frames, height=size, width=size, text_tokens=text,
                                  pair_parallel=pair)
        n, D = frames * size * size // 4, 64
        kw = dict(text_tokens=text, lora_rank=4, fused_rms_norm=False)
        est = memory.wan_training_activation_bytes(cfg, n, batch=2 if pair else 1, forwards=1 if pair else 2,
                                                   gradient_checkpointing=ckpt, **kw)
        batch = 2 if pair else 1
        recompute = batch * memory.wan_block_saved_bytes(cfg, n, batch=batch, **kw) if ckpt else 0
        per = (2 if pair else 1) * n * D  # one forward's tokens · D
        transient = ((got["reference"] - got["graph"]) / per, (got["backward"] - got["graph"] - recompute) / per)
        saved = f"{got['saved'] / est.graph:6.3f}" if not ckpt else "   -  "
        print(f"{variant:<11}{ffn / D:>5.2f}{text:>5}{n:>7}{'yes' if ckpt else 'no':>5}{'yes' if pair else 'no':>5}"
              f"{saved:>24}{got['peak'] / 2**20:>13.2f} / {est.peak / 2**20:5.2f} MiB"
              f"{transient[0]:>15.1f}, {transient[1]:.1f}", flush=True)


# ------------------------------------------------------------------------------------- ComfyUI's launch flags

SHORT = {"CogVideoXTransformer3DModel": "T", "T5EncoderModel": "T5", "AutoencoderKLCogVideoX": "VAE",
         "MagicMirrorAdapter": "MM", "DualRealAdapters": "DR", "LoraModule": "LoRA", "IDEncoder": "FE",
         "CLIPVisionModelWithProjection": "CLIP"}
HELD = {"whole": "W", "cast": "C", "streamed": "S", "moved": "M"}


def flag_rows(comfyui: str, python: str, card: float, stacks: str, tiny: bool = False) -> list[dict]:
    """``testing/comfy_sim.py`` for every launch flag in ComfyUI's Python (a process per flag): its rows."""
    import json
    import os
    import subprocess

    from magicmirror_video.testing.comfy_sim import FLAGS

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testing", "comfy_sim.py")
    rows = []
    for flag in FLAGS:
        cmd = [python, script, comfyui, flag, "--card", str(card), "--stacks", stacks] + (["--tiny"] if tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=comfyui, timeout=3600, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"comfy_sim {flag} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        rows += json.loads(lines[-1][len("RESULT "):])["rows"]
    return rows


def stage_cell(stage: dict) -> str:
    """``T5 cpu`` / ``T P63% + MM W 11.8``: each module (its device unless the card) and how core / the placement
    holds it at the stage's start (W whole, P part, C cast: nothing loaded, its layers come in per forward, S streamed
    by the placement), then the GiB of weights on the card."""
    parts = []
    for name, m in stage["modules"].items():
        held = HELD.get(m["held"], m["held"].replace("part ", "P"))
        parts.append(f"{SHORT.get(name, name)} {'cpu' if m['device'] == 'cpu' else held}")
    return " + ".join(parts) + f" {stage['card'] / GIB:.1f}"


def print_flags(rows: list[dict], card: float) -> None:
    stages = ("t5", "sampling", "decode")
    print(f"CogVideoX-5B, {FRAMES}x{HEIGHT}x{WIDTH}, bf16, CFG 6, tiled decode, on a simulated {card:g} GiB card, "
          "ComfyUI core's model_management deciding (testing/comfy_sim.py). Per stage: module + how it is held at the "
          "stage's start (W whole, P part, C cast: core loaded nothing, its layers come in per forward, S streamed by "
          "the placement, cpu: runs on the CPU) + GiB of weights on the card; peak: weights + the stage's activation "
          "estimate")
    print(f"{'flag':<10}{'stack':<13}{'mode':<18}" + "".join(f"{s:<34}" for s in stages) + f"{'peak':>6}  result")
    for r in rows:
        mode = r["mode"] if r.get("resolved") in (None, r["mode"]) else f"{r['mode']} -> {r['resolved']}"
        cells = "".join(f"{stage_cell(r['stages'][s]) if s in r['stages'] else '-':<34}" for s in stages)
        result = r.get("error", "ok")[:60] + (" EVICTED " + str(r["evictions"]) if r["evictions"] else "")
        print(f"{r['flag']:<10}{r['stack']:<13}{mode:<18}{cells}{r['card_peak'] / GIB:>6.1f}  {result}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="run every mode x method x stage on CUDA and measure")
    ap.add_argument("--training", action="store_true", help="Wan 14B Reg-DPO training memory per GPU (estimate)")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure tiny Wan training steps on the CPU beside models/memory.py's training formulas")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps when measuring")
    ap.add_argument("--tiny", action="store_true", help="tiny models (check the measuring code on any machine)")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even if CUDA is there (with --tiny)")
    ap.add_argument("--flags", action="store_true", help="ComfyUI's launch flags x offload modes, on a simulated card "
                    "with core's own model management (needs --comfyui / COMFYUI_PATH)")
    ap.add_argument("--card", type=float, default=12.0, help="the simulated card's GiB (with --flags)")
    ap.add_argument("--stacks", default="magicmirror", help="base, magicmirror, all (comma-separated; with --flags)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout (with --flags)")
    ap.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"), help="ComfyUI's Python")
    args = ap.parse_args()
    if args.flags:
        if not args.comfyui:
            ap.error("--flags needs a ComfyUI checkout: --comfyui /path/to/ComfyUI (or COMFYUI_PATH)")
        print_flags(flag_rows(args.comfyui, args.comfyui_python or sys.executable, args.card, args.stacks), args.card)
    elif args.training:
        models = build_wan_models()
        print_training(models)
        print_full_training(models)
        print_context_parallel(models)
    elif args.calibrate:
        calibrate()
    elif args.measure:
        measure(args)
    else:
        print_estimate(build_models())


if __name__ == "__main__":
    main()
