"""Wan memory estimates: the shipped real configs (parameter counts on the meta device), video tokens, and the
training activation formulas of ``models/memory.py`` against measurements of tiny Wan Reg-DPO steps on the CPU
(autograd's saved tensors through a saved-tensors hook; live tensor bytes through a dispatch mode)."""

from __future__ import annotations

import pytest
import torch

from magicmirror_video.models.memory import (
    WAN_IMAGE_TOKENS,
    wan_block_saved_bytes,
    wan_training_activation_bytes,
    wan_video_tokens,
)
from magicmirror_video.testing import reference_json, tiny_wan
from magicmirror_video.testing.memory_probe import (
    LiveTensorBytes,
    saved_tensor_bytes,
    wan_full_transformer,
    wan_lora_transformer,
    wan_regdpo_step,
)

# DESIGN.md: parameters on the meta device, in billions
PARAMETERS_B = {"wan2.1_t2v_1.3b": 1.42, "wan2.1_t2v_14b": 14.29, "wan2.1_i2v_14b_480p": 16.40,
                "wan2.1_i2v_14b_720p": 16.40, "wan2.2_t2v_a14b": 14.29, "wan2.2_i2v_a14b": 14.29,
                "wan2.2_ti2v_5b": 5.00}


def config(name: str) -> dict:
    return {k: v for k, v in reference_json(f"wan/{name}.json").items() if not k.startswith("_")}


@pytest.mark.parametrize("name", sorted(PARAMETERS_B))
def test_real_configs_have_the_design_parameter_counts(name):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(config(f"transformer_config_{name}"))
    billions = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert billions == pytest.approx(PARAMETERS_B[name], abs=0.006)  # 16.395B for I2V-14B, 16.40 in DESIGN.md
    assert (transformer.config.image_dim is not None) == ("wan2.1_i2v" in name)  # 2.2 I2V has no CLIP branch


