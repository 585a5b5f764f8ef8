"""Reg-DPO step: time and peak memory of LoRA-as-reference vs a frozen copy, pair-parallel vs sequential.

Mid config (as bench/sampler.py: 4 layers, width 256, 49 frames at 128x128), LoRA rank 16 on the
attention projections, one GT-Pair per step. Each configuration runs in its own process so the
peak is its own (peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU); median of
--repeats steps after a warm-up. The paper reports ~50% lower peak memory for pair-parallel under
FSDP on GPUs; on one CPU process the pair-parallel forward holds both activations at once.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import run_configs_in_processes, time_steps

CONFIGS = [("LoRA-as-reference, pair-parallel", "lora_disabled", True),
           ("LoRA-as-reference, sequential", "lora_disabled", False),
           ("frozen copy, pair-parallel", "copy", True),
           ("frozen copy, sequential", "copy", False)]


def one(reference: str, parallel: bool, repeats: int, device: str) -> dict:
    import copy

    from diffusers import CogVideoXDDIMScheduler

    from magicmirror_video.models.lora import TrainableLora, find_lora_targets
    from magicmirror_video.testing import tiny
    from magicmirror_video.training.train_regdpo import RegDPOModule, RegDPOTrainConfig

    c = tiny.build_components(num_layers=4, heads=4, head_dim=64, text_dim=256, latent_channels=16)
    transformer = c["transformer"].to(device).requires_grad_(False)
    frozen = {"transformer": transformer, "vae": c["vae"].to(device).requires_grad_(False),
              "text_encoder": c["text_encoder"].to(device), "scheduler": CogVideoXDDIMScheduler.from_config(tiny.SCHEDULER_CONFIG)}
    if reference == "copy":
        frozen["reference"] = copy.deepcopy(transformer)
    lora = TrainableLora(transformer, find_lora_targets(transformer, ["to_q", "to_k", "to_v", "to_out.0"]), 16, 32.0)
    lora.apply(transformer)
    config = RegDPOTrainConfig(reference_model=reference, pair_parallel=parallel, height=128, width=128, num_frames=49)
    module = RegDPOModule(lora.to(device), frozen, config)
    opt = torch.optim.AdamW(lora.parameters(), lr=5e-6)
    g = torch.Generator().manual_seed(0)
    batch = {"winner": torch.rand(1, 49, 3, 128, 128, generator=g) * 2 - 1,
             "loser": torch.rand(1, 49, 3, 128, 128, generator=g) * 2 - 1,
             "first_frame": torch.rand(1, 3, 128, 128, generator=g) * 2 - 1,
             "input_ids": torch.randint(0, 100, (1, 226), generator=g)}

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
        _, reference, parallel = CONFIGS[args.one]
        print(json.dumps(one(reference, parallel, args.repeats, device)))
        return
    kind = "CUDA allocated" if device == "cuda" else "process RSS"
    print(f"Reg-DPO step, mid config, 49 frames 128x128, one pair, LoRA r16, {device}, {torch.get_num_threads()} threads")
    results = run_configs_in_processes(__file__, [name for name, _, _ in CONFIGS], args.repeats)
    for name, r in results.items():
        print(f"{name:>34}: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}), "
              f"peak {r['peak_gib']:.3f} GiB ({kind})")
    a, b = results[CONFIGS[0][0]], results[CONFIGS[2][0]]
    print(f"LoRA-as-reference / frozen copy (pair-parallel): time x{a['median_s'] / b['median_s']:.2f}, "
          f"memory x{a['peak_gib'] / b['peak_gib']:.3f}")
    from common import load_reference_config
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        full = CogVideoXTransformer3DModel.from_config(load_reference_config("transformer_config_5b.json"))
    size = sum(p.numel() for p in full.parameters()) * 2 / 2**30
    print(f"at full size a frozen reference copy of the CogVideoX-5B transformer costs {size:.1f} GiB more in bf16; "
          "LoRA-as-reference costs none")
    p, s = results[CONFIGS[0][0]], results[CONFIGS[1][0]]
    print(f"pair-parallel / sequential (LoRA-as-reference): time x{p['median_s'] / s['median_s']:.2f}, "
          f"memory x{p['peak_gib'] / s['peak_gib']:.3f}")


if __name__ == "__main__":
    main()
