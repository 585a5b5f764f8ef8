"""The edges of the patch nodes: base-model records of adapter files, MagicMirror's strength near 0, references
beyond the RoPE grid, one method per model at every entry point, attention processors that bypass ``to_out[0]``,
config values read from files, and what a cache skips of each patch (asked of the patch)."""

import dataclasses
import json
import logging
import re

import pytest
import torch
from conftest import bundle_from_components
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from safetensors import safe_open

from magicmirror_video.models.block_runner import BlockExtension, TokenStream, block_runner
from magicmirror_video.models.cogvideox import BASE_MODEL_KEY, WeightsFileError, write_safetensors
from magicmirror_video.models.dualreal import (
    DualRealAdapters,
    DualRealConfig,
    DualRealPatch,
    load_dualreal,
    save_dualreal,
)
from magicmirror_video.models.lora import LoraLayer, LoraMismatchError, LoraPatch, load_lora_file, save_lora
from magicmirror_video.models.magicmirror import (
    AdapterMismatchError,
    FaceEmbeds,
    MagicMirrorAdapter,
    MagicMirrorConfig,
    MagicMirrorPatch,
    load_magicmirror,
    save_magicmirror,
)
from magicmirror_video.models.patches import PatchConflictError, SamplingContext, applied_patches
from magicmirror_video.models.sampler import rotary_embeddings, sample_video
from magicmirror_video.models.speed import SpeedConflictError, SpeedOptions, check_speed
from magicmirror_video.models.subject import SubjectReferencePatch, encode_reference
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

SMALL = dict(id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32, fuse_hidden=32)
KW = dict(num_frames=5, height=32, width=32, steps=2, cfg=6.0, seed=3)
PROMPT = "a man img is walking on the beach at sunset"
# the tiny models' variants as CogVideoX names them (heads 2 x head dim 16 = width 32)
T2V, I2V, T2V_15 = "CogVideoX-32w T2V", "CogVideoX-32w I2V", "CogVideoX1.5-32w T2V"


