"""Host tests: the shipped Wan Reg-DPO workflows (core ComfyUI nodes only) run end to end in a real ComfyUI.

``workflows/wan_regdpo_t2v.json`` and ``wan_regdpo_i2v.json`` are converted with the server's ``/object_info`` (every
node must be one of core's), pointed at tiny files in a temporary models tree and shrunk (32x16, 5 frames, 2 steps):

* ``diffusion_models/``: a tiny random Wan 2.1 T2V / I2V written by core's own ``WanModel`` (core's key format; core's
  detection reads it as WAN21 t2v / i2v);
* ``loras/``: a Reg-DPO-target LoRA (attention q/k/v/o and FFN of every block) written by ``save_wan_lora`` from
  diffusers' ``from_single_file`` model of that file;
* ``vae/``: a random Wan 2.1 VAE built by core's ``comfy.ldm.wan.vae.WanVAE`` at the size core builds for any Wan 2.1
  VAE file (core's VAELoader picks a fixed config from the keys, so a narrower VAE cannot load; ~250 MB in fp16);
* core's CLIPLoader (type wan) and CLIPVisionLoader build the 24-layer UMT5-XXL and ViT-H/14 at full size from any file,
  so the test's copy of the prompt replaces just those two loaders with test-only nodes (a custom_nodes module written
  here) that build core's own classes (``comfy.sd.CLIP`` on ``comfy.text_encoders.t5.T5`` with a UMT5 config, and
  ``comfy.clip_vision.ClipVisionModel``) with tiny configs and the widths Wan reads (4096, 1280); core's CLIPTextEncode
  and CLIPVisionEncode stay.

Each workflow runs at LoRA strength 1 and 0: the saved video decodes to 5 frames of 16x32, the LoRA changes the video,
and core logged no LoRA key as not loaded. Skipped without ``COMFYUI_PATH``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402
import wan_testing  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT, FRAMES, STEPS = 32, 16, 5, 2
UMT5_FILE, CLIP_VISION_FILE = "tiny_umt5.safetensors", "tiny_clip_vision.safetensors"
VAE_FILE = "wan_2.1_vae_random.safetensors"
TEST_PACK = "mmv_test_wan"

# ComfyUI's Python: argv = comfyui, output path. A random Wan 2.1 VAE with the config comfy/sd.py builds for one.
VAE_SCRIPT = r'''
import json, sys
comfyui, path = sys.argv[1:3]
sys.path.insert(0, comfyui)
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.wan.vae
from safetensors.torch import save_file

vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True], dropout=0.0)
gen = torch.Generator().manual_seed(0)
state_dict = {}
for name, p in vae.state_dict().items():  # core's ops leave the weights uninitialised
    if name.endswith("gamma"):
        value = torch.ones(p.shape)
    elif p.dim() == 1:
        value = torch.zeros(p.shape)
    else:
        value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
    state_dict[name] = value.half().contiguous()
save_file(state_dict, path)
print("RESULT " + json.dumps({"keys": len(state_dict)}))
'''

# The test-only loaders (a custom_nodes module inside the test's temporary ComfyUI).
TEST_NODES = r'''
import json
import os

import comfy.clip_vision
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
import comfy.utils
import folder_paths
import torch
from transformers import T5TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "umt5_config.json")) as f:
    UMT5_CONFIG = json.load(f)


class TinyUMT5(comfy.sd1_clip.SDClipModel):  # comfy.text_encoders.wan.UMT5XXlModel with a tiny config
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, textmodel_json_config=dict(UMT5_CONFIG), dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         enable_attention_masks=True, zero_out_masked=True, model_options=model_options)


class TinyUMT5Tokenizer(comfy.sd1_clip.SDTokenizer):  # comfy.text_encoders.wan.UMT5XXlTokenizer, tiny vocabulary
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(os.path.join(HERE, "tokenizer"), pad_with_end=False, embedding_size=UMT5_CONFIG["d_model"],
                         embedding_key="umt5xxl", tokenizer_class=T5TokenizerFast, has_start_token=False,
                         pad_to_max_length=False, max_length=99999999, min_length=512, pad_token=0,
                         tokenizer_data=tokenizer_data)


class Target:
    params = {}

    @staticmethod
    def clip(**kwargs):
        return comfy.sd1_clip.SD1ClipModel(name="umt5xxl", clip_model=TinyUMT5, **kwargs)

    @staticmethod
    def tokenizer(**kwargs):
        return comfy.sd1_clip.SD1Tokenizer(name="umt5xxl", tokenizer=TinyUMT5Tokenizer, **kwargs)


def loader(folder, return_type, build):
    """A node reading ``clip_name`` from models/<folder> into the model ``build()`` makes (strict: every key)."""

    class Loader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"clip_name": (folder_paths.get_filename_list(folder),)}}

        RETURN_TYPES = (return_type,)
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self, clip_name):
            state_dict = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise(folder, clip_name))
            model = build()
            missing, unexpected = model.load_sd(state_dict)
            assert not missing and not unexpected, (missing, unexpected)
            return (model,)

    return Loader


NODE_CLASS_MAPPINGS = {
    "MMVTestTinyUMT5Loader": loader("text_encoders", "CLIP",
                                    lambda: comfy.sd.CLIP(target=Target, model_options={"dtype": torch.float32})),
    "MMVTestTinyCLIPVisionLoader": loader("clip_vision", "CLIP_VISION", lambda: comfy.clip_vision.ClipVisionModel(
        os.path.join(HERE, "clip_vision_config.json"))),
}
'''

UMT5_CONFIG = dict(d_ff=32, d_kv=8, d_model=4096, num_heads=2, num_layers=2, dense_act_fn="gelu_pytorch_tanh",
                   is_gated_act=True, model_type="umt5")  # (+ vocab_size) core's T5 reads these keys
CLIP_VISION_CONFIG = dict(hidden_act="gelu", hidden_size=1280, image_size=28, intermediate_size=64, layer_norm_eps=1e-5,
                          model_type="clip_vision_model", num_attention_heads=2, num_channels=3, num_hidden_layers=2,
                          patch_size=14, projection_dim=16)


def _build_models(root: Path, tmp: Path, python: str, comfyui: str) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    from magicmirror_video.models.lora import LoraLayer
    from magicmirror_video.models.wan_lora import save_wan_lora
    from magicmirror_video.testing import tiny

    for sub in ("diffusion_models", "loras", "vae", "text_encoders", "clip_vision"):
        (root / sub).mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    for seed, kind in enumerate(("t2v", "i2v")):
        model = wan_testing.build_core_wan(python, comfyui, kind,
                                           root / "diffusion_models" / f"wan_tiny_{kind}.safetensors", tmp, seed=seed)
        transformer = wan_testing.load_with_diffusers(model, kind, tmp)
        layers = {name: LoraLayer(0.3 * torch.randn(4, m.in_features, generator=gen),
                                  0.3 * torch.randn(m.out_features, 4, generator=gen), 2.0)
                  for name, m in transformer.named_modules() if name.endswith(wan_testing.REGDPO_TARGETS)}
        save_wan_lora(str(root / "loras" / f"wan_tiny_{kind}_regdpo.safetensors"), layers, {"method": "regdpo"})
    wan_testing.run_in_comfy(python, comfyui, VAE_SCRIPT, root / "vae" / VAE_FILE, tmp=tmp)
    tokenizer = tiny.build_tokenizer()
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=8, d_ff=32, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                       dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                                       eos_token_id=1))
    save_file({k: v.contiguous() for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(root / "text_encoders" / UMT5_FILE))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in CLIP_VISION_CONFIG.items()
                                                               if k != "model_type"}))
    save_file({k: v.half().contiguous() for k, v in vision.state_dict().items() if not k.endswith("position_ids")},
              str(root / "clip_vision" / CLIP_VISION_FILE))


def _write_test_nodes(custom_nodes: Path, tokenizer_dir: Path, vocab_size: int) -> None:
    import shutil

    pack = custom_nodes / TEST_PACK
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text(TEST_NODES, encoding="utf-8")
    (pack / "umt5_config.json").write_text(json.dumps(dict(UMT5_CONFIG, vocab_size=vocab_size)), encoding="utf-8")
    (pack / "clip_vision_config.json").write_text(json.dumps(CLIP_VISION_CONFIG), encoding="utf-8")
    shutil.copytree(tokenizer_dir, pack / "tokenizer")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI with the tiny Wan files, the test-only loaders and input/example.png."""
    comfyui, python = comfy_host.require_comfyui()
    import numpy as np
    from PIL import Image

    tmp = tmp_path_factory.mktemp("host_wan_workflows")
    models = tmp / "models"
    _build_models(models, tmp, python, comfyui)
    srv = comfy_host.ComfyServer(comfyui, python, pack_dir=PACK_DIR, model_root=models, tmp_dir=tmp / "comfy")
    from transformers import T5TokenizerFast

    _write_test_nodes(srv.base_dir / "custom_nodes", tmp / "tokenizer",
                      len(T5TokenizerFast.from_pretrained(str(tmp / "tokenizer"))))
    srv.input_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:40, 0:48]
    gradient = np.stack([xx * 5, yy * 6, np.full_like(xx, 90)], -1).astype(np.uint8)
    Image.fromarray(gradient).save(srv.input_dir / "example.png")
    with srv:
        yield srv


