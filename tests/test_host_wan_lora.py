"""ComfyUI core applies the pack's Wan LoRA files exactly, and diffusers gives the same weights.

For Wan 2.1 T2V and I2V (with the image K/V layers ``cross_attn.k_img/v_img`` and the image projection): a tiny random
Wan built by core's own ``WanModel`` in ComfyUI's Python and saved in core's key format; diffusers reads that file
with ``WanTransformer3DModel.from_single_file`` (its own original->diffusers conversion); random LoRA layers on every
Linear of that diffusers model are exported with ``save_wan_lora``. Then, in ComfyUI's Python, core's
``comfy.sd.load_diffusion_model`` loads the model and ``comfy.sd.load_lora_for_models`` (what LoraLoaderModelOnly
calls) applies the file; ``ModelPatcher.patch_model`` writes the patched weights. Every LoRA module becomes a patch,
core logs no "lora key not loaded" / "NOT LOADED", and each patched weight equals W + (alpha / rank)·B·A computed
here from the file (1e-6 relative), every other tensor unchanged. In this venv the same file through diffusers'
``load_lora_weights`` + ``fuse_lora`` on the from_single_file model gives the same weights as core (names mapped by
diffusers' own converter). Skipped without ``COMFYUI_PATH``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402
import wan_testing  # noqa: E402

# ComfyUI's Python: argv = comfyui, model file, LoRA file, output file for the patched weights.
APPLY_SCRIPT = r'''
import json, logging, sys
comfyui, model_path, lora_path, out_path = sys.argv[1:5]
sys.path.insert(0, comfyui)
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.lora
import comfy.sd
import comfy.utils
from safetensors.torch import save_file

warnings = []


class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger().addHandler(Collect(level=logging.WARNING))
model = comfy.sd.load_diffusion_model(model_path)
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
patched.patch_model()
state_dict = {k[len("diffusion_model."):]: v.detach().float().contiguous()
              for k, v in patched.model.state_dict().items() if k.startswith("diffusion_model.")}
save_file(state_dict, out_path)
lora_warnings = list(warnings)
# control: the capture sees core's message for a key its model lacks
comfy.lora.load_lora({"diffusion_model.blocks.0.nothing.lora_A.weight": torch.zeros(1, 1)},
                     comfy.lora.model_lora_keys_unet(model.model, {}))
print("RESULT " + json.dumps({
    "model_class": type(model.model).__name__, "model_type": model.model.model_config.unet_config.get("model_type"),
    "dtype": str(model.model.get_dtype()), "patched_keys": sorted(patched.patches), "warnings": lora_warnings,
    "control_warnings": warnings[len(lora_warnings):]}))
'''


def random_layers(transformer, seed: int) -> dict:
    """Random LoRA layers on every Linear: ranks 1..4, scales 2, 0.75, 0.3 (diffusers splits scales below 0.5)."""
    from magicmirror_video.models.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (path, m) in enumerate(linears):
        rank = 1 + i % 4
        layers[path] = LoraLayer(0.1 * torch.randn(rank, m.in_features, generator=gen),
                                 0.1 * torch.randn(m.out_features, rank, generator=gen), (2.0, 0.75, 0.3)[i % 3])
    return layers


def expected_from_file(model: dict, lora: dict) -> dict:
    """W + (alpha / rank)·B·A for each LoRA module of the file (alpha / rank = 1 without an ``.alpha`` key)."""
    expected = {}
    for key in lora:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("diffusion_model."):-len(".lora_A.weight")]
        down, up = lora[key].double(), lora[f"diffusion_model.{module}.lora_B.weight"].double()
        alpha = lora.get(f"diffusion_model.{module}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        expected[f"{module}.weight"] = model[f"{module}.weight"].double() + scale * (up @ down)
    return expected


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_host_core_lora_loader_applies_the_wan_lora_like_diffusers(variant, tmp_path):
    comfyui, python = comfy_host.require_comfyui()
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from magicmirror_video.models.wan_lora import save_wan_lora

    model_path = wan_testing.build_core_wan(python, comfyui, variant, tmp_path / f"wan_{variant}.safetensors", tmp_path)
    transformer = wan_testing.load_with_diffusers(model_path, variant, tmp_path)
    layers = random_layers(transformer, seed=1)
    lora_path = save_wan_lora(str(tmp_path / f"lora_{variant}.safetensors"), layers, {"method": "regdpo"})
    lora, model = load_file(lora_path), load_file(str(model_path))
    if variant == "i2v":
        assert {"diffusion_model.blocks.1.cross_attn.k_img.alpha",
                "diffusion_model.img_emb.proj.1.lora_A.weight"} <= set(lora)

    result = wan_testing.run_in_comfy(python, comfyui, APPLY_SCRIPT, model_path, lora_path,
                                      tmp_path / "patched.safetensors", tmp=tmp_path)
    assert (result["model_class"], result["model_type"], result["dtype"]) == ("WAN21", variant, "torch.float32")
    assert not result["warnings"], result["warnings"]  # no "lora key not loaded", no "NOT LOADED"
    assert any("lora key not loaded: diffusion_model.blocks.0.nothing" in w for w in result["control_warnings"])
    expected = expected_from_file(model, lora)
    assert len(expected) == len(layers)
    assert result["patched_keys"] == sorted(f"diffusion_model.{k}" for k in expected)  # every module applied
    patched = load_file(str(tmp_path / "patched.safetensors"))
    assert patched.keys() == model.keys()
    core_errors = {k: wan_testing.relative_error(patched[k], v) for k, v in expected.items()}
    assert max(core_errors.values()) <= 1e-6, max(core_errors.items(), key=lambda kv: kv[1])
    assert all(torch.equal(patched[k], model[k]) for k in model if k not in expected)

    pipe = wan_testing.diffusers_pipeline(transformer)
    with wan_testing.diffusers_warnings() as warned:
        pipe.load_lora_weights(lora_path)
    pipe.fuse_lora()
    assert not warned, warned
    fused = wan_testing.fused_weights(transformer)
    core_in_diffusers_names = convert_wan_transformer_to_diffusers(dict(patched))
    assert core_in_diffusers_names.keys() == fused.keys()
    diffusers_errors = {k: wan_testing.relative_error(fused[k], v) for k, v in core_in_diffusers_names.items()}
    assert max(diffusers_errors.values()) <= 1e-6, max(diffusers_errors.items(), key=lambda kv: kv[1])
    print(f"{variant}: {len(lora)} LoRA keys, {len(result['patched_keys'])}/{len(layers)} modules patched by core; "
          f"core vs W + alpha/rank·B·A max relative {max(core_errors.values()):.1e}; diffusers fused vs core max "
          f"relative {max(diffusers_errors.values()):.1e}")