def faces(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FaceEmbeds(arcface=torch.randn(n, 512, generator=g), x_id=torch.randn(n, 2, 256, generator=g),
                      clip_penultimate=torch.randn(n, 17, 64, generator=g))


def randomised(module, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def magicmirror(transformer, form="two-way"):
    return randomised(MagicMirrorAdapter(MagicMirrorConfig.for_transformer(transformer, **SMALL, face_attention=form)))


def dualreal(transformer):
    return randomised(DualRealAdapters(DualRealConfig.for_transformer(transformer, condition_dim=16, hidden_dim=8,
                                                                      n_groups=1)))


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def world():
    bundle = bundle_from_components(tiny.build_components())
    return bundle, encode_prompt(bundle, PROMPT, trigger="img"), encode_prompt(bundle, "")


@pytest.fixture(scope="module")
def others():
    """Tiny I2V 1.0 and T2V 1.5 transformers of the same width and depth as ``world``'s."""
    return {I2V: tiny.build_components(i2v=True)["transformer"],
            T2V_15: tiny.build_components(version="1.5")["transformer"]}


# ------------------------------------------------------------------------------------------- base-model records


def test_magicmirror_file_records_its_base_and_another_variant_is_refused(world, others, tmp_path):
    bundle, pos, _ = world
    path = tmp_path / "mm.safetensors"
    save_magicmirror(str(path), magicmirror(bundle.transformer))
    assert metadata(path)[BASE_MODEL_KEY] == T2V
    adapter = load_magicmirror(str(path))
    adapter.check_compatible(bundle.transformer)  # its own base passes
    for variant, transformer in others.items():
        with pytest.raises(AdapterMismatchError, match=rf"^This MagicMirror adapter was trained on {T2V} but the "
                                                       rf"loaded model is {variant}: load {T2V}"):
            adapter.check_compatible(transformer)
        with pytest.raises(AdapterMismatchError, match=f"loaded model is {variant}"):
            MagicMirrorPatch(adapter, faces()).apply(transformer, SamplingContext(device=torch.device("cpu"),
                                                                                  dtype=torch.float32))


def test_dualreal_file_records_its_base_and_another_variant_is_refused(world, others, tmp_path):
    bundle, _, _ = world
    path = tmp_path / "dr.safetensors"
    save_dualreal(str(path), dualreal(bundle.transformer))
    assert metadata(path)[BASE_MODEL_KEY] == T2V
    adapters = load_dualreal(str(path))
    adapters.check_compatible(bundle.transformer)
    for variant, transformer in others.items():
        with pytest.raises(ValueError, match=rf"^This DualReal adapter was trained on {T2V} but the loaded model is "
                                             rf"{variant}"):
            adapters.check_compatible(transformer)
        with pytest.raises(ValueError, match=f"loaded model is {variant}"):
            DualRealPatch(adapters, torch.zeros(1, 1, 16)).apply(transformer, SamplingContext(
                device=torch.device("cpu"), dtype=torch.float32))


def test_official_dualreal_pickle_is_taken_as_cogvideox_5b_t2v(world, tmp_path, monkeypatch, caplog):
    """An official adapter.pth records nothing; the official code trains on THUDM/CogVideoX-5b only, so a pickle of
    its layout is CogVideoX-5B T2V (the layout is the tiny one here: a 5B adapter is 1.3 GB)."""
    from magicmirror_video.models import dualreal as dualreal_module

    bundle, _, _ = world
    adapters = dualreal(bundle.transformer)
    torch.save({k: v.clone() for k, v in adapters.state_dict().items()}, tmp_path / "adapter.pth")
    with caplog.at_level(logging.WARNING, logger="magicmirror_video.models.dualreal"):
        other_layout = load_dualreal(str(tmp_path / "adapter.pth"))
    assert other_layout.config.base_model is None  # not the official layout: unrecorded, with a note
    assert [r.getMessage() for r in caplog.records] == [
        "DualReal adapter 'adapter.pth' does not record the base model it was trained on (written before the record, "
        "or by another tool): it loads as before, with only its layer sizes checked against the model."]
    other_layout.check_compatible(bundle.transformer)

    monkeypatch.setattr(dualreal_module, "OFFICIAL_LAYOUT", (32, 2))
    official = load_dualreal(str(tmp_path / "adapter.pth"))
    assert official.config.base_model == "CogVideoX-5B T2V"
    with pytest.raises(ValueError, match=f"trained on CogVideoX-5B T2V but the loaded model is {T2V}"):
        official.check_compatible(bundle.transformer)


def test_files_without_the_record_load_as_before_with_a_one_line_note(world, tmp_path, caplog):
    bundle, pos, neg = world
    adapter = magicmirror(bundle.transformer)
    path = tmp_path / "old.safetensors"  # as save_magicmirror wrote before the record (its config named the size)
    write_safetensors(str(path), adapter.state_dict(), {"method": "magicmirror", "config": dict(
        dataclasses.asdict(adapter.config), base_model="CogVideoX-5B")})
    with caplog.at_level(logging.WARNING):
        loaded = load_magicmirror(str(path))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and notes[0].startswith("MagicMirror adapter 'old.safetensors' does not record the base "
                                                   "model it was trained on") and "\n" not in notes[0]
    assert loaded.config.base_model is None
    expected = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces())), pos, neg, **KW)
    assert torch.equal(sample_video(bundle.with_patch(MagicMirrorPatch(loaded, faces())), pos, neg, **KW), expected)


