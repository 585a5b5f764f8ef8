"""LoRA loading (diffusers/PEFT, kohya, ComfyUI keys) and non-destructive patching."""

import json

import pytest
import torch
from conftest import bundle_from_components
from diffusers import CogVideoXPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from magicmirror_video.models.lora import (
    LoraLayer,
    LoraMismatchError,
    LoraPatch,
    load_lora_file,
    parse_lora_state_dict,
    save_lora,
)
from magicmirror_video.models.patches import applied_patches
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

PROMPT = "a woman img is smiling in a garden"
KW = dict(num_frames=5, height=32, width=32, steps=2, cfg=6.0, seed=3)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj"]  # "proj" includes the conv patch_embed.proj


def make_diffusers_lora(tmp_path, rank=4, alpha=8, seed=0):
    """A random (non-zero) LoRA saved by diffusers' own CogVideoXPipeline.save_lora_weights."""
    c = tiny.build_components()
    torch.manual_seed(seed)
    c["transformer"].add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    sd = get_peft_model_state_dict(c["transformer"])
    sd = {k: v * 3 for k, v in sd.items()}  # large enough to change the video visibly
    CogVideoXPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd, weight_name=f"lora{seed}.safetensors",
                                        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha,
                                                                           "target_modules": TARGETS})
    return tmp_path / f"lora{seed}.safetensors"


def ours(bundle):
    return sample_video(bundle, encode_prompt(bundle, PROMPT), **KW)


def diffusers_with_lora(path):
    pipe = CogVideoXPipeline(**tiny.build_components())
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipe(prompt=PROMPT, negative_prompt="", height=32, width=32, num_frames=5, num_inference_steps=2,
                guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="latent").frames


def to_kohya(path, out):
    """Rewrite a diffusers LoRA in kohya naming, moving alpha/r from metadata into `.alpha` keys."""
    sd = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    kohya = {}
    for k, v in sd.items():
        module = k[len("transformer."):].rsplit(".lora_", 1)[0]
        name = "lora_unet_" + module.replace(".", "_")
        if ".lora_A." in k:
            kohya[f"{name}.lora_down.weight"] = v
            kohya[f"{name}.alpha"] = torch.tensor(float(meta["transformer.lora_alpha"]))
        else:
            kohya[f"{name}.lora_up.weight"] = v
    save_file(kohya, str(out))
    return out


def to_comfy(path, out, naming):
    """ComfyUI keys: diffusion_model.<path>.lora_down/up (+ alpha) or .lora_A/B with the scale baked."""
    sd = load_file(str(path))
    comfy = {}
    for k, v in sd.items():
        module = k[len("transformer."):].rsplit(".lora_", 1)[0]
        is_a = ".lora_A." in k
        if naming == "down_up":
            comfy[f"diffusion_model.{module}.{'lora_down' if is_a else 'lora_up'}.weight"] = v
            comfy[f"diffusion_model.{module}.alpha"] = torch.tensor(8.0)
        else:
            comfy[f"diffusion_model.{module}.{'lora_A' if is_a else 'lora_B'}.weight"] = v if is_a else v * 2.0
    save_file(comfy, str(out))
    return out


def test_diffusers_lora_matches_diffusers_load_lora_weights(tmp_path):
    path = make_diffusers_lora(tmp_path)
    ref = diffusers_with_lora(path).permute(0, 2, 1, 3, 4)
    base = bundle_from_components(tiny.build_components())
    plain = ours(base)
    patched = ours(base.with_patch(LoraPatch(load_lora_file(str(path)), 1.0)))
    assert (patched - plain).abs().max() > 1e-2, "the LoRA must change the output"
    torch.testing.assert_close(patched, ref, atol=1e-5, rtol=0)


def test_kohya_and_comfy_variants_give_the_same_output(tmp_path):
    path = make_diffusers_lora(tmp_path)
    base = bundle_from_components(tiny.build_components())
    reference = ours(base.with_patch(LoraPatch(load_lora_file(str(path)))))
    for variant in (to_kohya(path, tmp_path / "kohya.safetensors"),
                    to_comfy(path, tmp_path / "comfy_du.safetensors", "down_up"),
                    to_comfy(path, tmp_path / "comfy_ab.safetensors", "A_B")):
        out = ours(base.with_patch(LoraPatch(load_lora_file(str(variant)))))
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=str(variant))


