"""Node definitions are valid for ComfyUI, the nodes run headless, shipped workflows are consistent."""

import glob
import json
import os

import pytest
import torch

from magicmirror_video import nodes as pack_nodes

WORKFLOWS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "workflows", "*.json")))
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# The core ComfyUI nodes our workflows use, with their widget inputs (checked against the real
# server's /object_info by the host tests).
CORE_WIDGETS = {
    "CreateVideo": [("fps", ("FLOAT", {"min": 1.0, "max": 120.0}))],
    "SaveVideo": [("filename_prefix", ("STRING", {})), ("format", (["auto", "mp4"], {})),
                  ("codec", (["auto", "h264"], {}))],
    "LoadImage": [("image", (None, {})), ("upload", (None, {}))],
    "PreviewImage": [],
    "PreviewAny": [],  # shows a STRING (e.g. the Identity Score report) on the node; its input type is "*"
    "CLIPLoader": [("clip_name", (None, {})), ("type", (["stable_diffusion", "stable_cascade", "sd3", "wan"], {})),
                   ("device", (["default", "cpu"], {}))],  # (type lists more; the workflows use sd3 and wan)
    # core's Wan nodes (the wan_*.json workflows)
    "UNETLoader": [("unet_name", (None, {})),
                   ("weight_dtype", (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], {}))],
    "VAELoader": [("vae_name", (None, {}))],
    "CLIPVisionLoader": [("clip_name", (None, {}))],
    "LoraLoaderModelOnly": [("lora_name", (None, {})), ("strength_model", ("FLOAT", {"min": -100.0, "max": 100.0}))],
    "ModelSamplingSD3": [("shift", ("FLOAT", {"min": 0.0, "max": 100.0}))],
    "CLIPTextEncode": [("text", ("STRING", {}))],
    "CLIPVisionEncode": [("crop", (["center", "none"], {}))],
    "EmptyHunyuanLatentVideo": [("width", ("INT", {"min": 16, "max": 16384, "step": 16})),
                                ("height", ("INT", {"min": 16, "max": 16384, "step": 16})),
                                ("length", ("INT", {"min": 1, "max": 16384})), ("batch_size", ("INT", {"min": 1}))],
    "WanImageToVideo": [("width", ("INT", {"min": 16, "max": 16384, "step": 16})),
                        ("height", ("INT", {"min": 16, "max": 16384, "step": 16})),
                        ("length", ("INT", {"min": 1, "max": 16384})), ("batch_size", ("INT", {"min": 1}))],
    "KSampler": [("seed", ("INT", {"min": 0})), ("steps", ("INT", {"min": 1, "max": 10000})),
                 ("cfg", ("FLOAT", {"min": 0.0, "max": 100.0})),
                 ("sampler_name", (["euler", "dpmpp_2m", "uni_pc"], {})),  # (core lists more)
                 ("scheduler", (["simple", "normal", "karras"], {})), ("denoise", ("FLOAT", {"min": 0.0, "max": 1.0}))],
    "VAEDecode": [],
    "MarkdownNote": [("text", ("STRING", {}))],  # frontend-only
}
DYNAMIC_COMBOS = {"model", "lora_name", "transformer_file", "insightface", "photomaker", "adapter", "clip_vision"}  # lists of files on the user's disk


def all_inputs(cls):
    spec = cls.INPUT_TYPES()
    return [(name, opt) for section in ("required", "optional") for name, opt in spec.get(section, {}).items()]


def is_widget(opt):
    return isinstance(opt[0], list) or opt[0] in PRIMITIVES


@pytest.mark.parametrize("node_id", sorted(pack_nodes.NODE_CLASS_MAPPINGS))
def test_node_definition_is_valid_for_comfyui(node_id):
    cls = pack_nodes.NODE_CLASS_MAPPINGS[node_id]
    assert node_id in pack_nodes.NODE_DISPLAY_NAME_MAPPINGS
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    for name, opt in all_inputs(cls):
        assert isinstance(opt, tuple) and 1 <= len(opt) <= 2, name
        typ, options = opt[0], (opt[1] if len(opt) > 1 else {})
        assert isinstance(typ, (str, list)), name
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(typ, list):
            assert typ and all(isinstance(v, str) for v in typ), name
            if "default" in options:
                assert options["default"] in typ, name
        elif typ in ("INT", "FLOAT"):
            assert options.get("min", -1e30) <= options["default"] <= options.get("max", 1e30), name
        elif typ == "BOOLEAN":
            assert isinstance(options["default"], bool)
        else:
            assert typ == typ.upper(), f"custom type names are upper case: {typ}"
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY and cls.DESCRIPTION