def lora_layers(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = transformer.transformer_blocks[0].attn1.to_q
    return {"transformer_blocks.0.attn1.to_q": LoraLayer(torch.randn(2, q.in_features, generator=g),
                                                         torch.randn(q.out_features, 2, generator=g), 0.5)}


def test_lora_recording_another_base_is_refused_at_the_loader_and_the_patch(world, others, tmp_path):
    from magicmirror_video.nodes.subject import lora_scope

    bundle, pos, neg = world
    path = tmp_path / "i2v.safetensors"
    save_lora(str(path), lora_layers(bundle.transformer), {BASE_MODEL_KEY: I2V, "subject_lora_scope": "reference"})
    lora = load_lora_file(str(path))
    assert lora_scope(lora.metadata, "auto") == "reference"
    message = rf"^LoRA 'i2v.safetensors' was trained on {I2V} but the loaded model is {T2V}: load {I2V}"
    with pytest.raises(LoraMismatchError, match=message):
        sample_video(bundle.with_patch(LoraPatch(lora)), pos, neg, **KW)
    LoraPatch(lora).apply(others[I2V], SamplingContext(device=torch.device("cpu"), dtype=torch.float32))()


def test_cogvideox_trainer_lora_export_records_its_base(world, tmp_path):
    """Reg-DPO's CogVideoX export (the Wan export records the Wan variant the same way, ``models/wan_lora.py``)."""
    from magicmirror_video.training.spec import CogVideoXSpec

    bundle, _, _ = world
    path = tmp_path / "regdpo.safetensors"
    CogVideoXSpec.from_bundle(bundle).export_lora(str(path), lora_layers(bundle.transformer), {"method": "regdpo"})
    assert metadata(path)[BASE_MODEL_KEY] == T2V


# --------------------------------------------------------------------------------------- MagicMirror strength


@pytest.mark.parametrize("form", ["two-way", "one-way"])
def test_magicmirror_strength_is_continuous_from_the_base_at_zero(world, form):
    """Output difference to the base model -> 0 as strength -> 0, and 0 is the base bit for bit. In the two-way form
    the face tokens' keys are weighted by the strength in every token's softmax (at 1e-6 they are 1e-6 of a token)."""
    bundle, pos, neg = world
    adapter = magicmirror(bundle.transformer, form)
    base = sample_video(bundle, pos, neg, **KW)
    diffs = []
    for strength in (1.0, 0.1, 0.01, 1e-3, 1e-6):
        out = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces(), strength)), pos, neg, **KW)
        diffs.append((out - base).abs().max().item())
    assert all(a > b for a, b in zip(diffs, diffs[1:])), diffs
    assert diffs[-1] < 1e-4 * diffs[0], diffs
    assert torch.equal(sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces(), 0.0)), pos, neg, **KW), base)


class FaceLikeStream(BlockExtension):
    """A joint token stream of fixed tokens (no RoPE rows, plain LayerNorm, zero gate) in every block."""

    name = "test-stream"

    def __init__(self, tokens, key_weight):
        self.tokens, self.key_weight = tokens, key_weight

    def begin(self, state, kwargs):
        def modulate(block, index, which, x, temb):
            return torch.nn.functional.layer_norm(x, x.shape[-1:]), x.new_zeros(x.shape[0], 1, x.shape[-1])

        state.add_stream(TokenStream("faces", self.tokens, modulate, key_weight=self.key_weight))


def test_a_stream_key_weight_of_k_equals_its_tokens_repeated_k_times(world):
    """Independent check of the weighted softmax: a stream whose keys weigh 2 gives every query what two copies of
    each of its tokens (weight 1) give, since both put 2·exp(score) of each such key in the softmax."""
    bundle, pos, _ = world
    t = bundle.transformer
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 5, 32, generator=g)
    x = torch.randn(1, 2, 4, 4, 4, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=pos.embeds, timestep=torch.tensor([500]),
              image_rotary_emb=rotary_embeddings(t, 32, 32, 2, 8, "cpu"), return_dict=False)
    runner = block_runner(t)
    with torch.no_grad():
        outs = {}
        for name, ext in (("weighted", FaceLikeStream(tokens, 2.0)),
                          ("repeated", FaceLikeStream(tokens.repeat_interleave(2, dim=1), 1.0)),
                          ("plain", FaceLikeStream(tokens, 1.0))):
            undo = runner.add(ext)
            try:
                outs[name] = t(**kw)[0]
            finally:
                undo()
    torch.testing.assert_close(outs["weighted"], outs["repeated"], atol=1e-5, rtol=1e-5)
    assert (outs["weighted"] - outs["plain"]).abs().max() > 1e-3  # (the weight does act)


def test_a_strength_other_than_one_needs_an_attention_that_takes_a_bias(world, monkeypatch):
    bundle, pos, neg = world
    from magicmirror_video.models import speed

    patch = MagicMirrorPatch(magicmirror(bundle.transformer), faces(), 0.5)
    monkeypatch.setattr(speed, "check_attention_backend", lambda *a, **k: None)  # (flash-attn is not installed here)
    with pytest.raises(SpeedConflictError, match=r"^attention backend 'flash' cannot act with two-way MagicMirror at "
                                                 r"strength 0.5 .*Use the native backend"):
        bundle.with_patch(patch).with_speed(SpeedOptions(attention="flash"))
    check_speed(SpeedOptions(attention="flash"), (MagicMirrorPatch(patch.adapter, faces(), 1.0),))  # no bias at 1

    class OtherProcessor(CogVideoXAttnProcessor2_0):
        pass

    processors = [blk.attn1.processor for blk in bundle.transformer.transformer_blocks]
    for blk in bundle.transformer.transformer_blocks:
        blk.attn1.processor = OtherProcessor()
    try:
        with pytest.raises(RuntimeError, match=r"need an attention that adds a bias to the scores, which "
                                               r"OtherProcessor does not take"):
            sample_video(bundle.with_patch(patch), pos, neg, **KW)
    finally:
        for blk, processor in zip(bundle.transformer.transformer_blocks, processors):
            blk.attn1.processor = processor


