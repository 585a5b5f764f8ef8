"""Speed and memory options (``models/speed.py``): every one is a diffusers feature and equals diffusers' own pipeline
with the same feature enabled the same way; each composes with every method or is refused where it is recorded; none
outlives its run.

* **caches** (first-block, pyramid attention broadcast, FasterCache, TaylorSeer, mag): the pack's sampler with the
  option equals ``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline`` with ``transformer.enable_cache(<the same
  config, written out here by hand>)`` on an independent copy of the model (same seed), to 1e-5; each case is checked
  to actually skip work (the cached video differs from the uncached one); a zero threshold equals no cache bit for bit;
* **fp8 weight storage** equals the pipeline with ``enable_layerwise_casting(fp8, compute)``; **block offloading**
  equals the pipeline with ``enable_group_offload(block_level)``;
* **composition**: every method with every cache runs (DualReal: one α per step), a fresh one-way MagicMirror leaves
  a cached run bit-identical (its query-only face tokens with attention caches that skip the processor), CFG as two
  forwards keeps one cache state per pass, refused combinations are refused at the patch and at the Speed node;
* **the base model** (weights, hooks, attention processors, compiled calls, cache state) is unchanged after every
  option on a patched model, also after an interrupted run;
* **attention backends**: the dispatcher copy of CogVideoX's processor with ``native`` equals the original bit for bit;
  a backend whose package is missing is a clear error naming it; a model the kernel cannot run (device, dtype, head
  width) is refused at the node, at least wherever diffusers' own constraint checks refuse;
* **compile**: equals eager to 1e-4 (inductor, where the toolchain works); one graph serves every block and later runs;
  refused where fp8 casting or leaf-level offloading hooks cut the blocks into one graph per layer (measured), equal to
  eager with block-level offloading;
* **settings that cannot act** are refused in one line: an empty step range at the node, a range outside the run and
  mag ratios of another step count at the sampler before anything runs (each refused setting, run anyway, gives the
  uncached video bit for bit), a second Speed node on one model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import bundle_from_components
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from test_composition import MAKERS, lora_patch, mm_patch

from magicmirror_video.models.cogvideox import CogVideoXBundle, load_cogvideox
from magicmirror_video.models.placement import module_bytes
from magicmirror_video.models.sampler import sample_video
from magicmirror_video.models.speed import (
    AttentionBackendError,
    CogVideoXDispatchAttnProcessor,
    SpeedConflictError,
    SpeedOptions,
    SpeedSettingError,
)
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

PROMPT, NEGATIVE = "a man img is walking on the beach at sunset", "blurry, low quality"
STEPS = 6
KW = dict(num_frames=9, height=32, width=32, steps=STEPS, cfg=6.0, seed=1)
RATIOS = (1.0, 1.04, 1.02, 0.98, 1.01, 0.97)  # mag cache: made-up per-step ratios (none is exactly 1)
TAYLOR = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


def world(i2v=False, version="1.0"):
    c = tiny.build_components(i2v=i2v, version=version, num_layers=3)
    b = bundle_from_components(c)
    return b, encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)


def pipeline_latents(config_of, pos, neg, *, i2v=False, version="1.0", cfg=6.0, image=None):
    """diffusers' own pipeline on an independent copy of the tiny model with the cache ``config_of(pipe)`` enabled
    on its transformer, on the same prompt embeddings; latents as the pack's LATENT [B, C, T, H, W]."""
    c = tiny.build_components(i2v=i2v, version=version, num_layers=3)
    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline)(**c)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(config_of(pipe))
    extra = {"image": image.permute(0, 3, 1, 2)} if i2v else {}
    out = pipe(prompt_embeds=pos.embeds, negative_prompt_embeds=neg.embeds, height=32, width=32, num_frames=9,
               num_inference_steps=STEPS, guidance_scale=cfg, generator=torch.Generator().manual_seed(1),
               output_type="latent", **extra).frames
    return out.permute(0, 2, 1, 3, 4)


def documented_pab(pipe):  # diffusers' PAB docs, CogVideoX example
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(100, 800),
                                           current_timestep_callback=lambda: pipe.current_timestep)


def documented_faster(pipe, distilled=False):  # diffusers' FasterCache docs, CogVideoX example
    return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                             low_frequency_weight_update_timestep_range=(99, 641),
                             high_frequency_weight_update_timestep_range=(-1, 301),
                             spatial_attention_block_identifiers=["transformer_blocks"],
                             attention_weight_callback=lambda _: 0.3, tensor_format="BFCHW",
                             current_timestep_callback=lambda: pipe.current_timestep, is_guidance_distilled=distilled)


# (our options, the same cache written as diffusers' config); 6 DDIM steps: timesteps 999 833 666 499 333 166
CASES = {
    "first_block_0.2": (SpeedOptions("first_block_cache", threshold=0.2), lambda p: FirstBlockCacheConfig(0.2)),
    "first_block_0.35": (SpeedOptions("first_block_cache", threshold=0.35), lambda p: FirstBlockCacheConfig(0.35)),
    "pab_documented": (SpeedOptions("pyramid_attention_broadcast"), documented_pab),
    "pab_steps_1_to_5_every_3rd": (  # steps 1..4 = timesteps in (200, 900)
        SpeedOptions("pyramid_attention_broadcast", interval=3, start_step=1, end_step=5),
        lambda p: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3,
                                                  spatial_attention_timestep_skip_range=(200, 900),
                                                  current_timestep_callback=lambda: p.current_timestep)),
    "faster_documented": (SpeedOptions("faster_cache"), documented_faster),
    "taylorseer": (SpeedOptions("taylorseer", interval=2, start_step=2),
                   lambda p: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                                   taylor_factors_dtype=torch.float32, cache_identifiers=TAYLOR)),
    "mag": (SpeedOptions("mag_cache", threshold=0.1, interval=2, start_step=1, mag_ratios=RATIOS),
            lambda p: MagCacheConfig(threshold=0.1, max_skip_steps=2, retention_ratio=1 / STEPS,
                                     num_inference_steps=STEPS, mag_ratios=list(RATIOS))),
}