def test_strength_and_stacking(tmp_path):
    base = bundle_from_components(tiny.build_components())
    p1, p2 = make_diffusers_lora(tmp_path, seed=1), make_diffusers_lora(tmp_path, seed=2)
    l1, l2 = load_lora_file(str(p1)), load_lora_file(str(p2))
    torch.testing.assert_close(ours(base.with_patch(LoraPatch(l1, 0.0))), ours(base), atol=0, rtol=0)
    # Stacking == one LoRA holding both sets of layers (hand-built by concatenating the ranks).
    merged = {}
    for name in l1.layers:
        a, b = l1.layers[name], l2.layers[name]
        merged[name] = LoraLayer(down=torch.cat([a.down, b.down * 0.5]), up=torch.cat([a.up * a.scale, b.up * b.scale], 1))
    from magicmirror_video.models.lora import LoraWeights
    stacked = ours(base.with_patch(LoraPatch(l1)).with_patch(LoraPatch(l2, 0.5)))
    single = ours(base.with_patch(LoraPatch(LoraWeights("merged", merged))))
    torch.testing.assert_close(stacked, single, atol=1e-5, rtol=0)


def test_saved_lora_loads_in_diffusers_with_scale_baked(tmp_path):
    torch.manual_seed(0)
    layers = {f"transformer_blocks.{i}.attn1.{m}": LoraLayer(down=torch.randn(2, 32), up=torch.randn(32, 2), scale=0.25)
              for i in range(2) for m in ("to_q", "to_v")}
    path = tmp_path / "pack_lora.safetensors"
    save_lora(str(path), layers, {"method": "test"})
    ref = diffusers_with_lora(path).permute(0, 2, 1, 3, 4)
    base = bundle_from_components(tiny.build_components())
    torch.testing.assert_close(ours(base.with_patch(LoraPatch(load_lora_file(str(path))))), ref, atol=1e-5, rtol=0)
    assert not list(tmp_path.glob("*.tmp-*")), "atomic save leaves no temp file"


def test_lora_for_another_model_is_a_clear_error(tmp_path):
    t = tiny.build_components()["transformer"]
    wan = parse_lora_state_dict({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 8),
                                 "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(8, 2)}, name="wan.safetensors")
    with pytest.raises(LoraMismatchError, match="none of its 1 layers match.*another model"):
        LoraPatch(wan).apply(t)
    wide = parse_lora_state_dict({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 1920),
                                  "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(1920, 2)},
                                 name="2b.safetensors")
    with pytest.raises(LoraMismatchError, match="another CogVideoX size.*1920"):
        LoraPatch(wide).apply(t)
    with pytest.raises(LoraMismatchError, match="no LoRA weights found"):
        parse_lora_state_dict({"foo.weight": torch.zeros(1)})


def test_patches_are_non_destructive_before_beside_after_and_on_interrupt(tmp_path):
    base = bundle_from_components(tiny.build_components())
    lora = load_lora_file(str(make_diffusers_lora(tmp_path)))
    patched = base.with_patch(LoraPatch(lora))
    params_before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    before = ours(base)
    branch = ours(patched)
    beside = ours(base)  # the same base model used elsewhere in the graph
    assert not torch.equal(branch, before)

    class Interrupted(Exception):
        pass

    def interrupt(info):
        if info.step == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        sample_video(patched, encode_prompt(patched, PROMPT), callback=interrupt, **KW)
    after = ours(base)
    assert torch.equal(before, beside) and torch.equal(before, after)
    assert patched.patches and not base.patches
    for name, value in base.transformer.state_dict().items():
        assert torch.equal(value, params_before[name]), name
    assert all(not m._forward_hooks for m in base.transformer.modules())


def test_failing_patch_undoes_the_ones_already_applied():
    t = tiny.build_components()["transformer"]
    undone = []

    class Good:
        name = "good"

        def apply(self, transformer, context=None):
            return lambda: undone.append("good")

    class Bad:
        name = "bad"

        def apply(self, transformer, context=None):
            raise RuntimeError("adapter made for another base model")

    with pytest.raises(RuntimeError, match="another base model"):
        with applied_patches(t, [Good(), Bad()]):
            pass
    assert undone == ["good"]
