"""Methods compose: one block runner for every run, every method stackable in any order.

* With nothing registered the runner is bit-identical to the unmodified diffusers transformer (T2V/I2V,
  1.0/1.5), and the attention goes through the model's own processor.
* Each supported pair and the full stack run in both orders with the same result; a zero-initialised
  method (MagicMirror's one-way form) added to any stack leaves it bit-identical; the base model is unchanged
  after every stacked run and after an interrupted one; a method applied twice is refused at the patch node.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import bundle_from_components

from magicmirror_video.models.block_runner import block_runner
from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig, DualRealPatch
from magicmirror_video.models.lora import LoraLayer, LoraPatch, LoraWeights, find_lora_targets
from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorAdapter, MagicMirrorConfig, MagicMirrorPatch
from magicmirror_video.models.patches import PatchConflictError
from magicmirror_video.models.sampler import rotary_embeddings, sample_video
from magicmirror_video.models.subject import SubjectReferencePatch
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

KW = dict(num_frames=9, height=32, width=32, steps=2, cfg=6.0, seed=1)
SMALL = dict(id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32, fuse_hidden=32)


@pytest.mark.parametrize("version", ["1.0", "1.5"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_runner_without_extensions_is_bit_identical_to_diffusers(version, i2v):
    t = tiny.build_components(version=version, i2v=i2v, num_layers=3)["transformer"]
    plain = copy.deepcopy(t)  # no runner: diffusers' own forward
    runner = block_runner(t)
    assert all(type(b.forward).__name__ == "partial" for b in t.transformer_blocks)  # the runner is installed
    g = torch.Generator().manual_seed(0)
    frames = 4 if version == "1.5" else 3
    kw = dict(hidden_states=torch.randn(2, frames, t.config.in_channels, 4, 6, generator=g),
              encoder_hidden_states=torch.randn(2, 9, 32, generator=g), timestep=torch.tensor([500, 20]),
              image_rotary_emb=rotary_embeddings(t, 32, 48, frames, 8, "cpu"), return_dict=False)
    if t.config.ofs_embed_dim:
        kw["ofs"] = torch.tensor([2.0, 2.0])
    calls = []
    handle = t.transformer_blocks[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert torch.equal(t(**kw)[0], plain(**kw)[0])
    handle.remove()
    assert calls == [1] and not runner.extensions


class CountingProcessor:
    """A custom attention processor (wrapping diffusers' own) that counts its calls."""

    def __init__(self):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        self.inner, self.calls = CogVideoXAttnProcessor2_0(), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_attention_goes_through_the_models_own_processor():
    b = bundle_from_components(tiny.build_components(num_layers=2))
    processor = CountingProcessor()
    b.transformer.set_attn_processor(processor)
    pos = encode_prompt(b, "a man img is walking", trigger="img")
    sample_video(b.with_patch(mm_patch(b)).with_patch(dualreal_patch(b)).with_patch(subject_patch(b)), pos, **KW)
    # two blocks, two steps, CFG's negative prompt as its own forward (two-way MagicMirror): 2 * 2 * 2
    assert processor.calls == 8


# ------------------------------------------------------------------ the methods, tiny and random


def lora_patch(b, targets, seed, name):
    t = b.transformer
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path in find_lora_targets(t, targets):
        m = dict(t.named_modules())[path]
        layers[path] = LoraLayer(torch.randn(4, m.in_features, generator=g) * 0.1,
                                 torch.randn(m.out_features, 4, generator=g) * 0.1, 0.5)
    return LoraPatch(LoraWeights(name=name, layers=layers))


def faces(seed=0):
    g = torch.Generator().manual_seed(seed)
    return FaceEmbeds(arcface=torch.randn(1, 512, generator=g), x_id=torch.randn(1, 2, 256, generator=g),
                      clip_penultimate=torch.randn(1, 17, 64, generator=g))


def mm_patch(b, face_attention="two-way", fresh=False):
    adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(b.transformer, **SMALL,
                                                                   face_attention=face_attention)).eval()
    if not fresh:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return MagicMirrorPatch(adapter, faces())


def dualreal_patch(b):
    adapters = DualRealAdapters(DualRealConfig.for_transformer(b.transformer, condition_dim=16, hidden_dim=8, n_groups=1))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return DualRealPatch(adapters.eval(), torch.randn(1, 1, 16, generator=g))


def subject_patch(b):
    return SubjectReferencePatch(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7)))


