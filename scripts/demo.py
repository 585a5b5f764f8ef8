"""`make demo`: a short video from tiny random models, through the nodes' own code path.

Builds tiny random CogVideoX folders (no download), runs the same node classes ComfyUI runs
(loader -> text encode -> sampler -> decode) headless, and writes an mp4. The weights are
random, so the video is coloured noise: the point is that the whole pipeline runs.
"""

from __future__ import annotations

import argparse
import os
import time

from magicmirror_video.models.video_io import read_video, write_video
from magicmirror_video.nodes.cogvideox import (
    CogVideoXDecode,
    CogVideoXModelLoader,
    CogVideoXSampler,
    CogVideoXTextEncode,
)
from magicmirror_video.testing import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo.mp4")
    ap.add_argument("--models", default=os.path.join(ROOT, ".tiny_models"), help="where the tiny models are built")
    ap.add_argument("--prompt", default="a dog * runs across a green field")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    folder = os.path.join(args.models, "CogVideo", "tiny-t2v")
    if not os.path.isdir(os.path.join(folder, "transformer")):
        print(f"building tiny random CogVideoX in {folder}")
        tiny.build_model_folder(folder)
    os.environ["MAGICMIRROR_MODELS_DIR"] = args.models

    start = time.perf_counter()
    (model,) = CogVideoXModelLoader().load("tiny-t2v", "fp32", "none")
    (positive,) = CogVideoXTextEncode().encode(model, args.prompt)
    (negative,) = CogVideoXTextEncode().encode(model, "")
    (latent,) = CogVideoXSampler().sample(model, positive, negative, width=args.size, height=args.size,
                                          num_frames=args.frames, steps=args.steps, cfg=6.0, seed=42, scheduler="DDIM")
    (frames,) = CogVideoXDecode().decode(model, latent, tiling=False)
    write_video(args.out, frames, fps=8)
    check, _ = read_video(args.out)
    print(f"wrote {args.out}: {check.shape[0]} frames of {check.shape[2]}x{check.shape[1]} "
          f"in {time.perf_counter() - start:.1f} s")
    print("NOTE: the model weights are RANDOM (tiny test models), so the video is noise. "
          "Put real CogVideoX weights in ComfyUI/models/CogVideo/ for real videos.")


if __name__ == "__main__":
    main()
