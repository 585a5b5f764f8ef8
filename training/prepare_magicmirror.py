"""Build a MagicMirror training set: ``python -m training.prepare_magicmirror``.

Input: one sub-folder per identity holding photos and/or videos of that person; an optional
caption sits beside each file as ``<file>.txt`` (else ``"a <class_word> img"`` is used)::

    people/
      alice/ 001.jpg 002.jpg 003.mp4 003.mp4.txt
      bob/   a.png b.png

For every file the largest face of the (first) frame is detected (insightface). Each file becomes a
training target whose references are the *other* files of the same identity whose ArcFace cosine
similarity to it exceeds ``--min_similarity`` (0.65, as the paper). The references' face-encoder
outputs (ArcFace, PhotoMaker-V2 ID tokens, CLIP penultimate features) are stored in
``faces/*.safetensors`` and the aligned crops in ``crops/``; ``metadata.jsonl`` lists
``media, caption, faces, face_box, face_kps, size, similarity`` per target. Unreadable files, files
without a face, identities with a single file and pairs below the threshold are reported and skipped.
Only a video's first frame is decoded; images are read as the trainer reads them (EXIF rotation
applied), so boxes and keypoints are in the trainer's pixel coordinates.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.face_analysis import FaceAnalyzer
from ..models.face_encoder import FaceEncoder
from ..models.id_encoder import load_photomaker_id_encoder
from .data import MediaError, first_frame, write_jsonl

logger = logging.getLogger(__name__)
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def caption_for(path: str, class_word: str, trigger: str) -> str:
    side = path + ".txt"
    caption = open(side).read().strip() if os.path.isfile(side) else f"a {class_word} {trigger}"
    if not re.search(rf"\s{re.escape(trigger)}(?![\w])", caption):
        caption = f"a {class_word} {trigger}, {caption}"
    return caption


def prepare(input_dir: str, output_dir: str, encoder: FaceEncoder, *, min_similarity: float = 0.65,
            max_refs: int = 1, class_word: str = "person", trigger: str = "img") -> dict:
    """Write ``output_dir/metadata.jsonl`` (+ faces/, crops/); returns counts of what was kept and skipped."""
    from PIL import Image
    from safetensors.torch import save_file

    os.makedirs(os.path.join(output_dir, "faces"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "crops"), exist_ok=True)
    identities = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if not identities:
        raise SystemExit(f"{input_dir}: expected one sub-folder per identity (see --help)")
    stats = {"targets": 0, "unreadable": [], "no_face": [], "single_file": [], "below_threshold": 0}
    rows = []
    for ident in tqdm(identities, desc="identities"):
        folder = os.path.join(input_dir, ident)
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXT + VIDEO_EXT))
        found = []  # (path, rgb, face)
        for path in files:
            try:
                rgb = first_frame(path)
            except MediaError as e:
                stats["unreadable"].append((path, str(e)))
                continue
            face = encoder.analyzer.detect_largest(rgb)
            if face is None:
                stats["no_face"].append(path)
                continue
            found.append((path, rgb, face))
        if len(found) < 2:
            stats["single_file"].append(ident)
            continue
        embeds = torch.nn.functional.normalize(torch.stack([torch.as_tensor(f.normed_embedding) for _, _, f in found]), dim=-1)
        sims = embeds @ embeds.T
        for i, (path, rgb, face) in enumerate(found):
            order = [j for j in sims[i].argsort(descending=True).tolist() if j != i and sims[i, j] > min_similarity]
            if not order:
                stats["below_threshold"] += 1
                continue
            refs = order[:max_refs]
            parts = [encoder.encode(torch.from_numpy(found[j][1]).float()[None] / 255.0) for j in refs]
            tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in ("arcface", "x_id", "clip_penultimate")}
            crops = torch.cat([p.crops for p in parts])
            tensors["crops"] = (crops * 255).round().to(torch.uint8)  # [N, 112, 112, 3]: the identity loss embeds them
            stem = f"{ident}-{os.path.splitext(os.path.basename(path))[0]}"
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(output_dir, "faces", f"{stem}.safetensors"))
            for k, crop in enumerate(crops):
                Image.fromarray((crop.numpy() * 255).round().astype(np.uint8)).save(
                    os.path.join(output_dir, "crops", f"{stem}-ref{k}.png"))
            rows.append({"media": os.path.relpath(path, output_dir), "caption": caption_for(path, class_word, trigger),
                         "faces": f"faces/{stem}.safetensors", "face_box": [round(float(v), 2) for v in face.bbox],
                         "face_kps": [[round(float(x), 2), round(float(y), 2)] for x, y in face.kps],
                         "size": [int(rgb.shape[1]), int(rgb.shape[0])],
                         "similarity": round(float(sims[i, refs[0]]), 4)})
            stats["targets"] += 1
    write_jsonl(os.path.join(output_dir, "metadata.jsonl"), rows)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Folder with one sub-folder per identity.")
    ap.add_argument("--output", required=True, help="Dataset folder to write (metadata.jsonl, faces/, crops/).")
    ap.add_argument("--insightface", required=True, help="insightface root (the folder holding models/<pack>/).")
    ap.add_argument("--pack", default="antelopev2", help="insightface pack name.")
    ap.add_argument("--photomaker", required=True, help="photomaker-v2.bin.")
    ap.add_argument("--min_similarity", type=float, default=0.65, help="ArcFace cosine a reference must exceed.")
    ap.add_argument("--max_refs", type=int, default=1, help="References per target (the most similar ones).")
    ap.add_argument("--class_word", default="person", help="Class word for captions that have none.")
    ap.add_argument("--trigger", default="img", help="Trigger word.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device.startswith("cuda") else None
    encoder = FaceEncoder(FaceAnalyzer(args.insightface, name=args.pack, providers=providers),
                          load_photomaker_id_encoder(args.photomaker), device=args.device)
    stats = prepare(args.input, args.output, encoder, min_similarity=args.min_similarity, max_refs=args.max_refs,
                    class_word=args.class_word, trigger=args.trigger)
    print(f"{stats['targets']} training targets written to {os.path.join(args.output, 'metadata.jsonl')}; "
          f"skipped: {len(stats['unreadable'])} unreadable files, {len(stats['no_face'])} files without a face, "
          f"{len(stats['single_file'])} identities with "
          f"fewer than 2 usable files, {stats['below_threshold']} targets without a reference above "
          f"{args.min_similarity}")
    for path, reason in stats["unreadable"][:20]:
        print(f"  unreadable: {reason}")
    for path in stats["no_face"][:20]:
        print(f"  no face: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
