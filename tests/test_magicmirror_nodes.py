"""MagicMirror nodes headless: fake insightface pack + tiny PhotoMaker-V2 + tiny adapter."""

import pytest
import torch

from magicmirror_video import nodes as pack_nodes
from magicmirror_video.models.face_encoder import NoFaceError
from magicmirror_video.testing import tiny, tiny_faces

M = pack_nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def mm_models(models_dir):
    tiny_faces.build_fake_insightface_pack(str(models_dir / "insightface"))
    (models_dir / "photomaker").mkdir(exist_ok=True)
    tiny.build_photomaker_checkpoint(str(models_dir / "photomaker" / "photomaker-v2.bin"))
    (models_dir / "magicmirror").mkdir(exist_ok=True)
    from diffusers import CogVideoXTransformer3DModel
    t = CogVideoXTransformer3DModel.from_pretrained(str(models_dir / "CogVideo" / "tiny-t2v" / "transformer"))
    tiny.build_magicmirror_adapter(str(models_dir / "magicmirror" / "tiny-mm.safetensors"), t)
    return models_dir


def image(seed=0, face=True):
    rgb = tiny_faces.synthetic_face_image(160, 128, radius=40 if face else None, seed=seed)
    return torch.from_numpy(rgb).float()[None] / 255.0


def test_magicmirror_nodes_end_to_end(mm_models, monkeypatch):
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(mm_models))
    spec = M["MMV_MagicMirrorFaceEncoderLoader"].INPUT_TYPES()["required"]
    assert "antelopev2" in spec["insightface"][0] and "photomaker-v2.bin" in spec["photomaker"][0]
    (encoder,) = M["MMV_MagicMirrorFaceEncoderLoader"]().load("antelopev2", "CPU", "photomaker-v2.bin", "fp32")
    refs = torch.cat([image(0), image(1)])
    embeds, crops = M["MMV_MagicMirrorFaceEncode"]().encode(encoder, refs)
    assert embeds.arcface.shape == (2, 512) and embeds.x_id.shape == (2, 2, 256)
    assert embeds.clip_penultimate.shape == (2, 17, 64) and crops.shape == (2, 224, 224, 3)
    (model,) = M["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    (patched,) = M["MMV_MagicMirrorApply"]().apply(model, "tiny-mm.safetensors", embeds, 1.0)
    enc = M["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "a man img is walking on the beach"), enc.encode(model, "")
    assert pos.identity_mask.any() and pos.encoded_prompt == "a man is walking on the beach"
    kw = dict(width=32, height=32, num_frames=9, steps=2, cfg=6.0, seed=0, scheduler="DDIM")
    (with_id,) = M["MMV_CogVideoXSampler"]().sample(patched, pos, neg, **kw)
    (base,) = M["MMV_CogVideoXSampler"]().sample(model, pos, neg, **kw)
    assert not torch.equal(with_id["samples"], base["samples"])
    (zero,) = M["MMV_MagicMirrorApply"]().apply(model, "tiny-mm.safetensors", embeds, 0.0)
    assert torch.equal(M["MMV_CogVideoXSampler"]().sample(zero, pos, neg, **kw)[0]["samples"], base["samples"])


def test_no_face_is_a_clear_error(mm_models, monkeypatch):
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(mm_models))
    (encoder,) = M["MMV_MagicMirrorFaceEncoderLoader"]().load("antelopev2", "CPU", "photomaker-v2.bin", "fp32")
    with pytest.raises(NoFaceError, match="No face found in reference image 2 of 2"):
        M["MMV_MagicMirrorFaceEncode"]().encode(encoder, torch.cat([image(0), image(1, face=False)]))


def test_adapter_for_another_base_model_is_refused(mm_models, monkeypatch, tmp_path):
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(mm_models))
    wide = tiny.build_components(heads=3)["transformer"]
    tiny.build_magicmirror_adapter(str(mm_models / "magicmirror" / "wide.safetensors"), wide)
    (model,) = M["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    from magicmirror_video.models.magicmirror import AdapterMismatchError, FaceEmbeds
    faces = FaceEmbeds(torch.zeros(1, 512), torch.zeros(1, 2, 256), torch.zeros(1, 17, 64))
    with pytest.raises(AdapterMismatchError, match="made for .*width 48.*loaded model is .*width 32"):
        M["MMV_MagicMirrorApply"]().apply(model, "wide.safetensors", faces, 1.0)


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "fp8_e4m3fn_all"])
def test_apply_stores_the_adapter_as_the_fp8_model_is_stored(mm_models, monkeypatch, storage):
    """On a model loaded with fp8 weight storage, MagicMirror Apply stores the adapter's linear layers in fp8 too
    (computed in the model's precision), its modulation layers (face AdaLN, CAN) as the transformer's modulation is
    stored. Reference: the same adapter file with each stored layer's weight and bias rounded through fp8 by hand,
    run in fp32 without any casting hook: the same video bit for bit; the adapter stays stored after the run."""
    import copy

    from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorPatch, load_magicmirror

    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(mm_models))
    g = torch.Generator().manual_seed(3)
    faces = FaceEmbeds(torch.randn(1, 512, generator=g), torch.randn(1, 2, 256, generator=g),
                       torch.randn(1, 17, 64, generator=g))
    (model,) = M["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none", weight_storage=storage)
    (patched,) = M["MMV_MagicMirrorApply"]().apply(model, "tiny-mm.safetensors", faces, 1.0)
    adapter = patched.patches[-1].adapter
    original = load_magicmirror(str(mm_models / "magicmirror" / "tiny-mm.safetensors"))
    rounded, fp8 = copy.deepcopy(original), torch.float8_e4m3fn
    stored = []
    for name, layer in rounded.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)):  # diffusers' layerwise casting's layers
            modulation = name.endswith("face_modulation") or name.startswith("can.")  # (CAN's embedding too)
            if storage.endswith("_all") or not modulation:
                stored.append(name)
                for p in layer.parameters():
                    p.data = p.data.to(fp8).float()
    layers = dict(adapter.named_modules())
    assert all(layers[n].weight.dtype == fp8 for n in stored)
    assert {n for n, m in layers.items() if hasattr(m, "weight") and m.weight.dtype == fp8} == set(stored)
    assert any("ca_k" in n for n in stored) and storage.endswith("_all") == any("face_modulation" in n for n in stored)
    enc = M["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "a man img is walking on the beach"), enc.encode(model, "")
    kw = dict(width=32, height=32, num_frames=9, steps=2, cfg=6.0, seed=0, scheduler="DDIM")
    (ours,) = M["MMV_CogVideoXSampler"]().sample(patched, pos, neg, **kw)
    assert all(layers[n].weight.dtype == fp8 for n in stored)  # still stored after the run
    (ref,) = M["MMV_CogVideoXSampler"]().sample(model.with_patch(MagicMirrorPatch(rounded, faces)), pos, neg, **kw)
    (unrounded,) = M["MMV_CogVideoXSampler"]().sample(model.with_patch(MagicMirrorPatch(original, faces)), pos, neg,
                                                      **kw)
    assert torch.equal(ours["samples"], ref["samples"])
    assert not torch.equal(ours["samples"], unrounded["samples"])  # (the rounding shows)
