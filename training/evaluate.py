"""Score generated videos: ``python -m training.evaluate`` (identity, face motion, dynamics, CLIP-I).

::

    python -m training.evaluate --videos out/videos --references alice.jpg alice2.jpg \\
        --insightface ComfyUI/models/insightface --output runs/eval/report.json

``--videos`` is a folder of videos (``.mp4 .mov .mkv .webm .avi``) or a ``.jsonl`` manifest (or a folder
holding ``metadata.jsonl``): one JSON object per line with the video under ``video`` (or ``media``,
``path``, ...) and, optionally, its own reference image(s) under ``ref_images`` / ``ref_image`` /
``reference``, which replace ``--references`` for that row. Relative paths resolve against the
manifest's folder.

Per video: face similarity to the reference set, share of frames with a face, similarity decay, FM_ref,
FM_inter, dynamics (Farneback flow, px/frame at short side 256) and, with ``--clip_vision``, CLIP-I
to the references (the formulas are in ``models/metrics.py`` and the README). Writes ``report.json``
(every video with its per-frame curves, the mean/std table), ``report.csv`` (one row per video) and
``report.png`` (the curves of all videos and the table), and prints the table in the layout of
MagicMirror's Table 1 for the columns computable here. Unreadable videos are reported and skipped.
With random-weight (tiny test) models the numbers are meaningless.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch
from tqdm.auto import tqdm

from ..models.metrics import FLOW_SHORT_SIDE, METRICS, NO_FACE, evaluate_video, reference_faces, summarise
from .data import IMAGE_EXTS, MEDIA_KEYS, first_frame, is_image, resolve_path
from .prepare_magicmirror import VIDEO_EXT

REFERENCE_KEYS = ("ref_images", "ref_image", "reference", "references")
# Table 1 of MagicMirror: the columns computable here, in the paper's order, then this pack's extras.
TABLE_COLUMNS = (("face_sim", "Face Similarity↑"), ("dynamics", "Dynamics↑"), ("fm_ref", "Face Motion (FM_ref)↑"),
                 ("fm_inter", "FM_inter"), ("sim_decay", "Sim. decay"), ("face_rate", "Face rate"),
                 ("clip_i", "CLIP-I↑"))


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2, before any model is loaded."""


# --------------------------------------------------------------------------------------------- inputs


def _image_list(paths, what: str) -> list[str]:
    """Image files from files and/or folders (a folder gives its images, sorted)."""
    out = []
    for path in paths:
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if is_image(f))
            if not found:
                raise UsageError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out.extend(found)
        elif not os.path.isfile(path):
            raise UsageError(f"{what} not found: {path}")
        elif not is_image(path):
            raise UsageError(f"{what} must be images ({', '.join(sorted(IMAGE_EXTS))}), got {path}")
        else:
            out.append(path)
    return out


def _manifest_rows(path: str) -> list[tuple[str, list[str]]]:
    """(video, own references) per line of an evaluation manifest."""
    rows, base = [], os.path.dirname(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}, line {lineno}: not a JSON-lines manifest ({e.msg})") from None
            key = next((k for k in MEDIA_KEYS if isinstance(row, dict) and k in row), None)
            if key is None:
                raise UsageError(f"{path}, line {lineno}: no video path; expected one of the keys "
                                 f"{', '.join(MEDIA_KEYS)}")
            video = resolve_path(str(row[key]), base)
            if is_image(video):
                raise UsageError(f"{path} is a manifest of images, not videos (line {lineno}: {video}); "
                                 "give a manifest or folder of generated videos")
            refs = next((row[k] for k in REFERENCE_KEYS if k in row), [])
            refs = [refs] if isinstance(refs, str) else list(refs)
            rows.append((video, [resolve_path(r, base) for r in refs]))
    if not rows:
        raise UsageError(f"{path} lists no videos")
    return rows


