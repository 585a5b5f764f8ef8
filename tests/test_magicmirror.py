"""MagicMirror: PhotoMaker-V2 compatibility, zero-init equivalence, identity tokens, checkpoints."""

import json
import math

import pytest
import torch
from conftest import bundle_from_components

from magicmirror_video.models.cogvideox import WeightsFileError
from magicmirror_video.models.id_encoder import IDPerceiver, clip_config_from_weights, load_photomaker_id_encoder
from magicmirror_video.models.magicmirror import (
    AdapterMismatchError,
    FaceEmbeds,
    MagicMirrorAdapter,
    MagicMirrorConfig,
    MagicMirrorPatch,
    load_magicmirror,
    save_magicmirror,
)
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.text import encode_prompt, identity_token_mask, split_trigger
from magicmirror_video.testing import reference_json, tiny

SMALL = dict(id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32, fuse_hidden=32)
KW = dict(num_frames=9, height=32, width=32, steps=3, cfg=6.0, seed=3)
PROMPT = "a man img is walking on the beach at sunset"


def faces(n=2, seed=0, id_dim=256, clip_dim=64):
    g = torch.Generator().manual_seed(seed)
    return FaceEmbeds(arcface=torch.randn(n, 512, generator=g), x_id=torch.randn(n, 2, id_dim, generator=g),
                      clip_penultimate=torch.randn(n, 17, clip_dim, generator=g))


def perturbed(adapter, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return adapter


# --------------------------------------------------------------------------- PhotoMaker-V2


def photomaker_perceiver_reference(sd, id_embeds, clip_hidden, num_tokens, heads):
    """PhotoMaker-V2 qformer_perceiver written out as plain tensor math on the raw state dict."""
    p = "qformer_perceiver."
    ln = lambda x, k: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])  # noqa
    lin = lambda x, k, bias=True: x @ sd[k + ".weight"].T + (sd[k + ".bias"] if bias else 0)  # noqa
    gelu = torch.nn.functional.gelu
    x = lin(gelu(lin(id_embeds, p + "token_proj.0")), p + "token_proj.2")
    dim = sd[p + "token_norm.weight"].shape[0]
    x = ln(x.reshape(-1, num_tokens, dim), p + "token_norm")
    r = p + "perceiver_resampler."
    feats = lin(clip_hidden, r + "proj_in")
    latents = x
    layer = 0
    while f"{r}layers.{layer}.0.to_q.weight" in sd:
        a = f"{r}layers.{layer}.0."
        f_n, l_n = ln(feats, a + "norm1"), ln(latents, a + "norm2")
        q = lin(l_n, a + "to_q", bias=False)
        k, v = lin(torch.cat([f_n, l_n], 1), a + "to_kv", bias=False).chunk(2, -1)
        b, n, _ = q.shape
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa
        q, k, v = split(q), split(k), split(v)
        s = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        w = torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1)
        latents = lin((w @ v).transpose(1, 2).reshape(b, n, -1), a + "to_out", bias=False) + latents
        fc = f"{r}layers.{layer}.1."
        h = torch.nn.functional.layer_norm(latents, latents.shape[-1:], sd[fc + "0.weight"], sd[fc + "0.bias"])
        latents = gelu(h @ sd[fc + "1.weight"].T) @ sd[fc + "3.weight"].T + latents
        layer += 1
    out = ln(lin(latents, r + "proj_out"), r + "norm_out")
    return x + out


