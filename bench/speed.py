"""Speed options side by side in one run: every cache at three settings, fp8 weight storage, and the MagicMirror and
DualReal stacks with the caches they allow.

Mid CPU config (as bench/sampler.py: 4 layers, width 256, 49 frames at 128x128 -> 13 latent frames, 10 DDIM steps,
CFG 6, fp32, random weights). Every configuration runs once per round, --repeats interleaved rounds (after one warm-up
round); medians and ratios to the uncached run of the same stack are printed. Per configuration, from one more
(untimed) run with counting hooks:

* ``blocks``: share of transformer-block computations that ran (rows x blocks x steps; a block a cache skips is not
  computed: its modulation layer never runs), ``attn`` / ``ff``: the same for the attention and the feed-forward
  (attention caches skip only those);
* ``max|d|`` / ``mean|d|``: deviation of the final latent from the uncached run of the same stack. The weights are
  random, so this is a sanity check of the caching (small, finite, growing with the setting), not a quality figure.

Settings per cache: one is diffusers' documented one (the CogVideoX examples of the PAB and FasterCache docs; the
config defaults of first-block cache and mag cache, which have no CogVideoX example; TaylorSeer's Flux example), two
are more or less aggressive (the same for the method stacks). Mag cache's ratios are calibrated first (diffusers'
calibration run, untimed) for each stack. fp8 rows: the transformer's weights stored in fp8 (diffusers' layerwise
casting; ``_all``: the AdaLN modulation too), computed in fp32 as the base: on a CPU fp8 saves memory, not time (every
layer is upcast when it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics

import torch
from common import interleaved_runs
from compose import method_patches
from sampler import build, build_bundle

from magicmirror_video.models.block_runner import block_runner
from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.placement import module_bytes
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.speed import WEIGHT_STORAGE, SpeedOptions, apply_weight_storage, storage_skip_patterns

KW = dict(num_frames=49, height=128, width=128, steps=10, cfg=6.0, seed=0)


def settings(ratios) -> dict:
    """cache -> [(label, options)]; the first is diffusers' documented setting (marked *)."""
    return {
        "first_block_cache": [("* threshold 0.05", SpeedOptions("first_block_cache")),
                              ("threshold 0.2", SpeedOptions("first_block_cache", threshold=0.2)),
                              ("threshold 0.4", SpeedOptions("first_block_cache", threshold=0.4))],
        "pyramid_attention_broadcast": [
            ("* every 2nd, t in (100, 800)", SpeedOptions("pyramid_attention_broadcast")),
            ("every 3rd, t in (100, 800)", SpeedOptions("pyramid_attention_broadcast", interval=3)),
            ("every 2nd, steps 1..9", SpeedOptions("pyramid_attention_broadcast", start_step=1, end_step=10))],
        "faster_cache": [("* every 2nd, t < 681", SpeedOptions("faster_cache")),
                         ("every 2nd, from step 3 (kijai's)", SpeedOptions("faster_cache", start_step=3)),
                         ("every 3rd, from step 2", SpeedOptions("faster_cache", interval=3, start_step=2))],
        "taylorseer": [("* every 5th, from step 3", SpeedOptions("taylorseer")),
                       ("every 3rd, from step 2", SpeedOptions("taylorseer", interval=3, start_step=2)),
                       ("every 2nd, from step 2", SpeedOptions("taylorseer", interval=2, start_step=2))],
        "mag_cache": [("threshold 0.02, <= 1 in a row", SpeedOptions("mag_cache", threshold=0.02, interval=1,
                                                                     mag_ratios=ratios)),
                      ("* threshold 0.06, <= 3 in a row", SpeedOptions("mag_cache", mag_ratios=ratios)),
                      ("threshold 0.24, <= 6 in a row", SpeedOptions("mag_cache", threshold=0.24, interval=6,
                                                                     mag_ratios=ratios))],
    }


class Counter:
    """Rows computed by each block's modulation (the block ran), attention (``to_q``) and feed-forward (first layer),
    counted with forward hooks on those leaves while active."""

    def __init__(self, transformer):
        self.transformer, self.rows, self.handles = transformer, {"blocks": 0, "attn": 0, "ff": 0}, []

    def __enter__(self):
        for blk in self.transformer.transformer_blocks:
            for key, module in (("blocks", blk.norm1.linear), ("attn", blk.attn1.to_q), ("ff", blk.ff.net[0])):
                self.handles.append(module.register_forward_hook(self._count(key)))
        return self

    def _count(self, key):
        def hook(module, args, output):
            self.rows[key] += args[0].shape[0]
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def shares(self, steps: int, rows_per_step: int = 2) -> dict:
        full = steps * rows_per_step * len(self.transformer.transformer_blocks)
        return {k: v / full for k, v in self.rows.items()}


