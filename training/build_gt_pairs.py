"""Build GT-Pair preference data for Reg-DPO: ``python -m training.build_gt_pairs``.

For each real video with a prompt (a folder or manifest as for training): filter (decodable, a video and not
an image, long enough for ``num_frames`` at ``fps``, short side ≥ ``min_short_side``, not static by mean frame
difference), normalise to the pairs' format (frame rate, frame count, aspect by centre crop, size) → the
**winner**; extract its first frame; then each **loser generator** (``--model_path PATH`` or
``--generator NAME=PATH``, any number; ``training/loser_generators.py``) makes one **loser** per clip from the
same first frame (image-conditioned models) or prompt (text-to-video models) and a per-pair seed:
CogVideoX through the pack's own sampler, Wan 2.1 / 2.2 through diffusers' ``WanPipeline`` /
``WanImageToVideoPipeline``. Writes ``pairs.jsonl`` rows
``{winner, loser, first_frame, caption, seed, source, generator}``, one per clip and generator.

The format defaults to the generators' own (CogVideoX 49 frames at 8 fps, 480x720; Wan 81 frames at 16 fps,
480x832); an option the user sets is kept as given and must suit every generator (4k+1 frames for its VAE,
sides multiples of its VAE factor × patch size). Generators of different bases need the options their
defaults disagree on.

Only the ``num_frames`` frames a clip contributes are decoded (the length and size checks read the container,
not the pixels), every check that needs no model runs before a model loads, and the winners are written before
any generator loads: if every clip is filtered out the tool exits with status 1 and the reasons without loading
one. Generators load one at a time, each only if some clip still needs its loser.

Resumable and data-parallel: clip ``i`` (the i-th distinct clip of the input) is handled by process
``i % world_size`` (``accelerate launch --num_processes N -m training.build_gt_pairs ...``) for every generator;
videos are written to temporary files and renamed, then ``pairs/<i>_<generator>.json`` marks the pair finished.
A re-run skips finished pairs (and reuses a clip's winner for a generator added later); at the end the main
process merges the markers into ``pairs.jsonl`` (each pair once, none half-written). Every skipped file is
reported with the reason. A folder written before the ``generator`` column (one generator; markers
``pairs/<i>.json``) stays valid: its pairs count as the first generator's.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys

import torch
from tqdm.auto import tqdm

from .config import InputError
from .data import Sample, is_image, read_manifest, resize_crop, write_jsonl
from .loser_generators import GenerationSettings, LoserGenerator, folder_generator, loaded_generator

logger = logging.getLogger(__name__)
CLIP_FILES = (("winner", "mp4"), ("first_frame", "png"))  # one per clip, shared by its generators' pairs
ROW_FILES = ("winner", "loser", "first_frame")
FORMAT_OPTIONS = ("num_frames", "fps", "height", "width")


def clip_files(index: int) -> dict:
    """Paths (relative to the output folder) of clip ``index``'s winner and first frame."""
    return {k: os.path.join("pairs", f"{index:06d}_{k}.{ext}") for k, ext in CLIP_FILES}


def loser_file(index: int, generator: str) -> str:
    return os.path.join("pairs", f"{index:06d}_loser_{generator}.mp4")


def marker_file(index: int, generator: str) -> str:
    return os.path.join("pairs", f"{index:06d}_{generator}.json")


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
    return all(os.path.isfile(os.path.join(output_dir, row[k])) for k in ROW_FILES)


def finished_pairs(output_dir: str, legacy_generator: str) -> dict[tuple[str, str], dict]:
    """(source, generator) -> row of every finished pair: the ``pairs/*.json`` markers, and rows of a
    ``pairs.jsonl`` written by an older version (no markers), whose three files all exist.

    Rows without a ``generator`` (a folder written before it existed, by one generator) count as
    ``legacy_generator``'s, unless a row with a generator already claims their loser file."""
    rows: list[dict] = []
    manifest = os.path.join(output_dir, "pairs.jsonl")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), "pairs", "*.json"))):
        if ".tmp-" not in os.path.basename(path):
            with open(path) as f:
                rows.append(json.load(f))  # after the manifest's rows: a marker is the newer record
    claimed = {r["loser"] for r in rows if r.get("generator")}
    found: dict[tuple[str, str], dict] = {}
    for row in rows:
        if not row.get("generator"):
            if row["loser"] in claimed:
                continue
            row = {**row, "generator": legacy_generator}
        found[(row["source"], row["generator"])] = row
    return {key: row for key, row in found.items() if _finished(output_dir, row)}


