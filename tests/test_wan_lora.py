"""Wan LoRA files (models/wan_lora.py) in original Wan naming, checked with diffusers' own loaders.

* The name map agrees with diffusers' original->diffusers checkpoint converter
  (``convert_wan_transformer_to_diffusers``) on every LoRA-able layer of every tiny Wan variant.
* A LoRA on every Linear of a tiny Wan 2.1 T2V / 2.1 I2V (image K/V and image projection included) / 2.2 TI2V /
  2.2 A14B (both experts), and one on the Reg-DPO default targets, saved with ``save_wan_lora`` and loaded by diffusers'
  ``load_lora_weights`` + ``fuse_lora``: each targeted weight equals W + scale·up@down computed here, every other
  tensor is unchanged, diffusers builds exactly the file's layers and warns about nothing.
ComfyUI core's loader reads the same files in tests/test_host_wan_lora.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file
from wan_testing import REGDPO_TARGETS, diffusers_warnings, fused_weights, relative_error

from magicmirror_video.models.lora import LoraLayer
from magicmirror_video.models.wan_lora import (
    WanLoraError,
    diffusers_name,
    original_name,
    read_wan_lora,
    save_wan_lora,
)
from magicmirror_video.testing import tiny_wan

VARIANTS = ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-ti2v", "wan2.2-t2v-a14b"]


def linear_paths(transformer, suffixes=None) -> list[str]:
    """Every Linear of the transformer, or those inside the blocks whose path ends in one of ``suffixes``."""
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)
            and (suffixes is None or (name.startswith("blocks.") and name.endswith(suffixes)))]


def random_layers(transformer, paths, scale=2.0, seed=0) -> dict[str, LoraLayer]:
    """Random non-zero LoRA layers of ranks 1..3 (so diffusers needs a rank pattern)."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    layers = {}
    for i, path in enumerate(paths):
        m, rank = modules[path], 1 + i % 3
        layers[path] = LoraLayer(torch.randn(rank, m.in_features, generator=gen),
                                 torch.randn(m.out_features, rank, generator=gen), scale)
    return layers


def lora_modules(transformer) -> set[str]:
    return {k.split(".lora_A.")[0] for k in transformer.state_dict() if ".lora_A." in k}


def assert_fused(before: dict, after: dict, layers: dict[str, LoraLayer]) -> float:
    """Targeted weights = W + scale·up@down (1e-6 relative), everything else unchanged; returns the worst error."""
    assert after.keys() == before.keys()
    worst = 0.0
    for key, weight in before.items():
        layer = layers.get(key.removesuffix(".weight"))
        if layer is None or not key.endswith(".weight"):
            assert torch.equal(after[key], weight), key
            continue
        expected = weight + layer.scale * (layer.up @ layer.down)
        error = relative_error(after[key], expected)
        assert error <= 1e-6, (key, error)
        worst = max(worst, error)
    return worst


@pytest.mark.parametrize("variant", [*VARIANTS, "wan2.2-i2v-a14b"])
def test_map_agrees_with_diffusers_checkpoint_converter(variant):
    """original_name(p) is what diffusers' single-file converter turns back into p, for every layer of the model."""
    transformer = tiny_wan.build_components(variant)["transformer"]
    paths = linear_paths(transformer) + ["patch_embedding"]
    converted = convert_wan_transformer_to_diffusers({f"{original_name(p)}.weight": torch.zeros(1) for p in paths})
    assert sorted(converted) == sorted(f"{p}.weight" for p in paths)
    assert all(diffusers_name(original_name(p)) == p for p in paths)
    if variant == "wan2.1-i2v":
        assert original_name("blocks.1.attn2.add_k_proj") == "blocks.1.cross_attn.k_img"
        assert original_name("condition_embedder.image_embedder.ff.net.2") == "img_emb.proj.3"


