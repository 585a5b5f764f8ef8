"""Subject reference cost: sampling with the reference stream vs base, and image vs video trainer steps.

Sampling: mid config (as bench/sampler.py: 4 layers, width 256, 49 frames at 128x128, 10 steps,
CFG 6), with one 128x128 reference image (one extra latent frame of tokens) vs without.
Trainer: one LoRA training step (rank 128, batch 1) of an S2I image pair (a 1-frame target) vs a
video-replay step (49 frames), both at 128x128 with the reference stream; printed beside the
attention-cost ratio from the token counts (the paper: video ≈ 169x image at 49x480x720).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved_runs, summary
from sampler import build_bundle

from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.subject import SubjectReferencePatch


def attention_ratio(frames: int, height: int, width: int, text: int = 226) -> float:
    """(video step tokens / image step tokens)^2 with one reference frame of tokens in both."""
    per_frame = (height // 16) * (width // 16)
    video = text + per_frame * ((frames - 1) // 4 + 1) + per_frame
    image = text + per_frame + per_frame
    return (video / image) ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device, dtype = "cpu", torch.float32
    bundle, pos, neg, g = build_bundle(False, device, dtype)
    transformer, vae, text_dim = bundle.transformer, bundle.vae, pos.embeds.shape[-1]
    ids = pos.input_ids
    reference = torch.randn(1, 16, 16, 16, generator=g)  # one 128x128 reference, already VAE-encoded
    patched = bundle.with_patch(SubjectReferencePatch(reference))
    kw = dict(num_frames=49, height=128, width=128, steps=10, cfg=6.0, seed=0)
    times = interleaved_runs({"base": lambda: sample_video(bundle, pos, neg, **kw),
                              "reference": lambda: sample_video(patched, pos, neg, **kw)}, args.repeats)
    print(f"sampling, mid config, 49 frames 128x128, 10 steps, CFG 6, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:>10}: {summary(t)}")
    print(f"reference stream / base: {statistics.median(times['reference']) / statistics.median(times['base']):.3f} "
          f"(13 -> 14 latent frames of tokens)")

    # trainer steps
    from diffusers import CogVideoXDDIMScheduler

    from magicmirror_video.models.lora import TrainableLora, find_lora_targets
    from magicmirror_video.models.subject import LORA_TARGETS, NORM_LORA_MODULES
    from magicmirror_video.testing import tiny
    from magicmirror_video.training.train_subject_replay import SubjectReplayModule, SubjectReplayTrainConfig

    transformer.train()
    lora = TrainableLora(transformer, find_lora_targets(transformer, list(LORA_TARGETS)), 128, 64.0, 0.1,
                         reference_only=NORM_LORA_MODULES)
    undo = lora.apply(transformer)

    class FrozenText(torch.nn.Module):  # prompts pre-encoded: the step measures the DiT + VAE encode
        def forward(self, ids):
            return (torch.zeros(ids.shape[0], 226, text_dim),)

    frozen = {"transformer": transformer, "vae": vae, "text_encoder": FrozenText(),
              "scheduler": CogVideoXDDIMScheduler.from_config(tiny.SCHEDULER_CONFIG)}
    config = SubjectReplayTrainConfig(token_drop_prob=0.0)
    module = SubjectReplayModule(lora, frozen, config)
    opt = torch.optim.AdamW(lora.parameters(), lr=5e-5)
    batches = {
        "image": {"kind": "image", "target": torch.rand(1, 1, 3, 128, 128) * 2 - 1,
                  "reference": torch.rand(1, 3, 128, 128) * 2 - 1, "input_ids": ids},
        "video": {"kind": "video", "target": torch.rand(1, 49, 3, 128, 128) * 2 - 1,
                  "reference": torch.rand(1, 3, 128, 128) * 2 - 1, "input_ids": ids},
    }

    def step(kind):
        loss, _ = module(batches[kind], torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = interleaved_runs({k: (lambda k=k: step(k)) for k in batches}, args.repeats)
    undo()
    print("trainer step (LoRA rank 128, batch 1, 128x128):")
    for name, t in times.items():
        print(f"{name:>10}: {summary(t)}")
    ratio = statistics.median(times["video"]) / statistics.median(times["image"])
    print(f"video step / image step: {ratio:.1f}x measured; attention-cost ratio from token counts: "
          f"{attention_ratio(49, 128, 128):.1f}x here, {attention_ratio(49, 480, 720):.0f}x at 49x480x720 "
          f"(paper: ~169x)")


if __name__ == "__main__":
    main()