@pytest.fixture(scope="module")
def t2v():
    b, pos, neg = world()
    return b, pos, neg, sample_video(b, pos, neg, **KW)


@pytest.mark.parametrize("case", list(CASES))
def test_cache_equals_diffusers_pipeline_with_the_same_cache(t2v, case):
    b, pos, neg, uncached = t2v
    options, config_of = CASES[case]
    ours = sample_video(b.with_speed(options), pos, neg, **KW)
    torch.testing.assert_close(ours, pipeline_latents(config_of, pos, neg), atol=1e-5, rtol=0)
    assert (ours - uncached).abs().max() > 1e-4, "the cache skipped nothing: the comparison would prove nothing"
    assert not b.transformer.is_cache_enabled


@pytest.mark.parametrize("case", ["first_block_0.2", "faster_documented", "taylorseer"])
def test_cache_on_i2v_1_5_equals_diffusers_pipeline(case):
    b, pos, neg = world(i2v=True, version="1.5")
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    options, config_of = CASES[case]
    ours = sample_video(b.with_speed(options), pos, neg, **KW, image=image)
    ref = pipeline_latents(config_of, pos, neg, i2v=True, version="1.5", image=image)
    ref = ref[:, :, ref.shape[2] - ours.shape[2]:]  # (1.5's leading padding frame)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - sample_video(b, pos, neg, **KW, image=image)).abs().max() > 1e-4


def test_faster_cache_without_cfg_reuses_attention_only_as_diffusers_does(t2v):
    """Without CFG there are no negative rows to approximate: FasterCache runs as for a guidance-distilled model."""
    b, pos, neg, _ = t2v
    kw = dict(KW, cfg=1.0)
    ours = sample_video(b.with_speed(SpeedOptions("faster_cache")), pos, neg, **kw)
    ref = pipeline_latents(lambda p: documented_faster(p, distilled=True), pos, neg, cfg=1.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - sample_video(b, pos, neg, **kw)).abs().max() > 1e-4


@pytest.mark.parametrize("options", [SpeedOptions("first_block_cache", threshold=0.0),
                                     SpeedOptions("mag_cache", threshold=0.0, start_step=1, mag_ratios=RATIOS),
                                     SpeedOptions("pyramid_attention_broadcast", interval=1, start_step=1)],
                         ids=["first_block", "mag", "pab_every_step"])
def test_a_cache_that_may_skip_nothing_equals_no_cache(t2v, options):
    b, pos, neg, uncached = t2v
    assert torch.equal(sample_video(b.with_speed(options), pos, neg, **KW), uncached)


def test_mag_cache_without_ratios_calibrates_them(t2v):
    """No ratios: the run is diffusers' calibration run (every block computed: the uncached video) and reports the
    ratios; with them, the next run skips steps."""
    b, pos, neg, uncached = t2v
    out = {}
    assert torch.equal(sample_video(b.with_speed(SpeedOptions("mag_cache")), pos, neg, **KW, outputs=out), uncached)
    ratios = out["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    cached = sample_video(b.with_speed(SpeedOptions("mag_cache", threshold=0.5, start_step=1, mag_ratios=ratios)),
                          pos, neg, **KW)
    assert (cached - uncached).abs().max() > 1e-4


# ----------------------------------------------------------------------------------- weight storage, offloading


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("speed") / "tiny"
    tiny.build_model_folder(str(path), num_layers=3)
    return str(path)


def folder_pipeline(folder, prepare, pos, neg):
    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prepare(pipe.transformer)
    return pipe(prompt_embeds=pos.embeds, negative_prompt_embeds=neg.embeds, height=32, width=32, num_frames=9,
                num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator().manual_seed(1),
                output_type="latent").frames.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_all"])
def test_fp8_storage_equals_diffusers_layerwise_casting(folder, name):
    """The loader's weight_storage (what the node passes) against diffusers' own layerwise casting of the pipeline's
    transformer: the model method with CogVideoX's skip patterns, or for "_all" the hook function with ours."""
    from diffusers.hooks import apply_layerwise_casting

    from magicmirror_video.models.speed import ALL_LINEAR_SKIP_PATTERNS, WEIGHT_STORAGE, storage_skip_patterns

    storage = WEIGHT_STORAGE[name]
    b = load_cogvideox(folder, dtype=torch.float32, weight_dtype=storage,
                       weight_skip_patterns=storage_skip_patterns(name))
    t = b.transformer
    assert t.transformer_blocks[0].attn1.to_q.weight.dtype == storage and t.dtype == torch.float32
    for kept in (t.patch_embed.proj, t.proj_out):  # skipped by both
        assert kept.weight.dtype == torch.float32
    modulation = t.transformer_blocks[0].norm1.linear.weight.dtype  # CogVideoX's "norm" pattern, or fp8 too
    assert modulation == (storage if name.endswith("_all") else torch.float32)
    full = load_cogvideox(folder, dtype=torch.float32)
    assert module_bytes(t) < 0.5 * module_bytes(full.transformer)  # (a tiny model's norms weigh more)
    pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
    ours = sample_video(b, pos, neg, **KW)

    def cast(tr):
        if name.endswith("_all"):
            apply_layerwise_casting(tr, storage, torch.float32, skip_modules_pattern=ALL_LINEAR_SKIP_PATTERNS)
        else:
            tr.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)

    assert torch.equal(ours, folder_pipeline(folder, cast, pos, neg))
    assert (ours - sample_video(full, pos, neg, **KW)).abs().max() > 1e-4  # fp8 is not fp32


