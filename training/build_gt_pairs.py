"""Build GT-Pair preference data for Reg-DPO: ``python -m training.build_gt_pairs``.

For each real video with a prompt (a folder or manifest as for training): filter (decodable,
long enough for ``num_frames`` at ``fps``, short side ≥ ``min_short_side``, not static by mean
frame difference), normalise to the model's format (frame rate, frame count, aspect by centre crop,
size) → the **winner**; extract its first frame; generate the **loser** with the base model through
the pack's own sampler from the same first frame (I2V base) or prompt (T2V base) and a per-pair
seed. Writes ``pairs.jsonl`` rows ``{winner, loser, caption, first_frame, seed, source}``.

Resumable: re-running skips pairs already in the manifest. Videos are written to temporary files
and renamed, and a row is added only after both videos exist, so a crash never leaves a half-written
video in the manifest. Every skipped file is reported with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from tqdm.auto import tqdm

from ..models.sampler import check_video_size
from ..models.video_io import read_video, write_video
from .data import read_manifest, resize_crop, write_jsonl

logger = logging.getLogger(__name__)


def normalise(frames: torch.Tensor, src_fps: float, *, fps: float, num_frames: int, height: int, width: int,
              min_short_side: int, static_threshold: float) -> tuple[torch.Tensor | None, str]:
    """Frames [T, H, W, 3] 0..1 -> ([num_frames, height, width, 3], "") or (None, reason to skip)."""
    total, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
    if min(h, w) < min_short_side:
        return None, f"resolution {w}x{h}: short side below {min_short_side}"
    span = (num_frames - 1) / fps  # seconds the clip must cover
    index = [round(k * src_fps / fps) for k in range(num_frames)]
    if index[-1] >= total:
        return None, (f"too short: {total} frames at {src_fps:g} fps = {total / src_fps:.2f} s; {num_frames} frames "
                      f"at {fps:g} fps need {span:.2f} s")
    clip = frames[index]  # [num_frames, H, W, 3]
    motion = (clip[1:] - clip[:-1]).abs().mean().item()
    if motion < static_threshold:
        return None, f"static: mean frame difference {motion:.4f} < {static_threshold}"
    clip = resize_crop(clip.permute(0, 3, 1, 2), height, width).permute(0, 2, 3, 1).clamp(0, 1)
    return clip, ""


def build_pairs(samples, bundle, output_dir: str, *, num_frames: int, height: int, width: int, fps: float = 8.0,
                min_short_side: int = 64, static_threshold: float = 0.01, steps: int = 50, cfg: float = 6.0,
                seed: int = 0, scheduler: str = "ddim") -> dict:
    """Write winner/loser pairs for ``samples`` into ``output_dir``; returns counts and skip reasons."""
    from PIL import Image

    from ..models.sampler import decode_latents, sample_video
    from ..models.text import encode_prompt

    check_video_size(num_frames, height, width)
    os.makedirs(os.path.join(output_dir, "pairs"), exist_ok=True)
    manifest = os.path.join(output_dir, "pairs.jsonl")
    rows = [json.loads(line) for line in open(manifest)] if os.path.isfile(manifest) else []
    done = {r["source"] for r in rows if all(os.path.isfile(os.path.join(output_dir, r[k]))
                                           for k in ("winner", "loser", "first_frame"))}
    rows = [r for r in rows if r["source"] in done]
    stats = {"written": 0, "already_done": 0, "skipped": []}
    i2v = bundle.transformer.config.in_channels == 2 * bundle.transformer.config.out_channels
    for index, sample in enumerate(tqdm(samples, desc="GT-Pairs")):
        if sample.media in done:
            stats["already_done"] += 1
            continue
        try:
            frames, src_fps = read_video(sample.media)
        except Exception as e:  # undecodable media: report and go on
            stats["skipped"].append((sample.media, f"corrupt or unreadable: {e}"))
            continue
        clip, reason = normalise(frames, src_fps, fps=fps, num_frames=num_frames, height=height, width=width,
                                 min_short_side=min_short_side, static_threshold=static_threshold)
        if clip is None:
            stats["skipped"].append((sample.media, reason))
            continue
        stem = f"{index:06d}"
        rel = {k: os.path.join("pairs", f"{stem}_{k}.{ext}") for k, ext in
               (("winner", "mp4"), ("loser", "mp4"), ("first_frame", "png"))}
        write_video(os.path.join(output_dir, rel["winner"]), clip, fps=fps)
        first_tmp = os.path.join(output_dir, rel["first_frame"] + f".tmp-{os.getpid()}.png")
        Image.fromarray((clip[0] * 255).round().to(torch.uint8).numpy()).save(first_tmp)
        os.replace(first_tmp, os.path.join(output_dir, rel["first_frame"]))
        pair_seed = seed + index
        latents = sample_video(bundle, encode_prompt(bundle, sample.caption), num_frames=num_frames, height=height,
                               width=width, steps=steps, cfg=cfg, seed=pair_seed, scheduler=scheduler,
                               image=clip[:1] if i2v else None)
        write_video(os.path.join(output_dir, rel["loser"]), decode_latents(bundle, latents)[0], fps=fps)
        rows.append({**rel, "caption": sample.caption, "seed": pair_seed, "source": sample.media})
        write_jsonl(manifest, rows)
        stats["written"] += 1
    if not os.path.isfile(manifest):
        write_jsonl(manifest, rows)
    return stats


def main(argv=None) -> int:
    from ..models.cogvideox import DTYPES, load_cogvideox

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Real videos: metadata.jsonl, or a folder (prompts.txt + videos.txt).")
    ap.add_argument("--output", required=True, help="Folder for pairs/ and pairs.jsonl.")
    ap.add_argument("--model_path", required=True, help="The base CogVideoX folder (T2V or I2V) that makes the losers.")
    ap.add_argument("--num_frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--fps", type=float, default=8.0, help="Frame rate of the normalised clips (CogVideoX: 8; 1.5: 16).")
    ap.add_argument("--min_short_side", type=int, default=256, help="Skip videos whose short side is smaller.")
    ap.add_argument("--static_threshold", type=float, default=0.01, help="Skip clips whose mean frame difference "
                    "(0..1 pixels) is below this.")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0, help="Pair i uses seed + i.")
    ap.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm"))
    ap.add_argument("--precision", default="bf16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    samples = read_manifest(args.input, check_files=False)
    bundle = load_cogvideox(args.model_path, dtype=DTYPES[args.precision], device=args.device)
    stats = build_pairs(samples, bundle, args.output, num_frames=args.num_frames, height=args.height, width=args.width,
                        fps=args.fps, min_short_side=args.min_short_side, static_threshold=args.static_threshold,
                        steps=args.steps, cfg=args.cfg, seed=args.seed, scheduler=args.scheduler)
    print(f"{stats['written']} pairs written, {stats['already_done']} already done, {len(stats['skipped'])} skipped "
          f"-> {os.path.join(args.output, 'pairs.jsonl')}")
    for path, reason in stats["skipped"]:
        print(f"  skipped {path}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