@pytest.mark.parametrize("frames", [17, 81])
def test_video_tokens_match_what_the_vae_and_the_patch_embedding_make(frames):
    """The VAE's own encoder and the transformer's patch embedding (real configs, meta device) give the count."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    vae_config, transformer_config = config("vae_config_wan2.1"), config("transformer_config_wan2.1_t2v_14b")
    with torch.device("meta"):
        latents = AutoencoderKLWan.from_config(vae_config).encode(
            torch.empty(1, 3, frames, 720, 1280)).latent_dist.mean
        tokens = WanTransformer3DModel.from_config(transformer_config).patch_embedding(latents).flatten(2).shape[-1]
    assert wan_video_tokens(transformer_config, vae_config, frames, 720, 1280) == tokens
    if frames == 81:
        assert tokens == 21 * 45 * 80


def tiny_config(variant: str) -> dict:
    return tiny_wan.transformer_config(variant, heads=2, head_dim=32, num_layers=2, text_dim=32)


def formula(cfg: dict, tokens: int, text_tokens: int, *, pair=True, checkpointing=False, full=False):
    return wan_training_activation_bytes(cfg, tokens, batch=2 if pair else 1, forwards=1 if pair else 2,
                                         gradient_checkpointing=checkpointing, text_tokens=text_tokens, lora_rank=4,
                                         fused_rms_norm=False, full=full)  # the CPU's RMSNorm keeps an fp32 upcast


def regdpo_step(cfg: dict, folder: str, *, full: bool, checkpointing=False, **kw) -> dict:
    """One measured Reg-DPO step: a LoRA on the frozen transformer, or (``full``) every weight trainable and the
    reference a frozen copy (``--train full``)."""
    if full:
        transformer, frozen_copy = wan_full_transformer(cfg, folder, gradient_checkpointing=checkpointing)
        return wan_regdpo_step(transformer, None, frozen_copy=frozen_copy, **kw)
    transformer, lora = wan_lora_transformer(cfg, folder, gradient_checkpointing=checkpointing)
    return wan_regdpo_step(transformer, lora, **kw)


# (variant, text tokens, frames x size in latent units): video tokens = frames * size^2 / 4; the I2V attention needs
# the 512 text tokens of the real pipeline (and 257 image tokens)
CASES = [("wan2.1-t2v", 16, 3, 16), ("wan2.1-i2v", 512, 3, 16)]
TRAIN = pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])


@pytest.mark.parametrize("variant,text,frames,size", CASES)
@pytest.mark.parametrize("pair", [True, False], ids=["pair-parallel", "sequential"])
@TRAIN
def test_saved_tensors_of_a_regdpo_step_match_the_formula(tmp_path, variant, text, frames, size, pair, full):
    """Without checkpointing, what autograd keeps (a saved-tensors hook) is the formula's graph within 3%: LoRA
    training, and full-parameter training (every weight trainable, the reference a frozen copy: WAN_FULL)."""
    cfg = tiny_config(variant)
    got = regdpo_step(cfg, str(tmp_path), full=full, frames=frames, height=size, width=size, text_tokens=text,
                      pair_parallel=pair)
    est = formula(cfg, frames * size * size // 4, text, pair=pair, full=full)
    assert got["saved"] == pytest.approx(est.graph, rel=0.03)


def test_full_parameter_saved_tensors_grow_with_the_video_tokens_as_the_formula_says(tmp_path):
    """Full-parameter training: what the hook sees added by two more latent frames (the per-video-token terms alone,
    the context and per-sample terms cancel) is the formula's difference within 3%."""
    cfg = tiny_config("wan2.1-t2v")
    kw = dict(height=16, width=16, text_tokens=16)
    saved = {frames: regdpo_step(cfg, str(tmp_path / str(frames)), full=True, frames=frames, **kw)["saved"]
             for frames in (3, 5)}
    est = {frames: formula(cfg, frames * 16 * 16 // 4, 16, full=True).graph for frames in (3, 5)}
    assert saved[5] - saved[3] == pytest.approx(est[5] - est[3], rel=0.03)


@pytest.mark.parametrize("variant,text,frames,size", CASES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["graph", "checkpointing"])
@TRAIN
def test_peak_of_a_regdpo_step_matches_the_formula(tmp_path, variant, text, frames, size, checkpointing, full):
    """The peak of live tensor bytes over the whole step (policy forward, no-grad reference forward, backward) is the
    formula's peak within 10%, with and without gradient checkpointing; checkpointing keeps far less. Full-parameter
    training: the measured peak includes the weights' gradients (bf16, a few % here), which the formula leaves to the
    caller (bench/memory.py counts them sharded under FSDP)."""
    cfg = tiny_config(variant)
    got = regdpo_step(cfg, str(tmp_path), full=full, checkpointing=checkpointing, frames=frames, height=size,
                      width=size, text_tokens=text)
    est = formula(cfg, frames * size * size // 4, text, checkpointing=checkpointing, full=full)
    assert got["peak"] == pytest.approx(est.peak, rel=0.10)
    assert got["graph"] == pytest.approx(est.graph, rel=0.10)
    if checkpointing:
        assert got["graph"] < formula(cfg, frames * size * size // 4, text, full=full).graph / 4


def test_block_saved_bytes_by_hand():
    """The per-block count on a hand-made config: D = 64, F = 172, 2 heads, 10 tokens, 3 text tokens, rank 4."""
    cfg = dict(tiny_config("wan2.1-t2v"), ffn_dim=172)
    D, F, H, r, n, T = 64, 172, 2, 4, 10, 3
    per_token = 34 * D + 2 * F + 4 * H * 2 + 2 * r * 6 + 4 * 9  # fused RMSNorm: its bf16 inputs
    per_text = 6 * D + 4 * r + 4
    attention_only = wan_block_saved_bytes(cfg, n, text_tokens=T, lora_rank=r, ffn_lora=False)
    assert attention_only == n * per_token + T * per_text + 32 * r * D
    # the FFN LoRAs (the trainer's Wan default) keep their bf16 inputs (D and F wide), their down outputs and copies
    assert wan_block_saved_bytes(cfg, n, text_tokens=T, lora_rank=r) - attention_only == \
        n * (2 * D + 2 * F + 4 * r) + 4 * r * (D + F)
    cpu = wan_block_saved_bytes(cfg, n, text_tokens=T, lora_rank=r, fused_rms_norm=False)  # three fp32 upcasts
    assert cpu - wan_block_saved_bytes(cfg, n, text_tokens=T, lora_rank=r) == n * 3 * 2 * D + T * 2 * D
    image = wan_block_saved_bytes(tiny_config("wan2.1-i2v"), n, text_tokens=T, lora_rank=r, batch=2)
    assert image - wan_block_saved_bytes(tiny_config("wan2.1-t2v"), n, text_tokens=T, lora_rank=r) == \
        n * (4 * D + 4 * H) + T * 4 * D + WAN_IMAGE_TOKENS * 4 * D


def test_context_parallel_splits_the_video_tokens():
    cfg = config("transformer_config_wan2.1_t2v_14b")
    whole = wan_training_activation_bytes(cfg, 45000, gradient_checkpointing=True)
    split = wan_training_activation_bytes(cfg, 180000, gradient_checkpointing=True, context_parallel=4)
    assert split == whole


def test_probes_count_what_they_should():
    """The probes on hand-made tensors: ``exp`` keeps its output, a frozen weight is not counted, a freed
    temporary leaves ``live`` but stays in ``peak``."""
    w = torch.randn(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    saved, _ = saved_tensor_bytes(lambda: (x @ w).exp().sum(), exclude=[x, w])
    assert saved == 4 * 8 * 4  # exp's output; the matmul keeps x and w, both excluded
    with LiveTensorBytes(exclude=[x, w]) as live:
        y = (x @ w).exp()  # x @ w: a temporary, then y
        assert live.live == 4 * 8 * 4 and live.peak == 2 * 4 * 8 * 4
        del y
        assert live.live == 0


def test_meta_models_keep_float32_tables_as_from_pretrained_does(tmp_path):
    """bench/memory.py's meta-device cast gives every tensor the dtype diffusers' from_pretrained(bfloat16) gives."""
    import importlib.util
    import sys
    from pathlib import Path

    from diffusers import WanTransformer3DModel

    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_memory", bench / "memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    cfg = tiny_config("wan2.1-i2v")
    WanTransformer3DModel(**cfg).save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            cast = module.keep_in_fp32_like_from_pretrained(WanTransformer3DModel(**cfg))
    finally:
        torch.set_default_dtype(default)
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert dtypes(cast) == dtypes(loaded)
    assert torch.float32 in dtypes(loaded).values()
