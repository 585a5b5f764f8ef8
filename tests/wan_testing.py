"""Helpers for the Wan LoRA tests (no test functions here).

* :func:`diffusers_warnings` and :func:`fused_weights` read diffusers' LoRA loading;
* :func:`build_core_wan` writes a tiny random Wan in ComfyUI core's own key format, built by core's
  ``comfy.ldm.wan.model.WanModel`` in ComfyUI's Python (independent of this pack's name map), and
  :func:`load_with_diffusers` reads that file with diffusers' ``WanTransformer3DModel.from_single_file``
  (diffusers' own original->diffusers conversion);
* :func:`run_in_comfy` runs a script in ComfyUI's Python and returns the JSON it prints on its ``RESULT`` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
from pathlib import Path

import torch

# Core's detection (comfy/model_detection.py) reads the width from head.modulation and sets heads = width // 128,
# freq_dim 256 and text_dim 4096 (WanModel's default); I2V 2.1 = in_dim 36 and img_emb (CLIP width 1280).
WIDTH, FFN, LAYERS = 256, 512, 2
IN_DIM = {"t2v": 16, "i2v": 36}
# The Reg-DPO LoRA targets for Wan: attention q/k/v/o and the FFN of every block.
REGDPO_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                  "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")

# ComfyUI's Python: argv = comfyui, variant, output path, seed, JSON {width, ffn, layers, in_dim}.
CORE_WAN_SCRIPT = r'''
import json, sys
comfyui, variant, path, seed, dims = sys.argv[1:6]
sys.path.insert(0, comfyui)
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.wan.model
import comfy.ops
from safetensors.torch import save_file

dims = json.loads(dims)
model = comfy.ldm.wan.model.WanModel(model_type=variant, in_dim=dims["in_dim"], dim=dims["width"], ffn_dim=dims["ffn"],
                                     freq_dim=256, text_dim=4096, out_dim=16, num_heads=dims["width"] // 128,
                                     num_layers=dims["layers"], device="cpu", dtype=torch.float32,
                                     operations=comfy.ops.disable_weight_init)
gen = torch.Generator().manual_seed(int(seed))
state_dict = {}
for name, p in model.state_dict().items():  # core's ops leave the weights uninitialised: random values here
    if name.endswith("modulation"):
        value = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
    elif p.dim() == 1:
        value = (1.0 if "norm" in name else 0.0) + 0.05 * torch.randn(p.shape, generator=gen)
    else:
        value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
    state_dict[name] = value.float().contiguous()
save_file(state_dict, path)
print("RESULT " + json.dumps({"keys": len(state_dict)}))
'''


def run_in_comfy(python: str, comfyui: str, script: str, *args, tmp: Path, timeout: int = 600) -> dict:
    """Run ``script`` with ComfyUI's Python (argv: comfyui, *args); the JSON of its last ``RESULT`` line."""
    path = Path(tmp) / f"comfy_script_{hashlib.sha1(script.encode()).hexdigest()[:12]}.py"
    path.write_text(script, encoding="utf-8")
    proc = subprocess.run([python, str(path), comfyui, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=comfyui)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def build_core_wan(python: str, comfyui: str, variant: str, path: Path, tmp: Path, seed: int = 0) -> Path:
    """A tiny random Wan 2.1 ``t2v`` / ``i2v`` in core's key format (what Load Diffusion Model reads)."""
    dims = dict(width=WIDTH, ffn=FFN, layers=LAYERS, in_dim=IN_DIM[variant])
    run_in_comfy(python, comfyui, CORE_WAN_SCRIPT, variant, path, seed, json.dumps(dims), tmp=tmp)
    return path


def diffusers_config(variant: str) -> dict:
    """The ``WanTransformer3DModel`` config of :func:`build_core_wan`'s model."""
    i2v = variant == "i2v"
    return dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=WIDTH // 128,
                attention_head_dim=128, in_channels=IN_DIM[variant], out_channels=16, text_dim=4096, freq_dim=256,
                ffn_dim=FFN, num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                image_dim=1280 if i2v else None, added_kv_proj_dim=WIDTH if i2v else None, rope_max_seq_len=1024)


def load_with_diffusers(path: Path, variant: str, tmp: Path):
    """diffusers' ``from_single_file`` on a core-format file (its config from a local folder: no hub)."""
    from diffusers import WanTransformer3DModel

    config_dir = Path(tmp) / f"config_{variant}"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(diffusers_config(variant)), encoding="utf-8")
    return WanTransformer3DModel.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                  torch_dtype=torch.float32).eval()


def diffusers_pipeline(transformer):
    """The diffusers Wan pipeline class for ``transformer`` holding only it (enough for load_lora_weights)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if transformer.config.image_dim is not None:
        return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                       transformer=transformer, image_encoder=None, image_processor=None)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)


@contextlib.contextmanager
def diffusers_warnings():
    """Collect what diffusers logs at WARNING or above (its loggers do not propagate to the root logger)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def fused_weights(transformer) -> dict[str, torch.Tensor]:
    """The model's tensors after fuse_lora, under their plain names (peft keeps the fused base as base_layer)."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".lora_" not in k}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