MAKERS = {
    "lora": lambda b: lora_patch(b, ["ff.net.2", "proj_out"], 8, "style"),
    "regdpo_lora": lambda b: lora_patch(b, ["to_q", "to_k", "to_v", "to_out.0"], 9, "regdpo"),
    "magicmirror": mm_patch,
    "magicmirror_one_way": lambda b: mm_patch(b, "one-way"),
    "dualreal": dualreal_patch,
    "subject": subject_patch,
}
STACKS = [("magicmirror", "lora"), ("magicmirror", "regdpo_lora"), ("magicmirror", "dualreal"), ("subject", "dualreal"),
          ("magicmirror", "subject"), ("magicmirror_one_way", "dualreal"), ("magicmirror", "subject", "dualreal", "lora")]


@pytest.fixture(scope="module")
def world():
    b = bundle_from_components(tiny.build_components(num_layers=3))
    pos = encode_prompt(b, "a man img is walking on the beach at sunset", trigger="img")
    neg = encode_prompt(b, "blurry, low quality")
    weights = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    base = sample_video(b, pos, neg, **KW)
    return b, pos, neg, weights, base


def assert_base_intact(b, weights, pos, neg, base):
    t = b.transformer
    assert all(torch.equal(v, weights[k]) for k, v in t.state_dict().items())
    assert not block_runner(t).extensions
    hooked = [n for n, m in t.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, hooked
    assert torch.equal(sample_video(b, pos, neg, **KW), base)


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: "+".join(s))
def test_stack_runs_in_every_order_with_one_result(world, stack):
    b, pos, neg, weights, base = world
    patches = {name: MAKERS[name](b) for name in stack}
    orders = list(itertools.permutations(stack)) if len(stack) <= 2 else [stack, stack[::-1], stack[1:] + stack[:1]]
    outs, reports = [], []
    for order in orders:
        model = b
        for name in order:
            model = model.with_patch(patches[name])
        out = {}
        outs.append(sample_video(model, pos, neg, **KW, outputs=out))
        reports.append(out)
        assert_base_intact(b, weights, pos, neg, base)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)
    assert (outs[0] - base).abs().max() > 1e-3  # every stack changes the video
    if "dualreal" in stack:  # one α per step, from the positive rows, whatever the order or CFG split
        assert all(r["dualreal_alpha"].shape == (KW["steps"], 1) for r in reports)
        torch.testing.assert_close(reports[1]["dualreal_alpha"], reports[0]["dualreal_alpha"])


@pytest.mark.parametrize("stack", [(), ("lora",), ("dualreal",), ("subject",), ("subject", "dualreal", "regdpo_lora")],
                         ids=lambda s: "+".join(s) or "base")
def test_zero_initialised_method_leaves_any_stack_bit_identical(world, stack):
    b, pos, neg, weights, base = world
    model = b
    for name in stack:
        model = model.with_patch(MAKERS[name](b))
    before = sample_video(model, pos, neg, **KW)
    fresh = mm_patch(b, "one-way", fresh=True)
    for position in (0, len(stack)):  # first or last in the stack
        patches = list(model.patches)
        patches.insert(position, fresh)
        stacked = b
        for p in patches:
            stacked = stacked.with_patch(p)
        assert torch.equal(sample_video(stacked, pos, neg, **KW), before)


def test_interrupted_stacked_run_leaves_the_base_model_intact(world):
    b, pos, neg, weights, base = world
    model = b
    for name in ("magicmirror", "subject", "dualreal", "regdpo_lora"):
        model = model.with_patch(MAKERS[name](b))

    def interrupt(info):
        raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        sample_video(model, pos, neg, **KW, callback=interrupt)
    assert_base_intact(b, weights, pos, neg, base)


@pytest.mark.parametrize("name", ["magicmirror", "dualreal", "subject"])
def test_a_method_applied_twice_is_refused_at_the_patch_node(world, name):
    b = world[0]
    once = b.with_patch(MAKERS[name](b))
    with pytest.raises(PatchConflictError, match="already applied to this model"):
        once.with_patch(MAKERS[name](b))
    once.with_patch(MAKERS["lora"](b)).with_patch(MAKERS["regdpo_lora"](b))  # LoRAs stack freely


def test_patches_never_cast_trainable_weights_in_place():
    """A trainer validates with its trainable (fp32) adapter in a bf16 model: the run uses a bf16 copy and the
    trainer's weights stay fp32; frozen adapters are cast in place (no copy)."""
    from magicmirror_video.models.patches import in_dtype

    trainable = torch.nn.Linear(4, 4)
    used = in_dtype(trainable, torch.bfloat16)
    assert used is not trainable and used.weight.dtype == torch.bfloat16 and trainable.weight.dtype == torch.float32
    assert torch.equal(used.weight, trainable.weight.to(torch.bfloat16)) and not used.weight.requires_grad
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    assert in_dtype(frozen, torch.bfloat16) is frozen and frozen.weight.dtype == torch.bfloat16
    assert in_dtype(trainable, torch.float32) is trainable