def test_block_offload_equals_diffusers_group_offloading(folder):
    b = load_cogvideox(folder, dtype=torch.float32, offload="block")
    assert b.placement.home(b.transformer) == "streamed"
    pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
    ref = folder_pipeline(folder, lambda tr: tr.enable_group_offload(torch.device("cpu"), offload_type="block_level",
                                                                     num_blocks_per_group=1), pos, neg)
    assert torch.equal(sample_video(b, pos, neg, **KW), ref)


def test_fp8_storage_with_block_offload_and_a_cache_equals_diffusers(folder):
    """The three stacked as diffusers documents them (layerwise casting, then group offloading, then the cache)."""
    options, config_of = CASES["first_block_0.2"]
    b = load_cogvideox(folder, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn, offload="block")
    pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)

    def prepare(tr):
        tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        tr.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
        tr.enable_cache(config_of(None))

    assert torch.equal(sample_video(b.with_speed(options), pos, neg, **KW), folder_pipeline(folder, prepare, pos, neg))


@pytest.mark.parametrize("mode", ["model", "sequential", "block"])
def test_cached_fp8_run_with_methods_is_the_same_in_every_offload_mode(mode):
    """fp8 storage + a cache + DualReal and a LoRA: every offload mode (its real machinery on the CPU) gives the video
    of offload "none" bit for bit."""
    out = []
    for offload in ("none", mode):
        c = tiny.build_components(num_layers=3)
        c["transformer"].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        b = CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                            tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                            dtype=torch.float32, device=torch.device("cpu"), offload=offload)
        pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
        model = b.with_patch(MAKERS["dualreal"](b)).with_patch(MAKERS["lora"](b))
        out.append(sample_video(model.with_speed(METHOD_CACHES["first_block"]), pos, neg, **KW))
        assert b.placement.mode == offload
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("mode", ["model", "sequential", "block"])
@pytest.mark.parametrize("version, i2v", [("1.0", False), ("1.5", True)], ids=["1.0-t2v", "1.5-i2v"])
def test_fp8_magicmirror_adapter_in_a_full_stack_is_the_same_in_every_offload_mode(mode, version, i2v):
    """fp8 storage of the transformer and of MagicMirror's adapter (stored as MagicMirror Apply stores it), with two
    reference faces, stacked with the subject reference, DualReal and a LoRA: every offload mode (its real machinery
    on the CPU) gives offload "none"'s video bit for bit, the adapter still stored in fp8 after the run."""
    from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorPatch
    from magicmirror_video.models.speed import store_adapter_like

    g = torch.Generator().manual_seed(4)
    two_faces = FaceEmbeds(torch.randn(2, 512, generator=g), torch.randn(2, 2, 256, generator=g),
                           torch.randn(2, 17, 64, generator=g))
    image = torch.rand(1, 32, 32, 3, generator=g) if i2v else None
    out = []
    for offload in ("none", mode):
        c = tiny.build_components(i2v=i2v, version=version, num_layers=3)
        c["transformer"].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        b = CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                            tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                            dtype=torch.float32, device=torch.device("cpu"), offload=offload)
        pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
        adapter = MAKERS["magicmirror"](b).adapter
        store_adapter_like(adapter, b.transformer)
        model = b.with_patch(MagicMirrorPatch(adapter, two_faces))
        for name in ("subject", "dualreal", "lora"):
            model = model.with_patch(MAKERS[name](b))
        out.append(sample_video(model, pos, neg, **KW, image=image))
        assert b.placement.mode == offload
        assert adapter.blocks["0"].ca_k.weight.dtype == torch.float8_e4m3fn
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], out[1])


def test_lora_on_fp8_weights_adds_exactly_its_delta():
    """LoRA hooks fire after diffusers' casting hook: they see the compute-dtype input and output, whatever the
    storage; the LoRA adds scale * up(down(x)) to the fp8-stored layer's output."""
    b = bundle_from_components(tiny.build_components(num_layers=2))
    b.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    patch = lora_patch(b, ["to_q"], 3, "q")
    target = b.transformer.transformer_blocks[0].attn1.to_q
    layer = patch.lora.layers["transformer_blocks.0.attn1.to_q"]
    x = torch.randn(1, 5, target.in_features)
    plain = target(x)
    from magicmirror_video.models.patches import SamplingContext

    undo = patch.apply(b.transformer, SamplingContext(device=torch.device("cpu"), dtype=torch.float32))
    try:
        with_lora = target(x)
    finally:
        undo()
    assert target.weight.dtype == torch.float8_e4m3fn and with_lora.dtype == torch.float32
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.down), layer.up) * layer.scale
    torch.testing.assert_close(with_lora - plain, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["lora", "regdpo_lora", "magicmirror", "magicmirror_one_way", "dualreal", "subject",
                                  "full_stack"])
