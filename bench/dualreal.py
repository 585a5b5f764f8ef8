"""DualReal cost: sampling time vs base on the mid config, and parameter counts on the 5B config.

Sampling: as bench/sampler.py (4 layers, width 256, 49 frames at 128x128, 10 steps, CFG 6),
base vs DualReal (adapters with non-zero weights, dynamic StageBlender), interleaved, median of
--repeats. Sizes: adapters + controller on the full CogVideoX-5B config, built on the meta device.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import flops_5b, interleaved_runs, load_reference_config, summary
from sampler import build_bundle

from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig, DualRealPatch
from magicmirror_video.models.sampler import sample_video


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes() -> None:
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(load_reference_config("transformer_config_5b.json"))
        adapters = DualRealAdapters(DualRealConfig.for_transformer(transformer))
    kinds = {k: sum(p.numel() for n, p in adapters.named_parameters() if f".{k}_" in n) for k in ("id", "motion")}
    print(f"CogVideoX-5B transformer: {count(transformer) / 1e9:.2f}B parameters")
    print(f"DualReal on 5B: identity adapters {kinds['id'] / 1e6:.2f}M, motion adapters {kinds['motion'] / 1e6:.2f}M, "
          f"StageBlender {count(adapters.controller) / 1e6:.2f}M ({adapters.config.n_groups} groups of "
          f"{adapters.config.num_layers // adapters.config.n_groups} blocks); total {count(adapters) / 1e6:.2f}M "
          f"({count(adapters) / count(transformer) * 100:.2f}% of the transformer)")


def report_flops_5b() -> None:
    def patches(transformer):
        return [DualRealPatch(DualRealAdapters(DualRealConfig.for_transformer(transformer)).eval(),
                              torch.randn(1, 1, 1024))]

    b, p = flops_5b(patches)
    print(f"5B forward FLOPs (CFG batch 2, 49x480x720): base {b / 1e12:.1f} T, DualReal {p / 1e12:.1f} T, "
          f"ratio {p / b:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes()
    report_flops_5b()
    bundle, pos, neg, g = build_bundle(False, "cpu", torch.float32)
    transformer = bundle.transformer
    adapters = DualRealAdapters(DualRealConfig.for_transformer(transformer, n_groups=2)).eval()
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    patched = bundle.with_patch(DualRealPatch(adapters, torch.randn(1, 1, 1024, generator=g)))
    kw = dict(num_frames=49, height=128, width=128, steps=10, cfg=6.0, seed=0)
    times = interleaved_runs({"base": lambda: sample_video(bundle, pos, neg, **kw),
                              "dualreal": lambda: sample_video(patched, pos, neg, **kw)}, args.repeats)
    print(f"sampling, mid config, 49 frames 128x128, 10 steps, CFG 6, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:>9}: {summary(t)}")
    print(f"overhead dualreal/base: {statistics.median(times['dualreal']) / statistics.median(times['base']):.3f} "
          f"(goal <= 1.05)")


if __name__ == "__main__":
    main()
