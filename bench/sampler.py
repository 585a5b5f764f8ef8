"""Pack sampler vs diffusers' CogVideoXPipeline on the same random model, in one run.

Default (CPU): a mid-size config (4 layers, width 256, 49 frames -> 13 latent frames at 16x16
latents, 10 steps, CFG on). Both run the denoising loop on pre-encoded prompts and return
latents; runs alternate, the median of --repeats is compared, and the spread is printed.

--full: the CogVideoX-5B configs shipped in testing/reference/cogvideox/ with random weights
(bf16, meant for a GPU) at 49x480x720; prints seconds and peak GiB of each.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved_runs, load_reference_config, peak_gib, reset_peak, summary
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.text import TextConditioning
from magicmirror_video.testing import tiny


def build(full: bool, device, dtype):
    if full:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise the 5B weights directly in bf16 (fp32 would need 20 GB)
        try:
            with torch.device(device):
                transformer = CogVideoXTransformer3DModel.from_config(load_reference_config("transformer_config_5b.json"))
                vae = AutoencoderKLCogVideoX.from_config(load_reference_config("vae_config.json"))
        finally:
            torch.set_default_dtype(default_dtype)
        scheduler_config = load_reference_config("scheduler_config_5b.json")
        small = tiny.build_components(text_dim=32)  # text encoder unused: prompts are pre-encoded
        text_encoder, tokenizer = small["text_encoder"], small["tokenizer"]
        text_dim = transformer.config.text_embed_dim
    else:
        c = tiny.build_components(num_layers=4, heads=4, head_dim=64, text_dim=256, latent_channels=16)
        transformer, vae, text_encoder, tokenizer = c["transformer"], c["vae"], c["text_encoder"], c["tokenizer"]
        scheduler_config = dict(c["scheduler"].config)
        text_dim = 256
    transformer.to(device, dtype).eval()
    vae.to(device, dtype).eval()
    return transformer, vae, text_encoder, tokenizer, scheduler_config, text_dim


def build_bundle(full: bool, device, dtype, identity_mask: torch.Tensor | None = None):
    """``build`` wrapped as a pack bundle, with random pre-encoded positive/negative prompts.

    Returns ``(bundle, positive, negative, generator)``; the generator continues the same seeded
    stream for the caller's own random draws.
    """
    transformer, vae, text_encoder, tokenizer, scheduler_config, text_dim = build(full, device, dtype)
    bundle = CogVideoXBundle(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler_config=scheduler_config, dtype=dtype, device=torch.device(device))
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 226, dtype=torch.long)
    pos = TextConditioning("bench", torch.randn(1, 226, text_dim, generator=g), ids, ids, identity_mask=identity_mask)
    neg = TextConditioning("", torch.randn(1, 226, text_dim, generator=g), ids, ids)
    return bundle, pos, neg, g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="CogVideoX-5B config, random weights (GPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    frames = args.frames
    height, width = args.height or (480 if args.full else 128), args.width or (720 if args.full else 128)
    steps = args.steps or (50 if args.full else 10)

    transformer, vae, text_encoder, tokenizer, scheduler_config, text_dim = build(args.full, device, dtype)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 226, text_dim, generator=g), torch.randn(1, 226, text_dim, generator=g)
    bundle = CogVideoXBundle(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler_config=scheduler_config, dtype=dtype, device=torch.device(device))
    pipe = CogVideoXPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler=CogVideoXDDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    ids = torch.zeros(1, 226, dtype=torch.long)
    cond = TextConditioning("bench", pos, ids, ids)
    uncond = TextConditioning("", neg, ids, ids)

    def run_pack():
        return sample_video(bundle, cond, uncond, num_frames=frames, height=height, width=width, steps=steps,
                            cfg=6.0, seed=0)

    def run_diffusers():
        return pipe(prompt_embeds=pos.to(device, dtype), negative_prompt_embeds=neg.to(device, dtype),
                    num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    a, b = run_pack(), run_diffusers().permute(0, 2, 1, 3, 4)
    print(f"config: {'CogVideoX-5B (reference configs)' if args.full else 'mid (4 layers, width 256)'}, "
          f"{frames} frames {width}x{height}, {steps} steps, CFG 6, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"outputs agree: max |pack - diffusers| = {(a.float() - b.float()).abs().max().item():.2e}")

    peaks = {}
    if args.full:
        for name, fn in (("pack", run_pack), ("diffusers", run_diffusers)):
            reset_peak(device)
            fn()
            peaks[name] = peak_gib(device)
    with torch.inference_mode():
        times = interleaved_runs({"pack": run_pack, "diffusers": run_diffusers}, args.repeats, device,
                                 warmup=0 if args.full else 1)
    for name, t in times.items():
        kind = "CUDA allocated" if device == "cuda" else "process RSS"
        extra = f", peak {peaks[name]:.2f} GiB ({kind})" if name in peaks else ""
        print(f"{name:>9}: {summary(t)}{extra}")
    ratios = [p / d for p, d in zip(times["pack"], times["diffusers"])]
    print(f"ratio pack/diffusers (median of medians): "
          f"{statistics.median(times['pack']) / statistics.median(times['diffusers']):.3f}  "
          f"(per-pair ratios {min(ratios):.3f}..{max(ratios):.3f})")


if __name__ == "__main__":
    main()