# ------------------------------------------------------------------------------------ reference beyond the grid


def test_a_reference_beyond_the_cogvideox_1_5_rope_grid_is_one_line_with_the_largest_size():
    bundle = bundle_from_components(tiny.build_components(version="1.5"))  # RoPE grid 8 x 8 latents = 64 x 64 px
    pos = encode_prompt(bundle, "a teddy bear is sitting on a wooden table")
    image = torch.rand(1, 128, 96, 3)
    calls = []
    handle = bundle.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    message = (r"^The subject reference is 96x128 px, beyond CogVideoX1.5-32w T2V's RoPE grid: the largest reference "
               r"that fits is 64x64 px; set max_side to 64 or less \(or use a smaller image\).$")
    try:
        with pytest.raises(ValueError, match=message):
            encode_reference(bundle, image, max_side=720)
    finally:
        handle.remove()
    assert not calls  # refused before the VAE runs
    with pytest.raises(ValueError, match=message):  # latents encoded elsewhere: refused before the first forward
        sample_video(bundle.with_patch(SubjectReferencePatch(torch.zeros(1, 4, 16, 12))), pos, num_frames=9,
                     height=32, width=32, steps=1, cfg=1)
    latents = encode_reference(bundle, image, max_side=64)  # the size it names works
    assert latents.shape[-2:] == (8, 6)
    out = sample_video(bundle.with_patch(SubjectReferencePatch(latents)), pos, num_frames=9, height=32, width=32,
                       steps=1, cfg=1)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- one method once per model


def test_one_method_once_per_model_at_every_entry_point(world):
    bundle, pos, neg = world
    t = bundle.transformer
    mm = [MagicMirrorPatch(magicmirror(t), faces(seed=s)) for s in (0, 1)]
    dr = [DualRealPatch(dualreal(t), torch.zeros(1, 1, 16)) for _ in (0, 1)]
    for first, second in (mm, dr):
        with pytest.raises(PatchConflictError, match=f"{first.method} is already applied to this model"):
            bundle.with_patch(first).with_patch(second)  # the node's way
        with pytest.raises(PatchConflictError, match=f"{first.method} is already applied to this model"):
            dataclasses.replace(bundle, patches=(first, second))  # a bundle built with both
        with pytest.raises(PatchConflictError, match=f"{first.method} is already applied to this model"):
            with applied_patches(t, [first, second], SamplingContext(positive=pos, device=torch.device("cpu"),
                                                                     dtype=torch.float32)):
                pass
    undo = dr[0].apply(t)
    try:  # the block runner itself (trainers install extensions directly)
        with pytest.raises(RuntimeError, match="dualreal is already installed in this transformer's blocks"):
            dr[1].apply(t)
    finally:
        undo()
    assert not block_runner(t).extensions


# ------------------------------------------------------------------------ processors that bypass to_out[0]


