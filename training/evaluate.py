"""Score generated videos under a published evaluation protocol: ``python -m training.evaluate``.

::

    python -m training.evaluate --videos out/videos --references alice.jpg --protocol consisid \\
        --insightface ComfyUI/models/insightface --output runs/eval/report.json

``--protocol`` (``models/metrics.py`` has the exact rules; the README names each source file):
``magicmirror`` (every frame, antelopev2 with the 640→256 size ladder, mean over the reference set),
``consisid`` (ConsisID ``eval/get_facesim_fid.py`` + ``get_clipscore.py``: 16 frames, buffalo_l at 320 with a
padded retry, cosine clamped at 0, a faceless video scores 0, one reference photo, FaceSim-Arc/-Cur, FID,
CLIPScore) and ``opens2v`` (OpenS2V-Nexus ``eval/get_facesim.py`` + ``get_motionscore.py``: as consisid with 32
frames, no FID, motion_fb). Every protocol adds dynamics in px/s and VBench's dynamic degree.

``--videos`` is a folder of videos (``.mp4 .mov .mkv .webm .avi``) or a ``.jsonl`` manifest (or a folder
holding ``metadata.jsonl``): one JSON object per line with the video under ``video`` (or ``media``,
``path``, ...), optionally its own reference image(s) under ``ref_images`` / ``ref_image`` / ``reference``
(replacing ``--references`` for that row) and its prompt under ``prompt`` / ``caption`` / ``text`` (for
CLIP-T; in a plain folder a ``<video stem>.txt`` beside the video, else ``--prompt``).

Optional models (CurricularFace, Inception-v3 for FID, RAFT, a CLIP folder for CLIP-T, a DINO folder) are
looked up in ``--metric_models`` (default: ``metrics/`` beside the insightface folder), the insightface
folder and torch's hub cache, or given one by one; a column whose model is missing says so in the table.

Writes ``report.json`` (settings, every video with its metrics, counts and per-frame curves, the summary),
``report.csv`` (one row per video: any aggregate can be recomputed) and ``report.png``, and prints the
protocol, one row per video and the aggregate row: mean ± std with the number of videos and of frames
(or frame pairs) behind each column. Exit codes: 0 all videos scored; 1 some video could not be read or
scored (the report is still written; ``--skip-unreadable`` accepts that) or none could; 2 bad input,
reported in one line before any model loads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.metric_models import FOLDER_KINDS, NEEDS_TORCHVISION
from ..models.metrics import METRICS, NO_FACE, PROTOCOLS, evaluate_video, get_protocol, reference_faces, summarise
from ..models.motion import FLOW_SHORT_SIDE
from .data import CAPTION_KEYS, IMAGE_EXTS, MEDIA_KEYS, first_frame, is_image, resolve_path
from .prepare_magicmirror import VIDEO_EXT

REFERENCE_KEYS = ("ref_images", "ref_image", "reference", "references")
OPTIONAL_MODELS = ("curricularface", "inception", "raft", "clip_text", "dino")


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


def _manifest_rows(path: str) -> list[dict]:
    """{video, references, prompt} per line of an evaluation manifest."""
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
            prompt = next((str(row[k]) for k in CAPTION_KEYS if row.get(k)), None)
            rows.append({"video": video, "references": [resolve_path(r, base) for r in refs], "prompt": prompt})
    if not rows:
        raise UsageError(f"{path} lists no videos")
    return rows


def _sidecar_prompt(video: str) -> str | None:
    path = os.path.splitext(video)[0] + ".txt"
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


def collect_videos(spec: str) -> list[dict]:
    """{video, references, prompt} from a folder of videos, a folder with metadata.jsonl, or a .jsonl file."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "metadata.jsonl")):
            return _manifest_rows(os.path.join(path, "metadata.jsonl"))
        videos = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(VIDEO_EXT))
        if not videos:
            raise UsageError(f"no videos ({', '.join(VIDEO_EXT)}) and no metadata.jsonl in {path}")
        return [{"video": v, "references": [], "prompt": _sidecar_prompt(v)} for v in videos]
    if not os.path.exists(path):
        raise UsageError(f"--videos not found: {path}")
    if not path.endswith(".jsonl"):
        raise UsageError(f"--videos must be a folder of videos or a .jsonl manifest, got the file {path}")
    return _manifest_rows(path)


