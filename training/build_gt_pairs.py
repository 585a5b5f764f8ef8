"""Build GT-Pair preference data for Reg-DPO: ``python -m training.build_gt_pairs``.

For each real video with a prompt (a folder or manifest as for training): filter (decodable,
long enough for ``num_frames`` at ``fps``, short side ≥ ``min_short_side``, not static by mean
frame difference), normalise to the model's format (frame rate, frame count, aspect by centre crop,
size) → the **winner**; extract its first frame; generate the **loser** with the base model through
the pack's own sampler from the same first frame (I2V base) or prompt (T2V base) and a per-pair
seed. Writes ``pairs.jsonl`` rows ``{winner, loser, caption, first_frame, seed, source}``.

Only the ``num_frames`` frames a clip contributes are decoded (the length and size checks read the
container, not the pixels), and every check that needs no model runs before the model loads: if
every clip is filtered out the tool exits with status 1 and the reasons, without loading it.

Resumable and data-parallel: pair ``i`` (the i-th distinct clip of the input) is made by process
``i % world_size`` (``accelerate launch --num_processes N -m training.build_gt_pairs ...``); its
videos are written to temporary files and renamed, then ``pairs/<i>.json`` marks it finished. A re-run
skips finished pairs; at the end the main process merges the markers into ``pairs.jsonl`` (each pair
once, none half-written). Every skipped file is reported with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from tqdm.auto import tqdm

from .config import InputError
from .data import read_manifest, resize_crop, write_jsonl

logger = logging.getLogger(__name__)
PAIR_FILES = (("winner", "mp4"), ("loser", "mp4"), ("first_frame", "png"))


def source_frames(total: int, src_fps: float, *, fps: float, num_frames: int) -> list[int] | None:
    """Indices of the source frames that resample a clip of ``total`` frames at ``src_fps`` to ``num_frames``
    frames at ``fps`` (nearest frame), or None when the clip is too short."""
    index = [round(k * src_fps / fps) for k in range(num_frames)]
    return index if index[-1] < total else None


def normalise(frames: torch.Tensor, *, height: int, width: int,
              static_threshold: float) -> tuple[torch.Tensor | None, str]:
    """The picked frames [num_frames, H, W, 3] 0..1 -> ([num_frames, height, width, 3], "") or (None, reason)."""
    motion = (frames[1:] - frames[:-1]).abs().mean().item()
    if motion < static_threshold:
        return None, f"static: mean frame difference {motion:.4f} < {static_threshold}"
    return resize_crop(frames.permute(0, 3, 1, 2), height, width).permute(0, 2, 3, 1).clamp(0, 1), ""


def _finished(output_dir: str, row: dict) -> bool:
    return all(os.path.isfile(os.path.join(output_dir, row[k])) for k, _ in PAIR_FILES)


def finished_pairs(output_dir: str) -> dict[str, dict]:
    """source -> row of every finished pair: the ``pairs/*.json`` markers, and rows of a ``pairs.jsonl``
    written by an older version (no markers), whose three files all exist."""
    rows: dict[str, dict] = {}
    manifest = os.path.join(output_dir, "pairs.jsonl")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row["source"], row)
    folder = os.path.join(output_dir, "pairs")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and ".tmp-" not in name:
            with open(os.path.join(folder, name)) as f:
                row = json.load(f)
            rows[row["source"]] = row
    return {source: row for source, row in rows.items() if _finished(output_dir, row)}


def merge_pairs(output_dir: str) -> list[dict]:
    """Write ``pairs.jsonl`` from every finished pair (each once, ordered by pair file), atomically."""
    rows = sorted(finished_pairs(output_dir).values(), key=lambda r: r["winner"])
    write_jsonl(os.path.join(output_dir, "pairs.jsonl"), rows)
    return rows


def plan_pairs(samples, output_dir: str, *, num_frames: int, height: int, width: int, fps: float = 8.0,
               min_short_side: int = 64, rank: int = 0, world: int = 1) -> tuple[list, dict]:
    """This process's share of the work, from the containers only (no model, no pixels): returns
    ``[(pair index, sample, video index, source frames)]`` still to make, and the counts so far."""
    from ..models.sampler import check_video_size
    from ..models.video_io import index_video

    check_video_size(num_frames, height, width)
    done = finished_pairs(output_dir)
    stats = {"written": 0, "already_done": 0, "skipped": []}
    todo, seen = [], {}
    for sample in samples:
        if sample.media in seen:
            if seen[sample.media] % world == rank:
                stats["skipped"].append((sample.media, f"duplicate: the same video as pair {seen[sample.media]}"))
            continue
        index = seen[sample.media] = len(seen)
        if index % world != rank:
            continue
        if sample.media in done:
            stats["already_done"] += 1
            continue
        try:
            video = index_video(sample.media)
        except Exception as e:  # missing, undecodable or no video stream: report and go on
            stats["skipped"].append((sample.media, f"corrupt or unreadable: {' '.join(str(e).split())}"))
            continue
        if min(video.width, video.height) < min_short_side:
            stats["skipped"].append((sample.media, f"resolution {video.width}x{video.height}: short side below "
                                                   f"{min_short_side}"))
            continue
        picks = source_frames(video.frames, video.fps, fps=fps, num_frames=num_frames)
        if picks is None:
            stats["skipped"].append((sample.media, f"too short: {video.frames} frames at {video.fps:g} fps = "
                                                   f"{video.frames / video.fps:.2f} s; {num_frames} frames at {fps:g} "
                                                   f"fps need {(num_frames - 1) / fps:.2f} s"))
            continue
        todo.append((index, sample, video, picks))
    return todo, stats


def make_pairs(todo, stats: dict, bundle, output_dir: str, *, num_frames: int, height: int, width: int,
               fps: float = 8.0, static_threshold: float = 0.01, steps: int = 50, cfg: float = 6.0, seed: int = 0,
               scheduler: str = "ddim", progress: bool = True) -> dict:
    """Decode, normalise and write the winner, first frame and generated loser of each planned pair, then
    its ``pairs/<i>.json`` marker. Updates and returns ``stats``."""
    from PIL import Image

    from ..models.sampler import decode_latents, sample_video
    from ..models.text import encode_prompt
    from ..models.video_io import read_frames, write_video

    os.makedirs(os.path.join(output_dir, "pairs"), exist_ok=True)
    i2v = bundle.transformer.config.in_channels == 2 * bundle.transformer.config.out_channels
    for index, sample, video, picks in tqdm(todo, desc="GT-Pairs", disable=not progress):
        try:
            frames = torch.from_numpy(read_frames(sample.media, picks, video)).float() / 255.0
        except Exception as e:  # undecodable media: report and go on
            stats["skipped"].append((sample.media, f"corrupt or unreadable: {' '.join(str(e).split())}"))
            continue
        clip, reason = normalise(frames, height=height, width=width, static_threshold=static_threshold)
        if clip is None:
            stats["skipped"].append((sample.media, reason))
            continue
        stem = f"{index:06d}"
        rel = {k: os.path.join("pairs", f"{stem}_{k}.{ext}") for k, ext in PAIR_FILES}
        write_video(os.path.join(output_dir, rel["winner"]), clip, fps=fps)
        first_tmp = os.path.join(output_dir, rel["first_frame"] + f".tmp-{os.getpid()}.png")
        Image.fromarray((clip[0] * 255).round().to(torch.uint8).numpy()).save(first_tmp)
        os.replace(first_tmp, os.path.join(output_dir, rel["first_frame"]))
        pair_seed = seed + index
        latents = sample_video(bundle, encode_prompt(bundle, sample.caption), num_frames=num_frames, height=height,
                               width=width, steps=steps, cfg=cfg, seed=pair_seed, scheduler=scheduler,
                               image=clip[:1] if i2v else None)
        write_video(os.path.join(output_dir, rel["loser"]), decode_latents(bundle, latents)[0], fps=fps)
        marker = os.path.join(output_dir, "pairs", f"{stem}.json")
        with open(f"{marker}.tmp-{os.getpid()}", "w") as f:
            json.dump({**rel, "caption": sample.caption, "seed": pair_seed, "source": sample.media}, f)
        os.replace(f"{marker}.tmp-{os.getpid()}", marker)
        stats["written"] += 1
    return stats


def build_pairs(samples, bundle, output_dir: str, *, num_frames: int, height: int, width: int, fps: float = 8.0,
                min_short_side: int = 64, static_threshold: float = 0.01, steps: int = 50, cfg: float = 6.0,
                seed: int = 0, scheduler: str = "ddim") -> dict:
    """Write winner/loser pairs for ``samples`` into ``output_dir`` (one process) and merge ``pairs.jsonl``;
    returns counts and skip reasons."""
    todo, stats = plan_pairs(samples, output_dir, num_frames=num_frames, height=height, width=width, fps=fps,
                             min_short_side=min_short_side)
    try:
        make_pairs(todo, stats, bundle, output_dir, num_frames=num_frames, height=height, width=width, fps=fps,
                   static_threshold=static_threshold, steps=steps, cfg=cfg, seed=seed, scheduler=scheduler)
    finally:
        os.makedirs(output_dir, exist_ok=True)
        merge_pairs(output_dir)
    return stats


def summary(stats: list[dict], manifest: str) -> tuple[int, str]:
    """(pairs available, report lines) over the stats of every process."""
    written, done = sum(s["written"] for s in stats), sum(s["already_done"] for s in stats)
    skipped = sorted(p for s in stats for p in s["skipped"])
    per_process = "" if len(stats) == 1 else " (" + ", ".join(
        f"process {rank}: {s['written']} written, {s['already_done']} done" for rank, s in enumerate(stats)) + ")"
    lines = [f"{written} pairs written, {done} already done, {len(skipped)} skipped -> {manifest}{per_process}"]
    lines += [f"  skipped {path}: {reason}" for path, reason in skipped]
    return written + done, "\n".join(lines)


def main(argv=None) -> int:
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
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--device", default=None, help="Default: this process's accelerator device (cuda:<rank>) or cpu.")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except InputError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .inputs import check_model_folder, check_size
    from .trainer import use_cpu

    check_size(args.num_frames, args.height, args.width)
    check_model_folder(args.model_path)
    if os.path.isfile(args.output):
        raise InputError(f"--output {args.output} is a file; pass a folder (it is created if missing)")
    try:
        samples = read_manifest(args.input, check_files=False)  # a missing clip is skipped and reported
    except InputError as e:
        raise type(e)(f"--input: {e}") from None
    state = PartialState(cpu=use_cpu())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING)
    kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps)
    todo, stats = plan_pairs(samples, args.output, min_short_side=args.min_short_side, rank=state.process_index,
                             world=state.num_processes, **kw)
    if any(gather_object([len(todo)])):  # nothing to make anywhere: no model is loaded
        from ..models.cogvideox import DTYPES, load_cogvideox

        bundle = load_cogvideox(args.model_path, dtype=DTYPES[args.precision], device=args.device or state.device)
        make_pairs(todo, stats, bundle, args.output, static_threshold=args.static_threshold, steps=args.steps,
                   cfg=args.cfg, seed=args.seed, scheduler=args.scheduler, progress=state.is_main_process, **kw)
    everyone = gather_object([stats])
    manifest = os.path.join(args.output, "pairs.jsonl")
    if state.is_main_process:
        os.makedirs(args.output, exist_ok=True)
        merge_pairs(args.output)
    state.wait_for_everyone()
    available, report = summary(everyone, manifest)
    if state.is_main_process:
        print(report)
        if not available:
            print(f"error: no GT-Pair in {manifest}: every clip of {args.input} was skipped (reasons above); "
                  "adjust --num_frames/--fps/--min_short_side/--static_threshold or add clips", file=sys.stderr)
    return 0 if available else 1


if __name__ == "__main__":
    raise SystemExit(main())