def test_fp8_storage_with_every_method(folder, name):
    b = load_cogvideox(folder, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
    weights = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    base = sample_video(b, pos, neg, **KW)
    names = ("magicmirror", "subject", "dualreal", "lora") if name == "full_stack" else (name,)
    model = b
    for n in names:
        model = model.with_patch(MAKERS[n](b))
    out = {}
    x = sample_video(model, pos, neg, **KW, outputs=out)
    assert torch.isfinite(x).all() and (x - base).abs().max() > 1e-3
    if "dualreal" in names:
        assert out["dualreal_alpha"].shape == (STEPS, 1)
    assert_intact(b, weights, pos, neg, base)


# ------------------------------------------------------------------------------------------------ composition


def assert_intact(b, weights, pos, neg, base, processors=None):
    """The base model as before: weights, no leftover hooks, the runner's hooks alone on the blocks and the
    transformer, the original attention processors, eager blocks, no cache, and the same video."""
    t = b.transformer
    assert all(torch.equal(v, weights[k]) for k, v in t.state_dict().items())
    assert not [n for n, m in t.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert all(blk._diffusers_hook._hook_order == ["magicmirror_video.block_runner"] for blk in t.transformer_blocks)
    assert t._diffusers_hook._hook_order == ["magicmirror_video.block_runner.forward"]
    assert all(type(blk.attn1.processor) is CogVideoXAttnProcessor2_0 for blk in t.transformer_blocks)
    if processors is not None:
        assert [blk.attn1.processor for blk in t.transformer_blocks] == processors
    assert all(blk._compiled_call_impl is None for blk in t.transformer_blocks)
    assert not t.is_cache_enabled and "_repeated_blocks" not in t.__dict__
    assert torch.equal(sample_video(b, pos, neg, **KW), base)


def allowed(options: SpeedOptions, stack: tuple) -> bool:
    if options.cache in ("pyramid_attention_broadcast", "faster_cache") and "magicmirror" in stack:
        return False
    if options.cache == "mag_cache" and "dualreal" in stack:
        return False
    return not (options.compile and {"magicmirror", "magicmirror_one_way", "subject", "dualreal"} & set(stack))


METHOD_CACHES = {"first_block": SpeedOptions("first_block_cache", threshold=0.3),
                 "pab": SpeedOptions("pyramid_attention_broadcast", start_step=1),
                 "faster": SpeedOptions("faster_cache", start_step=1),
                 "taylorseer": SpeedOptions("taylorseer", interval=2, start_step=1),
                 "mag": SpeedOptions("mag_cache", threshold=0.5, start_step=1, mag_ratios=RATIOS)}
METHODS = ["lora", "magicmirror", "magicmirror_one_way", "dualreal", "subject"]


@pytest.fixture(scope="module")
def composed():
    b, pos, neg = world()
    weights = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    return b, pos, neg, weights, sample_video(b, pos, neg, **KW)


@pytest.mark.parametrize("cache", list(METHOD_CACHES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_every_cache_runs_or_is_refused_where_recorded(composed, method, cache):
    b, pos, neg, weights, base = composed
    options, patch = METHOD_CACHES[cache], MAKERS[method](b)
    if not allowed(options, (method,)):
        with pytest.raises(SpeedConflictError, match=r"cannot act"):
            b.with_patch(patch).with_speed(options)  # the Speed node after the patch node
        with pytest.raises(SpeedConflictError, match=r"cannot act"):
            b.with_speed(options).with_patch(patch)  # ... or before it
        return
    uncached = sample_video(b.with_patch(patch), pos, neg, **KW)
    out = {}
    cached = sample_video(b.with_patch(patch).with_speed(options), pos, neg, **KW, outputs=out)
    assert torch.isfinite(cached).all() and (cached - uncached).abs().max() > 1e-4
    assert torch.equal(sample_video(b.with_speed(options).with_patch(patch), pos, neg, **KW), cached)  # node order
    if method == "dualreal":  # the StageBlender ran at every step (block 0 is never skipped by these caches)
        assert out["dualreal_alpha"].shape == (STEPS, 1)
    assert_intact(b, weights, pos, neg, base)


@pytest.mark.parametrize("method, cache, said", [
    ("subject", "first_block", "the subject reference tokens are skipped with every other token"),
    ("magicmirror_one_way", "mag", "MagicMirror's face tokens are skipped with every other token"),
    ("magicmirror", "taylorseer", "hold MagicMirror's face tokens' attention of the step that computed them"),
    ("subject", "faster", "hold the subject reference tokens' attention"),
    ("dualreal", "first_block", "block 0 always runs"),
    ("lora", "first_block", None), ("dualreal", "taylorseer", None)])
def test_a_cached_run_says_what_it_skips_of_each_method(composed, method, cache, said, caplog):
    """A cache that skips a method's tokens (or reuses their attention) says so in the run's log; methods it does not
    touch get no line."""
    b, pos, neg, _, _ = composed
    with caplog.at_level("INFO", logger="magicmirror_video.models.sampler"):
        sample_video(b.with_patch(MAKERS[method](b)).with_speed(METHOD_CACHES[cache]), pos, neg, **KW)
    lines = [r.getMessage() for r in caplog.records if r.name == "magicmirror_video.models.sampler"]
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and said in lines[0], lines


@pytest.mark.parametrize("cache", ["first_block", "pab", "faster", "taylorseer", "mag"])
def test_fresh_one_way_magicmirror_leaves_a_cached_run_bit_identical(composed, cache):
    """A zero-initialised one-way adapter adds exactly nothing, with any cache: its face tokens (which only query the
    joint attention) are computed on the cached steps too — with keys and values recomputed where an attention cache
    skipped the processor — and FasterCache's positive-only forwards give the identity to the right row."""
    b, pos, neg, _, _ = composed
    options = METHOD_CACHES[cache]
    cached = sample_video(b.with_speed(options), pos, neg, **KW)
    fresh = mm_patch(b, "one-way", fresh=True)
    assert torch.equal(sample_video(b.with_patch(fresh).with_speed(options), pos, neg, **KW), cached)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitCfg:
    """A patch that changes nothing but asks for CFG's negative prompt as a forward of its own (as MagicMirror's
    two-way form does)."""

    name: str = "split-cfg"
    conditional_only: bool = True

    def apply(self, transformer, context=None):
        return lambda: None


@pytest.mark.parametrize("cache", ["taylorseer", "mag"])
def test_cfg_as_two_forwards_keeps_one_cache_state_per_pass(composed, cache):
    """Caches with a step schedule decide the same in both forms, so the unchanged model run with CFG as two forwards
    (contexts "uncond" / "cond") equals the batched run (one "cond_uncond" context) — it would not if the two passes
    shared one state (each pass would consume the other's steps and predictions)."""
    b, pos, neg, _, _ = composed
    options = METHOD_CACHES[cache]
    batched = sample_video(b.with_speed(options), pos, neg, **KW)
    split = sample_video(b.with_patch(SplitCfg()).with_speed(options), pos, neg, **KW)
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=0)


def test_two_way_magicmirror_with_a_zero_threshold_cache_is_exact(composed):
    b, pos, neg, _, _ = composed
    model = b.with_patch(mm_patch(b))
    uncached = sample_video(model, pos, neg, **KW)
    assert torch.equal(sample_video(model.with_speed(SpeedOptions("first_block_cache", threshold=0.0)), pos, neg, **KW),
                       uncached)


def test_faster_cache_hands_the_block_runner_the_rows_it_computes(composed, monkeypatch):
    """FasterCache's denoiser hook drops CFG's negative rows on the steps it approximates them; the runner's
    per-forward state starts inside it, so it sees those forwards as positive-only."""
    from magicmirror_video.models.block_runner import BlockRunner

    b, pos, neg, _, _ = composed
    seen, begin = [], BlockRunner._begin

    def spy(self, module, args, kwargs):
        args, kwargs = begin(self, module, args, kwargs)
        seen.append((kwargs["hidden_states"].shape[0], kwargs["attention_kwargs"]["_mmv_forward"].roles))
        return args, kwargs

    monkeypatch.setattr(BlockRunner, "_begin", spy)
    sample_video(b.with_patch(MAKERS["dualreal"](b)).with_speed(SpeedOptions("faster_cache", start_step=1)), pos, neg,
                 **KW)
    assert (2, ("negative", "positive")) in seen and (1, ("positive",)) in seen
    assert all(rows == len(roles) for rows, roles in seen) and len(seen) == STEPS


@pytest.mark.parametrize("options", [*METHOD_CACHES.values(), SpeedOptions(compile=True, compile_backend="eager")],
                         ids=[*METHOD_CACHES, "compile"])
def test_options_on_a_patched_model_leave_the_base_model_intact(composed, options):
    b, pos, neg, weights, base = composed
    processors = [blk.attn1.processor for blk in b.transformer.transformer_blocks]
    stack = [n for n in ("magicmirror", "magicmirror_one_way", "subject", "dualreal", "lora")
             if allowed(options, (n,)) and not (n == "magicmirror_one_way" and allowed(options, ("magicmirror",)))]
    model = b
    for name in stack:
        model = model.with_patch(MAKERS[name](b))
    model = model.with_speed(options)
    sample_video(model, pos, neg, **KW)
    assert_intact(b, weights, pos, neg, base, processors)

    def cancel(info):
        if info.step == 3:
            raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        sample_video(model, pos, neg, **KW, callback=cancel)
    assert_intact(b, weights, pos, neg, base, processors)


def test_the_input_bundle_is_unchanged_by_the_speed_node(composed):
    from magicmirror_video.nodes.cogvideox import CogVideoXSpeed

    b = composed[0]
    (fast,) = CogVideoXSpeed().apply(b, "taylorseer", -1.0, 3, 2, -1, False, "native")
    assert b.speed is None and fast.transformer is b.transformer
    assert fast.speed == SpeedOptions("taylorseer", interval=3, start_step=2)  # -1: diffusers' default
    (mag,) = CogVideoXSpeed().apply(b, "mag_cache", 0.1, -1, -1, -1, False, "native", "[1.0, 0.98, 1.01]")
    assert mag.speed.mag_ratios == (1.0, 0.98, 1.01) and mag.speed.threshold == 0.1
    with pytest.raises(SpeedConflictError, match="MagicMirror's two-way face attention"):
        CogVideoXSpeed().apply(b.with_patch(mm_patch(b)), "pyramid_attention_broadcast", -1.0, -1, -1, -1, False,
                               "native")


# ---------------------------------------------------------------------------------------------- attention backends


def test_native_dispatch_processor_equals_cogvideox_processor(composed):
    b, pos, neg, _, _ = composed
    attn = b.transformer.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 24, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    from magicmirror_video.models.sampler import rotary_embeddings

    rope = rotary_embeddings(b.transformer, 32, 48, 4, 8, "cpu")  # 4 latent frames x 2 x 3 patches = 24 tokens
    original = CogVideoXAttnProcessor2_0()(attn, hidden, text, image_rotary_emb=rope)
    dispatched = CogVideoXDispatchAttnProcessor()
    from diffusers.models.attention_dispatch import AttentionBackendName

    dispatched._attention_backend = AttentionBackendName.NATIVE
    ours = dispatched(attn, hidden, text, image_rotary_emb=rope)
    assert all(torch.equal(a, c) for a, c in zip(ours, original))


def test_the_dispatcher_route_with_native_and_every_method_is_bit_identical(composed):
    """The route the other backends take (the dispatcher copy of the processor on every block, set for the run and
    removed after it), with ``native``: every method, stacked, gives the video of CogVideoX's own processor (the
    ``native`` option itself keeps CogVideoX's own processor: nothing to swap)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from magicmirror_video.models.speed import _use_attention_backend

    b, pos, neg, _, _ = composed
    processors = [blk.attn1.processor for blk in b.transformer.transformer_blocks]
    active = _AttentionBackendRegistry.get_active_backend()[0]
    for stack in (("magicmirror", "subject", "dualreal", "lora"), ("magicmirror_one_way",)):  # (one-way: the query-
        model = b  # only face stream reads the keys the processor computed)
        for name in stack:
            model = model.with_patch(MAKERS[name](b))
        expected = sample_video(model, pos, neg, **KW)
        undo = _use_attention_backend(b.transformer, "native")
        try:
            assert all(type(blk.attn1.processor) is CogVideoXDispatchAttnProcessor
                       and blk.attn1.processor._attention_backend.value == "native"
                       for blk in b.transformer.transformer_blocks)
            assert torch.equal(sample_video(model, pos, neg, **KW), expected)
        finally:
            undo()
        assert [blk.attn1.processor for blk in b.transformer.transformer_blocks] == processors
    assert _AttentionBackendRegistry.get_active_backend()[0] == active  # never diffusers' process-wide backend


@pytest.mark.parametrize("backend, package, module", [("flash", "flash-attn", "flash_attn"),
                                                      ("sage", "sageattention", "sageattention"),
                                                      ("xformers", "xformers", "xformers")])
def test_a_backend_without_its_package_is_a_clear_error_at_the_node(composed, backend, package, module):
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed here")
    from magicmirror_video.nodes.cogvideox import CogVideoXSpeed

    with pytest.raises(AttentionBackendError, match=rf"needs the {package} package.*pip install {package}"):
        CogVideoXSpeed().apply(composed[0], "none", -1.0, -1, -1, -1, False, backend)


# ------------------------------------------------------------------------------------------------------- compile


def compiler_works() -> str | None:
    """None if inductor compiles on this machine, else why not."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)
        fn(torch.randn(4))
    except Exception as e:  # no C++ compiler, no Python headers, ...
        return f"torch.compile (inductor) cannot build here: {type(e).__name__}: {str(e)[:200]}"
    return None


def test_compile_equals_eager(composed):
    reason = compiler_works()
    if reason:
        pytest.skip(reason)
    b, pos, neg, _, _ = composed
    model = b.with_patch(MAKERS["lora"](b))
    kw = dict(KW, steps=2)
    eager = sample_video(model, pos, neg, **kw)
    compiled = sample_video(model.with_speed(SpeedOptions(compile=True)), pos, neg, **kw)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert all(blk._compiled_call_impl is None for blk in b.transformer.transformer_blocks)


def graphs_of(model, pos, neg, runs=2) -> list:
    """torch._dynamo's compiled-graph count after each of ``runs`` sampling runs (eager backend: tracing only)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = []
    for _ in range(runs):
        sample_video(model, pos, neg, **dict(KW, steps=3))
        out.append(counters["stats"]["unique_graphs"])
    return out


@pytest.mark.parametrize("stack", [(), ("lora",), ("first_block",), ("taylorseer",), ("pab",), ("lora", "faster")],
                         ids=lambda s: "+".join(s) or "base")
def test_compile_shares_one_graph_between_blocks_and_runs(stack):
    """diffusers' regional compile pays off only if every block reuses one compiled graph: the graph count does not
    grow with the number of blocks, nor with later runs."""
    counts = []
    for layers in (4, 6):  # (both have middle blocks: first-block cache hooks head, middle and tail blocks apart)
        b = bundle_from_components(tiny.build_components(num_layers=layers))
        pos, neg = encode_prompt(b, PROMPT, trigger="img"), encode_prompt(b, NEGATIVE)
        cache = [METHOD_CACHES[s] for s in stack if s in METHOD_CACHES]
        options = dataclasses.replace(cache[0] if cache else SpeedOptions(), compile=True, compile_backend="eager")
        model = b
        for name in stack:
            if name in MAKERS:
                model = model.with_patch(MAKERS[name](b))
        counts.append(graphs_of(model.with_speed(options), pos, neg))
    assert counts[0] == counts[1], counts  # 4 or 6 blocks: the same graphs
    if not any(s in METHOD_CACHES for s in stack):  # (a cache's skip path may first be taken in the second run)
        assert counts[0][0] == counts[0][1], counts  # the second run compiles nothing


@pytest.mark.parametrize("method", ["magicmirror", "subject", "dualreal"])
def test_compile_with_a_method_is_refused_because_it_recompiles(composed, method, monkeypatch):
    b, pos, neg, _, _ = composed
    with pytest.raises(SpeedConflictError, match="compile cannot act with .*one graph per block"):
        b.with_patch(MAKERS[method](b)).with_speed(SpeedOptions(compile=True))
    # what the refusal avoids: with the check skipped, the method makes dynamo compile graph after graph
    import magicmirror_video.models.sampler as sampler

    monkeypatch.setattr(sampler, "check_speed", lambda *a: [])
    # (nor does the compiled block run the pre-hook that adds MagicMirror's cross-attention, which the block runner
    # refuses; let it run here to count the graphs)
    import magicmirror_video.models.block_runner as runner_module

    monkeypatch.setattr(runner_module, "_check_output_projection_ran", lambda *a: None)
    options = SpeedOptions(compile=True, compile_backend="eager")
    base = graphs_of(b.with_speed(options), pos, neg)
    streams = graphs_of(dataclasses.replace(b.with_patch(MAKERS[method](b)), speed=options), pos, neg)
    assert streams[-1] > base[-1], (streams, base)


# ------------------------------------------------------------------------------------- settings that cannot act


def speed_node(model, cache="none", *, threshold=-1.0, interval=-1, start_step=-1, end_step=-1, compile=False,
               attention="native", mag_ratios=""):
    from magicmirror_video.nodes.cogvideox import CogVideoXSpeed

    return CogVideoXSpeed().apply(model, cache, threshold, interval, start_step, end_step, compile, attention,
                                  mag_ratios)[0]


@pytest.mark.parametrize("cache, start, end", [("pyramid_attention_broadcast", 10, 5), ("faster_cache", 4, 4),
                                               ("taylorseer", -1, 2), ("pyramid_attention_broadcast", -1, 0)])
def test_an_empty_step_range_is_refused_at_the_speed_node(composed, cache, start, end):
    """start_step >= end_step (taylorseer's default start is step 3) leaves no step that may reuse the cache."""
    with pytest.raises(SpeedSettingError, match=rf"^{cache}: start_step \d+.* and end_step {end} leave no step to "
                                                r"cache .*set end_step above start_step, or -1"):
        speed_node(composed[0], cache, start_step=start, end_step=end)
    speed_node(composed[0], cache, start_step=start, end_step=max(start, 3) + 1)  # a range with a step: accepted


# (settings, the sampler's refusal): each acts on no step of the run (KW: 6 DDIM steps)
NO_STEP = {
    "faster_start_past_the_steps": (SpeedOptions("faster_cache", start_step=30), r"faster_cache caches no step of this "
                                    r"6-step run: none of its timesteps \(999 to 166\) lies in the cached range"),
    "pab_start_past_the_steps": (SpeedOptions("pyramid_attention_broadcast", start_step=6, interval=2),
                                 r"pyramid_attention_broadcast caches no step of this 6-step run"),
    "taylorseer_start_past_the_steps": (SpeedOptions("taylorseer", interval=2, start_step=6),
                                        r"taylorseer caches no step of this 6-step run: start_step 6 is past its last "
                                        r"step \(5\)"),
    "mag_start_past_the_steps": (SpeedOptions("mag_cache", threshold=0.5, start_step=6, mag_ratios=RATIOS),
                                 r"mag_cache caches no step of this 6-step run: start_step 6 is past"),
}


@pytest.mark.parametrize("case", list(NO_STEP))
def test_a_step_range_outside_the_run_is_refused_before_sampling(t2v, case, monkeypatch):
    """Refused by the sampler before anything runs (no transformer forward); what the refusal avoids: the same run with
    the check skipped is the uncached video bit for bit (diffusers' hooks reuse nothing), while a start one step
    earlier does change the video."""
    from magicmirror_video.models import sampler

    b, pos, neg, uncached = t2v
    options, said = NO_STEP[case]
    calls = []
    hook = b.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(SpeedSettingError, match=said + r".*Set start_step below"):
            sample_video(b.with_speed(options), pos, neg, **KW)
    finally:
        hook.remove()
    assert calls == []
    with monkeypatch.context() as m:
        m.setattr(sampler, "check_steps", lambda *a: None)
        assert torch.equal(sample_video(b.with_speed(options), pos, neg, **KW), uncached)
    earlier = dataclasses.replace(options, start_step=2 if options.cache == "faster_cache" else 4)
    assert (sample_video(b.with_speed(earlier), pos, neg, **KW) - uncached).abs().max() > 1e-4


def test_pab_default_range_on_a_one_step_run_is_refused(t2v):
    """The documented timestep range (100, 800) holds no timestep of a 1-step run (timestep 999)."""
    b, pos, neg, _ = t2v
    with pytest.raises(SpeedSettingError, match=r"none of its timesteps \(999 to 999\) lies in the cached range "
                                                r"\(100, 800\)"):
        sample_video(b.with_speed(SpeedOptions("pyramid_attention_broadcast")), pos, neg, **dict(KW, steps=1))


def test_mag_ratios_of_another_step_count_are_refused_at_the_sampler(t2v):
    """One ratio per step: 2 ratios for 6 steps are refused before sampling with the fix named (diffusers would
    stretch them over the steps by nearest-neighbour interpolation, ratios of no step of this run)."""
    b, pos, neg, _ = t2v
    model = speed_node(b, "mag_cache", threshold=0.5, start_step=1, mag_ratios="1.0, 0.98")  # (the node cannot know)
    with pytest.raises(SpeedSettingError, match=r"^mag_ratios has 2 values but this run has 6 steps: mag_cache needs "
                                                r"the ratio of each step\. Calibrate at 6 steps .* or sample with 2 "
                                                r"steps\.$"):
        sample_video(model, pos, neg, **KW)
    sample_video(model, pos, neg, **dict(KW, steps=2))  # the count they were calibrated for


def test_a_second_speed_node_is_refused(composed):
    """One Speed node per model (a second would silently replace the first): refused naming what is recorded, also
    with a patch node in between; a Speed node on the loader's model again (another branch) is fine."""
    b = composed[0]
    fast = speed_node(b, "first_block_cache", threshold=0.3)
    for model in (fast, fast.with_patch(MAKERS["lora"](b))):
        with pytest.raises(SpeedSettingError, match=r"^this model already has speed options \(cache='first_block_cache'"
                                                    r", threshold=0\.3\): use one Speed node per model"):
            speed_node(model, "taylorseer")
    assert speed_node(b, "taylorseer").speed == SpeedOptions("taylorseer")


# ------------------------------------------------------------------- attention backend limits, compile with hooks


@pytest.mark.parametrize("backend", ["flash", "sage", "xformers"])
def test_backend_limits_refuse_what_diffusers_own_constraints_refuse(backend):
    """diffusers registers constraints with each backend (checked only with DIFFUSERS_ATTN_CHECKS): run them on small
    q/k/v of each dtype; whatever they refuse, the node refuses too (ours are stricter where the kernels are: flash on
    a CPU tensor passes diffusers' same-device check but has no CPU kernel)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from magicmirror_video.models.speed import ATTENTION_BACKENDS, attention_backend_problem

    constraints = _AttentionBackendRegistry._constraints[AttentionBackendName(ATTENTION_BACKENDS[backend][0])]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.zeros(1, 4, 2, 64, dtype=dtype)
        refused_by_diffusers = []
        for check in constraints:
            try:
                check(query=q, key=q, value=q, attn_mask=None, is_causal=False)
            except ValueError as e:
                refused_by_diffusers.append(str(e))
        ours = attention_backend_problem(backend, device=q.device, dtype=dtype, head_dim=64)
        if refused_by_diffusers:
            assert ours is not None, (backend, dtype, refused_by_diffusers)
        assert ours is not None and "this model runs on cpu" in ours  # none of the three has CPU kernels
        # on a CUDA device only the dtype is left to refuse (no GPU needed to ask: the capability is read when present)
        on_gpu = attention_backend_problem(backend, device=torch.device("cuda"), dtype=dtype, head_dim=64)
        if not torch.cuda.is_available():
            assert (on_gpu is not None) == (backend != "xformers" and dtype == torch.float32), (backend, dtype, on_gpu)


@pytest.mark.parametrize("backend, head_dim, said", [
    ("flash", 128, None), ("flash", 256, None), ("flash", 320, "flash-attn takes attention heads up to 256 wide and "
                                                               "this model's are 320"),
    ("sage", 128, None), ("sage", 192, "SageAttention takes attention heads up to 128 wide"), ("xformers", 512, None)])
def test_backend_head_width_limits(backend, head_dim, said):
    from magicmirror_video.models.speed import attention_backend_problem

    if torch.cuda.is_available():
        pytest.skip("the capability of this machine's GPU would be checked too")
    problem = attention_backend_problem(backend, device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=head_dim)
    assert problem == said if said is None else said in problem


def test_a_backend_the_model_cannot_run_is_refused_at_the_node_in_one_line(composed, monkeypatch):
    """With the package present (its check skipped here: none of them is installed), the tiny CPU fp32 model is
    refused by flash at the Speed node, before any model runs, in one line naming the device and the way out."""
    from magicmirror_video.models import speed

    monkeypatch.setattr(speed, "_check_installed", lambda name: None)
    with pytest.raises(AttentionBackendError, match=r"^attention backend 'flash' cannot run this model: flash-attn "
                                                    r"has kernels for CUDA \(or ROCm\) GPUs only and this model runs "
                                                    r"on cpu \(or use attention 'native'\)\.$"):
        speed_node(composed[0], attention="flash")


def hooked_bundle(hooks: str, layers: int = 3):
    """A tiny bundle whose transformer carries diffusers hooks: fp8 layerwise casting ("fp8") or the offload modes'
    group offloading ("block", "sequential")."""
    c = tiny.build_components(num_layers=layers)
    if hooks == "fp8":
        c["transformer"].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                           tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=torch.float32,
                           device=torch.device("cpu"), offload=hooks if hooks in ("block", "sequential") else "none")


def block_graphs(bundle) -> int:
    """dynamo's graph count for one transformer forward with the blocks compiled (eager backend: tracing only)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from magicmirror_video.models.speed import _compile_blocks

    t = bundle.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, t.config.in_channels, 4, 4, generator=g)
    text = torch.randn(2, 7, t.config.text_embed_dim, generator=g)
    torch._dynamo.reset()
    counters.clear()
    undo = _compile_blocks(t, "eager")
    try:
        with torch.no_grad(), bundle.placement.run(t):
            t(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500, 500]), return_dict=False)
    finally:
        undo()
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("hooks, said", [("fp8", "compile cannot act on weights stored in float8_e4m3fn"),
                                         ("sequential", "compile cannot act with offload 'sequential'")])
def test_compile_is_refused_where_hooks_cut_the_blocks_into_one_graph_per_layer(hooks, said):
    """fp8 layerwise casting recasts each layer's weights in a hook dynamo does not trace, leaf-level group offloading
    moves each layer in a torch.compiler.disable'd call: refused at the Speed node. What the refusal avoids (measured):
    the compiled block is cut into at least one graph per linear layer, against one graph without the hooks."""
    b = hooked_bundle(hooks)
    with pytest.raises(SpeedConflictError, match=said):
        speed_node(b, compile=True)
    linears = sum(isinstance(m, torch.nn.Linear) for m in b.transformer.transformer_blocks[0].modules())
    plain = block_graphs(hooked_bundle("none"))
    assert block_graphs(b) >= plain + linears, (block_graphs(b), plain, linears)


def test_compile_with_block_offload_works(t2v):
    """Block-level group offloading moves whole blocks around the compiled block bodies: accepted; the compiled block
    stays one graph (the transfers add the graph breaks at the block's entry and exit only, for any block count), and
    the video is the eager one."""
    _, pos, neg, _ = t2v
    plain = block_graphs(hooked_bundle("none"))
    assert [block_graphs(hooked_bundle("block", layers)) for layers in (3, 5)] == [plain + 2] * 2
    b = hooked_bundle("block")
    assert speed_node(b, compile=True).speed == SpeedOptions(compile=True)
    kw = dict(KW, steps=2)
    eager = sample_video(b, pos, neg, **kw)
    compiled = sample_video(b.with_speed(SpeedOptions(compile=True, compile_backend="eager")), pos, neg, **kw)
    assert torch.equal(compiled, eager)
