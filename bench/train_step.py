"""MagicMirror training step: time and peak memory, with/without gradient checkpointing and cache.

Mid config (as bench/sampler.py): 4 layers, width 256, 49 frames at 128x128 (13 latent frames),
batch 1, MagicMirror adapters with the paper-size face dims (x_id 2x2048, CLIP 1024), identity
loss on (decode of x̂0's first frame + a small random iresnet). "cache" = the batch carries
precomputed VAE posteriors and T5 embeddings, and T5 is not loaded (the precompute cache's
training mode); otherwise every step encodes the video and the prompt.

Each configuration runs in its own process so peak memory is its own: peak resident set size on
the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Median of --repeats steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import run_configs_in_processes, time_steps

CONFIGS = [("no checkpointing, no cache", False, False), ("checkpointing, no cache", True, False),
           ("no checkpointing, cache", False, True), ("checkpointing, cache", True, True)]


def one(checkpointing: bool, cache: bool, repeats: int, device: str) -> dict:
    from diffusers import CogVideoXDDIMScheduler

    from magicmirror_video.models.arcface import IResNet
    from magicmirror_video.models.magicmirror import MagicMirrorAdapter, MagicMirrorConfig
    from magicmirror_video.testing import tiny
    from magicmirror_video.training.train_magicmirror import MagicMirrorTrainConfig, MagicMirrorTrainingModule

    c = tiny.build_components(num_layers=4, heads=4, head_dim=64, text_dim=256, latent_channels=16)
    transformer, vae = c["transformer"].to(device).train(), c["vae"].to(device)
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    text_encoder = None if cache else c["text_encoder"].to(device)
    del c
    config = MagicMirrorTrainConfig(height=128, width=128, stage="video", num_frames=49, id_loss_weight=0.1)
    adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(transformer)).to(device)
    frozen = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
              "scheduler": CogVideoXDDIMScheduler.from_config(tiny.SCHEDULER_CONFIG),
              "arcface": IResNet((1, 1, 1, 1)).eval().requires_grad_(False).to(device)}
    module = MagicMirrorTrainingModule(adapter, frozen, config)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 226, dtype=torch.bool)
    mask[0, 2] = True
    batch = {"identity_mask": mask, "face_box": torch.tensor([[32.0, 32.0, 96.0, 96.0]]),
             "face_kps": torch.tensor([[[50.0, 55.0], [78.0, 55.0], [64.0, 68.0], [53.0, 82.0], [75.0, 82.0]]]),
             "ref_arcface": torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1),
             "x_id": [torch.randn(1, 2, 2048, generator=g)], "clip_penultimate": [torch.randn(1, 257, 1024, generator=g)]}
    if cache:
        batch["latents"] = torch.randn(1, 16, 13, 16, 16, generator=g)
        batch["prompt_embeds"] = torch.randn(1, 226, 256, generator=g)
    else:
        batch["pixels"] = torch.rand(1, 49, 3, 128, 128, generator=g) * 2 - 1
        batch["input_ids"] = torch.randint(0, 100, (1, 226), generator=g)

    def step():
        loss, _ = module(batch, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_steps(step, repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one is not None:
        _, gc, cache = CONFIGS[args.one]
        print(json.dumps(one(gc, cache, args.repeats, device)))
        return
    print(f"MagicMirror training step, mid config, 49 frames 128x128, batch 1, {device}, "
          f"{torch.get_num_threads()} threads")
    results = run_configs_in_processes(__file__, [name for name, _, _ in CONFIGS], args.repeats)
    for name, r in results.items():
        kind = "CUDA allocated" if device == "cuda" else "process RSS"
        print(f"{name:>28}: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}), "
              f"peak {r['peak_gib']:.2f} GiB ({kind})")
    base = results[CONFIGS[0][0]]
    for name, r in results.items():
        print(f"{name:>28}: time x{r['median_s'] / base['median_s']:.2f}, memory x{r['peak_gib'] / base['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