# Node ids and input names shipped so far: they never change (saved workflows refer to them).
SHIPPED_INPUTS = {
    "MMV_CogVideoXModelLoader": ["model", "precision", "offload", "transformer_file", "weight_storage"],
    "MMV_CogVideoXTextEncode": ["model", "text", "trigger_word", "clip"],
    "MMV_CogVideoXLoraLoader": ["model", "lora_name", "strength"],
    "MMV_CogVideoXSampler": ["model", "positive", "negative", "width", "height", "num_frames", "steps", "cfg", "seed",
                             "scheduler", "image", "dynamic_cfg"],
    "MMV_CogVideoXDecode": ["model", "samples", "tiling"],
    "MMV_MagicMirrorFaceEncoderLoader": ["insightface", "provider", "photomaker", "precision"],
    "MMV_MagicMirrorFaceEncode": ["face_encoder", "images"],
    "MMV_MagicMirrorApply": ["model", "adapter", "face_embeds", "strength"],
    "MMV_SubjectReferenceLoraLoader": ["model", "lora_name", "strength", "norm_scope"],
    "MMV_SubjectReference": ["model", "image", "max_side"],
    "MMV_DualRealStageBlender": ["model", "adapter", "clip_vision", "reference_image", "mode", "fixed_alpha"],
    "MMV_DualRealBlendPlot": ["samples"],
    "MMV_CogVideoXSpeed": ["model", "cache", "threshold", "interval", "start_step", "end_step", "compile", "attention",
                           "mag_ratios"],
}


@pytest.mark.parametrize("node_id", sorted(SHIPPED_INPUTS))
def test_shipped_node_ids_and_input_names_never_change(node_id):
    """New inputs may only be appended: UI workflows store widget values by position."""
    names = [name for name, _ in all_inputs(pack_nodes.NODE_CLASS_MAPPINGS[node_id])]
    assert names[:len(SHIPPED_INPUTS[node_id])] == SHIPPED_INPUTS[node_id], names


def test_node_menu_has_one_sub_category_per_method():
    categories = {cls.CATEGORY for cls in pack_nodes.NODE_CLASS_MAPPINGS.values()}
    assert all(c.startswith("MagicMirror Video/") for c in categories), categories
    assert {"MagicMirror Video/CogVideoX", "MagicMirror Video/MagicMirror", "MagicMirror Video/DualReal",
            "MagicMirror Video/Subject Reference"} <= categories


def test_readme_documents_every_node():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for node_id, display in pack_nodes.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert display in readme, f"README node table lacks {display}"