def metric_model_folders(args, kind: str) -> list[str]:
    """Where an optional model of ``kind`` is looked for (in order)."""
    folders = [args.metric_models or os.path.join(os.path.dirname(os.path.abspath(args.insightface)), "metrics")]
    if kind == "curricularface":
        folders += [args.insightface, os.path.join(args.insightface, "models")]
    if kind in NEEDS_TORCHVISION:  # (torchvision's own download folder)
        folders.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    return folders


def find_optional_models(args) -> tuple[dict, dict]:
    """({kind: path} of the optional models to load, {kind: why not}); a path given on the command line must exist
    (UsageError otherwise)."""
    from ..models.metric_models import find_metric_model, missing_reason, torchvision_available

    found, missing = {}, {}
    p = get_protocol(args.protocol)
    for kind in OPTIONAL_MODELS:
        if kind == "inception" and not p.fid:
            continue
        given = getattr(args, kind)
        no_torchvision = kind in NEEDS_TORCHVISION and not torchvision_available()
        if given:
            path = os.path.abspath(os.path.expanduser(given))
            is_folder = kind in FOLDER_KINDS
            if not (os.path.isdir(path) if is_folder else os.path.isfile(path)):
                raise UsageError(f"--{kind} not found: {path} (expected {'a folder' if is_folder else 'a file'})")
            if no_torchvision:
                raise UsageError(f"--{kind} needs torchvision (pip install torchvision, as ComfyUI has it)")
            found[kind] = path
            continue
        path, searched = find_metric_model(kind, metric_model_folders(args, kind))
        if path is not None and not no_torchvision:
            found[kind] = path
        else:
            missing[kind] = missing_reason(kind, searched)
    return found, missing


# --------------------------------------------------------------------------------------------- report


def _cell(stats: dict, fmt: str, unit: str) -> str:
    """``mean ± std (n=<videos>, <frames> frames[, incl. k faceless = 0][; m left out: why])``, or ``n/a: why``."""
    reasons = stats.get("reasons") or {}
    why = "; ".join(reasons) if len(reasons) == 1 else ", ".join(f"{n} {r}" for r, n in reasons.items())
    if stats["mean"] is None:
        return "n/a: " + (why or "no value")
    notes = [f"n={stats['n']}", f"{stats['frames']} {unit}"]
    if stats.get("faceless_as_zero"):
        notes[-1] += f", incl. {stats['faceless_as_zero']} faceless = 0"
    if stats["left_out"]:
        notes[-1] += f"; {stats['left_out']} left out: {why}"
    return f"{fmt.format(stats['mean'])} ± {fmt.replace('+', '').format(stats['std'])} ({', '.join(notes)})"


def shown_columns(protocol, rows: list[dict]) -> list[tuple[str, str]]:
    """The protocol's columns that some video has a value for or a reason why not."""
    p = get_protocol(protocol)
    return [(key, label) for key, label in p.columns
            if any(r.get(key) is not None or key in (r.get("unavailable") or {}) for r in rows)]


def _value(row: dict, key: str) -> str:
    if row.get(key) is not None:
        count = (row.get("counts") or {}).get(key)
        return METRICS[key].format(row[key]) + (f" [{count}]" if count is not None else "")
    return "n/a" if key in (row.get("unavailable") or {}) else "–"


def table_markdown(name: str, summary: dict, rows: list[dict], protocol) -> str:
    """One row per video (each value with [the frames or pairs it used]) and the aggregate row: mean ± std with
    n videos and frames (pairs for motion)."""
    from ..models.metrics import COUNT_UNITS

    columns = shown_columns(protocol, rows)
    header = "| Video | frames (scored) | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = [header, rule]
    for r in rows:
        lines.append(f"| {os.path.basename(r['video'])} | {r['num_frames']} ({len(r['frame_indices'])}) | "
                     + " | ".join(_value(r, key) for key, _ in columns) + " |")
    total = sum(r["num_frames"] for r in rows)
    lines.append(f"| **{name}** ({len(rows)} videos) | {total} | "
                 + " | ".join(_cell(summary[key], METRICS[key], COUNT_UNITS.get(key, "frames")) for key, _ in columns)
                 + " |")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> str:
    keys = list(METRICS)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "protocol", "frames", "frames_scored", "fps", *keys,
                         *(f"{k}_count" for k in keys), "face_lost_at", "references", "references_used", "error"])
        for r in rows:
            counts = r.get("counts") or {}
            values = ("" if r.get(k) is None else f"{r[k]:.6g}" for k in keys)
            lost = "" if r.get("face_lost_at") is None else r["face_lost_at"]
            writer.writerow([r["video"], r.get("protocol", ""), r.get("num_frames", ""),
                             len(r.get("frame_indices", [])), r.get("fps", ""), *values,
                             *(counts.get(k, "") for k in keys), lost, len(r.get("references", [])),
                             r.get("references_used", ""), r.get("error", "")])
    os.replace(tmp, path)
    return path


