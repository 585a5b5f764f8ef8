"""The pack's sampler against diffusers' own CogVideoX pipelines (same components, seed, steps)."""

import pytest
import torch
from conftest import bundle_from_components
from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline

from magicmirror_video.models.sampler import SamplingInputError, decode_latents, encode_first_frame, sample_video
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

PROMPT, NEGATIVE = "a man img is walking on the beach", "blurry, low quality"


def run_both(c, *, i2v, scheduler, cfg=6.0, dynamic=False, frames=9, h=32, w=48, steps=3, seed=7, output="latent"):
    if scheduler == "dpm":
        c["scheduler"] = CogVideoXDPMScheduler.from_config(c["scheduler"].config)
    image = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(1))
    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline)(**c)
    extra = {"image": image.permute(0, 3, 1, 2)} if i2v else {}
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w, num_frames=frames,
               num_inference_steps=steps, guidance_scale=cfg, use_dynamic_cfg=dynamic,
               generator=torch.Generator().manual_seed(seed), output_type=output, **extra).frames
    bundle = bundle_from_components(c)
    ours = sample_video(bundle, encode_prompt(bundle, PROMPT), encode_prompt(bundle, NEGATIVE), num_frames=frames,
                        height=h, width=w, steps=steps, cfg=cfg, seed=seed, scheduler=scheduler,
                        use_dynamic_cfg=dynamic, image=image if i2v else None)
    return ref, ours, bundle


@pytest.mark.parametrize("version", ["1.0", "1.5"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_sampler_equals_diffusers_pipeline(version, i2v, scheduler):
    c = tiny.build_components(i2v=i2v, version=version)
    ref, ours, _ = run_both(c, i2v=i2v, scheduler=scheduler)
    ref = ref.permute(0, 2, 1, 3, 4)  # diffusers [B,T,C,H,W] -> LATENT [B,C,T,H,W]
    # diffusers' latent output keeps CogVideoX 1.5's leading padding frame; its decoded output drops it.
    ref = ref[:, :, ref.shape[2] - ours.shape[2]:]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_i2v_first_frame_condition_equals_the_pipelines_image_latents(version):
    """The sampler's first-frame latent is CogVideoXImageToVideoPipeline.prepare_latents' image latent: x the VAE
    scaling factor, or / it when the VAE sets invert_scale_latents (CogVideoX 1.5 I2V)."""
    c = tiny.build_components(i2v=True, version=version)
    assert c["vae"].config.invert_scale_latents == (version == "1.5") and c["vae"].config.scaling_factor != 1
    image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, expected = CogVideoXImageToVideoPipeline(**c).prepare_latents(
            image.permute(0, 3, 1, 2) * 2 - 1, 1, 4, 9, 32, 48, torch.float32, "cpu", torch.Generator().manual_seed(5))
    ours = encode_first_frame(bundle_from_components(c), image, 32, 48, torch.Generator().manual_seed(5))
    assert ours.shape == (1, 1, 4, 4, 6) and torch.equal(ours, expected[:, :1])


def test_decoded_frames_equal_diffusers_and_no_cfg_dynamic_paths():
    c = tiny.build_components()
    ref, ours, bundle = run_both(c, i2v=False, scheduler="ddim", output="pt")  # [B, F, C, H, W]
    frames = decode_latents(bundle, ours)  # [B, F, H, W, C]
    assert frames.shape == (1, 9, 32, 48, 3)
    torch.testing.assert_close(frames, ref.permute(0, 1, 3, 4, 2), atol=1e-5, rtol=0)
    for cfg, dynamic in ((1.0, False), (5.0, True)):
        ref, ours, _ = run_both(tiny.build_components(), i2v=False, scheduler="dpm", cfg=cfg, dynamic=dynamic)
        torch.testing.assert_close(ours, ref.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)


def test_seed_changes_output_and_is_reproducible(components):
    bundle = bundle_from_components(components)
    pos = encode_prompt(bundle, PROMPT)
    kw = dict(num_frames=5, height=32, width=32, steps=2, cfg=1.0)
    a, b, c = (sample_video(bundle, pos, seed=s, **kw) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("frames,h,w,msg", [
    (10, 32, 32, r"num_frames=10 is not of the form 4k\+1.*use 9 or 13"),
    (48, 32, 32, r"use 45 or 49"),
    (9, 40, 32, r"height=40 is not a multiple of 16.*use 32 or 48"),
    (9, 32, 8, r"width=8 is not a multiple of 16"),
])
def test_bad_sizes_are_clear_errors(components, frames, h, w, msg):
    bundle = bundle_from_components(components)
    with pytest.raises(SamplingInputError, match=msg):
        sample_video(bundle, encode_prompt(bundle, PROMPT), num_frames=frames, height=h, width=w, steps=1)


def test_image_mismatch_errors(components):
    bundle = bundle_from_components(components)
    pos = encode_prompt(bundle, PROMPT)
    with pytest.raises(SamplingInputError, match="text-to-video model"):
        sample_video(bundle, pos, num_frames=5, height=32, width=32, steps=1, image=torch.rand(1, 32, 32, 3))
    i2v = bundle_from_components(tiny.build_components(i2v=True))
    with pytest.raises(SamplingInputError, match="image-to-video model: connect a first-frame image"):
        sample_video(i2v, encode_prompt(i2v, PROMPT), num_frames=5, height=32, width=32, steps=1)
