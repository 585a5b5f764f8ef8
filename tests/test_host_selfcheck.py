"""Self-check of the host-test harness (tests/comfy_host.py) against a real ComfyUI.

Starts ComfyUI with an empty pack, converts a UI-format workflow made of core
nodes only, runs it and checks the saved video. If this fails, the harness or
the local ComfyUI is broken, not the pack.

Run with:
    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/.venv/bin/python \
        python -m pytest tests -k host
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

FRAMES = 9
FPS = 8
SIZE = 64


def _selfcheck_workflow() -> dict:
    """A UI-format workflow (as the frontend saves it), core nodes only.

    EmptyImage(64x64, batch 9, black) -> ImageInvert [bypassed] -> CreateVideo(fps 8)
    -> Reroute -> SaveVideo(mp4, h264), plus a Note. The bypassed ImageInvert and
    the Reroute exercise link resolution in ui_to_api: if the bypass were
    ignored the frames would come out white instead of black.
    """
    links = [
        # [link_id, origin_id, origin_slot, target_id, target_slot, type]
        [1, 1, 0, 2, 0, "IMAGE"],
        [2, 2, 0, 3, 0, "IMAGE"],
        [3, 3, 0, 4, 0, "VIDEO"],
        [4, 4, 0, 5, 0, "VIDEO"],
    ]

    def node(node_id, type_, pos, inputs, outputs, widgets_values, mode=0, order=0, **extra):
        return {
            "id": node_id,
            "type": type_,
            "pos": pos,
            "size": [270, 100],
            "flags": {},
            "order": order,
            "mode": mode,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": type_},
            "widgets_values": widgets_values,
            **extra,
        }

    nodes = [
        node(1, "EmptyImage", [0, 0], [],
             [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
             [SIZE, SIZE, FRAMES, 0], order=0),
        node(2, "ImageInvert", [300, 0],
             [{"name": "image", "type": "IMAGE", "link": 1}],
             [{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
             [], mode=comfy_host.MODE_BYPASS, order=1),
        node(3, "CreateVideo", [600, 0],
             [{"name": "images", "type": "IMAGE", "link": 2},
              {"name": "audio", "shape": 7, "type": "AUDIO", "link": None}],
             [{"name": "VIDEO", "type": "VIDEO", "links": [3]}],
             [FPS], order=2),
        node(4, "Reroute", [900, 0],
             [{"name": "", "type": "*", "link": 3}],
             [{"name": "", "type": "VIDEO", "links": [4]}],
             None, order=3),
        node(5, "SaveVideo", [1100, 0],
             [{"name": "video", "type": "VIDEO", "link": 4}],
             [],
             ["host_selfcheck/clip", "mp4", "h264"], order=4),
        node(6, "Note", [0, 300], [], [],
             ["Harness self-check workflow."], order=5),
    ]
    for n in nodes:
        if n["widgets_values"] is None:
            del n["widgets_values"]
    return {
        "last_node_id": 6,
        "last_link_id": 4,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def test_host_selfcheck_core_video_workflow(tmp_path):
    paths = comfy_host.require_comfyui()
    av = pytest.importorskip("av")

    # An empty pack: ComfyUI accepts a module whose NODE_CLASS_MAPPINGS is empty.
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    # A model root with a folder name ComfyUI does not know itself.
    models = tmp_path / "models"
    (models / "CogVideo").mkdir(parents=True)
    (models / "CogVideo" / "dummy.safetensors").write_bytes(b"")

    workflow = _selfcheck_workflow()
    with comfy_host.ComfyServer(*paths, pack_dir=pack, model_root=models, tmp_dir=tmp_path / "comfy") as srv:
        # The extra-model-paths YAML registered the custom folder name.
        assert srv.get_json("/models/CogVideo") == ["dummy.safetensors"]

        api = comfy_host.ui_to_api(workflow, srv.object_info())
        assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == {
            "1": ("EmptyImage", {"width": SIZE, "height": SIZE, "batch_size": FRAMES, "color": 0}),
            "3": ("CreateVideo", {"images": ["1", 0], "fps": FPS}),
            "5": ("SaveVideo", {"video": ["3", 0], "filename_prefix": "host_selfcheck/clip",
                                "format": "mp4", "codec": "h264"}),
        }

        entry = srv.run_prompt(api, timeout=300, workflow=workflow)
        assert entry["status"]["status_str"] == "success"
        saved = entry["outputs"]["5"]["images"]
        assert len(saved) == 1
        assert saved[0]["subfolder"] == "host_selfcheck" and saved[0]["type"] == "output"
        assert saved[0]["filename"].startswith("clip_") and saved[0]["filename"].endswith(".mp4")

        (video_path,) = srv.output_files(entry)
        assert video_path.is_file(), video_path
        with av.open(str(video_path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == FRAMES
        assert frames[0].shape == (SIZE, SIZE, 3)
        assert max(float(f.mean()) for f in frames) < 40, "frames should be black (bypassed ImageInvert)"

        # Errors come back as text: a validation error (HTTP 400) ...
        bad = json.loads(json.dumps(api))
        bad["3"]["inputs"]["fps"] = 1000.0  # above CreateVideo's max of 120
        error = srv.run_prompt_expect_error(bad)
        assert "fps" in error and "CreateVideo" in error
        # ... an execution error (scaling a 1x1 image to 0x0 raises in torch) ...
        failing = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScaleBy",
                  "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 0.01}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        }
        error = srv.run_prompt_expect_error(failing)
        assert error.startswith("node 2 (ImageScaleBy): RuntimeError"), error
        # ... and a missing node type is reported by ui_to_api itself.
        unknown = json.loads(json.dumps(workflow))
        unknown["nodes"][0]["type"] = "NoSuchNode"
        with pytest.raises(ValueError, match="NoSuchNode"):
            comfy_host.ui_to_api(unknown, srv.object_info())