def merge_pairs(output_dir: str, legacy_generator: str) -> list[dict]:
    """Write ``pairs.jsonl`` from every finished pair (each once, ordered by clip, then loser), atomically."""
    rows = sorted(finished_pairs(output_dir, legacy_generator).values(), key=lambda r: (r["winner"], r["loser"]))
    write_jsonl(os.path.join(output_dir, "pairs.jsonl"), rows)
    return rows


def clip_indices(samples) -> dict[str, int]:
    """media path -> pair index: the order of the input's distinct clips (a clip listed twice keeps its first)."""
    indices: dict[str, int] = {}
    for sample in samples:
        indices.setdefault(sample.media, len(indices))
    return indices


def check_clip_order(samples, output_dir: str, legacy_generator: str) -> None:
    """The finished pairs' winner files belong to the clips this input gives their indices (a clip inserted or
    removed before them would make a new clip reuse, or overwrite, another clip's files); else one InputError."""
    owners = {row["winner"]: row["source"] for row in finished_pairs(output_dir, legacy_generator).values()}
    for media, index in clip_indices(samples).items():
        owner = owners.get(clip_files(index)["winner"])
        if owner is not None and owner != media:
            raise InputError(f"--output: pair {index} of {output_dir} was made from {owner}, but clip {index} of "
                             f"--input is {media}: the input's clips changed order since; keep the order the folder "
                             "was built with (add new clips at the end) or use another --output")


def check_output_format(output_dir: str, legacy_generator: str, *, num_frames: int, height: int, width: int,
                        fps: float) -> None:
    """Every finished pair's winner in ``output_dir`` has this run's format (a generator added later reuses it),
    read from the containers; else one InputError line."""
    from ..models.video_io import probe_video

    winners = sorted({row["winner"] for row in finished_pairs(output_dir, legacy_generator).values()})
    for path in (os.path.join(output_dir, w) for w in winners):
        try:
            info = probe_video(path)
        except Exception as e:  # av errors of many kinds
            raise InputError(f"--output: cannot read {path} ({' '.join(str(e).split())}); delete it (and its pair "
                             "markers) or use another --output") from None
        if (info.frames, info.height, info.width) != (num_frames, height, width) or abs(info.fps - fps) > 1e-3:
            raise InputError(f"--output: {path} has {info.frames} frames {info.height}x{info.width} at {info.fps:g} "
                             f"fps but this run makes {num_frames} frames {height}x{width} at {fps:g} fps; pass that "
                             "folder's --num_frames/--height/--width/--fps or another --output")


@dataclasses.dataclass
class PlannedClip:
    """A clip with pairs still to make: the generators that lack its loser, and (when its winner is still to
    write) the container's index and the source frames it contributes."""

    index: int
    sample: Sample
    generators: list
    video: object = None
    picks: list | None = None


def _new_stats(names) -> dict:
    return {"written": 0, "already_done": 0, "skipped": [],
            "generators": {n: {"written": 0, "already_done": 0} for n in names}}


def plan_pairs(samples, output_dir: str, generators, *, num_frames: int, fps: float = 8.0, min_short_side: int = 64,
               rank: int = 0, world: int = 1) -> tuple[list[PlannedClip], dict]:
    """This process's share of the work, from the containers only (no model, no pixels): the clips that still
    lack a loser of some generator (names, in order), and the counts so far."""
    from ..models.video_io import index_video

    names = list(generators)
    done = finished_pairs(output_dir, names[0])
    owners = {row["winner"]: row["source"] for row in done.values()}
    stats = _new_stats(names)
    todo, seen = [], {}
    for sample in samples:
        if sample.media in seen:
            if seen[sample.media] % world == rank:
                stats["skipped"].append((sample.media, f"duplicate: the same video as pair {seen[sample.media]}"))
            continue
        index = seen[sample.media] = len(seen)
        if index % world != rank:
            continue
        needed = [n for n in names if (sample.media, n) not in done]
        for n in names:
            if n not in needed:
                stats["already_done"] += 1
                stats["generators"][n]["already_done"] += 1
        if not needed:
            continue
        rel = clip_files(index)
        if owners.get(rel["winner"]) == sample.media and os.path.isfile(os.path.join(output_dir, rel["first_frame"])):
            todo.append(PlannedClip(index, sample, needed))  # a finished pair holds its winner: only losers are missing
            continue
        if is_image(sample.media):
            stats["skipped"].append((sample.media, "an image, not a video: a GT-Pair's winner is a real clip"))
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
        todo.append(PlannedClip(index, sample, needed, video, picks))
    return todo, stats