@pytest.mark.parametrize("targets", ["every_linear", "regdpo"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_loads_and_fuses_the_file_exactly(variant, targets, tmp_path):
    c = tiny_wan.build_components(variant)
    experts = ["transformer", "transformer_2"] if "transformer_2" in c else ["transformer"]
    pipe = tiny_wan.pipeline(c)
    files, expected, before = {}, {}, {}
    for i, name in enumerate(experts):
        model = c[name]
        paths = linear_paths(model) if targets == "every_linear" else linear_paths(model, REGDPO_TARGETS)
        if variant == "wan2.1-i2v" and targets == "every_linear":
            assert {"blocks.1.attn2.add_k_proj", "blocks.1.attn2.add_v_proj",
                    "condition_embedder.image_embedder.ff.net.0.proj"} <= set(paths)
        expected[name] = random_layers(model, paths, seed=i)
        before[name] = {k: v.clone() for k, v in model.state_dict().items()}
        files[name] = save_wan_lora(str(tmp_path / f"{name}.safetensors"), expected[name],
                                    {"method": "regdpo", "rank": 3})
    keys = load_file(files["transformer"])
    assert all(k.startswith("diffusion_model.") for k in keys)
    with diffusers_warnings() as warned:
        for name in experts:
            pipe.load_lora_weights(files[name], adapter_name=name, load_into_transformer_2=name == "transformer_2")
        pipe.fuse_lora(components=experts)
    assert warned == []
    for name in experts:
        # every layer of the file; on an I2V model diffusers adds zero image K/V LoRAs to a LoRA without them
        added = lora_modules(c[name]) - set(expected[name])
        assert set(expected[name]) <= lora_modules(c[name])
        assert all(p.endswith(("attn2.add_k_proj", "attn2.add_v_proj")) for p in added), added
        assert bool(added) == (variant == "wan2.1-i2v" and targets == "regdpo")
        worst = assert_fused(before[name], fused_weights(c[name]), expected[name])  # the added ones change nothing
        print(f"{variant} {name} {targets}: {len(expected[name])} layers, {len(load_file(files[name]))} keys, "
              f"worst relative error {worst:.1e}")


def test_scales_other_than_two_and_mixed_dtypes(tmp_path):
    """alpha / rank of any value, also below 0.5 (where diffusers splits the scale between A and B), and bf16
    tensors: diffusers' fused weights equal W + scale·up@down."""
    c = tiny_wan.build_components("wan2.1-i2v")
    model = c["transformer"]
    paths = linear_paths(model)
    layers = random_layers(model, paths)
    for i, path in enumerate(paths):
        layers[path].scale = (0.3, 1.7, 0.05, 6.0)[i % 4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_wan_lora(str(tmp_path / "lora.safetensors"), layers)
    pipe = tiny_wan.pipeline(c)
    pipe.load_lora_weights(path)
    pipe.fuse_lora()
    print(f"mixed scales: worst relative error {assert_fused(before, fused_weights(model), layers):.1e}")
    back = read_wan_lora(path)  # the pack's own reader gives the same updates
    assert back.keys() == layers.keys()
    for p, layer in layers.items():
        torch.testing.assert_close(back[p].scale * back[p].up @ back[p].down, layer.scale * layer.up @ layer.down,
                                   rtol=1e-6, atol=1e-6)
    half = {p: LoraLayer(l.down.bfloat16(), l.up.bfloat16(), l.scale) for p, l in layers.items() if "proj_out" in p
            or p.startswith("blocks.0.attn1.")}
    sd = load_file(save_wan_lora(str(tmp_path / "bf16.safetensors"), half))
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}


def test_warning_capture_sees_a_layer_the_model_lacks(tmp_path):
    """Control for the checks above: a block the model does not have is reported by diffusers."""
    c = tiny_wan.build_components("wan2.1-t2v")
    gen = torch.Generator().manual_seed(0)
    layers = {"blocks.0.attn1.to_q": LoraLayer(torch.randn(2, 24, generator=gen), torch.randn(24, 2, generator=gen)),
              "blocks.7.attn1.to_q": LoraLayer(torch.randn(2, 24, generator=gen), torch.randn(24, 2, generator=gen))}
    path = save_wan_lora(str(tmp_path / "extra_block.safetensors"), layers)
    with diffusers_warnings() as warned:
        tiny_wan.pipeline(c).load_lora_weights(path)
    assert warned and any("blocks.7" in m for m in warned), warned
    print(warned)


@pytest.mark.parametrize("path, message", [
    ("blocks.0.norm2", "not a WanTransformer3DModel layer a Wan LoRA file can hold"),
    ("transformer.blocks.0.attn1.to_q", "not a WanTransformer3DModel layer"),
    ("patch_embedding", "Cannot export a LoRA on 'patch_embedding'"),
])
def test_bad_layer_is_refused_before_writing(path, message, tmp_path):
    gen = torch.Generator().manual_seed(0)
    layers = {"blocks.0.attn1.to_q": LoraLayer(torch.randn(2, 24, generator=gen), torch.randn(24, 2, generator=gen)),
              path: LoraLayer(torch.randn(2, 24, generator=gen), torch.randn(24, 2, generator=gen))}
    out = tmp_path / "lora.safetensors"
    with pytest.raises(WanLoraError, match=message) as info:
        save_wan_lora(str(out), layers)
    assert len(str(info.value).splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_files_diffusers_could_not_read_are_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def layer():
        return LoraLayer(torch.randn(2, 24, generator=gen), torch.randn(24, 2, generator=gen))

    with pytest.raises(WanLoraError, match="without their pair"):
        save_wan_lora(str(tmp_path / "a.safetensors"), {"blocks.0.attn2.add_k_proj": layer()})
    with pytest.raises(WanLoraError, match="at least one transformer-block layer"):
        save_wan_lora(str(tmp_path / "b.safetensors"), {"proj_out": layer()})
    with pytest.raises(WanLoraError, match="lora_adapter_metadata"):
        save_wan_lora(str(tmp_path / "c.safetensors"), {"blocks.0.attn1.to_q": layer()},
                      {"lora_adapter_metadata": "{}"})
    assert not list(tmp_path.iterdir())
