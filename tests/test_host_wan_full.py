"""ComfyUI core loads the pack's full-parameter Wan export (``models/wan_single_file.py``, what ``train_regdpo --train
full`` writes per transformer) with its own loader: ``comfy.sd.load_diffusion_model`` on the file detects Wan (2.1 T2V,
2.1 I2V with the CLIP branch, 2.2 TI2V-5B's 48 latent channels, 2.2 I2V A14B's 36 input channels without CLIP) and
loads every tensor — no "unet missing" / "unet unexpected" warning, no left-over key — and the model core built holds
exactly the file's values. The diffusers transformers are random, with the widths core's detection assumes (heads =
width / 128, 4096-wide text, 256 frequencies). Skipped without ``COMFYUI_PATH``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402
import wan_testing  # noqa: E402

# ComfyUI's Python: argv = comfyui, model file, output file for the loaded weights.
LOAD_SCRIPT = r'''
import json, logging, sys
comfyui, model_path, out_path = sys.argv[1:4]
sys.path.insert(0, comfyui)
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.sd
from safetensors.torch import save_file

messages = []


class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


logging.getLogger().addHandler(Collect(level=logging.INFO))
logging.getLogger().setLevel(logging.INFO)
model = comfy.sd.load_diffusion_model(model_path)
state_dict = {k: v.detach().float().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
save_file(state_dict, out_path)
config = model.model.model_config.unet_config
found = [m for m in messages if "unet missing" in m or "unet unexpected" in m or "left over" in m]
model.model.load_model_weights({"blocks.0.nothing.weight": torch.zeros(1)}, "")  # control: core's own warning
control = [m for m in messages if "unet unexpected" in m]
print("RESULT " + json.dumps({
    "model_class": type(model.model).__name__, "model_type": config.get("model_type"), "in_dim": config.get("in_dim"),
    "out_dim": config.get("out_dim"), "dtype": str(model.model.get_dtype()),
    "messages": found, "control": control}))
'''

VARIANTS = {  # diffusers config, what core should detect: (class, model_type, in_dim, out_dim)
    "wan2.1-t2v": (wan_testing.diffusers_config("t2v"), ("WAN21", "t2v", 16, 16)),
    "wan2.1-i2v": (wan_testing.diffusers_config("i2v"), ("WAN21", "i2v", 36, 16)),
    "wan2.2-ti2v": (dict(wan_testing.diffusers_config("t2v"), in_channels=48, out_channels=48),
                    ("WAN22", "t2v", 48, 48)),
    "wan2.2-i2v-a14b": (dict(wan_testing.diffusers_config("t2v"), in_channels=36), ("WAN21", "t2v", 36, 16)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_host_core_loads_the_full_wan_export(variant, tmp_path):
    comfyui, python = comfy_host.require_comfyui()
    from diffusers import WanTransformer3DModel

    from magicmirror_video.models.wan_single_file import save_wan_transformer_file

    config, expected = VARIANTS[variant]
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():
        for p in transformer.parameters():  # every tensor random (no ones, no zeros), so a mix-up shows
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    path = save_wan_transformer_file(str(tmp_path / f"{variant}.safetensors"), transformer.state_dict(),
                                     {"method": "regdpo", "train": "full"})
    result = wan_testing.run_in_comfy(python, comfyui, LOAD_SCRIPT, path, tmp_path / "loaded.safetensors",
                                      tmp=tmp_path)
    got = (result["model_class"], result["model_type"], result["in_dim"], result["out_dim"])
    assert got == expected and result["dtype"] == "torch.float32", result
    assert not result["messages"], result["messages"]  # nothing missing, unexpected or left over
    assert any("blocks.0.nothing.weight" in m for m in result["control"])  # the capture sees core's warnings
    written, loaded = load_file(path), load_file(str(tmp_path / "loaded.safetensors"))
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    print(f"{variant}: core detected {got}; {len(written)} tensors loaded, all equal to the file")