def write_winners(todo: list[PlannedClip], stats: dict, output_dir: str, *, height: int, width: int, fps: float,
                  static_threshold: float = 0.01, progress: bool = True) -> list[PlannedClip]:
    """Decode, normalise and write the winner and first frame of each planned clip that lacks them (no model
    needed); returns the clips whose winner is ready. Static or undecodable clips are reported in ``stats``."""
    from PIL import Image

    from ..models.video_io import read_frames, write_video

    os.makedirs(os.path.join(output_dir, "pairs"), exist_ok=True)
    ready = []
    for clip in tqdm(todo, desc="GT-Pair winners", disable=not progress or not todo):
        if clip.video is None:
            ready.append(clip)
            continue
        try:
            frames = torch.from_numpy(read_frames(clip.sample.media, clip.picks, clip.video)).float() / 255.0
        except Exception as e:  # undecodable media: report and go on
            stats["skipped"].append((clip.sample.media, f"corrupt or unreadable: {' '.join(str(e).split())}"))
            continue
        winner, reason = normalise(frames, height=height, width=width, static_threshold=static_threshold)
        if winner is None:
            stats["skipped"].append((clip.sample.media, reason))
            continue
        rel = clip_files(clip.index)
        write_video(os.path.join(output_dir, rel["winner"]), winner, fps=fps)
        first_tmp = os.path.join(output_dir, rel["first_frame"] + f".tmp-{os.getpid()}.png")
        Image.fromarray((winner[0] * 255).round().to(torch.uint8).numpy()).save(first_tmp)
        os.replace(first_tmp, os.path.join(output_dir, rel["first_frame"]))
        ready.append(clip)
    return ready


def make_losers(clips: list[PlannedClip], stats: dict, generator: LoserGenerator, output_dir: str, *, fps: float,
                seed: int = 0, progress: bool = True) -> dict:
    """With ``generator`` loaded: generate, write and mark the loser of each clip that lacks it (seed + the clip's
    index). Updates and returns ``stats``."""
    import numpy as np
    from PIL import Image

    from ..models.video_io import write_video

    s = generator.settings
    mine = [c for c in clips if generator.name in c.generators]
    for clip in tqdm(mine, desc=f"GT-Pair losers ({generator.name})", disable=not progress):
        rel = {**clip_files(clip.index), "loser": loser_file(clip.index, generator.name)}
        with Image.open(os.path.join(output_dir, rel["first_frame"])) as im:
            first_frame = torch.from_numpy(np.array(im.convert("RGB"))).float() / 255.0  # [H, W, 3]
        pair_seed = seed + clip.index
        frames = generator.generate(clip.sample.caption, first_frame, pair_seed)
        if tuple(frames.shape) != (s.num_frames, s.height, s.width, 3):
            raise RuntimeError(f"generator {generator.name} returned frames {tuple(frames.shape)}, expected "
                               f"{(s.num_frames, s.height, s.width, 3)}")
        write_video(os.path.join(output_dir, rel["loser"]), frames, fps=fps)
        marker = os.path.join(output_dir, marker_file(clip.index, generator.name))
        with open(f"{marker}.tmp-{os.getpid()}", "w") as f:
            json.dump({"winner": rel["winner"], "loser": rel["loser"], "first_frame": rel["first_frame"],
                       "caption": clip.sample.caption, "seed": pair_seed, "source": clip.sample.media,
                       "generator": generator.name}, f)
        os.replace(f"{marker}.tmp-{os.getpid()}", marker)
        stats["written"] += 1
        stats["generators"][generator.name]["written"] += 1
    return stats


def as_generators(generators) -> list[LoserGenerator]:
    """A generator, a loaded model (``CogVideoXBundle`` / ``WanModel``), or a list of them -> generators."""
    items = generators if isinstance(generators, (list, tuple)) else [generators]
    out = [g if isinstance(g, LoserGenerator) else loaded_generator(g) for g in items]
    check_unique([g.name for g in out])
    return out


def check_unique(names, options=None) -> None:
    for k, name in enumerate(names):
        if name in names[:k]:
            option = options[k] if options else "--generator"
            raise InputError(f"{option}: two generators are named {name!r}; give each its own name with "
                             "--generator NAME=PATH")