def write_summary_png(path: str, rows: list[dict], footer: list[str]) -> str:
    from ..models.metrics_plot import Panel, render_panels

    ok = [r for r in rows if "error" not in r]
    # series k of every panel = video k (the legend's colours)
    curves = {key: [r["curves"].get(key, []) for r in ok] for key in ("face_sim", "flow", "clip_t", "clip_i")}
    panels = [Panel("identity: cosine to the reference(s) per scored frame (one line per video)", curves["face_sim"],
                    message=NO_FACE, x_label="scored frame"),
              Panel(f"dynamics: optical flow per frame pair, px/s at short side {FLOW_SHORT_SIDE}", curves["flow"],
                    x_label="frame pair")]
    for key, title in (("clip_t", "text-video: CLIP-T per frame"), ("clip_i", "subject: CLIP-I per frame")):
        if any(curves[key]):
            panels.append(Panel(title, curves[key]))
    legend = [os.path.basename(r["video"]) for r in ok]
    img = render_panels(panels, footer=footer, legend=legend, width=max(640, 7 * max(len(x) for x in footer)))
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- main


class Scorer:
    """The loaded models of one run and the per-reference-set cache."""

    def __init__(self, protocol: str, analyzer, face_models=None, clip_model=None, text_clip=None, dino=None,
                 flow=None, missing: dict | None = None):
        self.protocol, self.analyzer, self.face_models = get_protocol(protocol), analyzer, face_models
        self.clip_model, self.text_clip, self.dino, self.flow = clip_model, text_clip, dino, flow
        self.missing, self.cache = dict(missing or {}), {}

    def references(self, paths: list[str]) -> dict:
        """Face references and the CLIP-I / DINO-I reference embeddings of a reference set (cached); each image is
        embedded at its own size (the first only under consisid / opens2v)."""
        if tuple(paths) not in self.cache:
            images = [first_frame(p) for p in paths]
            faces = reference_faces(self.analyzer, images, self.protocol, self.face_models)
            subject = images[:1] if self.protocol.one_reference else images
            clip = dino = None
            if self.clip_model is not None:
                from ..models.clip_vision import image_embeds

                clip = torch.cat([image_embeds(self.clip_model, torch.from_numpy(i)[None].float() / 255.0)
                                  for i in subject])                                   # [R, D]
            if self.dino is not None:
                from ..models.metric_models import dino_embeddings

                dino = np.concatenate([dino_embeddings(self.dino, i[None]) for i in subject])  # [R, D]
            self.cache[tuple(paths)] = {"faces": faces, "clip": clip, "dino": dino}
        return self.cache[tuple(paths)]

    def score(self, video: str, ref_paths: list[str], prompt: str | None, fps: float | None) -> dict:
        from ..models.video_io import read_video

        try:
            refs = self.references(ref_paths)
        except Exception as e:  # a missing or faceless reference: report, go on
            return {"video": video, "references": ref_paths, "error": f"reference: {e}"}
        try:
            frames, file_fps = read_video(video)
        except Exception as e:  # undecodable, missing or empty
            return {"video": video, "references": ref_paths, "error": f"unreadable video: {' '.join(str(e).split())}"}
        metrics = evaluate_video(frames, protocol=self.protocol, fps=fps or file_fps, analyzer=self.analyzer,
                                 references=refs["faces"], face_models=self.face_models, clip_model=self.clip_model,
                                 clip_references=refs["clip"], text_clip=self.text_clip, prompt=prompt,
                                 dino=self.dino, dino_references=refs["dino"], flow=self.flow)
        for kind, key in (("clip_text", "clip_t"), ("dino", "dino_i")):
            if kind in self.missing and getattr(metrics, key) is None:
                metrics.unavailable.setdefault(key, self.missing[kind])
        if "raft" in self.missing and metrics.flow:
            metrics.notes.append(f"RAFT not used ({self.missing['raft']}): flow is Farneback")
        return {"video": video, "references": ref_paths, "prompt": prompt, **metrics.as_dict()}