def widget_specs(node_type):
    if node_type in pack_nodes.NODE_CLASS_MAPPINGS:
        return [(n, o) for n, o in all_inputs(pack_nodes.NODE_CLASS_MAPPINGS[node_type]) if is_widget(o)]
    return CORE_WIDGETS[node_type]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_refers_to_existing_nodes_with_valid_widgets(path):
    wf = json.load(open(path))
    assert {"last_node_id", "last_link_id", "nodes", "links", "version"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in pack_nodes.NODE_CLASS_MAPPINGS or node["type"] in CORE_WIDGETS, node["type"]
        values = list(node["widgets_values"])
        optional = set(pack_nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES().get("optional", {})) \
            if node["type"] in pack_nodes.NODE_CLASS_MAPPINGS else set()
        for name, opt in widget_specs(node["type"]):
            if not values and name in optional:  # an optional widget added after the workflow was saved: the
                break  # frontend (and the host tests' ui_to_api) use its default
            assert values, f"{node['type']}: missing value for widget {name}"
            value = values.pop(0)
            typ, options = opt[0], (opt[1] if len(opt) > 1 else {})
            if typ == "INT":
                assert isinstance(value, int) and options.get("min", value) <= value <= options.get("max", value), name
                if options.get("step") and name in ("width", "height"):
                    assert value % options["step"] == 0
                if name == "seed":
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            elif typ == "FLOAT":
                assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get("max", value)
            elif typ == "BOOLEAN":
                assert isinstance(value, bool), name
            elif typ == "STRING":
                assert isinstance(value, str), name
            elif isinstance(typ, list) and name not in DYNAMIC_COMBOS:
                assert value in typ, f"{node['type']}.{name}={value!r} not in {typ}"
        assert not values, f"{node['type']}: extra widget values {values}"
        if node["type"] == "MMV_CogVideoXSampler":
            frames = node["widgets_values"][2]
            assert (frames - 1) % 4 == 0
        if node["type"] in ("EmptyHunyuanLatentVideo", "WanImageToVideo"):  # Wan: 4k + 1 frames
            assert (node["widgets_values"][2] - 1) % 4 == 0
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == typ and inp["type"] in (typ, "*") and inp["link"] == link_id and link_id in out["links"]
        if inp["type"] == "*":
            assert nodes[dst]["type"] == "PreviewAny", nodes[dst]["type"]
        if nodes[dst]["type"] in pack_nodes.NODE_CLASS_MAPPINGS:
            spec = dict(all_inputs(pack_nodes.NODE_CLASS_MAPPINGS[nodes[dst]["type"]]))
            assert spec[inp["name"]][0] == typ, (nodes[dst]["type"], inp["name"])
        if nodes[src]["type"] in pack_nodes.NODE_CLASS_MAPPINGS:
            assert pack_nodes.NODE_CLASS_MAPPINGS[nodes[src]["type"]].RETURN_TYPES[src_slot] == typ


def test_nodes_run_headless_end_to_end(models_dir, monkeypatch, tmp_path):
    """Loader -> encode -> LoRA -> sampler -> decode through the node classes (no ComfyUI)."""
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models_dir))
    from magicmirror_video.models.lora import LoraLayer, save_lora
    m = pack_nodes.NODE_CLASS_MAPPINGS
    assert "tiny-t2v" in m["MMV_CogVideoXModelLoader"].INPUT_TYPES()["required"]["model"][0]
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "model")
    torch.manual_seed(0)
    save_lora(str(models_dir / "loras" / "tiny.safetensors"),
              {"transformer_blocks.0.attn1.to_q": LoraLayer(torch.randn(2, 32), torch.randn(32, 2))})
    assert "tiny.safetensors" in m["MMV_CogVideoXLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    (patched,) = m["MMV_CogVideoXLoraLoader"]().load_lora(model, "tiny.safetensors", 0.8)
    enc = m["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "a dog * runs across a green field"), enc.encode(model, "")
    kw = dict(width=32, height=32, num_frames=5, steps=2, cfg=6.0, seed=1, scheduler="DPM")
    (latent,) = m["MMV_CogVideoXSampler"]().sample(patched, pos, neg, **kw)
    assert latent["samples"].shape == (1, 4, 2, 4, 4)
    (base_latent,) = m["MMV_CogVideoXSampler"]().sample(model, pos, neg, **kw)
    assert not torch.equal(latent["samples"], base_latent["samples"])
    (frames,) = m["MMV_CogVideoXDecode"]().decode(model, latent, tiling=True)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == torch.float32


def test_loader_node_errors_list_paths(models_dir, monkeypatch):
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models_dir))
    from magicmirror_video.models.cogvideox import ModelFolderError
    with pytest.raises(ModelFolderError, match=str(models_dir / "CogVideo" / "CogVideoX-5b")):
        pack_nodes.NODE_CLASS_MAPPINGS["MMV_CogVideoXModelLoader"]().load("CogVideoX-5b", "bf16", "none")
    with pytest.raises(ModelFolderError, match="diffusion_models file not found: 'missing.safetensors'. Paths searched"):
        pack_nodes.NODE_CLASS_MAPPINGS["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none", "missing.safetensors")
