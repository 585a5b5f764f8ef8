"""Host tests: the pack inside a real ComfyUI, driven over its HTTP API.

* Every shipped workflow (``workflows/*.json``, UI format) is converted with the
  server's ``/object_info``, pointed at a tiny random model, shrunk, run, and its
  saved video decoded.
* Bad inputs (frame count, size, incomplete model folder, corrupt LoRA, corrupt
  single-file transformer) give the user a clear error, and the server keeps
  serving afterwards.

One ComfyUI server (module scope) serves every test here. Run with:
    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/.venv/bin/python \
        python -m pytest tests -k host
Without ``COMFYUI_PATH`` these tests skip.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent
# The Wan workflows (core nodes only, on core-format Wan files) run in test_host_wan_workflows.py.
WORKFLOWS = sorted(p for p in (PACK_DIR / "workflows").glob("*.json") if not p.name.startswith("wan_"))

WIDTH = HEIGHT = 32
FRAMES = 9
STEPS = 2
PROMPT_TIMEOUT = 600

LOADER = "MMV_CogVideoXModelLoader"
ENCODE = "MMV_CogVideoXTextEncode"
LORA = "MMV_CogVideoXLoraLoader"
SAMPLER = "MMV_CogVideoXSampler"
DECODE = "MMV_CogVideoXDecode"
FACE_LOADER = "MMV_MagicMirrorFaceEncoderLoader"
FACE_ENCODE = "MMV_MagicMirrorFaceEncode"
IDENTITY_SCORE = "MMV_IdentityScore"

BAD_LORA = "bad.safetensors"
BAD_TRANSFORMER = "truncated_transformer.safetensors"
BROKEN_FOLDER = "broken"
NO_T5 = "tiny-t2v-no-t5"
COMFY_T5 = "t5_test.safetensors"


def _build_model_root(root: Path, error_cases: bool = True) -> None:
    """models/ with tiny T2V/I2V folders plus the bad files the error test needs.

    Everything exists before the server starts: the extra-model-paths YAML maps the
    subfolders present at start-up, and the combos then list the bad entries.
    ``error_cases=False`` leaves out the bad files and the T5 for core's Load CLIP
    (what the method workflows need, for tests/test_host_frontend.py).
    """
    from diffusers import CogVideoXTransformer3DModel

    from magicmirror_video.testing import tiny, tiny_faces

    cog = root / "CogVideo"
    tiny.build_model_folder(str(cog / "tiny-t2v"))
    tiny.build_model_folder(str(cog / "tiny-i2v"), i2v=True)
    # MagicMirror: fake insightface pack, tiny PhotoMaker-V2 checkpoint, tiny adapter for tiny-t2v.
    tiny_faces.build_fake_insightface_pack(str(root / "insightface"))
    # Video Metrics' protocols: buffalo_l (consisid / opens2v), tiny optional metric models in models/metrics/.
    from magicmirror_video.testing import tiny_metrics

    tiny_faces.build_fake_insightface_pack(str(root / "insightface"), "buffalo_l")
    tiny_metrics.build_curricularface_file(str(root / "metrics" / "glint360k_curricular_face_r101_backbone.bin"))
    tiny_metrics.build_clip_folder(str(root / "metrics" / "clip-vit-tiny"))
    tiny_metrics.build_dino_folder(str(root / "metrics" / "dino-tiny"))
    (root / "photomaker").mkdir()
    tiny.build_photomaker_checkpoint(str(root / "photomaker" / "photomaker-v2.bin"))
    (root / "magicmirror").mkdir()
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(cog / "tiny-t2v" / "transformer"))
    tiny.build_magicmirror_adapter(str(root / "magicmirror" / "magicmirror.safetensors"), transformer)
    # Subject reference: a random LoRA trained-format file with the reference scope recorded.
    import torch

    from magicmirror_video.models.lora import TrainableLora, find_lora_targets, save_lora
    from magicmirror_video.models.subject import LORA_TARGETS, NORM_LORA_MODULES

    torch.manual_seed(0)
    lora = TrainableLora(transformer, find_lora_targets(transformer, list(LORA_TARGETS)), 4, 4.0,
                         reference_only=NORM_LORA_MODULES)
    with torch.no_grad():
        for p in lora.up.values():
            p.normal_(0, 0.05)
    (root / "loras").mkdir()
    save_lora(str(root / "loras" / "subject_reference_lora.safetensors"), lora.layers(),
              {"method": "subject_replay", "subject_lora_scope": "reference"})
    # Reg-DPO: a random LoRA in the trainer's export format (rank 4 on the attention projections).
    dpo = TrainableLora(transformer, find_lora_targets(transformer, ["to_q", "to_k", "to_v", "to_out.0"]), 4, 8.0)
    with torch.no_grad():
        for p in dpo.up.values():
            p.normal_(0, 0.05)
    save_lora(str(root / "loras" / "regdpo.safetensors"), dpo.layers(), {"method": "regdpo", "rank": 4, "alpha": 8.0})
    # DualReal: a random adapter in the official adapter.pth format + a tiny CLIP vision tower.
    from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig
    from magicmirror_video.testing.tiny import build_clip_vision_checkpoint

    adapters = DualRealAdapters(DualRealConfig.for_transformer(transformer, condition_dim=16, hidden_dim=8))
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (root / "dualreal").mkdir()
    torch.save(adapters.state_dict(), root / "dualreal" / "adapter.pth")
    (root / "clip_vision").mkdir()
    build_clip_vision_checkpoint(str(root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))
    if not error_cases:
        return
    # A folder without text_encoder/ (its prompts come from core's Load CLIP) and a T5 file for models/text_encoders/.
    _build_comfy_t5(root, cog / NO_T5)
    # A folder that the loader's combo lists (it has transformer/) but that is incomplete.
    shutil.copytree(cog / "tiny-t2v" / "transformer", cog / BROKEN_FOLDER / "transformer")
    # A LoRA "downloaded" as an HTML error page.
    (root / "loras" / BAD_LORA).write_bytes(b"<html>404</html>")
    # A single-file transformer cut off mid-download: a real file's first 60%.
    (root / "diffusion_models").mkdir()
    good = (cog / "tiny-t2v" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (root / "diffusion_models" / BAD_TRANSFORMER).write_bytes(good[: int(len(good) * 0.6)])


def _build_comfy_t5(root: Path, folder: Path) -> None:
    """``text_encoders/`` with a random T5 that core's Load CLIP loads, and a tiny CogVideoX without text_encoder/.

    ComfyUI builds its T5 from a fixed config picked by the file's layout: a file with 24 blocks of width 4096 is a
    T5-XXL (9.5 GB); a smaller one is read as T5-base (768 wide, 12 blocks), which is what this test file is
    (~220 MB in fp16). The pack's code path is the same for both: the CLIP's own T5 tokenizer and T5 model.
    """
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from magicmirror_video.testing import tiny

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12,
                                 feed_forward_proj="relu", is_encoder_decoder=False, use_cache=False))
    (root / "text_encoders").mkdir()
    save_file({k: v.half().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(root / "text_encoders" / COMFY_T5))
    tiny.build_model_folder(str(folder), text_dim=768)
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")


def _write_probe_pack(custom_nodes: Path) -> None:
    """A test-only custom node pack: ``GET /mmv_test/models`` answers what ``comfy.model_management`` holds
    (``current_loaded_models``) and which models each ``load_models_gpu`` call was given (``?reset=1`` clears)."""
    probe = custom_nodes / "mmv_test_probe"
    probe.mkdir(parents=True)
    (probe / "__init__.py").write_text('''
import comfy.model_management as mm
from aiohttp import web
from server import PromptServer

LOADS = []
_load_models_gpu = mm.load_models_gpu


def load_models_gpu(models, *args, **kwargs):
    LOADS.append([type(getattr(m, "model", m)).__name__ for m in models])
    return _load_models_gpu(models, *args, **kwargs)


mm.load_models_gpu = load_models_gpu


@PromptServer.instance.routes.get("/mmv_test/models")
async def models(request):
    loaded = [type(m.model.model).__name__ for m in mm.current_loaded_models if m.model is not None]
    answer = {"loaded": loaded, "loads": list(LOADS)}
    if request.query.get("reset"):
        LOADS.clear()
    return web.json_response(answer)


NODE_CLASS_MAPPINGS = {}
''', encoding="utf-8")


def _write_face_pngs(input_dir: Path) -> None:
    """face.png (a synthetic face the fake detector finds) and dark.png (no face)."""
    from PIL import Image

    from magicmirror_video.testing import tiny_faces

    Image.fromarray(tiny_faces.synthetic_face_image(160, 128, radius=40, seed=0)).save(input_dir / "face.png")
    Image.fromarray(tiny_faces.synthetic_face_image(160, 128, radius=None)).save(input_dir / "dark.png")
    Image.fromarray(tiny_faces.synthetic_face_image(56, 40, radius=14, seed=5)).save(input_dir / "subject.png")


def _write_example_png(path: Path) -> None:
    """A 48x40 RGB gradient: the image the I2V workflow's LoadImage names."""
    import numpy as np
    from PIL import Image

    h, w = 40, 48
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 128)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI with the pack, tiny models, bad files and input/example.png."""
    paths = comfy_host.require_comfyui()
    tmp = tmp_path_factory.mktemp("host_workflows")
    models = tmp / "models"
    _build_model_root(models)
    srv = comfy_host.ComfyServer(*paths, pack_dir=PACK_DIR, model_root=models, tmp_dir=tmp / "comfy")
    _write_probe_pack(srv.base_dir / "custom_nodes")
    _write_example_png(srv.input_dir / "example.png")
    _write_face_pngs(srv.input_dir)
    with srv:
        yield srv


def _nodes_of(api: dict, class_type: str) -> list[dict]:
    return [node for node in api.values() if node["class_type"] == class_type]


def _shipped_api(srv: comfy_host.ComfyServer, path: Path) -> tuple[dict, dict]:
    """(UI workflow, API prompt) of a shipped workflow, on the tiny model and shrunk.

    Edits the API prompt by input name (after ui_to_api), so a reordering of widgets
    in the workflow or the node definitions cannot put a value in the wrong input.
    """
    workflow = json.loads(path.read_text(encoding="utf-8"))
    api = comfy_host.ui_to_api(workflow, srv.object_info())
    loaders = _nodes_of(api, LOADER)
    samplers = _nodes_of(api, SAMPLER)
    assert loaders and samplers, f"{path.name}: no {LOADER} / {SAMPLER}"
    clip_loaders = _nodes_of(api, "CLIPLoader")
    for node in loaders:
        original = node["inputs"]["model"]
        tiny_model = NO_T5 if clip_loaders else "tiny-i2v" if "I2V" in original else "tiny-t2v"
        node["inputs"].update(model=tiny_model, precision="fp32", offload="none")
    for node in clip_loaders:
        node["inputs"].update(clip_name=COMFY_T5)
    for node in samplers:
        node["inputs"].update(width=WIDTH, height=HEIGHT, num_frames=FRAMES, steps=STEPS)
    for node in _nodes_of(api, FACE_LOADER):
        node["inputs"].update(precision="fp32", provider="CPU")
    return workflow, api


def _decode_video(path: Path) -> list:
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _run_and_check_video(srv: comfy_host.ComfyServer, api: dict, workflow: dict | None = None) -> None:
    entry = srv.run_prompt(api, timeout=PROMPT_TIMEOUT, workflow=workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (save_id,) = [nid for nid, node in api.items() if node["class_type"] == "SaveVideo"]
    files = srv.output_files(entry, save_id)
    assert len(files) == 1, entry["outputs"]
    assert files[0].is_file(), files[0]
    frames = _decode_video(files[0])
    assert len(frames) == FRAMES
    assert all(f.shape == (HEIGHT, WIDTH, 3) for f in frames), [f.shape for f in frames]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_host_runs_every_shipped_workflow(server, path):
    workflow, api = _shipped_api(server, path)
    for node in _nodes_of(api, "LoadImage"):
        assert node["inputs"]["image"] in ("example.png", "face.png", "subject.png"), node["inputs"]["image"]
    _run_and_check_video(server, api, workflow)


def test_host_pack_loads_from_a_non_identifier_folder_and_its_pyproject_parses(server):
    """ComfyUI imported the pack from custom_nodes/<git clone name> (not a Python identifier) and its own
    Comfy Registry parser (comfy_config) read pyproject.toml without complaint."""
    assert not server.pack_name.isidentifier()
    assert (server.base_dir / "custom_nodes" / server.pack_name / "__init__.py").is_file()
    assert LOADER in server.object_info()
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Unable to parse pyproject.toml" not in log, log[-3000:]


@pytest.mark.parametrize("name", ["dualreal_stageblender", "identity_motion_preference"])
def test_host_dualreal_blend_plot_is_produced(server, name):
    _, api = _shipped_api(server, PACK_DIR / "workflows" / f"{name}.json")
    entry = server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    (plot_id,) = [nid for nid, node in api.items() if node["class_type"] == "MMV_DualRealBlendPlot"]
    (preview_id,) = [nid for nid, node in api.items() if node["class_type"] == "PreviewImage"
                     and node["inputs"]["images"][0] == plot_id]
    images = entry["outputs"][preview_id]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")


def test_host_identity_motion_preference_stacks_three_methods_on_one_model(server):
    """MagicMirror (face) + a Reg-DPO LoRA + DualReal (motion) on one model, in that order."""
    _, api = _shipped_api(server, PACK_DIR / "workflows" / "identity_motion_preference.json")
    (sampler,) = _nodes_of(api, SAMPLER)
    chain, node_id = [], sampler["inputs"]["model"][0]
    while api[node_id]["class_type"] != LOADER:
        chain.append(api[node_id]["class_type"])
        node_id = api[node_id]["inputs"]["model"][0]
    assert chain == ["MMV_DualRealStageBlender", LORA, "MMV_MagicMirrorApply"]
    assert [n["inputs"]["lora_name"] for n in _nodes_of(api, LORA)] == ["regdpo.safetensors"]


def test_host_magicmirror_no_face_error(server):
    _, api = _shipped_api(server, PACK_DIR / "workflows" / "magicmirror_id_video.json")
    for node in _nodes_of(api, "LoadImage"):
        node["inputs"]["image"] = "dark.png"
    with pytest.raises(comfy_host.PromptFailed) as err:
        server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    error = _execution_error(err.value.details)
    assert error.get("node_type") == FACE_ENCODE
    assert "No face found in reference image 1" in error.get("exception_message", ""), error


def test_host_identity_score_beside_the_video(server):
    """The shipped MagicMirror workflow scores its own video: the report shows on the Identity Score node (ui text)
    and in the Preview Any beside the video, the per-frame plot in a Preview Image. The tiny random model's 32x32
    frames are noise (the fake detector may or may not see blobs in them): the numbers are meaningless, the report's
    form is checked."""
    workflow, api = _shipped_api(server, PACK_DIR / "workflows" / "magicmirror_id_video.json")
    entry = server.run_prompt(api, timeout=PROMPT_TIMEOUT, workflow=workflow)
    (score_id,) = [nid for nid, node in api.items() if node["class_type"] == IDENTITY_SCORE]
    (text_id,) = [nid for nid, node in api.items() if node["class_type"] == "PreviewAny"]
    assert api[score_id]["inputs"]["frames"][0] in [nid for nid, n in api.items() if n["class_type"] == DECODE]
    report = entry["outputs"][score_id]["text"][0]
    assert entry["outputs"][text_id]["text"][0] == report
    assert re.match(r"Face similarity (-?[01]\.\d{4} \(mean over [1-9]/9 frames with a face, 1 reference\)|"
                    r": no face in any frame \(9 frames, detector antelopev2 at 640/512/384/256\))", report), report
    (plot_id,) = [nid for nid, node in api.items() if node["class_type"] == "PreviewImage"
                  and node["inputs"]["images"][0] == score_id]
    assert len(entry["outputs"][plot_id]["images"]) == 1
    print(f"\nIdentity Score on the tiny model's video:\n{report}")


def test_host_identity_score_on_faces(server):
    """Identity Score in ComfyUI on frames that do show the reference face (face.png repeated 9 times)."""
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "2": {"class_type": FACE_LOADER, "inputs": {"insightface": "antelopev2", "provider": "CPU",
                                                    "photomaker": "photomaker-v2.bin", "precision": "fp32"}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 9}},
        "4": {"class_type": IDENTITY_SCORE, "inputs": {"face_encoder": ["2", 0], "frames": ["3", 0],
                                                       "reference": ["1", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    entry = server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    report = entry["outputs"]["4"]["text"][0]
    assert report.startswith("Face similarity 1.0000 (mean over 9/9 frames with a face, 1 reference)"), report
    assert "FM_ref 0.0000, FM_inter 0.0000" in report
    assert float(entry["outputs"]["5"]["text"][0]) == pytest.approx(1.0, abs=1e-5)  # the FLOAT score output
    print(f"\nIdentity Score on 9 copies of the reference face:\n{report}")


def test_host_video_metrics_consisid_protocol(server):
    """Video Metrics in ComfyUI under consisid: the installed buffalo_l pack (the face encoder is antelopev2), 16
    frames of a 9-frame video, FaceSim-Cur from models/metrics/, CLIPScore and DINO-I from the folders there; the FID
    column says why it has no number (no Inception weights)."""
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "2": {"class_type": FACE_LOADER, "inputs": {"insightface": "antelopev2", "provider": "CPU",
                                                    "photomaker": "photomaker-v2.bin", "precision": "fp32"}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 9}},
        "4": {"class_type": "MMV_VideoMetrics", "inputs": {
            "frames": ["3", 0], "protocol": "consisid", "fps": 8.0, "reference": ["1", 0], "face_encoder": ["2", 0],
            "clip_vision": "none", "prompt": "a face", "clip_text": "clip-vit-tiny", "dino": "dino-tiny"}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    entry = server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    report = entry["outputs"]["4"]["text"][0]
    assert report.startswith("FaceSim-Arc 1.0000 (mean over 16/16 frames with a face, 1 reference)"), report
    assert "FaceSim-Cur 1.0000" in report and "FID (face crops, ConsisID): n/a (no inception_v3_google" in report
    for part in ("CLIPScore", "DINO-I 1.0000", "Dynamics 0.0 px/s", "Protocol consisid: 16 frames scored of 9"):
        assert part in report, report
    assert "uses the insightface pack" not in report
    print(f"\nVideo Metrics (consisid) on 9 copies of the reference face:\n{report}")


def _t2v_api(srv: comfy_host.ComfyServer) -> dict:
    """The shipped T2V workflow as an API prompt on tiny-t2v, shrunk (a valid prompt)."""
    _, api = _shipped_api(srv, PACK_DIR / "workflows" / "cogvideox_text_to_video.json")
    return api


def _with_lora(api: dict, lora_name: str) -> dict:
    """Insert an MMV_CogVideoXLoraLoader between the loader and the sampler."""
    api = copy.deepcopy(api)
    (loader_id,) = [nid for nid, n in api.items() if n["class_type"] == LOADER]
    lora_id = str(max(int(nid) for nid in api) + 1)
    api[lora_id] = {"class_type": LORA,
                    "inputs": {"model": [loader_id, 0], "lora_name": lora_name, "strength": 1.0}}
    for node in _nodes_of(api, SAMPLER):
        node["inputs"]["model"] = [lora_id, 0]
    return api


def _execution_error(entry: dict) -> dict:
    """The ``execution_error`` event data of a failed history entry."""
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {json.dumps(entry.get('status'))}")


def test_host_bad_input_errors_and_server_keeps_serving(server):
    valid = _t2v_api(server)
    info = server.object_info()
    loader_inputs = info[LOADER]["input"]
    # The bad entries reach the user's combos (else ComfyUI validation would reject them first).
    assert BROKEN_FOLDER in loader_inputs["required"]["model"][0]
    assert BAD_TRANSFORMER in loader_inputs["optional"]["transformer_file"][0]
    assert BAD_LORA in info[LORA]["input"]["required"]["lora_name"][0]

    def with_inputs(class_type: str, api: dict | None = None, **inputs) -> dict:
        api = copy.deepcopy(valid if api is None else api)
        for node in _nodes_of(api, class_type):
            node["inputs"].update(inputs)
        return api

    # Sizes the Sampler's own validation (VALIDATE_INPUTS) refuses before anything runs, with the sampler's message.
    for label, api, snippets in (("num_frames=10", with_inputs(SAMPLER, num_frames=10), ["num_frames=10", "4k+1"]),
                                 ("width=40", with_inputs(SAMPLER, width=40), ["width=40", "multiple of 16"])):
        with pytest.raises(comfy_host.PromptRejected) as err:
            server.submit(api)
        assert SAMPLER in str(err.value) and all(s in str(err.value) for s in snippets), f"{label}: {err.value}"

    # Each case: (prompt, failing node type, exception type, snippets of the message).
    # All of them pass ComfyUI's validation and fail in our nodes, so the message is the pack's.
    cases = {
        "incomplete folder": (with_inputs(LOADER, model=BROKEN_FOLDER), LOADER, "ModelFolderError",
                              [BROKEN_FOLDER, "incomplete", "vae"]),
        "corrupt LoRA": (_with_lora(valid, BAD_LORA), LORA, "WeightsFileError",
                         [BAD_LORA, "corrupt or truncated"]),
        "corrupt transformer file": (with_inputs(LOADER, transformer_file=BAD_TRANSFORMER), LOADER,
                                     "WeightsFileError", [BAD_TRANSFORMER, "corrupt or truncated"]),
    }
    seen = {}
    for label, (api, node_type, exc_type, snippets) in cases.items():
        try:
            server.run_prompt(api, timeout=PROMPT_TIMEOUT)
        except comfy_host.PromptRejected as err:
            pytest.fail(f"{label}: rejected by ComfyUI validation instead of the pack's own error:\n{err}")
        except comfy_host.PromptFailed as err:
            error = _execution_error(err.details)
            message = error.get("exception_message", "")
            seen[label] = f"{error.get('node_type')}: {error.get('exception_type')}: {message}"
            assert error.get("node_type") == node_type, f"{label}: {err}"
            assert error.get("exception_type") == exc_type, f"{label}: {err}"  # the class name, no module path
            assert comfy_host.PACK_MODULE_NAME not in message, f"{label}: {message}"
            for snippet in snippets:
                assert snippet in message, f"{label}: {snippet!r} not in the error message:\n{message}"
        else:
            pytest.fail(f"{label}: the prompt succeeded but should have failed")
    print("\nerrors the user sees:\n" + "\n".join(f"  {k}: {v}" for k, v in seen.items()))

    # The server survived all of that and still runs a valid prompt.
    _run_and_check_video(server, valid)


# ------------------------------------------------------------------------ ComfyUI's model manager

TRANSFORMER, T5, VAE = "MMV_CogVideoXTransformer3DModel", "MMV_T5EncoderModel", "MMV_AutoencoderKLCogVideoX"


def _models(srv: comfy_host.ComfyServer, reset: bool = False) -> dict:
    """The probe's answer: the pack's entries in ``current_loaded_models`` and the ``load_models_gpu`` calls."""
    answer = srv.get_json("/mmv_test/models" + ("?reset=1" if reset else ""))
    return {"loaded": sorted(c for c in answer["loaded"] if c.startswith("MMV_")),
            "loads": [[c for c in call if c.startswith("MMV_")] for call in answer["loads"]]}


def _free(srv: comfy_host.ComfyServer, **flags) -> None:
    """``POST /free`` and wait until the prompt worker has unloaded the pack's models."""
    import time

    srv.post_json("/free", flags)
    deadline = time.monotonic() + 60
    while _models(srv)["loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)


def _with_seed(api: dict, seed: int) -> dict:
    api = copy.deepcopy(api)
    for node in _nodes_of(api, SAMPLER):
        node["inputs"]["seed"] = seed
    return api


def test_host_models_are_registered_with_comfy_model_management(server):
    """After a run the transformer, T5 and VAE are among ComfyUI's loaded models (offload auto: on this CPU it keeps
    them, like none); POST /free {"unload_models": true} unloads them; the next run loads them again and succeeds;
    {"unload_models": true, "free_memory": true} too (the whole workflow reloads)."""
    api = _t2v_api(server)
    for node in _nodes_of(api, LOADER):
        node["inputs"]["offload"] = "auto"
    _free(server, unload_models=True)  # (what the tests before left loaded)
    _models(server, reset=True)
    _run_and_check_video(server, _with_seed(api, 11))
    assert _models(server)["loaded"] == sorted([TRANSFORMER, T5, VAE])
    _free(server, unload_models=True)
    assert _models(server, reset=True)["loaded"] == []
    _run_and_check_video(server, _with_seed(api, 12))  # the prompts are cached: sampler and decode run again
    state = _models(server, reset=True)
    assert state["loaded"] == sorted([TRANSFORMER, VAE]) and state["loads"] == [[TRANSFORMER], [VAE]]
    _free(server, unload_models=True, free_memory=True)
    assert _models(server)["loaded"] == []
    _run_and_check_video(server, _with_seed(api, 12))  # nothing cached any more
    assert _models(server)["loaded"] == sorted([TRANSFORMER, T5, VAE])
    _free(server, unload_models=True)


@pytest.mark.parametrize("storage", ["precision", "fp8_e4m3fn"])
def test_host_adapters_load_with_the_transformer_and_leave_after_the_run(server, storage):
    """MagicMirror (model offload): the adapter is loaded in the same load_models_gpu call as the transformer, so
    ComfyUI's estimate counts it, and nothing of the pack stays loaded after the run; also with fp8 weight storage
    (the adapter stored in fp8 too, moved by ComfyUI's model manager as stored)."""
    _, api = _shipped_api(server, PACK_DIR / "workflows" / "magicmirror_id_video.json")
    for node in _nodes_of(api, LOADER):
        node["inputs"]["offload"] = "model"
        node["inputs"]["weight_storage"] = storage
    _free(server, unload_models=True)
    _models(server, reset=True)
    server.run_prompt(_with_seed(api, 21 if storage == "precision" else 22), timeout=PROMPT_TIMEOUT)
    state = _models(server, reset=True)
    assert {TRANSFORMER, "MMV_MagicMirrorAdapter"} in [set(call) for call in state["loads"]], state
    if storage == "precision":  # (the next case's face encoding is ComfyUI's cached output of this one)
        assert ["MMV_IDEncoder"] in state["loads"], state  # the face encoder's ID encoder too
    assert state["loaded"] == [], state


def test_host_folder_without_text_encoder_asks_for_a_clip(server):
    api = copy.deepcopy(_t2v_api(server))
    for node in _nodes_of(api, LOADER):
        node["inputs"]["model"] = NO_T5
    with pytest.raises(comfy_host.PromptFailed) as err:
        server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    error = _execution_error(err.value.details)
    assert error.get("node_type") == ENCODE
    assert "without text_encoder/" in error["exception_message"] and "Load CLIP" in error["exception_message"]


SPEED = "MMV_CogVideoXSpeed"


def test_host_speed_workflow_runs_fp8_weights_and_a_cache(server):
    """The shipped speed workflow in real ComfyUI: the loader stores the transformer in fp8 (layerwise casting) and the
    Speed node's first-block cache acts in the sampler; the video is saved."""
    workflow, api = _shipped_api(server, PACK_DIR / "workflows" / "cogvideox_speed.json")
    (loader,), (speed,), (sampler,) = _nodes_of(api, LOADER), _nodes_of(api, SPEED), _nodes_of(api, SAMPLER)
    assert loader["inputs"]["weight_storage"] == "fp8_e4m3fn" and speed["inputs"]["cache"] == "first_block_cache"
    assert api[sampler["inputs"]["model"][0]]["class_type"] == SPEED
    speed["inputs"]["threshold"] = 0.3  # (the tiny random model changes too much between steps for 0.05 to skip)
    loader["inputs"]["offload"] = "model"  # the goal's fp8 + model mode (and a load of its own: ComfyUI caches nodes)
    mark = len(server.log_path.read_text(encoding="utf-8", errors="replace"))
    _run_and_check_video(server, api, workflow)
    log = server.log_path.read_text(encoding="utf-8", errors="replace")[mark:]
    assert "weights stored in torch.float8_e4m3fn" in log, log[-3000:]
    assert "Sampling with SpeedOptions(cache='first_block_cache', threshold=0.3" in log, log[-3000:]


def _speed_node(model_link: list, **inputs) -> dict:
    return {"class_type": SPEED, "inputs": {
        "model": model_link, "cache": "none", "threshold": -1.0, "interval": -1, "start_step": -1, "end_step": -1,
        "compile": False, "attention": "native", "mag_ratios": "", **inputs}}


def test_host_speed_settings_that_cannot_act_are_refused_in_one_plain_sentence(server):
    """In a real ComfyUI, /history's error of each refusal: the Speed node's type, the exception's class name alone
    (ComfyUI prints a class of a custom node pack with its module path otherwise, the pack's folder in it) and one
    sentence: a second Speed node on the model, an empty step range at the node, mag_ratios for another step count and
    a start step past the run at the sampler (before it samples)."""
    def prompt(first: dict, second: dict | None = None) -> dict:
        api = copy.deepcopy(_t2v_api(server))
        (sampler,) = _nodes_of(api, SAMPLER)
        api["901"] = _speed_node(sampler["inputs"]["model"], **first)
        sampler["inputs"]["model"] = ["901", 0]
        if second is not None:
            api["902"] = _speed_node(["901", 0], **second)
            sampler["inputs"]["model"] = ["902", 0]
        return api

    steps = STEPS
    cases = {  # (prompt, failing node, sentence)
        "second Speed node": (prompt(dict(cache="first_block_cache", threshold=0.3), dict(cache="taylorseer")), SPEED,
                              "this model already has speed options (cache='first_block_cache', threshold=0.3): use "
                              "one Speed node per model and set every option there (a second Speed node would "
                              "replace the first)."),
        "empty range": (prompt(dict(cache="pyramid_attention_broadcast", start_step=10, end_step=5)), SPEED,
                        "pyramid_attention_broadcast: start_step 10 and end_step 5 leave no step to cache (the steps "
                        "start_step <= i < end_step reuse it); set end_step above start_step, or -1 for the last "
                        "step."),
        "mag_ratios count": (prompt(dict(cache="mag_cache", mag_ratios="1.0, 0.99, 0.98, 0.97, 0.96")), SAMPLER,
                             f"mag_ratios has 5 values but this run has {steps} steps: mag_cache needs the ratio of "
                             f"each step. Calibrate at {steps} steps (leave mag_ratios empty for one run and paste the "
                             "ratios it logs) or sample with 5 steps."),
        "start past the run": (prompt(dict(cache="taylorseer", start_step=30)), SAMPLER,
                               f"taylorseer caches no step of this {steps}-step run: start_step 30 is past its last "
                               f"step ({steps - 1}). Set start_step below {steps} (or -1 for diffusers' default), or "
                               "sample with more steps."),
    }
    for label, (api, node_type, sentence) in cases.items():
        with pytest.raises(comfy_host.PromptFailed) as err:
            server.run_prompt(api, timeout=PROMPT_TIMEOUT)
        error = _execution_error(err.value.details)
        assert error.get("node_type") == node_type, f"{label}: {error}"
        assert error.get("exception_type") == "SpeedSettingError", f"{label}: {error}"
        assert error.get("exception_message", "").strip() == sentence, f"{label}: {error}"
    _run_and_check_video(server, prompt(dict(cache="taylorseer", start_step=1)))  # (and the server keeps serving)


def test_host_speed_conflict_is_refused_at_the_speed_node(server):
    """Pyramid attention broadcast on a MagicMirror (two-way) model fails at the Speed node, before sampling, with the
    conflict named; the server keeps serving."""
    _, api = _shipped_api(server, PACK_DIR / "workflows" / "magicmirror_id_video.json")
    (sampler,) = _nodes_of(api, SAMPLER)
    api["900"] = {"class_type": SPEED, "inputs": {
        "model": sampler["inputs"]["model"], "cache": "pyramid_attention_broadcast", "threshold": -1.0, "interval": -1,
        "start_step": -1, "end_step": -1, "compile": False, "attention": "native", "mag_ratios": ""}}
    sampler["inputs"]["model"] = ["900", 0]
    with pytest.raises(comfy_host.PromptFailed) as err:
        server.run_prompt(api, timeout=PROMPT_TIMEOUT)
    error = _execution_error(err.value.details)
    assert error.get("node_type") == SPEED, error
    assert "MagicMirror's two-way face attention" in error.get("exception_message", ""), error
    assert LOADER in server.object_info()
