"""The Wan training specification against diffusers: its text embeddings, latents, image conditions, noisy inputs
and the transformer inputs it builds equal what ``WanPipeline`` / ``WanImageToVideoPipeline`` and
``FlowMatchEulerDiscreteScheduler`` produce for the same inputs, on every Wan variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from magicmirror_video.models.wan import WanModel, variant_of
from magicmirror_video.testing import tiny_wan
from magicmirror_video.training.spec_wan import EXPERTS, WanSpec, shift_sigmas

PROMPT = "a car drives along a mountain road with snow"


def spec_of(components: dict, **options) -> WanSpec:
    """A WanSpec over pipeline components (as load_wan would give them), float32 on the CPU."""
    c = components
    index = {k: c[k] for k in ("boundary_ratio", "expand_timesteps") if k in c}
    if "transformer_2" in c:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    model = WanModel(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                     tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                     variant=variant_of(dict(c["transformer"].config), index), dtype=torch.float32,
                     device=torch.device("cpu"), transformer_2=c.get("transformer_2"),
                     image_encoder=c.get("image_encoder"), image_processor=c.get("image_processor"),
                     boundary_ratio=c.get("boundary_ratio"), expand_timesteps=c.get("expand_timesteps", False))
    experts = ("",) if model.variant.experts == 1 else options.pop("experts", EXPERTS)
    shift = options.pop("flow_shift", 3.0)
    return WanSpec(model, torch.device("cpu"), torch.float32, shift, experts=experts, **options)


@pytest.fixture(scope="module")
def comps():
    return {v: tiny_wan.build_components(v) for v in tiny_wan.VARIANTS}


def i2v_pipeline(c):
    import diffusers

    return diffusers.WanImageToVideoPipeline(**{k: v for k, v in c.items()})


def first_frame(seed=0, size=32):
    """A uint8 frame, as a PIL image (what users give the pipelines) and as the trainers' [-1, 1] tensor."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_text_embeddings_equal_the_pipeline(comps):
    c = comps["wan2.1-t2v"]
    spec = spec_of(c)
    with torch.no_grad():  # as the pipeline's __call__ runs it (autograd picks other kernels: 1e-6 apart)
        expected = tiny_wan.pipeline(c)._get_t5_prompt_embeds(PROMPT, max_sequence_length=512)
    tokens = spec.tokenize(PROMPT)
    ours = spec.text_embeds({k: v[None] for k, v in tokens.items()})
    assert torch.equal(ours, expected)
    assert torch.equal(spec.encode_text(PROMPT)["prompt_embeds"], expected[0])
    n = int(tokens["attention_mask"].sum())
    assert 1 < n < 512 and ours[0, n:].abs().sum() == 0 and ours[0, :n].abs().sum() > 0


