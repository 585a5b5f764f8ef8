"""The block runner's cost: base vs diffusers, each method and the full stack, side by side in one run.

Mid CPU config (as bench/sampler.py: 4 layers, width 256, 49 frames at 128x128 -> 13 latent frames,
10 DDIM steps, CFG 6, fp32): diffusers' CogVideoXPipeline, the pack's base sampler, MagicMirror
(two-way, the default, and one-way), DualReal, the subject reference, and MagicMirror + subject +
DualReal + a LoRA on one model. Every method has non-zero random weights. Runs are interleaved
(--repeats rounds, each runs every configuration once); medians and their ratios to the base are
printed. Goals (issue "Methods compose"): base/diffusers <= 1.00 within noise, MagicMirror <= 1.08,
DualReal <= 1.16, subject <= 1.12 (the previous block-wrapper implementation's overheads).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved_runs, summary
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
from sampler import build_bundle

from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig, DualRealPatch
from magicmirror_video.models.lora import LoraLayer, LoraPatch, LoraWeights, find_lora_targets
from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorAdapter, MagicMirrorConfig, MagicMirrorPatch
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.subject import SubjectReferencePatch

GOALS = {"magicmirror": 1.08, "dualreal": 1.16, "subject": 1.12}


def randomised(module, g, scale=0.01):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def method_patches(transformer, g) -> dict:
    faces = FaceEmbeds(arcface=torch.randn(1, 512, generator=g), x_id=torch.randn(1, 2, 2048, generator=g),
                       clip_penultimate=torch.randn(1, 257, 1024, generator=g))
    mm = {form: MagicMirrorPatch(randomised(MagicMirrorAdapter(MagicMirrorConfig.for_transformer(
        transformer, face_attention=form)), g), faces) for form in ("two-way", "one-way")}
    dualreal = DualRealPatch(randomised(DualRealAdapters(DualRealConfig.for_transformer(transformer, n_groups=2)), g),
                             torch.randn(1, 1, 1024, generator=g))
    subject = SubjectReferencePatch(torch.randn(1, 16, 16, 16, generator=g))  # one 128x128 reference, VAE-encoded
    modules = dict(transformer.named_modules())
    lora = LoraPatch(LoraWeights("bench", {p: LoraLayer(torch.randn(16, modules[p].in_features, generator=g) * 0.01,
                                                        torch.randn(modules[p].out_features, 16, generator=g) * 0.01)
                                           for p in find_lora_targets(transformer, ["to_q", "to_k", "to_v", "to_out.0"])}))
    return {"magicmirror": mm["two-way"], "magicmirror_one_way": mm["one-way"], "dualreal": dualreal,
            "subject": subject, "lora": lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    mask = torch.zeros(1, 226, dtype=torch.bool)
    mask[0, 2] = True  # one identity token, as in "a man img ..."
    bundle, pos, neg, g = build_bundle(False, "cpu", torch.float32, identity_mask=mask)
    patches = method_patches(bundle.transformer, g)
    stack = bundle
    for name in ("magicmirror", "subject", "dualreal", "lora"):
        stack = stack.with_patch(patches[name])
    pipe = CogVideoXPipeline(transformer=bundle.transformer, vae=bundle.vae, text_encoder=bundle.text_encoder,
                             tokenizer=bundle.tokenizer,
                             scheduler=CogVideoXDDIMScheduler.from_config(bundle.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_frames=49, height=128, width=128, steps=10, cfg=6.0, seed=0)
    runs = {"diffusers": lambda: pipe(prompt_embeds=pos.embeds, negative_prompt_embeds=neg.embeds, num_frames=49,
                                      height=128, width=128, num_inference_steps=10, guidance_scale=6.0,
                                      generator=torch.Generator().manual_seed(0), output_type="latent"),
            "base": lambda: sample_video(bundle, pos, neg, **kw)}
    for name in ("magicmirror", "magicmirror_one_way", "dualreal", "subject"):
        runs[name] = lambda p=patches[name]: sample_video(bundle.with_patch(p), pos, neg, **kw)
    runs["full stack"] = lambda: sample_video(stack, pos, neg, **kw)
    with torch.inference_mode():
        times = interleaved_runs(runs, args.repeats)
    print(f"mid config (4 layers, width 256), 49 frames 128x128, 10 steps, CFG 6, fp32, CPU, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    base = statistics.median(times["base"])
    print("ratio = median over rounds of (run / the same round's base run): robust to a busy machine's spikes")
    for name, t in times.items():
        ratio = statistics.median(r / b for r, b in zip(t, times["base"]))
        goal = GOALS.get(name.split("_")[0] if name != "magicmirror_one_way" else "magicmirror")
        note = f"   goal <= {goal:.2f}" if goal else ""
        print(f"{name:>20}: {summary(t)}   x{ratio:.3f} of base (medians x{statistics.median(t) / base:.3f}){note}")
    pairs = [b / d for b, d in zip(times["base"], times["diffusers"])]
    print(f"base / diffusers per round: {min(pairs):.3f}..{max(pairs):.3f} (median {statistics.median(pairs):.3f})")


if __name__ == "__main__":
    main()