def evaluate(videos: list[dict], default_refs: list[str], scorer: Scorer, *, fps: float | None = None,
             default_prompt: str | None = None, progress: bool = True) -> list[dict]:
    """One row per video: its metrics, counts and curves, or ``{"video", "error"}`` when it could not be scored."""
    rows = []
    bar = tqdm(videos, desc="Scoring videos", unit="video", disable=not progress)
    for item in bar:
        row = scorer.score(item["video"], item["references"] or default_refs, item.get("prompt") or default_prompt, fps)
        rows.append(row)
        if row.get("face_sim") is not None:
            bar.set_postfix(face_sim=f"{row['face_sim']:.3f}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", required=True, help="A folder of videos, or a .jsonl manifest (or a folder with "
                    "metadata.jsonl) whose rows name a video and optionally its own reference image(s) and prompt.")
    ap.add_argument("--references", nargs="+", default=[], help="Reference image(s) or folder(s) of images: the "
                    "person's photos (identity) / the subject image (CLIP-I, DINO-I). Needed unless every manifest "
                    "row has its own. consisid and opens2v use the first only, as their scripts do.")
    ap.add_argument("--protocol", default="magicmirror", choices=sorted(PROTOCOLS),
                    help="Evaluation protocol (frames, detector, retry, clamping, faceless videos, references): "
                         "magicmirror (default), consisid, opens2v.")
    ap.add_argument("--insightface", required=True, help="insightface root (the folder holding models/<pack>/, "
                    "e.g. ComfyUI/models/insightface).")
    ap.add_argument("--pack", default="", help="insightface pack name (default: the protocol's: antelopev2 for "
                    "magicmirror, buffalo_l for consisid and opens2v).")
    ap.add_argument("--metric_models", default="", help="Folder of the optional metric models (default: metrics/ "
                    "beside the insightface folder, e.g. ComfyUI/models/metrics).")
    ap.add_argument("--curricularface", default="", help="glint360k_curricular_face_r101_backbone.bin (FaceSim-Cur).")
    ap.add_argument("--inception", default="", help="inception_v3_google-0cc3c7bd.pth (consisid FID; torchvision).")
    ap.add_argument("--raft", default="", help="raft-things.pth or a torchvision raft_large_*.pth (VBench's flow for "
                    "dynamics and dynamic degree; torchvision). Default flow: Farneback.")
    ap.add_argument("--clip_text", default="", help="A transformers CLIP folder with both towers (e.g. "
                    "clip-vit-base-patch32) for CLIP-T.")
    ap.add_argument("--dino", default="", help="A transformers DINO ViT folder (e.g. dino-vits16) for DINO-I.")
    ap.add_argument("--clip_vision", default="", help="Optional CLIP vision checkpoint (.safetensors) for CLIP-I.")
    ap.add_argument("--prompt", default="", help="Prompt for CLIP-T of videos without their own (manifest "
                    "prompt/caption, or <video stem>.txt).")
    ap.add_argument("--fps", type=float, default=0.0, help="Frame rate to assume (default: each file's own).")
    ap.add_argument("--output", default="report.json", help="report JSON; the CSV and PNG go beside it.")
    ap.add_argument("--name", default="", help="Row name in the table (default: the videos folder's name).")
    ap.add_argument("--skip-unreadable", "--skip_unreadable", dest="skip_unreadable", action="store_true",
                    help="Exit 0 even when some videos could not be read or scored (they are listed).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (face analysis on CUDA needs onnxruntime-gpu).")
    ap.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return ap


def check_args(args) -> tuple[list[dict], list[str], dict, dict]:
    """Everything checkable without loading a model; UsageError on the first problem."""
    from ..models.face_analysis import find_insightface_pack

    videos = collect_videos(args.videos)
    default_refs = _image_list(args.references, "--references") if args.references else []
    missing = [v["video"] for v in videos if not v["references"] and not default_refs]
    if missing:
        raise UsageError(f"no references for {len(missing)} of {len(videos)} videos (e.g. {missing[0]}): give "
                         "--references IMAGE [IMAGE ...] or a 'ref_images' entry in each manifest row")
    for v in videos:
        for ref in v["references"]:
            if not is_image(ref):
                raise UsageError(f"manifest reference must be an image, got {ref}")
    try:
        find_insightface_pack(args.insightface, args.pack)
    except FileNotFoundError as e:
        first, *searched = (line.strip() for line in str(e).splitlines())
        raise UsageError(f"{first} {'; '.join(searched)} (under --insightface {args.insightface})") from None
    if args.clip_vision and not os.path.isfile(args.clip_vision):
        raise UsageError(f"--clip_vision not found: {args.clip_vision}")
    if args.fps < 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    found, missing_models = find_optional_models(args)
    return videos, default_refs, found, missing_models