def test_photomaker_v2_checkpoint_loads_and_matches_reference_math(tmp_path):
    path = tiny.build_photomaker_checkpoint(str(tmp_path / "photomaker-v2.bin"))
    enc = load_photomaker_id_encoder(path)
    sd = torch.load(path, weights_only=True)["id_encoder"]
    g = torch.Generator().manual_seed(0)
    arc, hidden = torch.randn(3, 512, generator=g), torch.randn(3, 17, 64, generator=g)
    ref = photomaker_perceiver_reference(sd, arc, hidden, num_tokens=2, heads=256 // 128)
    torch.testing.assert_close(enc.perceiver(arc, hidden), ref, atol=1e-5, rtol=1e-5)
    # The CLIP tower equals transformers' own CLIP loaded with the same keys.
    from transformers import CLIPVisionModelWithProjection
    clip = CLIPVisionModelWithProjection(clip_config_from_weights(sd)).eval()
    clip.load_state_dict({k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))
                          and not k.endswith("position_ids")})
    pixels = torch.randn(2, 3, 56, 56, generator=g)
    last, pen = enc.clip_features(pixels)
    out = clip(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(last, out.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(pen, out.hidden_states[-2], atol=0, rtol=0)
    x_id, _ = enc(pixels, arc[:2])
    assert x_id.shape == (2, 2, 256)


def test_module_names_and_shapes_match_the_real_photomaker_v2_manifest():
    manifest = reference_json("photomaker_v2_id_encoder.keys.json")
    with torch.device("meta"):
        perceiver = IDPerceiver()
    ours = {f"qformer_perceiver.{k}": list(v.shape) for k, v in perceiver.state_dict().items()}
    theirs = {k: v for k, v in manifest.items() if k.startswith("qformer_perceiver.")}
    assert ours == theirs
    cfg = clip_config_from_weights({k: torch.empty(v, device="meta") for k, v in manifest.items()})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == \
        (1024, 24, 16, 14, 224)
    from transformers import CLIPVisionModel
    with torch.device("meta"):
        clip = CLIPVisionModel(cfg)
    clip_keys = {("" if k.startswith("vision_model.") else "vision_model.") + k: list(v.shape)
                 for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    assert clip_keys == {k: v for k, v in manifest.items() if k.startswith("vision_model.")}


def test_not_photomaker_v2(tmp_path):
    torch.save({"id_encoder": {"vision_model.embeddings.class_embedding": torch.zeros(4)}}, tmp_path / "v1.bin")
    with pytest.raises(WeightsFileError, match="not a PhotoMaker-V2 ID encoder.*v1"):
        load_photomaker_id_encoder(str(tmp_path / "v1.bin"))


# ------------------------------------------------------------------------------ adapters


@pytest.fixture(params=["two-way", "one-way"])
def setup(request):
    bundle = bundle_from_components(tiny.build_components(num_layers=3))
    adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(bundle.transformer, **SMALL,
                                                                   face_attention=request.param)).eval()
    pos = encode_prompt(bundle, PROMPT, trigger="img")
    return bundle, adapter, pos


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_fresh_one_way_adapter_equals_base_model_exactly(setup, scheduler):
    bundle, adapter, pos = setup
    if adapter.config.face_attention != "one-way":
        pytest.skip("a fresh two-way adapter changes the output (the face keys join the softmax); see below")
    base = sample_video(bundle, pos, scheduler=scheduler, **KW)
    patched = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces())), pos, scheduler=scheduler, **KW)
    assert torch.equal(base, patched)


def forward_inputs(t, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 4, 4, 4, generator=g).repeat(batch, 1, 1, 1, 1)
    from magicmirror_video.models.sampler import rotary_embeddings
    return dict(hidden_states=x, timestep=torch.tensor([500] * batch),
                image_rotary_emb=rotary_embeddings(t, 32, 32, 3, 8, "cpu"), return_dict=False)


