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
"""

from __future__ import annotations

import argparse
import contextlib
import gc

import torch
from common import load_reference_config

from magicmirror_video.models.memory import (
    t5_activation_bytes,
    transformer_activation_bytes,
    vae_decode_activation_bytes,
    vae_encode_activation_bytes,
    video_tokens,
)
from magicmirror_video.models.placement import largest_block_bytes, largest_leaf_bytes, module_bytes
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


def build_models(device="meta", dtype=torch.bfloat16, tiny_models=False) -> dict:
    """Every model the table needs, in ``dtype`` on ``device`` (meta: nothing allocated)."""
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
            m = {"transformer": CogVideoXTransformer3DModel.from_config(tcfg),
                 "transformer_fp8": CogVideoXTransformer3DModel.from_config(tcfg),
                 "transformer_fp8_all": CogVideoXTransformer3DModel.from_config(tcfg),
                 "vae": AutoencoderKLCogVideoX.from_config(vcfg),
                 "t5": T5EncoderModel(T5Config(**t5cfg))}
            for key in ("magicmirror", "magicmirror_fp8", "magicmirror_fp8_all"):
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
    for storage in ("fp8", "fp8_all"):  # the loader's weight_storage fp8_e4m3fn, fp8_e4m3fn_all
        apply_weight_storage(m[f"transformer_{storage}"], torch.float8_e4m3fn, dtype,
                             storage_skip_patterns(f"fp8_e4m3fn{storage[3:]}"))
        store_adapter_like(m[f"magicmirror_{storage}"], m[f"transformer_{storage}"])  # as MagicMirror Apply does
    return m


def block_stream_bytes(transformer) -> int:
    """Bytes a block-level stream holds during a forward: the layers outside the blocks and two blocks (the running
    one and the prefetched one)."""
    return largest_block_bytes(transformer) + max(module_bytes(b) for b in transformer.transformer_blocks)


def lora_bytes(lora) -> int:
    return sum(t.numel() * t.element_size() for layer in lora.layers.values() for t in (layer.down, layer.up))


def estimate(m: dict, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> tuple[dict, dict, dict]:
    """(weights, activations, table): table[(mode, storage)][method][stage] = (weights resident, total) in bytes."""
    tcfg, vcfg, t5 = m["transformer"].config, m["vae"].config, m["t5"].config
    transformers = ("transformer", "transformer_fp8", "transformer_fp8_all")
    adapters = ("magicmirror_fp8", "magicmirror_fp8_all")  # stored as the fp8 transformers (MagicMirror Apply)
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
    for storage in STORAGES:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="run every mode x method x stage on CUDA and measure")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps when measuring")
    ap.add_argument("--tiny", action="store_true", help="tiny models (check the measuring code on any machine)")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even if CUDA is there (with --tiny)")
    args = ap.parse_args()
    if args.measure:
        measure(args)
    else:
        print_estimate(build_models())


if __name__ == "__main__":
    main()