def calibrate(model, pos, neg) -> tuple | None:
    """Mag cache's ratios for ``model`` (diffusers' calibration run, its printout silenced); None where refused."""
    out = {}
    try:
        calibrating = model.with_speed(SpeedOptions("mag_cache"))
    except ValueError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        sample_video(calibrating, pos, neg, **KW, outputs=out)
    return out["mag_ratios"]


def fp8_bundle(name: str):
    """The same random transformer (same seed), weights stored as the loader's weight_storage ``name``, computed in
    fp32."""
    transformer, vae, text_encoder, tokenizer, scheduler_config, _ = build(False, "cpu", torch.float32)
    block_runner(transformer)  # (first, as the loader does)
    apply_weight_storage(transformer, WEIGHT_STORAGE[name], torch.float32, storage_skip_patterns(name))
    return CogVideoXBundle(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           scheduler_config=scheduler_config, dtype=torch.float32, device=torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    mask = torch.zeros(1, 226, dtype=torch.bool)
    mask[0, 2] = True  # one identity token, as in "a man img ..."
    bundle, pos, neg, g = build_bundle(False, "cpu", torch.float32, identity_mask=mask)
    patches = method_patches(bundle.transformer, g)
    stacks = {"base": bundle, "magicmirror": bundle.with_patch(patches["magicmirror"]),
              "dualreal": bundle.with_patch(patches["dualreal"])}
    runs, meta = {}, {}  # name -> fn; name -> (stack, cache, label, model)
    with torch.inference_mode():
        for stack, model in stacks.items():
            ratios = calibrate(model, pos, neg)
            runs[f"{stack}"] = lambda m=model: sample_video(m, pos, neg, **KW)
            meta[stack] = (stack, "none", "uncached", model)
            for cache, options in settings(ratios).items():
                for label, opts in options:
                    try:
                        fast = model.with_speed(opts)
                    except ValueError as e:  # refused with this method (SpeedConflictError)
                        meta[f"{stack} + {cache} refused"] = (stack, cache, str(e).split(":")[0], None)
                        continue
                    name = f"{stack} + {cache}: {label}"
                    runs[name] = lambda m=fast: sample_video(m, pos, neg, **KW)
                    meta[name] = (stack, cache, label, fast)
        for storage in ("fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_all"):
            fp8 = fp8_bundle(storage)
            name = f"base, weights {storage}"
            runs[name] = lambda m=fp8: sample_video(m, pos, neg, **KW)
            meta[name] = ("base", "fp8", storage, fp8)
        reference, stats = {}, {}
        for name, (stack, cache, label, model) in meta.items():
            if model is None:
                continue
            with Counter(model.transformer) as counter:
                out = sample_video(model, pos, neg, **KW)
            if cache == "none":
                reference[stack] = out
            d = (out - reference[stack]).abs()
            stats[name] = {**counter.shares(KW["steps"]), "max_dev": d.max().item(), "mean_dev": d.mean().item(),
                           "weight_bytes": module_bytes(model.transformer)}
        times = interleaved_runs(runs, args.repeats)
    print(f"mid config (4 layers, width 256), 49 frames 128x128, 10 DDIM steps, CFG 6, fp32, CPU, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds (+1 warm-up); random weights: the "
          "deviations are sanity checks, not quality figures")
    print("* = diffusers' documented setting (PAB/FasterCache: its CogVideoX examples; first-block/mag cache: config "
          "defaults; TaylorSeer: its Flux example); kijai's = the peer's FasterCache from step 3")
    header = f"{'configuration':<72}{'median s':>9}{'speedup':>9}{'blocks':>8}{'attn':>7}{'ff':>7}{'max|d|':>9}" \
             f"{'mean|d|':>9}"
    print(header)
    rows = []
    for name, (stack, cache, label, model) in meta.items():
        if model is None:
            print(f"{name:<72}  refused: {label}")
            rows.append({"name": name, "refused": label})
            continue
        med = statistics.median(times[name])
        speedup = statistics.median(times[stack]) / med
        s = stats[name]
        print(f"{name:<72}{med:>9.3f}{speedup:>8.2f}x{s['blocks']:>8.2f}{s['attn']:>7.2f}{s['ff']:>7.2f}"
              f"{s['max_dev']:>9.4f}{s['mean_dev']:>9.5f}")
        rows.append({"name": name, "stack": stack, "cache": cache, "setting": label, "median_s": med,
                     "times": times[name], "speedup": speedup, **s})
    base_bytes = stats["base"]["weight_bytes"]
    for name in [n for n in meta if meta[n][1] == "fp8"]:
        s = stats[name]
        ratio = statistics.median(times[name]) / statistics.median(times["base"])
        print(f"{name}: transformer weights {s['weight_bytes'] / 2**20:.2f} MiB vs {base_bytes / 2**20:.2f} MiB fp32 "
              f"(x{s['weight_bytes'] / base_bytes:.3f}), time x{ratio:.3f} of base")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
