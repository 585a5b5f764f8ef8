"""Cost of scoring one generated video: a 49-frame 480x720 synthetic video on the CPU.

Identity (face similarity, decay), face motion (FM_ref, FM_inter), dynamics and dynamic degree (Farneback at
short side 256, 16 fps thinned to 8) and CLIP-I (tiny random CLIP vision tower) under the magicmirror protocol,
on the fake insightface pack the tests use (its ONNX graphs are cheap, so the face part here measures the
pipeline, not a real SCRFD-10G/glintr100; with those, detection dominates). Prints frames/s per stage and in
total, and checks the promised cost: one detector pass per frame with a face, the 4-size ladder (640 -> 256) on
a frame without one, and ONE batched recogniser call for all faces (calls counted). Median of --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from magicmirror_video.models import metrics, motion
from magicmirror_video.models.clip_vision import load_clip_vision
from magicmirror_video.models.face_analysis import FaceAnalyzer
from magicmirror_video.testing import tiny, tiny_faces

FRAMES, HEIGHT, WIDTH, FPS = 49, 480, 720, 16.0


def synthetic_video() -> torch.Tensor:
    """A face walking across the frame, turning into another identity for the last 10 frames; 3 faceless frames."""
    frames = []
    for t in range(FRAMES):
        radius = None if t in (20, 21, 22) else 70 + t
        frames.append(tiny_faces.synthetic_face_image(HEIGHT, WIDTH, center=(200 + 6 * t, 240 + 2 * t), radius=radius,
                                                      seed=1 if t < 39 else 5))
    return torch.from_numpy(np.stack(frames)).float() / 255.0


class CountingSession:
    """Counts onnxruntime ``run`` calls of the recogniser and the batch size of each."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, outputs, feeds):
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.session.run(outputs, feeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = tempfile.mkdtemp(prefix="mmv-bench-metrics-")
    tiny_faces.build_fake_insightface_pack(tmp)
    analyzer = FaceAnalyzer(tmp)
    tiny.build_clip_vision_checkpoint(os.path.join(tmp, "clip.safetensors"))
    clip = load_clip_vision(os.path.join(tmp, "clip.safetensors"))
    video = synthetic_video()
    reference = torch.from_numpy(tiny_faces.synthetic_face_image(512, 512, radius=150, seed=1))[None].float() / 255.0
    references = metrics.reference_faces(analyzer, reference)

    # one counted run: detector passes and recogniser calls while scoring the video (references done before)
    detect, counted = analyzer.det_model.detect, {"detect": 0}

    def counting_detect(*a, **k):
        counted["detect"] += 1
        return detect(*a, **k)

    analyzer.det_model.detect = counting_detect
    analyzer.rec_model.session = session = CountingSession(analyzer.rec_model.session)
    result = metrics.evaluate_video(video, fps=FPS, analyzer=analyzer, references=references, clip_model=clip,
                                    clip_references=reference)
    del analyzer.det_model.detect
    analyzer.rec_model.session = session.session
    faces = result.faces_found
    print(f"{FRAMES} frames {WIDTH}x{HEIGHT}: {counted['detect']} detector passes, recogniser calls with batch sizes "
          f"{session.batches} ({faces} frames with a face)")
    assert counted["detect"] == faces + len(analyzer.det_sizes) * (FRAMES - faces), counted
    assert session.batches == [faces], session.batches
    print(result.report())

    stages = {
        "faces (detect + 1 batched recognition)": lambda: metrics.evaluate_video(
            video, analyzer=analyzer, references=references, dynamics=False),
        "dynamics (Farneback @256, 8 fps)": lambda: motion.video_motion(metrics.frames_uint8(video), FPS),
        "CLIP-I (tiny CLIP)": lambda: metrics.clip_similarity_curve(clip, video, reference),
        "all": lambda: metrics.evaluate_video(video, fps=FPS, analyzer=analyzer, references=references,
                                              clip_model=clip, clip_references=reference),
    }
    for name, fn in stages.items():
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        med = statistics.median(times)
        print(f"{name:42s} median {med:.3f} s  ({FRAMES / med:6.1f} frames/s; min {min(times):.3f}, "
              f"max {max(times):.3f}, n={len(times)}, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