@pytest.mark.parametrize("variant", ["wan2.1-t2v", "wan2.2-ti2v"])
def test_video_latents_are_the_normalised_posterior_draw(comps, variant):
    c = comps[variant]
    spec = spec_of(c)
    pixels = torch.rand(2, 9, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = spec.latents({"pixels": pixels}, torch.Generator().manual_seed(5))
    with torch.no_grad():
        post = c["vae"].encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
    cfg = c["vae"].config
    mean, std = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(ours, (z - mean) / std, atol=1e-6, rtol=1e-6)
    assert ours.shape == (2, cfg.z_dim, 3, 64 // cfg.scale_factor_spatial, 64 // cfg.scale_factor_spatial)
    # the pipelines decode latents / (1 / std) + mean: our latents are what they denormalise
    torch.testing.assert_close(ours / (1.0 / std) + mean, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v"])
@pytest.mark.parametrize("frames", [5, 9])
def test_image_condition_equals_the_pipelines_prepare_latents(comps, variant, frames):
    c = comps[variant]
    spec, pipe = spec_of(c), i2v_pipeline(c)
    image, tensor = first_frame()
    z = c["vae"].config.z_dim
    with torch.no_grad():
        prepared = pipe.prepare_latents(tensor, 1, z, 32, 32, frames, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(1))
    latents = torch.zeros_like(prepared[0])
    text = {"prompt_embeds": torch.zeros(1, 512, 32)}
    ours = spec.condition({**text, "first_frame": tensor}, torch.Generator(), latents)
    if variant == "wan2.2-ti2v":  # the first frame's latent in place, frames after it noisy
        assert torch.equal(ours["first_frame"], prepared[1])
        assert torch.equal(prepared[2][0, 0, 0], torch.zeros_like(prepared[2][0, 0, 0]))
    else:  # 4 mask channels + the condition latents of [frame, black frames]
        assert torch.equal(ours["image_latents"], prepared[1])
        assert ours["image_latents"].shape[1] == 4 + z
    if variant == "wan2.1-i2v":  # CLIP penultimate hidden states of the PIL frame
        with torch.no_grad():
            expected = pipe.encode_image(image, torch.device("cpu"))
        torch.testing.assert_close(ours["image_embeds"], expected, atol=1e-6, rtol=1e-6)
    else:
        assert "image_embeds" not in ours
    cached = spec.image_condition_item(spec.encode_image_condition(tensor, frames), None)  # the cache's route
    again = spec.condition({**text, **{k: v[None] for k, v in cached.items()}}, torch.Generator(), latents)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigmas_noisy_inputs_and_timesteps_equal_the_flow_match_scheduler(comps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = spec_of(comps["wan2.1-t2v"], flow_shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    grid = torch.from_numpy(np.linspace(scheduler.sigma_max, scheduler.sigma_min, 10))  # the grid it shifts
    torch.testing.assert_close(shift_sigmas(grid, shift).float(), scheduler.sigmas[:-1], atol=1e-6, rtol=1e-6)
    x0 = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for sigma, t in zip(scheduler.sigmas[:-1], scheduler.timesteps):
        draw = spec.draw_at(noise, sigma.view(1))
        torch.testing.assert_close(draw.timesteps, t.view(1), atol=1e-3, rtol=0)
        torch.testing.assert_close(spec.noisy(x0, draw), scheduler.scale_noise(x0, t.view(1), noise), atol=1e-6,
                                   rtol=1e-6)
        assert torch.equal(spec.target(x0, draw), noise - x0)


@pytest.mark.parametrize("density", ["uniform", "logit_normal"])
def test_sigma_density_and_expert_ranges(comps, density):
    c = comps["wan2.2-t2v-a14b"]
    latents = torch.zeros(4000, 1, 1, 1, 1)
    for experts in (EXPERTS, ("high_noise",), ("low_noise",)):
        spec = spec_of(c, experts=experts, sigma_density=density, logit_mean=0.3, logit_std=0.8)
        draw = spec.draw_noise(latents, torch.Generator().manual_seed(0))
        t = draw.timesteps
        if experts == ("high_noise",):
            assert (t >= 875).all() and draw.experts is None
        elif experts == ("low_noise",):
            assert (t < 875).all() and draw.experts is None
        else:
            assert torch.equal(draw.experts, (t < 875).long()) and 0 < draw.experts.float().mean() < 1
            u = draw.sigmas.double() / (3.0 - 2.0 * draw.sigmas.double())  # unshift
            if density == "uniform":  # u uniform on (0, 1): mean 1/2, variance 1/12
                assert abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.01
            else:  # logit(u) ~ N(0.3, 0.8)
                logit = torch.logit(u)
                assert abs(logit.mean() - 0.3) < 0.05 and abs(logit.std() - 0.8) < 0.05
    # both experts together cover both sides of the boundary with the density's own split
    spec = spec_of(c, sigma_density=density, logit_mean=0.3, logit_std=0.8)
    share = float(spec.draw_noise(latents, torch.Generator().manual_seed(1)).experts.eq(0).float().mean())
    lo, _ = spec_of(c, experts=("high_noise",), sigma_density=density, logit_mean=0.3, logit_std=0.8).sigma_range()
    assert abs(share - (1 - lo)) < 0.03


def captured_inputs(transformer):
    """Records the keyword inputs of every call of ``transformer``."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("variant", list(tiny_wan.VARIANTS))
def test_transformer_inputs_equal_the_pipelines(comps, variant):
    """One pipeline run (flow-match Euler, no CFG, given initial latents) and the spec's predict at the same σ
    hand each transformer the same inputs: hidden states (mask + condition channels, TI2V's first frame in place),
    timesteps (TI2V: per token, 0 on the first frame), text and image embeddings, and the same expert."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = dict(comps[variant])
    c["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    spec = spec_of(c)
    image_conditioned = spec.image_conditioned
    pipe = (diffusers.WanImageToVideoPipeline if image_conditioned else diffusers.WanPipeline)(**c)
    transformers = [c["transformer"]] + ([c["transformer_2"]] if "transformer_2" in c else [])
    z = c["vae"].config.z_dim
    h = 32 // c["vae"].config.scale_factor_spatial
    start = torch.randn(1, z, 3, h, h, generator=torch.Generator().manual_seed(4))
    image, tensor = first_frame()
    records = [captured_inputs(t) for t in transformers]
    kwargs = dict(image=image) if image_conditioned else {}
    pipe(prompt=PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
         latents=start.clone(), output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    theirs = [list(calls) for calls, _ in records]
    text = spec.tokenize(PROMPT)
    batch = {k: v[None] for k, v in text.items()}
    if image_conditioned:
        batch["first_frame"] = tensor
    condition = spec.condition(batch, torch.Generator(), start)
    for step, sigma in enumerate(c["scheduler"].sigmas[:2]):
        expert = int(len(transformers) == 2 and sigma * 1000 < 1000 * c["boundary_ratio"])
        source = theirs[expert][0 if len(transformers) == 2 else step]
        noisy = source["hidden_states"][:, :z]  # the pipeline's latents at this step (TI2V: frame 0 is replaced)
        with torch.no_grad():
            spec.predict(noisy, condition, spec.draw_at(torch.zeros_like(noisy), sigma.view(1)))
        ours = records[expert][0][-1]
        for key in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image"):
            a, b = ours.get(key), source.get(key)
            assert (a is None) == (b is None), key
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=key)
        assert torch.equal(ours["timestep"].float(), source["timestep"].float())
        if spec.ti2v:
            tokens = (h // 2) ** 2
            assert ours["timestep"].shape == (1, 3 * tokens) and (ours["timestep"][0, :tokens] == 0).all()
    assert [len(t) for t in theirs] == ([1, 1] if len(transformers) == 2 else [2])  # both experts ran once
    for _, handle in records:
        handle.remove()


def test_two_experts_each_get_their_rows(comps):
    """Rows of one batch on both sides of the boundary: each expert sees exactly its rows, in order."""
    c = comps["wan2.2-t2v-a14b"]
    spec = spec_of(c)
    noisy = torch.randn(3, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 512, 32, generator=torch.Generator().manual_seed(1))
    draw = spec.draw_at(torch.zeros_like(noisy), torch.tensor([0.95, 0.2, 0.9]))
    assert draw.experts.tolist() == [0, 1, 0]
    with torch.no_grad():
        out = spec.predict(noisy, {"text": text}, draw)
        high = c["transformer"](hidden_states=noisy[[0, 2]], timestep=draw.timesteps[[0, 2]],
                                encoder_hidden_states=text[[0, 2]], return_dict=False)[0]
        low = c["transformer_2"](hidden_states=noisy[[1]], timestep=draw.timesteps[[1]],
                                 encoder_hidden_states=text[[1]], return_dict=False)[0]
    torch.testing.assert_close(out[[0, 2]], high, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[[1]], low, atol=1e-6, rtol=1e-6)


def test_ti2v_error_counts_the_generated_frames_only(comps):
    spec = spec_of(comps["wan2.2-ti2v"])
    pred, target = torch.zeros(2, 8, 3, 2, 2), torch.zeros(2, 8, 3, 2, 2)
    target[:, :, 0] = 5.0  # the given first frame: not counted
    target[1, :, 1:] = 2.0
    assert spec.error(pred, target).tolist() == [0.0, 4.0]
    t2v = spec_of(comps["wan2.1-t2v"])
    assert t2v.error(pred, target).tolist() == pytest.approx([25 / 3, (25 + 8) / 3])


def test_folder_variants(tmp_path):
    from magicmirror_video.models.bases import detect_base
    from magicmirror_video.models.wan import folder_variant, missing_components

    names = {"wan2.1-t2v": "Wan2.1-T2V-24w", "wan2.1-i2v": "Wan2.1-I2V-24w", "wan2.2-ti2v": "Wan2.2-TI2V-24w",
             "wan2.2-t2v-a14b": "Wan2.2-T2V-A24w", "wan2.2-i2v-a14b": "Wan2.2-I2V-A24w"}
    for variant, name in names.items():
        folder = tiny_wan.build_model_folder(str(tmp_path / variant), variant)
        assert detect_base(folder) == "wan" and str(folder_variant(folder)) == name
        assert missing_components(folder) == []
    import shutil

    shutil.rmtree(tmp_path / "wan2.2-t2v-a14b" / "transformer_2")
    shutil.rmtree(tmp_path / "wan2.1-i2v" / "image_encoder")
    assert missing_components(str(tmp_path / "wan2.2-t2v-a14b")) == ["transformer_2"]
    assert missing_components(str(tmp_path / "wan2.1-i2v")) == ["image_encoder"]
