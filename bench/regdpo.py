"""Reg-DPO training step on both bases: time per optimizer step of each mode and option, interleaved.

The trainer's own module and specification (training/train_regdpo.py, training/spec.py) on a mid config of each base
— CogVideoX (4 layers, width 256, 16 latent channels) and Wan (4 layers, width 256, 16 latent channels) — one
GT-Pair per step at 17 frames 64x64 (CogVideoX) / 64x64 (Wan), LoRA rank 16 on each base's default targets, AdamW.
Pixels go through the VAE each step as in an uncached run. Rows per base:

* ``regdpo`` — pair-parallel model forward + LoRA-off reference forward (the default);
* ``regdpo, sequential`` — winner and loser in two forwards each;
* ``regdpo, frozen copy`` — the reference a frozen copy of the transformer;
* ``sft`` — one forward over the winner, no loser, no reference.

Every configuration runs once per round, rounds alternate the configurations (``--rounds``, at least 7), and each
ratio is the median over rounds of the configuration's time / the same round's ``regdpo`` time. Peak memory is in
bench/memory.py (estimates) — on one CPU process the numbers here are time only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

import torch
from common import summary, timed

CONFIGS = {"regdpo": {}, "regdpo, sequential": {"pair_parallel": False},
           "regdpo, frozen copy": {"reference_model": "copy"}, "sft": {"mode": "sft"}}


def build_base(base: str, root: str) -> str:
    from magicmirror_video.testing import tiny, tiny_wan

    if base == "CogVideoX":
        return tiny.build_model_folder(f"{root}/cog", num_layers=4, heads=4, head_dim=64, text_dim=256,
                                       latent_channels=16)
    return tiny_wan.build_model_folder(f"{root}/wan", "wan2.1-t2v", num_layers=4, heads=4, head_dim=64, text_dim=256,
                                       z_dim=16)


def step_function(folder: str, pairs: str, root: str, options: dict, frames: int, size: int):
    """One optimizer step of the Reg-DPO trainer's module (built as the trainer builds it) on one GT-Pair."""
    from accelerate import Accelerator

    from magicmirror_video.training.config import load_config
    from magicmirror_video.training.train_regdpo import RegDPOTrainConfig, RegDPOTrainer

    config = load_config(RegDPOTrainConfig, ["--model_path", folder, "--data", pairs, "--num_frames", str(frames),
                                             "--height", str(size), "--width", str(size), "--mixed_precision", "no",
                                             "--no-gradient_checkpointing", "--output_dir", root])
    trainer = RegDPOTrainer(dataclasses.replace(config, **options))
    trainer.accelerator = Accelerator(cpu=not torch.cuda.is_available())
    module = trainer.build()
    batch = trainer.collate([trainer.dataset()[0]])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-6)

    def step():
        loss, _ = module(batch, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    from magicmirror_video.testing.tiny import write_gt_pairs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"Reg-DPO step, {args.frames} frames {args.size}x{args.size}, one pair, LoRA r16, {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as root:
        pairs = write_gt_pairs(f"{root}/pairs", n=1, frames=args.frames, size=args.size)
        for base in ("CogVideoX", "Wan"):
            folder = build_base(base, root)
            steps = {name: step_function(folder, pairs, f"{root}/{base}", options, args.frames, args.size)
                     for name, options in CONFIGS.items()}
            for fn in steps.values():  # warm-up
                fn()
            times = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, fn in steps.items():
                    times[name].append(timed(fn, device))
            print(f"\n{base}:")
            for name, t in times.items():
                ratio = statistics.median(a / b for a, b in zip(t, times["regdpo"]))
                print(f"  {name:>22}: {summary(t)}  x{ratio:.2f} of regdpo")


if __name__ == "__main__":
    main()
