"""Frame-selective decoding: the picked frames equal a full decode's, and memory does not grow with the
clip's length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import av
import numpy as np
import pytest
import torch

from magicmirror_video.models.video_io import index_video, read_frames, read_video
from magicmirror_video.training.data import frame_indices, load_media

SIZE = 256
FRAME_BYTES = SIZE * SIZE * 3


def encode(path, num_frames: int, gop: int) -> str:
    """A clip whose frames all differ (a square moving over a gradient, the frame number in a corner),
    H.264 with B-frames and a keyframe every ``gop`` frames."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    background = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "28", "g": str(gop), "bf": "2"}
        for t in range(num_frames):
            img = background.copy()
            x = (7 * t) % (SIZE - 48)
            img[100:148, x:x + 48] = (255, 40, 40)
            img[:16, :16] = t % 256
            img[:16, 16:32] = t // 256 * 64
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    from magicmirror_video.models.video_io import write_video

    return {"short": encode(root / "short.mp4", 40, gop=12), "long": encode(root / "long.mp4", 640, gop=24),
            "long_gop": encode(root / "long_gop.mp4", 640, gop=250),
            "warm_up": write_video(str(root / "warm_up.mp4"), torch.rand(9, 32, 32, 3))}


def full_decode(path) -> list[np.ndarray]:
    """The reference: every frame, decoded from the start by PyAV."""
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("name", ["short", "long", "long_gop"])
def test_picked_frames_equal_the_full_decode(clips, name):
    path = clips[name]
    full = full_decode(path)
    n = len(full)
    index = index_video(path)
    assert index.frames == n and index.seekable and (index.width, index.height) == (SIZE, SIZE)
    if name != "long_gop":
        assert len(index.keyframes) > 2  # several keyframes: the reader seeks
    picks = [frame_indices(n, 9, "uniform"), frame_indices(n, 9, "start"), list(range(n - 9, n)),
             [n - 1, 3, 3, n // 2, 0, n // 2 + 1, n - 2]]  # unsorted, repeated
    for indices in picks:
        for with_index in (index, None):  # seek by timestamp / decode from the start
            got = read_frames(path, indices, with_index)
            assert got.dtype == np.uint8 and got.shape == (len(indices), SIZE, SIZE, 3)
            for k, i in enumerate(indices):
                assert np.array_equal(got[k], full[i]), (name, indices, i, with_index is not None)
    for sampling, seed in (("uniform", 0), ("start", 0), ("random", 5), ("random", 6)):
        x = load_media(path, num_frames=9, height=SIZE, width=SIZE, sampling=sampling,
                       generator=torch.Generator().manual_seed(seed))
        indices = frame_indices(n, 9, sampling, torch.Generator().manual_seed(seed))
        expected = torch.from_numpy(np.stack([full[i] for i in indices])).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert torch.equal(x, expected.clamp(-1, 1)), (name, sampling)
    frames, fps = read_video(path, [0, n - 1])
    assert fps == 8 and torch.equal(frames, torch.from_numpy(np.stack([full[0], full[-1]])).float() / 255)


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_picked_frames_not_the_clip_length(clips):
    """tracemalloc sees the numpy frames (PyAV's to_ndarray, np.stack): 9 frames of a 640-frame clip cost
    what 9 frames of a 40-frame clip cost, while a full decode costs ~640 frames."""
    peaks = {name: traced_peak(lambda p=clips[name]: load_media(p, num_frames=9, height=SIZE, width=SIZE))
             for name in ("short", "long", "long_gop")}
    selected = 9 * FRAME_BYTES
    for name, peak in peaks.items():
        assert peak < 3 * selected, (name, peak, selected)
    assert peaks["long"] < peaks["short"] * 1.1 + 64 * 1024, peaks
    assert peaks["long_gop"] < peaks["short"] * 1.1 + 64 * 1024, peaks
    full = traced_peak(lambda: read_video(clips["long"]))  # the measurement does see decoded frames
    assert full > 600 * FRAME_BYTES, full


RSS_PROBE = """
import json, re, sys
from magicmirror_video.training.data import load_media
from magicmirror_video.models.video_io import read_video
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
load_media(sys.argv[2], num_frames=9, height=32, width=32)  # warm-up (a small clip): libraries, codec, threads
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS")
if sys.argv[3] == "full":
    x = read_video(sys.argv[1])[0]
else:
    x = load_media(sys.argv[1], num_frames=9, height=256, width=256, sampling="uniform")
print(json.dumps({"delta_kib": status("VmHWM") - before, "shape": list(x.shape)}))
"""


def peak_rss_increase(clip: str, warm_up: str, mode: str) -> tuple[int, list]:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, clip, warm_up, mode], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["delta_kib"], result["shape"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_does_not_grow_with_the_clip_length(clips):
    """The whole process (libav buffers and torch tensors included): the peak-RSS increase of loading 9
    frames from a 640-frame clip stays within a few MiB of that of a 40-frame clip, while decoding the
    whole long clip costs hundreds of MiB (which shows the probe measures decoding)."""
    deltas = {}
    for name in ("short", "long"):
        deltas[name], shape = peak_rss_increase(clips[name], clips["warm_up"], "picked")
        assert shape == [9, 3, SIZE, SIZE]
    full, _ = peak_rss_increase(clips["long"], clips["warm_up"], "full")
    print(f"peak RSS increase: 9 frames of 40: {deltas['short']} KiB, 9 frames of 640: {deltas['long']} KiB, "
          f"all 640 frames: {full} KiB")
    assert deltas["long"] < deltas["short"] + 8 * 1024, deltas
    assert deltas["long"] < 64 * 1024 < full, (deltas, full)