class FunctionalOutputProcessor:
    """A joint-attention processor written out here, whose output projection is ``F.linear`` on ``to_out[0]``'s
    weights: the module is never called, so its hooks never fire."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        n = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :n], apply_rotary_emb(q[:, :, n:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rotary_emb(k[:, :, n:], image_rotary_emb)], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        out = torch.nn.functional.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)
        return out[:, n:], out[:, :n]


@pytest.mark.parametrize("form", ["two-way", "one-way"])
def test_a_processor_that_bypasses_to_out_is_refused_with_magicmirror(world, form):
    bundle, pos, neg = world
    blocks = bundle.transformer.transformer_blocks
    processors = [blk.attn1.processor for blk in blocks]
    base = sample_video(bundle, pos, neg, **KW)
    for blk in blocks:
        blk.attn1.processor = FunctionalOutputProcessor()
    try:
        torch.testing.assert_close(sample_video(bundle, pos, neg, **KW), base, atol=1e-5, rtol=1e-5)  # the same math
        calls = []
        handle = blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
        with pytest.raises(RuntimeError, match=r"^The attention processor FunctionalOutputProcessor of transformer "
                                               r"block 0 does not call its output projection to_out\[0\] as a module, "
                                               r"so magicmirror's cross-attention"):
            sample_video(bundle.with_patch(MagicMirrorPatch(magicmirror(bundle.transformer, form), faces())), pos,
                         neg, **KW)
        handle.remove()
        # stopped in the first block of the forward with the identity (two-way: after CFG's negative forward, which
        # runs the base model)
        assert len(calls) == (1 if form == "two-way" else 0)
    finally:
        for blk, processor in zip(blocks, processors):
            blk.attn1.processor = processor
    assert not block_runner(bundle.transformer).extensions


# --------------------------------------------------------------------------------------- config values in files


def test_config_values_read_from_adapter_files_are_checked(world, tmp_path):
    bundle, _, _ = world
    adapter = magicmirror(bundle.transformer)
    config = dataclasses.asdict(adapter.config)
    cases = {"typo": ({**config, "face_attention": "two way"},
                      r"face_attention must be one of 'two-way', 'one-way', got 'two way'"),
             "unknown": ({**config, "face_atention": "one-way"},
                         r"unknown MagicMirror config field\(s\) 'face_atention'"),
             "type": ({**config, "width": "32"}, r"MagicMirror config field 'width' must be int, got '32'"),
             "zero": ({**config, "heads": 0}, r"heads must be at least 1, got 0")}
    for name, (fields, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(str(path), adapter.state_dict(), {"method": "magicmirror", "config": fields})
        with pytest.raises(WeightsFileError, match=rf"^'{re.escape(str(path))}': {message}"):
            load_magicmirror(str(path))
    path = tmp_path / "json.safetensors"
    write_safetensors(str(path), adapter.state_dict(), {"method": "magicmirror", "config": "{'width': 32"})
    with pytest.raises(WeightsFileError, match="its MagicMirror config is not valid JSON"):
        load_magicmirror(str(path))

    adapters = dualreal(bundle.transformer)
    for name, change, message in (("hidden", {"hidden_dim": 0}, "hidden_dim must be at least 1"),
                                  ("lambda", {"condition_lambda": "1"}, "'condition_lambda' must be float, got '1'")):
        path = tmp_path / f"dr-{name}.safetensors"
        write_safetensors(str(path), adapters.state_dict(), {"method": "dualreal", "config": {
            **dataclasses.asdict(adapters.config), **change}})
        with pytest.raises(WeightsFileError, match=message):
            load_dualreal(str(path))

    from magicmirror_video.nodes.subject import lora_scope

    with pytest.raises(ValueError, match="subject_lora_scope='refrence', which is neither 'reference' nor 'all'"):
        lora_scope({"subject_lora_scope": "refrence"}, "auto")
    path = tmp_path / "peft.safetensors"
    layers = lora_layers(bundle.transformer)
    save_lora(str(path), layers, {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": "8"})})
    with pytest.raises(LoraMismatchError, match=r"lora_adapter_metadata has lora_alpha='8'; it must be a positive"):
        load_lora_file(str(path))


# ------------------------------------------------------------------------------ what a cache skips of a patch


@dataclasses.dataclass(frozen=True, eq=False)
class NotedPatch:
    """A patch that says what each cache does to it, and cannot act with one that skips block 0."""

    name: str = "noted"
    method: str = "noted method"

    def apply(self, transformer, context=None):
        return lambda: None

    def cache_notes(self, kind):
        if kind.skips_block_zero:
            raise SpeedConflictError(f"{kind.name} cannot act with the noted method")
        return [f"{kind.name} with the noted method: {'blocks' if kind.skips_blocks else 'attention'} skipped"]


def test_caches_ask_each_patch_what_they_skip_of_it(world):
    bundle, _, _ = world
    model = bundle.with_patch(NotedPatch())
    assert check_speed(SpeedOptions("first_block_cache"), model.patches) == [
        "first_block_cache with the noted method: blocks skipped"]
    assert check_speed(SpeedOptions("taylorseer"), model.patches) == [
        "taylorseer with the noted method: attention skipped"]
    with pytest.raises(SpeedConflictError, match="mag_cache cannot act with the noted method"):
        model.with_speed(SpeedOptions("mag_cache", mag_ratios=(1.0,)))
    assert check_speed(SpeedOptions("none"), model.patches) == []