def _test_prompt(srv: comfy_host.ComfyServer, kind: str, strength: float) -> tuple[dict, dict]:
    """(UI workflow, API prompt): the shipped workflow on the tiny files, shrunk, at LoRA ``strength``."""
    workflow = json.loads((PACK_DIR / "workflows" / f"wan_regdpo_{kind}.json").read_text(encoding="utf-8"))
    info = srv.object_info()
    api = comfy_host.ui_to_api(workflow, info)
    modules = {node["class_type"]: info[node["class_type"]]["python_module"] for node in api.values()}
    assert all(m == "nodes" or m.startswith("comfy_extras.") for m in modules.values()), modules  # core nodes only
    api = copy.deepcopy(api)
    for node in api.values():
        inputs, kind_of = node["inputs"], node["class_type"]
        if kind_of == "UNETLoader":
            inputs.update(unet_name=f"wan_tiny_{kind}.safetensors")
        elif kind_of == "LoraLoaderModelOnly":
            inputs.update(lora_name=f"wan_tiny_{kind}_regdpo.safetensors", strength_model=strength)
        elif kind_of == "VAELoader":
            inputs.update(vae_name=VAE_FILE)
        elif kind_of == "CLIPLoader":
            assert inputs["type"] == "wan"
            node.update(class_type="MMVTestTinyUMT5Loader", inputs={"clip_name": UMT5_FILE})
        elif kind_of == "CLIPVisionLoader":
            node.update(class_type="MMVTestTinyCLIPVisionLoader", inputs={"clip_name": CLIP_VISION_FILE})
        elif kind_of in ("EmptyHunyuanLatentVideo", "WanImageToVideo"):
            inputs.update(width=WIDTH, height=HEIGHT, length=FRAMES)
        elif kind_of == "KSampler":
            inputs.update(steps=STEPS)
    return workflow, api


def _run_video(srv: comfy_host.ComfyServer, workflow: dict, api: dict):
    import numpy as np

    av = pytest.importorskip("av")
    entry = srv.run_prompt(api, timeout=900, workflow=workflow)
    (save_id,) = [nid for nid, node in api.items() if node["class_type"] == "SaveVideo"]
    (path,) = srv.output_files(entry, save_id)
    assert path.is_file(), path
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_host_runs_the_wan_regdpo_workflow_and_its_lora_acts(server, kind):
    videos = {}
    for strength in (1.0, 0.0):
        videos[strength] = _run_video(server, *_test_prompt(server, kind, strength))
        assert videos[strength].shape == (FRAMES, HEIGHT, WIDTH, 3), videos[strength].shape
    change = abs(videos[1.0].astype(float) - videos[0.0].astype(float)).mean()
    print(f"{kind}: mean |LoRA 1 - LoRA 0| = {change:.2f} of 255")
    assert change > 1.0
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
