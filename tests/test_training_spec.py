"""The shared CogVideoX training specification: its latents equal diffusers' pipeline preparation, and every
trainer runs on every CogVideoX variant it applies to (T2V/I2V x 1.0/1.5)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import bundle_from_components

from magicmirror_video.testing import tiny
from magicmirror_video.training.config import InputError, load_config
from magicmirror_video.training.spec import CogVideoXSpec

VARIANTS = [("1.0", False), ("1.0", True), ("1.5", False), ("1.5", True)]
VARIANT_IDS = ["1.0-t2v", "1.0-i2v", "1.5-t2v", "1.5-i2v"]


@pytest.mark.parametrize("version", ["1.0", "1.5"])
@pytest.mark.parametrize("pixel_frames", [9, 13])  # 3 and 4 latent frames: 1.5 pads the odd count
def test_i2v_condition_and_rope_equal_the_diffusers_pipeline(version, pixel_frames):
    from diffusers import CogVideoXImageToVideoPipeline

    comps = tiny.build_components(i2v=True, version=version)
    vae = comps["vae"]
    # as CogVideoX1.5-5B-I2V's VAE config: the pipeline divides the image latents by the scaling factor
    assert vae.config.invert_scale_latents == (version == "1.5") and vae.config.scaling_factor != 1
    pipe = CogVideoXImageToVideoPipeline(**comps)
    spec = CogVideoXSpec.from_bundle(bundle_from_components(comps), "cpu")
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latent_frames = (pixel_frames - 1) // 4 + 1
    padded = latent_frames + (latent_frames % 2 if version == "1.5" else 0)  # what the pipeline's __call__ asks for
    with torch.no_grad():
        _, expected = pipe.prepare_latents(image, 1, 4, (padded - 1) * 4 + 1, 32, 48, torch.float32, "cpu",
                                           torch.Generator().manual_seed(7))
        ours = spec.image_condition(image, padded, torch.Generator().manual_seed(7))
    assert torch.equal(ours, expected)
    latents = torch.zeros(1, padded, 4, 4, 6)
    expected_rope = pipe._prepare_rotary_positional_embeddings(32, 48, padded, "cpu")
    for a, b in zip(spec.rotary(latents), expected_rope):
        assert torch.equal(a, b)


def test_video_latents_padding_and_noise():
    comps = tiny.build_components(version="1.5")
    spec = CogVideoXSpec.from_bundle(bundle_from_components(comps), "cpu")
    pixels = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = comps["vae"].encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
        g = torch.Generator().manual_seed(5)
        expected = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * comps["vae"].config.scaling_factor
        latents = spec.video_latents({"pixels": pixels}, torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, expected.permute(0, 2, 1, 3, 4), atol=1e-6, rtol=1e-6)
    padded = spec.pad_frames(latents)  # 3 latent frames -> 4: a copy of the first in front (CogVideo's fine-tuning)
    assert padded.shape[1] == 4 and torch.equal(padded[:, 0], latents[:, 0]) and torch.equal(padded[:, 1:], latents)
    noise, t, noisy = spec.add_noise(padded, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    assert torch.equal(noise, torch.randn(padded.shape, generator=g))
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=g))
    a = spec.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1).float()
    torch.testing.assert_close(noisy, a.sqrt() * padded + (1 - a).sqrt() * noise)


# ------------------------------------------------------------------------ every trainer, every variant

def trainer_setup(name):
    from magicmirror_video.training import (
        presets,
        train_dualreal,
        train_magicmirror,
        train_regdpo,
        train_subject_replay,
    )

    return {"magicmirror": (train_magicmirror.MagicMirrorTrainer, train_magicmirror, presets.build_tiny_magicmirror),
            "dualreal": (train_dualreal.DualRealTrainer, train_dualreal, presets.build_tiny_dualreal),
            "regdpo": (train_regdpo.RegDPOTrainer, train_regdpo, presets.build_tiny_regdpo),
            "subject_replay": (train_subject_replay.SubjectReplayTrainer, train_subject_replay,
                               presets.build_tiny_subject)}[name]


TEXT_TO_VIDEO_ONLY = {"magicmirror", "dualreal"}  # the papers' base models are T2V; the trainers refuse I2V


@pytest.fixture(scope="module")
def variant_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {(v, i2v): tiny.build_model_folder(str(root / f"{v}-{'i2v' if i2v else 't2v'}"), version=v, i2v=i2v)
            for v, i2v in VARIANTS}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    out = {}
    for name in ("magicmirror", "dualreal", "regdpo", "subject_replay"):
        trainer_class, module, build = trainer_setup(name)
        folder = tmp_path_factory.mktemp(name)
        out[name] = build(load_config(trainer_class.config_class, ["--preset", "tiny", "--output_dir", str(folder)],
                                      module.PRESETS))
    return out


@pytest.mark.parametrize("version,i2v", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name", ["magicmirror", "dualreal", "regdpo", "subject_replay"])
def test_every_trainer_runs_two_steps_on_every_variant_it_applies_to(name, version, i2v, variant_folders,
                                                                       tiny_configs, tmp_path):
    trainer_class, _, _ = trainer_setup(name)
    config = dataclasses.replace(tiny_configs[name], model_path=variant_folders[(version, i2v)], max_steps=2,
                                 checkpointing_steps=0, output_dir=str(tmp_path / "run"))
    trainer = trainer_class(config)
    if i2v and name in TEXT_TO_VIDEO_ONLY:
        with pytest.raises(InputError, match="image-to-video CogVideoX.*pass a T2V folder"):
            trainer.validate_inputs()
        return
    out = trainer.train()
    assert math.isfinite(trainer.last_logs["loss"]), trainer.last_logs
    assert trainer.spec.i2v == i2v and (trainer.spec.patch_size_t is not None) == (version == "1.5")
    from safetensors import safe_open
    from safetensors.torch import load_file
    assert load_file(out)  # the export is written and readable
    expected = f"CogVideoX{'1.5' if version == '1.5' else ''}-32w {'I2V' if i2v else 'T2V'}"  # (tiny: 32 wide)
    with safe_open(out, "pt") as f:  # ... and records the variant it was trained on
        assert f.metadata()["base_model"] == expected


@pytest.mark.parametrize("name", ["magicmirror", "dualreal", "regdpo", "subject_replay"])
def test_every_trainer_trains_from_the_precompute_cache_without_vae_or_text_encoder(name, variant_folders,
                                                                                     tiny_configs, tmp_path,
                                                                                     monkeypatch):
    """With ``precompute_cache`` the cache is filled first (VAE + T5), then the training steps never run the
    text encoder or the VAE (so they can leave memory; MagicMirror's identity loss is off here because it
    decodes x̂0); a second run finds every entry and encodes nothing."""
    trainer_class, _, _ = trainer_setup(name)
    i2v = name in ("regdpo", "subject_replay")  # the I2V first-frame condition comes from the cache too
    overrides = {"id_loss_weight": 0.0} if name == "magicmirror" else {}
    config = dataclasses.replace(tiny_configs[name], model_path=variant_folders[("1.5", i2v)], max_steps=2,
                                 checkpointing_steps=0, precompute_cache=True, cache_dir=str(tmp_path / "cache"),
                                 output_dir=str(tmp_path / "run"), **overrides)
    if "frame_sampling" in {f.name for f in dataclasses.fields(config)} and config.frame_sampling == "random":
        config = dataclasses.replace(config, frame_sampling="uniform")
    original = trainer_class.fill_cache
    calls = []

    def fill_then_forbid(self):
        original(self)
        vae = self.bundle.vae  # (vae.encode / decode run its encoder / decoder modules)
        for module, what in ((self.bundle.text_encoder, "text encoder"), (vae.encoder, "VAE encoder"),
                             (vae.decoder, "VAE decoder")):
            def forbid(*args, what=what):
                raise AssertionError(f"the {what} ran during training with the precompute cache")
            module.register_forward_pre_hook(forbid)
        calls.append(self.cache.store.misses)

    monkeypatch.setattr(trainer_class, "fill_cache", fill_then_forbid)
    trainer = trainer_class(config)
    trainer.train()
    assert trainer.spec.text_encoder is None and math.isfinite(trainer.last_logs["loss"])
    trainer_class(dataclasses.replace(config, output_dir=str(tmp_path / "again"))).train()
    assert calls[0] > 0 and calls[1] == 0  # the second run encoded nothing


def test_validation_videos_are_scored_and_logged(tiny_configs, variant_folders, tmp_path):
    """MagicMirror logs the identity similarity of its validation videos to the validation faces (equal to the
    metrics module on the written frames), subject replay and DualReal their CLIP-I to the reference (TensorBoard
    scalars + validation/step-N.json)."""
    pytest.importorskip("tensorboard")
    import json
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from magicmirror_video.models import metrics
    from magicmirror_video.models.clip_vision import load_clip_vision
    from magicmirror_video.models.metrics import clip_similarity_curve

    mm, dr, sr = tiny_configs["magicmirror"], tiny_configs["dualreal"], tiny_configs["subject_replay"]
    assets = os.path.dirname(os.path.dirname(mm.data))  # tiny-assets
    faces = os.path.join(os.path.dirname(mm.data), "faces", sorted(os.listdir(os.path.join(os.path.dirname(mm.data),
                                                                                             "faces")))[0])
    common = dict(max_steps=1, checkpointing_steps=0, report_to="tensorboard", validation_steps=1,
                  validation_num_frames=5, validation_steps_sampling=2)
    clip = dr.clip_vision
    ref = os.path.join(os.path.dirname(sr.pairs), "0-src.png")
    runs = {"magicmirror": (mm, dict(validation_prompts=["a person img waves"], validation_faces=faces,
                                     validation_insightface=os.path.join(assets, "insightface"),
                                     validation_insightface_pack="antelopev2", validation_protocol="opens2v"),
                            "validation/face_rate"),
            "dualreal": (dr, dict(validation_prompts=["a dog * runs"], validation_protocol="consisid"),
                         "validation/clip_i"),
            "subject_replay": (sr, dict(validation_prompts=["<cls> a teddy bear"], validation_reference=ref,
                                        validation_clip_vision=clip), "validation/clip_i")}
    for name, (config, extra, tag) in runs.items():
        trainer_class, _, _ = trainer_setup(name)
        out = tmp_path / name
        trainer_class(dataclasses.replace(config, output_dir=str(out), **common, **extra)).train()
        report = json.load(open(out / "validation" / "step-00000001.json"))
        protocol = extra.get("validation_protocol", "magicmirror")  # --validation_protocol picks the frames scored
        assert report["videos"][0]["protocol"] == protocol and report["videos"][0]["fps"] == 8.0
        assert report["videos"][0]["frame_indices"] == list(metrics.sample_indices(5, protocol))
        acc = EventAccumulator(str(out / "logs" / trainer_class.method))
        acc.Reload()
        assert tag in acc.Tags()["scalars"], acc.Tags()["scalars"]
        assert acc.Scalars(tag)[0].value == pytest.approx(report["means"][tag], rel=1e-5)
        if tag == "validation/clip_i":  # independently: CLIP on the written video's frames vs the reference image
            from magicmirror_video.models.video_io import read_video
            from magicmirror_video.training.data import first_frame
            frames, _ = read_video(str(out / "validation" / "step-00000001-0.mp4"))
            from magicmirror_video.training.data import read_manifest
            path = extra.get("validation_reference") or read_manifest(config.identity_data)[0].media
            reference = torch.from_numpy(first_frame(path)).float()[None] / 255
            scored = frames[metrics.sample_indices(len(frames), protocol)]  # the protocol's frames
            curve = clip_similarity_curve(load_clip_vision(clip), scored, reference)
            # the written mp4 is re-encoded (h264), so allow for compression
            assert report["videos"][0]["clip_i"] == pytest.approx(float(curve.mean()), abs=2e-2)


def test_a_trainer_continuing_from_an_unrecorded_adapter_records_the_model_it_trains(tiny_configs, variant_folders,
                                                                                     tmp_path):
    """--init_from a file without the base-model record: the export records the model the run trained on; a file that
    records another variant is refused."""
    from safetensors import safe_open

    from magicmirror_video.models.clip_vision import load_clip_vision
    from magicmirror_video.models.cogvideox import write_safetensors
    from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig, save_dualreal

    trainer_class, _, _ = trainer_setup("dualreal")
    c = tiny_configs["dualreal"]
    folder = variant_folders[("1.0", False)]
    transformer = tiny.build_components()["transformer"]  # (the folder's layout)
    condition_dim = load_clip_vision(c.clip_vision).config.projection_dim
    adapters = DualRealAdapters(DualRealConfig.for_transformer(transformer, hidden_dim=c.hidden_dim,
                                                               condition_dim=condition_dim))
    old = str(tmp_path / "old.safetensors")  # as written before the record
    write_safetensors(old, adapters.state_dict(), {"method": "dualreal", "config": dataclasses.asdict(
        dataclasses.replace(adapters.config, base_model=None))})
    config = dataclasses.replace(c, model_path=folder, init_from=old, max_steps=1, checkpointing_steps=0,
                                 output_dir=str(tmp_path / "run"))
    out = trainer_class(config).train()
    with safe_open(out, "pt") as f:
        assert f.metadata()["base_model"] == "CogVideoX-32w T2V"

    other = str(tmp_path / "other.safetensors")
    save_dualreal(other, DualRealAdapters(dataclasses.replace(adapters.config, base_model="CogVideoX1.5-32w T2V")))
    with pytest.raises(ValueError, match="trained on CogVideoX1.5-32w T2V but the loaded model is CogVideoX-32w T2V"):
        trainer_class(dataclasses.replace(config, init_from=other, output_dir=str(tmp_path / "run2"))).train()