def build_pairs(samples, generators, output_dir: str, *, num_frames: int, height: int, width: int, fps: float = 8.0,
                min_short_side: int = 64, static_threshold: float = 0.01, steps: int = 50, cfg: float | None = None,
                seed: int = 0, scheduler: str = "ddim", dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Write winner/loser pairs for ``samples`` into ``output_dir`` (one process) and merge ``pairs.jsonl``;
    ``generators``: see :func:`as_generators` (folders load in ``dtype`` on ``device``, one at a time). Returns
    counts and skip reasons."""
    generators = as_generators(generators)
    for g in generators:
        g.check_format(num_frames, height, width)
    check_clip_order(samples, output_dir, generators[0].name)
    check_output_format(output_dir, generators[0].name, num_frames=num_frames, height=height, width=width, fps=fps)
    todo, stats = plan_pairs(samples, output_dir, [g.name for g in generators], num_frames=num_frames, fps=fps,
                             min_short_side=min_short_side)
    settings = GenerationSettings(num_frames=num_frames, height=height, width=width, steps=steps, cfg=cfg,
                                  scheduler=scheduler, dtype=dtype, device=device, progress=progress)
    try:
        clips = write_winners(todo, stats, output_dir, height=height, width=width, fps=fps,
                              static_threshold=static_threshold, progress=progress)
        for g in generators:
            if any(g.name in c.generators for c in clips):
                with g.loaded(settings):
                    make_losers(clips, stats, g, output_dir, fps=fps, seed=seed, progress=progress)
    finally:
        os.makedirs(output_dir, exist_ok=True)
        merge_pairs(output_dir, generators[0].name)
    return stats


def summary(stats: list[dict], manifest: str) -> tuple[int, str]:
    """(pairs available, report lines) over the stats of every process."""
    written, done = sum(s["written"] for s in stats), sum(s["already_done"] for s in stats)
    skipped = sorted(p for s in stats for p in s["skipped"])
    per_process = "" if len(stats) == 1 else " (" + ", ".join(
        f"process {rank}: {s['written']} written, {s['already_done']} done" for rank, s in enumerate(stats)) + ")"
    lines = [f"{written} pairs written, {done} already done, {len(skipped)} skipped -> {manifest}{per_process}"]
    names = list(stats[0]["generators"])
    if len(names) > 1:
        lines.append("  per generator: " + ", ".join(
            f"{n}: {sum(s['generators'][n]['written'] for s in stats)} written, "
            f"{sum(s['generators'][n]['already_done'] for s in stats)} done" for n in names))
    lines += [f"  skipped {path}: {reason}" for path, reason in skipped]
    return written + done, "\n".join(lines)


class _AddGenerator(argparse.Action):
    """``--model_path`` and ``--generator`` both append (option, value) to ``generators``, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (option_string, values)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Real videos: metadata.jsonl, or a folder (prompts.txt + videos.txt).")
    ap.add_argument("--output", required=True, help="Folder for pairs/ and pairs.jsonl.")
    ap.set_defaults(generators=[])
    ap.add_argument("--model_path", dest="generators", action=_AddGenerator, metavar="PATH",
                    help="A loser generator: a diffusers CogVideoX or Wan folder (T2V, I2V, Wan 2.2 A14B or TI2V-5B), "
                         "named by its folder. Repeat for several generators (one loser per clip each).")
    ap.add_argument("--generator", dest="generators", action=_AddGenerator, metavar="NAME=PATH",
                    help="A loser generator with its name (letters, digits, . _ -; the rows' generator column and "
                         "the losers' file names). Mixes with --model_path; the first generator listed owns the "
                         "pairs of a folder written before the generator column.")
    ap.add_argument("--num_frames", type=int, default=None, help="Frames per clip (4k+1). Default: the generators' "
                    "(CogVideoX 49, Wan 81).")
    ap.add_argument("--height", type=int, default=None, help="Default: the generators' (CogVideoX and Wan 480).")
    ap.add_argument("--width", type=int, default=None, help="Default: the generators' (CogVideoX 720, Wan 832).")
    ap.add_argument("--fps", type=float, default=None, help="Frame rate of the normalised clips. Default: the "
                    "generators' (CogVideoX 8, Wan 16).")
    ap.add_argument("--min_short_side", type=int, default=256, help="Skip videos whose short side is smaller.")
    ap.add_argument("--static_threshold", type=float, default=0.01, help="Skip clips whose mean frame difference "
                    "(0..1 pixels) is below this.")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=None, help="Guidance scale for every generator. Default: each "
                    "generator's (CogVideoX 6, Wan 5).")
    ap.add_argument("--seed", type=int, default=0, help="Clip i's losers use seed + i.")
    ap.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm"), help="CogVideoX's sampler; Wan samples "
                    "with its folder's scheduler, as diffusers' pipeline.")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--device", default=None, help="Default: this process's accelerator device (cuda:<rank>) or cpu.")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except InputError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def parse_generators(entries) -> list[LoserGenerator]:
    """(option, value) pairs of ``--model_path PATH`` / ``--generator NAME=PATH`` -> generators (JSON only)."""
    if not entries:
        raise InputError("no loser generator: pass --model_path PATH (a diffusers CogVideoX or Wan folder) or "
                         "--generator NAME=PATH, once per generator")
    out, options = [], []
    for option, value in entries:
        name = None
        if option == "--generator":
            name, sep, value = value.partition("=")
            if not sep or not name or not value:
                raise InputError(f"--generator {name}{sep}{value}: expected NAME=PATH (e.g. --generator "
                                 "wan21=models/Wan2.1-I2V-14B-480P-Diffusers)")
            option = f"--generator {name}"
        out.append(folder_generator(value, name, option))
        options.append(option)
    check_unique([g.name for g in out], options)
    return out