def collect_videos(spec: str) -> list[tuple[str, list[str]]]:
    """(video, per-video references) from a folder of videos, a folder with metadata.jsonl, or a .jsonl file."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "metadata.jsonl")):
            return _manifest_rows(os.path.join(path, "metadata.jsonl"))
        videos = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(VIDEO_EXT))
        if not videos:
            raise UsageError(f"no videos ({', '.join(VIDEO_EXT)}) and no metadata.jsonl in {path}")
        return [(v, []) for v in videos]
    if not os.path.exists(path):
        raise UsageError(f"--videos not found: {path}")
    if not path.endswith(".jsonl"):
        raise UsageError(f"--videos must be a folder of videos or a .jsonl manifest, got the file {path}")
    return _manifest_rows(path)


# --------------------------------------------------------------------------------------------- report


def _cell(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{fmt.format(stats['mean'])} ± {fmt.replace('+', '').format(stats['std'])}"


def table_markdown(name: str, summary: dict) -> str:
    """The mean ± std table in the layout of MagicMirror's Table 1 (computable columns first)."""
    header = "| Method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---|" * len(TABLE_COLUMNS)
    row = f"| {name} | " + " | ".join(_cell(summary[key], METRICS[key]) for key, _ in TABLE_COLUMNS) + " |"
    return "\n".join([header, rule, row])


def write_csv(path: str, rows: list[dict]) -> str:
    keys = list(METRICS)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frames", *keys, "references", "error"])
        for r in rows:
            values = ("" if r.get(k) is None else f"{r[k]:.6g}" for k in keys)
            writer.writerow([r["video"], r.get("num_frames", ""), *values, len(r.get("references", [])),
                             r.get("error", "")])
    os.replace(tmp, path)
    return path


def write_summary_png(path: str, rows: list[dict], table: str) -> str:
    from ..models.metrics_plot import Panel, render_panels

    ok = [r for r in rows if "error" not in r]
    # series k of every panel = video k (the legend's colours)
    curves = {key: [r["curves"].get(key, []) for r in ok] for key in ("face_sim", "flow", "clip_i")}
    panels = [Panel("identity: cosine to the reference set per frame (one line per video)", curves["face_sim"],
                    message=NO_FACE),
              Panel(f"dynamics: optical flow per frame pair, px/frame at short side {FLOW_SHORT_SIDE}", curves["flow"],
                    x_label="frame pair")]
    if any(curves["clip_i"]):
        panels.append(Panel("subject: CLIP-I per frame", curves["clip_i"]))
    lines = table.splitlines()
    footer = [lines[0], lines[2], f"{len(ok)} videos scored, {len(rows) - len(ok)} skipped"]
    legend = [os.path.basename(r["video"]) for r in ok]
    img = render_panels(panels, footer=footer, legend=legend, width=max(640, 7 * max(len(x) for x in footer)))
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- main


def load_references(paths: list[str], analyzer, clip_model=None) -> tuple:
    """(ReferenceFaces, CLIP image embeddings [R, D] or None) of a set of reference images."""
    from ..models.clip_vision import image_embeds

    images = [first_frame(p) for p in paths]
    clip = None if clip_model is None else torch.cat(
        [image_embeds(clip_model, torch.from_numpy(i)[None].float() / 255.0) for i in images])
    return reference_faces(analyzer, images), clip


