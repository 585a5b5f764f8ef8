"""Host test: Cancel (``POST /interrupt``) inside a long sampling step ends the prompt within a block's time.

A tiny but deep random CogVideoX (96 blocks) samples 49 frames of 240x160: one denoising step takes tens of seconds on
a CPU, one block a fraction of a second. The interrupt is sent while the first step runs; the prompt must end,
interrupted at the Sampler, within a few seconds (a check between steps only would wait for the rest of the step).
Skips without ``COMFYUI_PATH`` like the other host tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent
DEPTH = 96
SAMPLER = "MMV_CogVideoXSampler"
LOADED = "Requested to load MMV_CogVideoXTransformer3DModel"  # core's log line as the sampler's stage begins
CANCEL_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    paths = comfy_host.require_comfyui()
    from magicmirror_video.testing import tiny

    tmp = tmp_path_factory.mktemp("host_cancel")
    models = tmp / "models"
    tiny.build_model_folder(str(models / "CogVideo" / "tiny-t2v-deep"), num_layers=DEPTH)
    with comfy_host.ComfyServer(*paths, pack_dir=PACK_DIR, model_root=models, tmp_dir=tmp / "comfy") as srv:
        yield srv


def long_prompt() -> dict:
    encode = "MMV_CogVideoXTextEncode"
    return {
        "1": {"class_type": "MMV_CogVideoXModelLoader",
              "inputs": {"model": "tiny-t2v-deep", "precision": "fp32", "offload": "none"}},
        "2": {"class_type": encode, "inputs": {"model": ["1", 0], "text": "a man walking on the beach"}},
        "3": {"class_type": encode, "inputs": {"model": ["1", 0], "text": ""}},
        "4": {"class_type": SAMPLER, "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "width": 240, "height": 160,
            "num_frames": 49, "steps": 4, "cfg": 6.0, "seed": 0, "scheduler": "DDIM"}},
        "5": {"class_type": "MMV_CogVideoXDecode", "inputs": {"model": ["1", 0], "samples": ["4", 0], "tiling": True}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def test_host_cancel_lands_inside_a_sampling_step(server):
    mark = len(server.log_path.read_text(encoding="utf-8", errors="replace"))
    prompt_id = server.submit(long_prompt())
    deadline = time.monotonic() + 300
    while LOADED not in server.log_path.read_text(encoding="utf-8", errors="replace")[mark:]:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    sampling_since = time.monotonic()
    time.sleep(3.0)  # well inside the first step's forward
    server.post_json("/interrupt", {})
    sent = time.monotonic()
    entry = server.wait(prompt_id, timeout=600)
    ended = time.monotonic() - sent
    events = {event: data for event, data in entry["status"]["messages"]}
    assert "execution_interrupted" in events, entry["status"]
    assert events["execution_interrupted"]["node_type"] == SAMPLER
    print(f"\ncancel sent {sent - sampling_since:.1f} s into sampling ({DEPTH} blocks a forward); the prompt ended "
          f"{ended:.2f} s later")
    assert ended < CANCEL_WITHIN_S, server.log_tail()