def resolve_format(args, generators: list[LoserGenerator]) -> None:
    """Fill the format options the user left unset from the generators' defaults (which must agree)."""
    for option in FORMAT_OPTIONS:
        if getattr(args, option) is not None:
            continue
        values = {g.defaults[option] for g in generators}
        if len(values) > 1:
            listed = ", ".join(f"{g.name} ({type(g).base}): {g.defaults[option]:g}" for g in generators)
            raise InputError(f"--{option}: the generators' defaults differ ({listed}); pass --{option} (one value for "
                             "every pair)")
        setattr(args, option, values.pop())
    if args.fps <= 0:
        raise InputError(f"--fps: {args.fps:g} is not a frame rate; pass a positive number (e.g. 16)")


def _run(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..models.cogvideox import DTYPES
    from .trainer import use_cpu

    generators = parse_generators(args.generators)  # every folder's JSON: no weights yet
    resolve_format(args, generators)
    for g in generators:
        g.check_format(args.num_frames, args.height, args.width)
    if os.path.isfile(args.output):
        raise InputError(f"--output {args.output} is a file; pass a folder (it is created if missing)")
    try:
        samples = read_manifest(args.input, check_files=False)  # a missing clip is skipped and reported
    except InputError as e:
        raise type(e)(f"--input: {e}") from None
    if all(is_image(s.media) for s in samples):
        raise InputError(f"--input: every row of {args.input} is an image; a GT-Pair's winner is a real video clip "
                         "(pass videos: videos.txt or a metadata.jsonl with video paths)")
    check_clip_order(samples, args.output, generators[0].name)
    check_output_format(args.output, generators[0].name, num_frames=args.num_frames, height=args.height,
                        width=args.width, fps=args.fps)
    state = PartialState(cpu=use_cpu())
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING)
    logger.info("GT-Pairs of %d frames %dx%d at %g fps; loser generators: %s", args.num_frames, args.height,
                args.width, args.fps, ", ".join(f"{g.name} ({g.variant})" for g in generators))
    names = [g.name for g in generators]
    todo, stats = plan_pairs(samples, args.output, names, num_frames=args.num_frames, fps=args.fps,
                             min_short_side=args.min_short_side, rank=state.process_index, world=state.num_processes)
    progress = state.is_main_process
    clips = write_winners(todo, stats, args.output, height=args.height, width=args.width, fps=args.fps,
                          static_threshold=args.static_threshold, progress=progress)
    settings = GenerationSettings(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
                                  cfg=args.cfg, scheduler=args.scheduler, dtype=DTYPES[args.precision],
                                  device=args.device or state.device, progress=progress)
    for g in generators:  # one at a time, and only where some process still needs its losers
        if any(gather_object([sum(g.name in c.generators for c in clips)])):
            with g.loaded(settings):
                make_losers(clips, stats, g, args.output, fps=args.fps, seed=args.seed, progress=progress)
    everyone = gather_object([stats])
    manifest = os.path.join(args.output, "pairs.jsonl")
    if state.is_main_process:
        os.makedirs(args.output, exist_ok=True)
        merge_pairs(args.output, names[0])
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
