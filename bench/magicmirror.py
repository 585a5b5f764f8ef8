"""MagicMirror cost: sampling time vs the base sampler, and the parameters it adds.

Sampling (default CPU mid config, as bench/sampler.py: 4 layers, width 256, 49 frames at
128x128, 10 steps, CFG 6): base vs MagicMirror-patched (adapter with non-zero weights, one
reference face), runs interleaved, median of --repeats. ``--full`` uses the 5B configs (GPU).

Sizes: parameter counts on the full CogVideoX-5B config, built on the meta device (nothing is
allocated): the base transformer, the MagicMirror adapters, and the face encoder's torch parts
(CLIP ViT-L/14 + PhotoMaker-V2 ID perceiver). The paper reports 10.5B -> 12.8B (+2.3B) including
the T5 text encoder and VAE of CogVideoX-5B.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import flops_5b, interleaved_runs, load_reference_config, summary
from sampler import build_bundle

from magicmirror_video.models.id_encoder import IDPerceiver
from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorAdapter, MagicMirrorConfig, MagicMirrorPatch
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.text import TextConditioning


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes() -> None:
    from diffusers import CogVideoXTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(load_reference_config("transformer_config_5b.json"))
        adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(transformer))
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                                num_hidden_layers=24, patch_size=14, image_size=224))
        perceiver = IDPerceiver()
    parts = {"q-former": count(adapter.face_qformer) + adapter.face_queries.numel(), "fusion": count(adapter.fusion),
             "CAN": count(adapter.can), "per-block face/CA": count(adapter.blocks)}
    added = count(adapter) + count(clip) + count(perceiver)
    print(f"CogVideoX-5B transformer: {count(transformer) / 1e9:.2f}B parameters")
    print(f"MagicMirror adapters: {count(adapter) / 1e9:.3f}B ("
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parts.items()) + ")")
    print(f"face encoder (torch): CLIP ViT-L/14 {count(clip) / 1e6:.0f}M + ID perceiver {count(perceiver) / 1e6:.0f}M"
          " (+ insightface ONNX detector/recogniser, not counted)")
    print(f"added in total: {added / 1e9:.2f}B   (paper: +2.3B, 10.5B -> 12.8B)")


def report_flops_5b() -> None:
    from magicmirror_video.models.patches import SamplingContext

    mask = torch.zeros(1, 226, dtype=torch.bool)
    mask[0, 2] = True
    ctx = SamplingContext(positive=TextConditioning("", None, None, None, identity_mask=mask))

    def patches(transformer):
        faces = FaceEmbeds(arcface=torch.randn(1, 512), x_id=torch.randn(1, 2, 2048),
                           clip_penultimate=torch.randn(1, 257, 1024))
        return [MagicMirrorPatch(MagicMirrorAdapter(MagicMirrorConfig.for_transformer(transformer)).eval(), faces)]

    b, p = flops_5b(patches, ctx)
    print(f"5B forward FLOPs (CFG batch 2, 49x480x720): base {b / 1e12:.1f} T, MagicMirror {p / 1e12:.1f} T, "
          f"ratio {p / b:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    sizes()
    report_flops_5b()
    if args.sizes_only:
        return
    device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    height, width, frames, steps = (480, 720, 49, 50) if args.full else (128, 128, 49, 10)
    mask = torch.zeros(1, 226, dtype=torch.bool)
    mask[0, 2] = True  # one identity token, as in "a man img ..."
    bundle, pos, neg, g = build_bundle(args.full, device, dtype, identity_mask=mask)
    transformer = bundle.transformer
    adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(transformer)).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    faces = FaceEmbeds(arcface=torch.randn(1, 512), x_id=torch.randn(1, 2, 2048), clip_penultimate=torch.randn(1, 257, 1024))
    patch = MagicMirrorPatch(adapter, faces)
    patched = bundle.with_patch(patch)
    start = time.perf_counter()
    with torch.no_grad():
        patch.face_tokens(adapter, torch.device(device), dtype)  # the one-time face Q-Former pass
    once = time.perf_counter() - start
    kw = dict(num_frames=frames, height=height, width=width, steps=steps, cfg=6.0, seed=0)
    times = interleaved_runs({"base": lambda: sample_video(bundle, pos, neg, **kw),
                              "magicmirror": lambda: sample_video(patched, pos, neg, **kw)}, args.repeats, device)
    print(f"sampling: {'5B' if args.full else 'mid config'}, {frames} frames {width}x{height}, {steps} steps, CFG 6, "
          f"{device}, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:>12}: {summary(t)}")
    ratio = statistics.median(times["magicmirror"]) / statistics.median(times["base"])
    print(f"overhead magicmirror/base: {ratio:.3f}   (paper, 5B on A800: 209/204 = 1.025)")
    print(f"plus once per set of reference faces: face Q-Former {once * 1000:.0f} ms (cached by the patch)")


if __name__ == "__main__":
    main()