def evaluate(videos: list[tuple[str, list[str]]], default_refs: list[str], analyzer, *, clip_model=None,
             det_size: int | None = None, progress: bool = True, cache: dict | None = None) -> list[dict]:
    """One row per video: its metrics and curves, or ``{"video", "error"}`` when it could not be scored.
    ``cache`` maps a tuple of reference paths to its :func:`load_references` result (filled as needed)."""
    from ..models.video_io import read_video

    cache = {} if cache is None else cache

    def references(paths: list[str]):
        if tuple(paths) not in cache:
            cache[tuple(paths)] = load_references(paths, analyzer, clip_model)
        return cache[tuple(paths)]

    rows = []
    bar = tqdm(videos, desc="Scoring videos", unit="video", disable=not progress)
    for video, own_refs in bar:
        ref_paths = own_refs or default_refs
        try:
            faces, clip_refs = references(ref_paths)
        except Exception as e:  # a manifest row with a missing or faceless reference: report, go on
            rows.append({"video": video, "references": ref_paths, "error": f"reference: {e}"})
            continue
        try:
            frames, fps = read_video(video)
        except Exception as e:  # undecodable, missing or empty: report, go on
            rows.append({"video": video, "references": ref_paths, "error": f"unreadable video: {e}"})
            continue
        metrics = evaluate_video(frames, analyzer=analyzer, references=faces, clip_model=clip_model,
                                 clip_references=clip_refs, det_size=det_size)
        rows.append({"video": video, "references": ref_paths, "fps": fps, **metrics.as_dict()})
        if metrics.face_sim is not None:
            bar.set_postfix(face_sim=f"{metrics.face_sim:.3f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", required=True, help="A folder of videos, or a .jsonl manifest (or a folder with "
                    "metadata.jsonl) whose rows name a video and optionally its own reference image(s).")
    ap.add_argument("--references", nargs="+", default=[], help="Reference image(s) or folder(s) of images: the "
                    "person's photos (identity) / the subject image (CLIP-I). Needed unless every manifest row has "
                    "its own.")
    ap.add_argument("--insightface", required=True, help="insightface root (the folder holding models/<pack>/, "
                    "e.g. ComfyUI/models/insightface).")
    ap.add_argument("--pack", default="antelopev2", help="insightface pack name (antelopev2 or buffalo_l).")
    ap.add_argument("--clip_vision", default="", help="Optional CLIP vision checkpoint (.safetensors) for CLIP-I.")
    ap.add_argument("--output", default="report.json", help="report JSON; the CSV and PNG go beside it.")
    ap.add_argument("--name", default="", help="Row name in the table (default: the videos folder's name).")
    ap.add_argument("--det_size", type=int, default=640, help="Face detector input size (one pass per frame).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (face analysis on CUDA needs onnxruntime-gpu).")
    ap.add_argument("--no_progress", action="store_true", help="No progress bar.")
    args = ap.parse_args(argv)
    try:
        videos = collect_videos(args.videos)
        default_refs = _image_list(args.references, "--references") if args.references else []
        missing = [v for v, own in videos if not own and not default_refs]
        if missing:
            raise UsageError(f"no references for {len(missing)} of {len(videos)} videos (e.g. {missing[0]}): give "
                             "--references IMAGE [IMAGE ...] or a 'ref_images' entry in each manifest row")
        for _, own in videos:
            for ref in own:
                if not is_image(ref):
                    raise UsageError(f"manifest reference must be an image, got {ref}")
        from ..models.face_analysis import find_insightface_pack

        try:
            find_insightface_pack(args.insightface, args.pack)
        except FileNotFoundError as e:
            raise UsageError(str(e).splitlines()[0] + f" (under --insightface {args.insightface})") from None
        if args.clip_vision and not os.path.isfile(args.clip_vision):
            raise UsageError(f"--clip_vision not found: {args.clip_vision}")
        if args.det_size <= 0 or args.det_size % 32:
            raise UsageError(f"--det_size must be a positive multiple of 32, got {args.det_size}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ..models.face_analysis import FaceAnalyzer
    from ..models.face_encoder import NoFaceError

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device.startswith("cuda") else None
    analyzer = FaceAnalyzer(args.insightface, name=args.pack, providers=providers)
    clip_model = None
    if args.clip_vision:
        from ..models.clip_vision import load_clip_vision

        clip_model = load_clip_vision(args.clip_vision).to(args.device)
    cache = {}
    if default_refs:
        try:
            cache[tuple(default_refs)] = load_references(default_refs, analyzer, clip_model)
        except NoFaceError as e:
            print(f"error: --references: {e}", file=sys.stderr)
            return 2

    rows = evaluate(videos, default_refs, analyzer, clip_model=clip_model, det_size=args.det_size,
                    progress=not args.no_progress, cache=cache)
    scored = [r for r in rows if "error" not in r]
    name = args.name or os.path.basename(os.path.normpath(os.path.abspath(args.videos))).removesuffix(".jsonl")
    summary = summarise(scored)
    table = table_markdown(name, summary)
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    stem = os.path.splitext(output)[0]
    report = {"name": name, "videos": rows, "summary": summary, "table": table,
              "skipped": [{"video": r["video"], "error": r["error"]} for r in rows if "error" in r],
              "settings": {"insightface": os.path.abspath(args.insightface), "pack": args.pack,
                           "det_size": args.det_size, "flow_short_side": FLOW_SHORT_SIDE,
                           "clip_vision": os.path.abspath(args.clip_vision) if args.clip_vision else None}}
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    os.replace(tmp, output)
    write_csv(stem + ".csv", rows)
    write_summary_png(stem + ".png", rows, table)
    print(table)
    no_face = [r["video"] for r in scored if r["face_rate"] == 0]
    print(f"{len(scored)} of {len(rows)} videos scored ({len(no_face)} with {NO_FACE}) -> {output}, "
          f"{stem}.csv, {stem}.png")
    for r in report["skipped"]:
        print(f"  skipped {r['video']}: {r['error']}")
    return 0 if scored else 1


if __name__ == "__main__":
    raise SystemExit(main())