def test_fresh_two_way_adapter_equals_diffusers_blocks_with_the_face_tokens_in_the_sequence():
    """Independent computation of the two-way math: each unmodified diffusers ``CogVideoXBlock`` runs on
    [text; face] + video (the face tokens as extra, unrotated sequence tokens) with hooks that give the face
    rows the zero-initialised φ_face (their own LayerNorm, shift = scale = 0) and a zero gate; the odd
    (non-adapted) blocks run without them. The fresh adapter's CAN, fusion and cross-attention add zero."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    bundle = bundle_from_components(tiny.build_components(num_layers=3))
    t = bundle.transformer
    adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(t, **SMALL)).eval()
    assert adapter.config.face_attention == "two-way"  # the default
    f = faces(2)
    text = encode_prompt(bundle, PROMPT, trigger="img")
    kw = dict(forward_inputs(t), encoder_hidden_states=text.embeds)
    with torch.no_grad():
        from magicmirror_video.models.patches import SamplingContext, applied_patches
        with applied_patches(t, [MagicMirrorPatch(adapter, f)], SamplingContext(positive=text)):
            ours = t(**kw)[0]
        base = t(**kw)[0]
        face = adapter.face_tokens(f.clip_penultimate)  # [1, 64, D]

        # the reference: diffusers' own blocks, called directly (the runner only sits on block.forward)
        captured = {}
        handles = [t.time_embedding.register_forward_hook(lambda m, a, o: captured.__setitem__("emb", o)),
                   t.patch_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("tokens", o))]
        t(**kw)
        for h in handles:
            h.remove()
        emb, tokens = captured["emb"], captured["tokens"]
        n_text = text.embeds.shape[1]
        enc, hidden = tokens[:, :n_text], tokens[:, n_text:]
        for i, block in enumerate(t.transformer_blocks):
            if i % 2:
                hidden, enc = CogVideoXBlock.forward(block, hidden, enc, emb, kw["image_rotary_emb"])
                continue
            ad = adapter.blocks[str(i)]
            hooks = []
            for norm, face_norm in ((block.norm1, ad.face_norm1), (block.norm2, ad.face_norm2)):
                def face_rows(mod, args, out, face_norm=face_norm):
                    h, e, gate, e_gate = out
                    e = torch.cat([e[:, :n_text], face_norm(args[1][:, n_text:])], dim=1)  # φ_face: shift = scale = 0
                    e_gate = torch.cat([e_gate.expand(-1, n_text, -1), torch.zeros_like(args[1][:, n_text:])], dim=1)
                    return h, e, gate, e_gate
                hooks.append(norm.register_forward_hook(face_rows))
            hidden, enc = CogVideoXBlock.forward(block, hidden, torch.cat([enc, face], dim=1), emb,
                                                 kw["image_rotary_emb"])
            enc = enc[:, :n_text]  # (the face tokens are unchanged: their gates are zero)
            for h in hooks:
                h.remove()
        hidden = t.proj_out(t.norm_out(t.norm_final(hidden), temb=emb))
        expected = hidden.reshape(1, 3, 2, 2, -1, 2, 2).permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the face keys do change the video (the comparison can fail)


def test_trained_adapter_changes_output_and_is_removed_after(setup):
    bundle, adapter, pos = setup
    t = bundle.transformer
    originals = list(t.transformer_blocks)
    base = sample_video(bundle, pos, **KW)
    patch = MagicMirrorPatch(perturbed(adapter), faces())
    out = sample_video(bundle.with_patch(patch), pos, **KW)
    assert (out - base).abs().max() > 1e-2
    assert list(t.transformer_blocks) == originals
    assert not t._forward_pre_hooks and not t._forward_hooks and not t.patch_embed._forward_hooks
    assert torch.equal(sample_video(bundle, pos, **KW), base)
    zero = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces(), strength=0.0)), pos, **KW)
    if adapter.config.face_attention == "one-way":
        assert torch.equal(zero, base)


def test_identity_acts_on_positive_rows_only(setup):
    """Rows whose role is negative (CFG) run the base model exactly: in the one-way form in the same batch
    as the positive rows, in the two-way form as a forward of their own (a mixed batch is refused)."""
    from magicmirror_video.models.block_runner import block_runner
    from magicmirror_video.models.patches import SamplingContext, applied_patches

    bundle, adapter, pos = setup
    t = bundle.transformer
    neg = encode_prompt(bundle, "")
    ctx = SamplingContext(positive=pos, negative=neg)
    patch = MagicMirrorPatch(perturbed(adapter), faces())
    runner = block_runner(t)
    with torch.no_grad():
        if adapter.config.face_attention == "one-way":
            kw = dict(forward_inputs(t, batch=2), encoder_hidden_states=torch.cat([neg.embeds, pos.embeds]))
            base = t(**kw)[0]
            with applied_patches(t, [patch], ctx), runner.roles(("negative", "positive")):
                out = t(**kw)[0]
            assert torch.equal(out[0], base[0])
            assert (out[1] - base[1]).abs().max() > 1e-3
        else:
            assert patch.conditional_only
            kw_neg = dict(forward_inputs(t), encoder_hidden_states=neg.embeds)
            kw_pos = dict(forward_inputs(t), encoder_hidden_states=pos.embeds)
            base_neg, base_pos = t(**kw_neg)[0], t(**kw_pos)[0]
            with applied_patches(t, [patch], ctx):
                with runner.roles(("negative",)):
                    assert torch.equal(t(**kw_neg)[0], base_neg)
                with runner.roles(("positive",)):
                    assert (t(**kw_pos)[0] - base_pos).abs().max() > 1e-3
                kw = dict(forward_inputs(t, batch=2), encoder_hidden_states=torch.cat([neg.embeds, pos.embeds]))
                with runner.roles(("negative", "positive")), pytest.raises(RuntimeError, match="negative rows"):
                    t(**kw)


def test_two_way_cfg_runs_the_negative_prompt_as_its_own_forward(setup):
    """The sampler's CFG with a two-way adapter: the negative prediction is the base model's (batch 1)."""
    bundle, adapter, pos = setup
    if adapter.config.face_attention != "two-way":
        pytest.skip("one-way adapters batch both prompts")
    calls = []
    handle = bundle.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    try:
        sample_video(bundle.with_patch(MagicMirrorPatch(perturbed(adapter), faces())), pos, **KW)
        assert calls == [1, 1] * KW["steps"]
        calls.clear()
        sample_video(bundle, pos, **KW)
        assert calls == [2] * KW["steps"]  # without it, one batch [negative, positive] as diffusers does
    finally:
        handle.remove()


def test_text_fusion_touches_only_identity_tokens(setup):
    bundle, adapter, pos = setup
    perturbed(adapter)
    text = pos.embeds
    fused = adapter.fusion(text, adapter.id_vector(faces().x_id))
    mask = pos.identity_mask[0]
    assert mask.sum() >= 1
    assert not torch.allclose(fused[0, mask], text[0, mask])
    masked = torch.where(pos.identity_mask[:, :, None], fused, text)
    assert torch.equal(masked[0, ~mask], text[0, ~mask])


def test_multiple_references_average_id_and_stack_face_tokens(setup):
    bundle, adapter, pos = setup
    f = faces(3)
    torch.testing.assert_close(adapter.id_vector(f.x_id), f.x_id.mean(0).reshape(1, -1))
    tokens = adapter.face_tokens(f.clip_penultimate)
    assert tokens.shape == (1, 3 * 32, adapter.config.width)
    single = adapter.face_tokens(f.clip_penultimate[1:2])
    torch.testing.assert_close(tokens[:, 32:64], single)  # each reference's 32 tokens, in order
    perturbed(adapter)
    one = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces(1))), pos, **KW)
    two = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces(2))), pos, **KW)
    assert not torch.equal(one, two)


def test_files_without_face_attention_load_as_one_way(setup, tmp_path):
    """Adapter files written before the option existed were trained one-way and load as such."""
    bundle, adapter, pos = setup
    path = str(tmp_path / "old.safetensors")
    import dataclasses

    from magicmirror_video.models.cogvideox import write_safetensors
    config = dataclasses.asdict(adapter.config)
    del config["face_attention"]
    write_safetensors(path, adapter.state_dict(), {"method": "magicmirror", "config": config})
    assert load_magicmirror(path).config.face_attention == "one-way"


def test_checkpoint_round_trip_and_base_mismatch(setup, tmp_path):
    bundle, adapter, pos = setup
    perturbed(adapter)
    path = str(tmp_path / "mm.safetensors")
    save_magicmirror(path, adapter)
    loaded = load_magicmirror(path)
    assert loaded.config == adapter.config
    a = sample_video(bundle.with_patch(MagicMirrorPatch(adapter, faces())), pos, **KW)
    b = sample_video(bundle.with_patch(MagicMirrorPatch(loaded, faces())), pos, **KW)
    assert torch.equal(a, b)
    other = bundle_from_components(tiny.build_components(heads=3))  # width 48 instead of 32
    with pytest.raises(AdapterMismatchError, match=r"made for .*width 32.*loaded model is .*width 48"):
        loaded.check_compatible(other.transformer)
    with pytest.raises(AdapterMismatchError, match="Face embeddings"):
        MagicMirrorPatch(loaded, faces(id_dim=128)).apply(bundle.transformer)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsFileError, match="not a MagicMirror adapter"):
        load_magicmirror(str(tmp_path / "other.safetensors"))


# ------------------------------------------------------------------------ identity tokens


@pytest.fixture(scope="module")
def spm_t5_tokenizer(tmp_path_factory):
    """A sentencepiece model trained here, in a tokenizer folder laid out like CogVideoX's
    (``spiece.model`` + ``tokenizer_config.json``), loaded the way the pack loads real models."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(tiny.CORPUS.splitlines() * 3))
    folder = d / "tokenizer"
    folder.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=100,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 226}))
    return AutoTokenizer.from_pretrained(str(folder)), spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))


@pytest.mark.parametrize("prompt,clean,words", [
    ("a man img is walking", "a man is walking", ["man"]),
    ("A young woman img, smiling in the rain", "A young woman, smiling in the rain", ["woman"]),
    ("close up of a girl img and a boy img", "close up of a girl and a boy", ["girl", "boy"]),
    ("a cat sits on a red sofa", "a cat sits on a red sofa", []),
])
def test_identity_mask_on_t5_tokenization(spm_t5_tokenizer, prompt, clean, words):
    tokenizer, sp = spm_t5_tokenizer
    text, spans = split_trigger(prompt, "img")
    assert text == clean and [text[a:b] for a, b in spans] == words
    ids = tokenizer(text, padding="max_length", max_length=226).input_ids
    assert ids[: len(sp.encode(text)) + 1] == sp.encode(text) + [1]  # same pieces as sentencepiece itself, + </s>
    mask = identity_token_mask(tokenizer, text, spans)
    pieces = [sp.id_to_piece(ids[i]) for i in mask[0].nonzero()[:, 0].tolist()]
    # The marked pieces are exactly the class words' pieces (a leading bare "▁" piece may be included).
    assert "".join(pieces).replace("\u2581", "") == "".join(words)
    assert mask.sum() >= len(words)
