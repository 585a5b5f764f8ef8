"""Reg-DPO vs vanilla DPO on a tiny model: how the winner's error and the gaps move during training.

The paper (§4.3) reports that vanilla DPO raises both the winner's and the loser's errors (Win Gap
and Lose Gap grow) while Reg-DPO (r = DGR) keeps the winner's error down. This script trains the
same tiny LoRA on the same synthetic GT-Pairs with each mode and prints the trajectories, so the
claim can be checked on whatever model/data it is pointed at. Observations go to the report as
measured, whatever they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import common  # noqa: F401  (pack import)
import torch

from magicmirror_video.training.config import load_config
from magicmirror_video.training.presets import build_tiny_regdpo
from magicmirror_video.training.train_regdpo import PRESETS, RegDPOTrainConfig, RegDPOTrainer


def trajectory(config, mode: str, steps: int, lr: float) -> list[dict]:
    from accelerate import Accelerator

    trainer = RegDPOTrainer(dataclasses.replace(config, mode=mode))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    data = trainer.dataset()
    batch = trainer.collate([data[0]])
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    out = []
    for step in range(steps):
        loss, logs = module(batch, torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append({k: float(v) for k, v in logs.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--beta", type=float, default=500.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = build_tiny_regdpo(load_config(RegDPOTrainConfig, ["--preset", "tiny", "--output_dir", tmp,
                                                                   "--beta", str(args.beta)], PRESETS))
        runs = {mode: trajectory(config, mode, args.steps, args.lr) for mode in ("regdpo", "dpo")}
    print(f"tiny model, one GT-Pair, {args.steps} steps, lr {args.lr}, beta {args.beta} (4 fixed noise draws cycled)")
    for mode, logs in runs.items():
        first, last = logs[0], logs[-1]
        print(f"{mode:>6}: err_w {first['err_w']:.5f} -> {last['err_w']:.5f}  win_gap {first['win_gap']:+.5f} -> "
              f"{last['win_gap']:+.5f}  lose_gap {first['lose_gap']:+.5f} -> {last['lose_gap']:+.5f}  "
              f"DGR {first['DGR']:.1f} -> {last['DGR']:.1f}  L_DPO {first['L_DPO']:.4f} -> {last['L_DPO']:.4f}")


if __name__ == "__main__":
    main()