def load_scorer(args, found: dict, missing: dict) -> Scorer:
    from ..models.face_analysis import FaceAnalyzer
    from ..models.metrics import FaceModels

    device = args.device
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    analyzer = FaceAnalyzer(args.insightface, name=args.pack, providers=providers)
    face_models = FaceModels(unavailable={k: v for k, v in missing.items() if k in ("curricularface", "inception")},
                             device=device)
    if "curricularface" in found:
        from ..models.curricularface import load_curricularface

        face_models.curricularface = load_curricularface(found["curricularface"], device)
    if "inception" in found:
        from ..models.metric_models import load_inception

        face_models.inception = load_inception(found["inception"], device)
    flow = None
    if "raft" in found:
        from ..models.motion import load_raft

        flow = load_raft(found["raft"], device)
    clip_model = text_clip = dino = None
    if args.clip_vision:
        from ..models.clip_vision import load_clip_vision

        clip_model = load_clip_vision(args.clip_vision).to(device)
    if "clip_text" in found:
        from ..models.metric_models import load_text_clip

        text_clip = load_text_clip(found["clip_text"], device)
    if "dino" in found:
        from ..models.metric_models import load_dino

        dino = load_dino(found["dino"], device)
    return Scorer(args.protocol, analyzer, face_models, clip_model=clip_model, text_clip=text_clip, dino=dino,
                  flow=flow, missing=missing)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.pack = args.pack or get_protocol(args.protocol).pack
    try:
        videos, default_refs, found, missing = check_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ..models.face_encoder import NoFaceError

    scorer = load_scorer(args, found, missing)
    if default_refs:
        try:
            scorer.references(default_refs)
        except NoFaceError as e:
            print(f"error: --references: {e}", file=sys.stderr)
            return 2

    rows = evaluate(videos, default_refs, scorer, fps=args.fps or None, default_prompt=args.prompt or None,
                    progress=not args.no_progress)
    scored = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    name = args.name or os.path.basename(os.path.normpath(os.path.abspath(args.videos))).removesuffix(".jsonl")
    protocol = get_protocol(args.protocol)
    summary = summarise(scored, protocol)
    table = table_markdown(name, summary, scored, protocol) if scored else "(no video scored)"
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    stem = os.path.splitext(output)[0]
    flows = sorted({r["flow"] for r in scored if r.get("flow")})
    settings = {"protocol": protocol.name, "protocol_rules": protocol.describe(),
                "insightface": os.path.abspath(args.insightface), "pack": args.pack,
                "models": found, "missing_models": missing, "flow": flows,
                "clip_vision": os.path.abspath(args.clip_vision) if args.clip_vision else None,
                "fps": args.fps or "each file's", "references": default_refs}
    report = {"name": name, "settings": settings, "videos": rows, "summary": summary, "table": table,
              "skipped": [{"video": r["video"], "error": r["error"]} for r in failed]}
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    os.replace(tmp, output)
    write_csv(stem + ".csv", rows)
    header = [protocol.describe(), f"flow: {', '.join(flows) or 'none'}"]
    if scored:
        write_summary_png(stem + ".png", rows, header + [f"{len(scored)} videos scored, {len(failed)} failed"])
    print("\n".join(header))
    print(table)
    no_face = [r for r in scored if (r.get("counts") or {}).get("face_rate") == 0]
    print(f"{len(scored)} of {len(rows)} videos scored ({len(no_face)} with {NO_FACE}) -> {output}, {stem}.csv"
          + (f", {stem}.png" if scored else ""))
    for kind, why in missing.items():
        print(f"  {kind}: {why}")
    for r in failed:
        print(f"  failed {r['video']}: {r['error']}")
    if not scored:
        print("error: no video could be scored", file=sys.stderr)
        return 1
    if failed and not args.skip_unreadable:
        print(f"error: {len(failed)} of {len(rows)} videos could not be read or scored (listed above); fix or remove "
              "them, or pass --skip-unreadable to accept a report without them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
