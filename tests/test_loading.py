"""Loading diffusers folders and single-file transformers; clear errors for bad files and folders."""


import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import save_file

from magicmirror_video.models.cogvideox import (
    ModelFolderError,
    WeightsFileError,
    find_model_folder,
    load_cogvideox,
    load_transformer_file,
    variant_of,
)
from magicmirror_video.models.sampler import decode_latents
from magicmirror_video.models.text import MAX_TEXT_TOKENS, encode_prompt
from magicmirror_video.testing import reference_json, tiny


def forward(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = t.config
    x = torch.randn(1, 4 if c.patch_size_t else 3, c.in_channels, 4, 4, generator=g)
    text = torch.randn(1, 7, c.text_embed_dim, generator=g)
    from magicmirror_video.models.sampler import rotary_embeddings
    rope = rotary_embeddings(t, 32, 32, x.shape[1], 8, "cpu")
    ofs = torch.full((1,), 2.0) if c.ofs_embed_dim else None
    with torch.no_grad():
        return t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), ofs=ofs,
                 image_rotary_emb=rope, return_dict=False)[0]


@pytest.mark.parametrize("version", ["1.0", "1.5"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["diffusers", "comfy"])
def test_single_file_transformer_variant_detected_and_identical(tmp_path, version, i2v, prefix):
    ref = tiny.build_components(i2v=i2v, version=version, num_layers=3)["transformer"]
    path = tmp_path / "t.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_transformer_file(str(path), dtype=torch.float32, base_config=dict(ref.config))
    assert variant_of(loaded.config) == variant_of(ref.config)
    assert loaded.config.num_layers == 3 and (loaded.config.patch_size_t == ref.config.patch_size_t)
    assert loaded.config.ofs_embed_dim is not None if (i2v and version == "1.5") else loaded.config.ofs_embed_dim is None
    assert torch.equal(forward(ref), forward(ref))
    torch.testing.assert_close(forward(loaded), forward(ref), atol=1e-5, rtol=0)


def test_variant_names_of_real_configs():
    for name, expect in (("transformer_config_5b.json", "CogVideoX-5B T2V"), ("transformer_config_I2V_5b.json", "CogVideoX-5B I2V")):
        cfg = reference_json(f"cogvideox/{name}")
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel.from_config(cfg)
        assert str(variant_of(model.config)) == expect


def test_single_file_without_base_config_uses_official_defaults(tmp_path):
    ref = tiny.build_components(version="1.5")["transformer"]
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "t.safetensors"))
    loaded = load_transformer_file(str(tmp_path / "t.safetensors"), dtype=torch.float32)
    assert (loaded.config.sample_height, loaded.config.sample_width, loaded.config.sample_frames) == (300, 300, 81)


def test_not_a_cogvideox_file(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsFileError, match="not a CogVideoX transformer"):
        load_transformer_file(str(path))


def test_corrupt_and_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(64, 64)}, str(good))
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"<html>404 Not Found</html>")
    for name in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(WeightsFileError, match="corrupt or truncated.*download it again"):
            load_transformer_file(str(tmp_path / name))


def test_missing_and_incomplete_model_folder(tmp_path):
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ModelFolderError) as e:
        find_model_folder("CogVideoX-5b", roots)
    for r in roots:
        assert f"{r}/CogVideoX-5b" in str(e.value)
    (tmp_path / "b" / "CogVideoX-5b" / "transformer").mkdir(parents=True)
    with pytest.raises(ModelFolderError, match="incomplete: missing subfolder.*vae"):
        find_model_folder("CogVideoX-5b", roots)
    with pytest.raises(ModelFolderError, match="Paths searched"):
        load_cogvideox(str(tmp_path / "nope"))


def test_load_folder_text_cache_and_cap(models_dir):
    b = load_cogvideox(find_model_folder("tiny-t2v", [str(models_dir / "CogVideo")]), dtype=torch.float32)
    assert str(b.variant).endswith("T2V") and not b.transformer.training
    c1 = encode_prompt(b, "a cat sits on a red sofa")
    assert c1.embeds.shape == (1, MAX_TEXT_TOKENS, 32) and c1.input_ids.shape == (1, MAX_TEXT_TOKENS)
    assert encode_prompt(b, "a cat sits on a red sofa") is c1 and len(b.text_cache) == 1
    # Same result as running T5 directly on diffusers-style tokens.
    ids = b.tokenizer("a cat sits on a red sofa", padding="max_length", max_length=226, truncation=True,
                      return_tensors="pt").input_ids
    torch.testing.assert_close(c1.embeds, b.text_encoder(ids)[0], atol=0, rtol=0)
    long = encode_prompt(b, "a cat sits on a red sofa " * 60)
    assert long.truncated and long.embeds.shape[1] == MAX_TEXT_TOKENS
    with pytest.raises(ValueError, match="at most 226"):
        encode_prompt(b, "x", max_length=300)


def test_decode_tiling_is_restored_and_close(models_dir):
    b = load_cogvideox(str(models_dir / "CogVideo" / "tiny-t2v"), dtype=torch.float32)
    z = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = decode_latents(b, z)
    assert plain.shape == (1, 9, 64, 64, 3) and 0 <= plain.min() and plain.max() <= 1
    tiled = decode_latents(b, z, tiling=True, slicing=True)
    assert tiled.shape == plain.shape
    assert b.vae.use_tiling is False and b.vae.use_slicing is False
    with pytest.raises(ValueError, match=r"expected a CogVideoX latent \[B, 4, T, H, W\]"):
        decode_latents(b, torch.zeros(1, 16, 3, 8, 8))
