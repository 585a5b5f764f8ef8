"""Placement: every offload mode runs its real machinery and gives the outputs of ``offload="none"`` bit for bit.

The execution device is the CPU here (and CUDA as well when a GPU is present), the offload device the CPU. What
each test observes and asserts after every stage (text encode, T2V and I2V sampling, decode, LoRA, MagicMirror,
DualReal, subject reference, all methods in one run):

* **outputs** equal those of the same stage with ``offload="none"`` (``torch.equal``);
* **whole-module moves**, recorded by a spy on ``Placement._move`` (the one place that moves modules): a module
  that waits on the offload device (model-mode components, the VAE in sequential mode, every patch's adapters in
  every mode) is moved to the execution device for the stage and back after it, pairwise, the last move being back;
  resident components (``none``) and streamed ones are never moved; components a stage does not use are not touched;
* **streamed weights** (``sequential``), recorded by a spy on diffusers' ``ModuleGroup.onload_``/``offload_``: the
  transformer's / T5's leaf groups are onloaded while the stage runs and every one is offloaded again by its end;
  group-offloading hooks sit on their leaves while the block runner stays the blocks' own hook;
* **parameter devices**: after the stage every non-resident module's weights are on the offload device (a real check
  on a GPU; on the CPU it holds trivially, which is why the moves are recorded as well).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig, DualRealPatch
from magicmirror_video.models.lora import LoraLayer, LoraPatch, LoraWeights, find_lora_targets
from magicmirror_video.models.magicmirror import FaceEmbeds, MagicMirrorAdapter, MagicMirrorConfig, MagicMirrorPatch
from magicmirror_video.models.patches import SamplingContext
from magicmirror_video.models.placement import Placement, choose_offload, module_bytes
from magicmirror_video.models.sampler import decode_latents, sample_video
from magicmirror_video.models.subject import NORM_LORA_MODULES, SubjectReferencePatch, encode_reference
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny

MODES = ("none", "model", "sequential", "block")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KW = dict(num_frames=9, height=32, width=32, steps=2, cfg=6.0, seed=1)
SMALL = dict(id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32, fuse_hidden=32)
GIB = 2**30


def make_bundle(mode, device, i2v=False):
    """Tiny components (the same weights for every mode), frozen as the loader freezes them."""
    c = tiny.build_components(i2v=i2v, num_layers=2)
    for m in (c["transformer"], c["vae"], c["text_encoder"]):
        m.requires_grad_(False)
    return CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                           tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=torch.float32,
                           device=torch.device(device), offload=mode)


def randomised(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval().requires_grad_(False)  # as the loaders return them


def lora_patch(b, targets=("to_q", "to_v", "ff.net.2"), reference_only=()):
    t, g = b.transformer, torch.Generator().manual_seed(8)
    modules = dict(t.named_modules())
    layers = {p: LoraLayer(torch.randn(4, modules[p].in_features, generator=g) * 0.1,
                           torch.randn(modules[p].out_features, 4, generator=g) * 0.1, 0.5)
              for p in find_lora_targets(t, list(targets))}
    return LoraPatch(LoraWeights(name="lora", layers=layers), reference_only=reference_only)


def mm_patch(b):
    adapter = randomised(MagicMirrorAdapter(MagicMirrorConfig.for_transformer(b.transformer, **SMALL)), 5)
    g = torch.Generator().manual_seed(0)
    faces = FaceEmbeds(arcface=torch.randn(1, 512, generator=g), x_id=torch.randn(1, 2, 256, generator=g),
                       clip_penultimate=torch.randn(1, 17, 64, generator=g))
    return MagicMirrorPatch(adapter, faces)


def dualreal_patch(b):
    config = DualRealConfig.for_transformer(b.transformer, condition_dim=16, hidden_dim=8, n_groups=1)
    return DualRealPatch(randomised(DualRealAdapters(config), 6), torch.randn(1, 1, 16, generator=torch.Generator()
                                                                               .manual_seed(6)))


def subject_patches(b):
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    latents = encode_reference(b, image)  # a VAE stage of its own
    return [lora_patch(b, ("to_k", "norm1.linear", "norm2.linear"), NORM_LORA_MODULES),
            SubjectReferencePatch(latents, vae_scale=b.vae_scale_factor_spatial)]


def conditionings(b):
    return encode_prompt(b, "a man img is walking on the beach", trigger="img"), encode_prompt(b, "blurry")


def run_sampler(b, patches=(), image=None):
    model = b
    for p in patches:
        model = model.with_patch(p)
    pos, neg = conditionings(b)
    return sample_video(model, pos, neg, **KW, image=image)


FIRST_FRAME = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(2))
LATENT = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(4))

# stage -> (i2v model?, the stage: bundle -> (output, patches), base components it uses)
STAGES = {
    "text_encode": (False, lambda b: (encode_prompt(b, "a man img is walking", trigger="img").embeds, []),
                    ["text_encoder"]),
    "t2v": (False, lambda b: (run_sampler(b), []), ["transformer"]),
    "i2v_first_frame": (True, lambda b: (run_sampler(b, image=FIRST_FRAME), []), ["vae", "transformer"]),
    "decode": (False, lambda b: (decode_latents(b, LATENT, tiling=False), []), ["vae"]),
    "lora": (False, None, ["transformer"]),
    "magicmirror": (False, None, ["transformer"]),
    "dualreal": (False, None, ["transformer"]),
    "subject_reference": (False, None, ["vae", "transformer"]),
    "all_methods": (False, None, ["vae", "transformer"]),
}
MAKERS = {"lora": lambda b: [lora_patch(b)], "magicmirror": lambda b: [mm_patch(b)],
          "dualreal": lambda b: [dualreal_patch(b)], "subject_reference": subject_patches,
          "all_methods": lambda b: [mm_patch(b), lora_patch(b), dualreal_patch(b), *subject_patches(b)]}

ADAPTERS = {"lora": 1, "magicmirror": 1, "dualreal": 1, "subject_reference": 1, "all_methods": 4}  # modules of patches


def run_stage(name, b):
    i2v, stage, _ = STAGES[name]
    if stage is not None:
        return stage(b)
    patches = MAKERS[name](b)
    return run_sampler(b, patches), patches


class Moves:
    """Spies on the placement layer's module moves and on diffusers' group onload/offload while active."""

    def __init__(self, monkeypatch):
        from diffusers.hooks.group_offloading import ModuleGroup

        self.moves, self.groups = [], []
        original_move, group_on, group_off = Placement._move, ModuleGroup.onload_, ModuleGroup.offload_

        def move(placement, modules, onload):
            self.moves += [(m, onload) for m in modules]
            return original_move(placement, modules, onload)

        monkeypatch.setattr(Placement, "_move", move)
        monkeypatch.setattr(ModuleGroup, "onload_", lambda g: (self.groups.append((g, True)), group_on(g))[1])
        monkeypatch.setattr(ModuleGroup, "offload_", lambda g: (self.groups.append((g, False)), group_off(g))[1])

    def clear(self):
        self.moves.clear(), self.groups.clear()

    def of(self, module):
        return [onload for m, onload in self.moves if m is module]


def groups_of(module):
    """diffusers' group-offloading groups hooked inside ``module``."""
    out = []
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            out.append(hook.group)
    return out


def assert_placement_after_stage(b, spy, used, patch_modules):
    placement = b.placement
    components = {"transformer": b.transformer, "text_encoder": b.text_encoder, "vae": b.vae}
    for name, module in components.items():
        home, moves = placement.home(module), spy.of(module)
        if name not in used or home in ("resident", "streamed"):
            assert moves == [], (name, home, moves)  # untouched / never moved whole
        else:  # brought in for the stage and taken back, last move back
            assert moves and moves == [True, False] * (len(moves) // 2), (name, moves)
        if home == "streamed":
            events = [(g, on) for g, on in spy.groups if g in groups_of(module)]
            if name in used:
                assert any(on for _, on in events), f"{name}: no leaf was streamed in"
            last = {}
            for g, on in events:
                last[id(g)] = on
            assert not any(last.values()), f"{name}: a leaf group is still onloaded"
        expected = placement.device if home == "resident" else placement.offload_device
        assert all(p.device.type == expected.type for p in module.parameters()), name
    for module in patch_modules:  # adapters: in for the run, out after it, in every mode
        moves = spy.of(module)
        assert moves and moves == [True, False] * (len(moves) // 2), (type(module).__name__, moves)
        tensors = list(module.parameters()) + list(module.buffers())
        assert all(t.device.type == placement.offload_device.type for t in tensors), type(module).__name__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", list(STAGES))
def test_offload_mode_is_bit_identical_and_leaves_nothing_behind(stage, mode, device, monkeypatch):
    i2v, _, used = STAGES[stage]
    reference, _ = run_stage(stage, make_bundle("none", device, i2v))
    b = make_bundle(mode, device, i2v)
    assert b.offload == mode and b.placement.mode == mode
    spy = Moves(monkeypatch)
    if stage not in ("text_encode", "decode"):  # the prompts are encoded before the sampling stage is observed
        conditionings(b)
        spy.clear()
    homes = {"none": ["resident"] * 3, "model": ["offloaded"] * 3, "sequential": ["streamed", "streamed", "offloaded"],
             "block": ["streamed", "streamed", "offloaded"]}
    assert [b.placement.home(m) for m in (b.transformer, b.text_encoder, b.vae)] == homes[mode]
    out, patches = run_stage(stage, b)
    assert torch.equal(out, reference)
    adapters = [m for p in patches for m in getattr(p, "models", list)()]
    assert len(adapters) == ADAPTERS.get(stage, 0)
    assert_placement_after_stage(b, spy, used, adapters)


def test_sequential_streams_transformer_and_t5_outside_the_block_runner():
    b = make_bundle("sequential", "cpu")
    for component in (b.transformer, b.text_encoder):
        assert b.placement.home(component) == "streamed"
        leaves = [m for m in component.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
        assert leaves and all(m._diffusers_hook.get_hook("group_offloading") is not None for m in leaves)
    for block in b.transformer.transformer_blocks:  # the runner is still the blocks' (innermost, only) hook
        assert block._diffusers_hook._hook_order == ["magicmirror_video.block_runner"]
    assert b.transformer._diffusers_hook._hook_order == ["magicmirror_video.block_runner.forward"]
    assert b.placement.home(b.vae) == "offloaded" and not groups_of(b.vae)


def test_block_mode_streams_transformer_blocks_around_the_block_runner():
    """``block``: diffusers' block-level group offloading, one group per transformer block, registered after the block
    runner so it wraps it (the runner stays each block's innermost hook); the embeddings and output layers form the
    transformer's own group, onloaded around the runner's per-forward hook; T5 streams leaf by leaf."""
    b = make_bundle("block", "cpu")
    for block in b.transformer.transformer_blocks:
        assert block._diffusers_hook._hook_order == ["magicmirror_video.block_runner", "group_offloading"]
        assert block._diffusers_hook.get_hook("group_offloading").group.modules == [block]
    assert b.transformer._diffusers_hook._hook_order == ["magicmirror_video.block_runner.forward", "group_offloading"]
    leaves = [m for m in b.text_encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert all(m._diffusers_hook.get_hook("group_offloading") is not None for m in leaves)


def test_block_stream_bytes_are_the_largest_block_and_everything_outside_the_blocks():
    """What block mode holds at a time, counted by hand on the transformer: every tensor outside
    ``transformer_blocks`` plus the largest block (the lists inside a block, ``attn1.to_out`` and ``ff.net``, are
    part of it, not blocks of their own)."""
    from magicmirror_video.models.placement import largest_block_bytes

    t = tiny.build_components(num_layers=3)["transformer"]
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in t.transformer_blocks]
    outside = sum(p.numel() * p.element_size() for n, p in t.named_parameters() if not n.startswith("transformer_"))
    outside += sum(b.numel() * b.element_size() for b in t.buffers())
    assert largest_block_bytes(t) == outside + max(sizes) > 0


@pytest.mark.parametrize("mode", MODES)
def test_interrupted_run_puts_everything_back(mode, monkeypatch):
    b = make_bundle(mode, "cpu")
    patches = [mm_patch(b), lora_patch(b), dualreal_patch(b)]
    model = b
    for p in patches:
        model = model.with_patch(p)
    pos, neg = conditionings(b)
    spy = Moves(monkeypatch)

    def cancel(info):
        raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        sample_video(model, pos, neg, **KW, callback=cancel)
    assert_placement_after_stage(b, spy, ["transformer"], [m for p in patches for m in p.models()])
    assert not b.placement._depth
    hooked = [n for n, m in b.transformer.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, hooked


def test_failed_move_in_puts_back_what_was_moved(monkeypatch):
    """A stage whose second module cannot come in (out of memory) leaves the first one on the offload device."""
    placement = Placement("cpu", "cpu", "model")
    first, second = torch.nn.Linear(2, 2).requires_grad_(False), torch.nn.Linear(2, 2).requires_grad_(False)
    calls = []
    original = Placement._move

    def move(self, modules, onload):
        for m in modules:
            if onload and m is second:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            calls.append((m, onload))
            original(self, [m], onload)

    monkeypatch.setattr(Placement, "_move", move)
    with pytest.raises(torch.OutOfMemoryError), placement.run(first, second):
        pass
    assert calls == [(first, True), (second, False), (first, False)]


def test_trainable_modules_are_brought_in_and_left_there(monkeypatch):
    placement = Placement("cpu", "cpu", "model")
    trainable, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    spy = Moves(monkeypatch)
    with placement.run(trainable, frozen):
        pass
    assert spy.of(trainable) == [True] and spy.of(frozen) == [True, False]  # in for the run, never taken back
    placement.add(trainable)  # a component is the placement's, trainable or not
    spy.clear()
    with placement.run(trainable):
        pass
    assert spy.of(trainable) == [True, False]


class RecordingManager:
    """The ModelManager protocol's calls, for the contract a host manager (ComfyUI's) implements."""

    def __init__(self):
        self.calls = []

    def load(self, modules, placement, memory_required):
        self.calls.append(("load", [type(m).__name__ for m in modules], memory_required))

    def unload(self, modules):
        self.calls.append(("unload", [type(m).__name__ for m in modules]))

    def free(self, memory_required, device, keep=()):
        self.calls.append(("free", memory_required, [type(m).__name__ for m in keep]))

    def empty_cache(self):
        self.calls.append(("empty_cache",))

    def available(self, device):
        return None


@pytest.mark.parametrize("mode", MODES)
def test_a_host_manager_does_the_moves(mode, monkeypatch):
    """With a manager the placement never moves a module itself: every stage asks the manager to load what it
    needs (the transformer with the run's adapters, and the activation estimate plus what the streamed components
    hold: their running and prefetched unit), unloads what the mode does not keep, empties the cache; a stage whose
    modules all stream only makes the manager free room, keeping the running stage's modules."""
    from magicmirror_video.models.memory import t5_activation_bytes, transformer_activation_bytes
    from magicmirror_video.models.placement import largest_block_bytes, largest_leaf_bytes

    manager = RecordingManager()
    reference = run_sampler(make_bundle("none", "cpu"), [mm_patch(make_bundle("none", "cpu"))])
    c = tiny.build_components(num_layers=2)
    for m in (c["transformer"], c["vae"], c["text_encoder"]):
        m.requires_grad_(False)
    placement = Placement("cpu", "cpu", mode, manager)
    b = CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                        tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=torch.float32,
                        device=torch.device("cpu"), placement=placement)
    spy = Moves(monkeypatch)
    pos, neg = conditionings(b)
    patch = mm_patch(b)
    out = sample_video(b.with_patch(patch), pos, neg, **KW)
    assert torch.equal(out, reference)
    assert spy.moves == []  # the manager moved everything
    kept = mode == "none"
    names = {"transformer": "CogVideoXTransformer3DModel", "t5": "T5EncoderModel"}
    loads = [c for c in manager.calls if c[0] == "load"]
    frees = [c for c in manager.calls if c[0] == "free"]
    # MagicMirror (two-way) samples the negative prompt on its own: batch 1, its 2 face tokens join the sequence
    sampling = transformer_activation_bytes(b.transformer.config, KW["num_frames"], KW["height"], KW["width"],
                                            batch=1, extra_tokens=patch.adapter.config.face_queries,
                                            element_size=4)
    t5 = b.text_encoder.config
    t5_need = t5_activation_bytes(t5.d_model, t5.d_ff, t5.num_heads, 226, element_size=4)
    if mode in ("sequential", "block"):
        t = b.transformer  # held while streaming: the layers outside the blocks and two blocks, or two leaves
        held = largest_block_bytes(t) + max(module_bytes(block) for block in t.transformer_blocks) if mode == "block" \
            else 2 * largest_leaf_bytes(t)
        assert [c[1] for c in loads] == [["MagicMirrorAdapter"]]
        assert loads[0][2] == sampling + held  # what the stream holds rides with the adapter's load
        assert frees == [("free", t5_need + 2 * largest_leaf_bytes(b.text_encoder), [names["t5"]])] * 2  # prompts
    else:
        assert [c[1] for c in loads] == [[names["t5"]], [names["t5"]], [names["transformer"], "MagicMirrorAdapter"]]
        assert [c[2] for c in loads] == [t5_need, t5_need, sampling] and not frees
    unloads = [c[1] for c in manager.calls if c[0] == "unload"]
    assert unloads[-1] == ([] if kept else [] if mode in ("sequential", "block") else [names["transformer"]]) + \
        ["MagicMirrorAdapter"]
    assert sum(c[0] == "empty_cache" for c in manager.calls) == 3


def test_lora_down_up_live_on_the_execution_device_even_with_weights_on_meta():
    """The issue's NaN: LoRA tensors were made on ``module.weight.device`` (meta once weights stream)."""
    b = make_bundle("none", "cpu")
    patch = lora_patch(b, ("to_q",))
    target = b.transformer.transformer_blocks[0].attn1.to_q
    x = torch.randn(1, 3, target.in_features)
    layer = patch.lora.layers["transformer_blocks.0.attn1.to_q"]
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.down), layer.up) * layer.scale
    b.transformer.to("meta")
    undo = patch.apply(b.transformer, SamplingContext(device=torch.device("cpu"), dtype=torch.float32))
    try:
        (hook,) = target._forward_hooks.values()
        out = hook(target, (x,), torch.zeros(1, 3, target.out_features))
    finally:
        undo()
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_no_code_reads_a_device_from_the_weights():
    root = os.path.join(os.path.dirname(__file__), "..")
    pattern = re.compile(r"next\([^)]*parameters\(\)\)\.device|param(eter)?\.device")
    offenders = []
    for folder in ("models", "nodes", "training"):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                text = open(os.path.join(root, folder, name), encoding="utf-8").read()
                offenders += [f"{folder}/{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------- auto

# CogVideoX-5B in bf16 (bench/memory.py counts them on the meta device): transformer, T5-XXL encoder, VAE
WEIGHTS_5B = {"transformer": int(10.39 * GIB), "text_encoder": int(8.87 * GIB), "vae": int(0.40 * GIB)}
ACTS_5B = {"transformer": int(2.85 * GIB), "text_encoder": int(0.05 * GIB), "vae": int(3.71 * GIB)}


@pytest.mark.parametrize("free_gib, expected", [(None, "none"), (79.0, "none"), (30.0, "none"), (23.0, "model"),
                                                (15.5, "model"), (15.0, "sequential"), (11.0, "sequential")])
def test_auto_picks_the_mode_from_free_memory_and_sizes(free_gib, expected):
    available = None if free_gib is None else int(free_gib * GIB)
    mode, reason = choose_offload(available, WEIGHTS_5B, ACTS_5B)
    assert mode == expected, reason


# held in block mode: the transformer's two blocks and the layers outside them; T5's two largest leaves (its embedding)
STREAMED_5B = {"block": {"transformer": int(0.53 * GIB), "text_encoder": int(0.49 * GIB)}}


@pytest.mark.parametrize("free_gib, expected", [(40.0, "none"), (23.0, "model"), (15.0, "block"), (7.0, "block"),
                                                (6.0, "sequential"), (0.0, "sequential")])
def test_auto_considers_block_between_model_and_sequential(free_gib, expected):
    """With the bytes block mode holds, ``auto`` picks it where the largest stage does not fit whole but fits with the
    transformer streaming block by block: max(0.53 + 2.85, 0.49 + 0.05, 0.40 + 3.71) + 2 headroom = 6.11 GiB; below
    that, sequential. ``none`` must fit an untiled decode (14.83 GiB) beside all the weights: 19.66 + 14.83 + 2."""
    mode, reason = choose_offload(int(free_gib * GIB), WEIGHTS_5B, ACTS_5B, streamed=STREAMED_5B,
                                  none_activations=int(14.83 * GIB))
    assert mode == expected, reason
    assert choose_offload(int(30 * GIB), WEIGHTS_5B, ACTS_5B, streamed=STREAMED_5B,
                          none_activations=int(14.83 * GIB))[0] == "model"  # tiled decode would have fitted: 25.4


def _config(d):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(d)  # a diffusers config: a mapping with attribute access


def test_activation_estimates_at_native_sizes_checked_by_hand():
    """``stage_activation_bytes`` plans CogVideoX 1.0 at 49x480x720 and 1.5 at 81x768x1360 and covers the decode
    with and without tiling; each figure is models/memory.py's formula at that size, written out here by hand:

    * transformer (14 units x batch 2 x tokens x width 3072 x 2 bytes): 1.0: 13 latent frames x 30 x 45 patches +
      226 text tokens = 17776 tokens -> 3.06e9 B (2.85 GiB); 1.5: ceil(21 latent frames / 2) x 48 x 85 + 226 = 45106
      tokens -> 7.76e9 B (7.23 GiB);
    * VAE decode (10 units x 256 channels x 9 frames x h x w x 2 bytes): untiled 480x720 -> 1.59e10 B (14.83 GiB),
      768x1360 -> 4.81e10 B (44.82 GiB); tiled (240x360 tiles) 3.98e9 B (3.71 GiB) at both sizes;
    * T5-XXL (226 tokens): (4 x 226 x 4096 + 3 x 226 x 10240) x 2 + 2 x 64 x 226^2 x 4 = 47441920 B."""
    import json
    import types

    from magicmirror_video.models.cogvideox import stage_activation_bytes
    from magicmirror_video.testing import reference_json

    t10 = {k: v for k, v in reference_json("cogvideox/transformer_config_5b.json").items() if not k.startswith("_")}
    t10["patch_size_t"] = None  # (diffusers' default, not written in the 1.0 config)
    t15 = dict(t10, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
    vae = {k: v for k, v in reference_json("cogvideox/vae_config.json").items() if not k.startswith("_")}
    t5 = types.SimpleNamespace(config=types.SimpleNamespace(d_model=4096, d_ff=10240, num_heads=64))
    expected = {
        "1.0": {"transformer": 14 * 2 * (13 * 30 * 45 + 226) * 3072 * 2, "vae": 10 * 256 * 9 * 240 * 360 * 2,
                "vae_untiled": 10 * 256 * 9 * 480 * 720 * 2},
        "1.5": {"transformer": 14 * 2 * (11 * 48 * 85 + 226) * 3072 * 2, "vae": 10 * 256 * 9 * 240 * 360 * 2,
                "vae_untiled": 10 * 256 * 9 * 768 * 1360 * 2}}
    for version, config in (("1.0", t10), ("1.5", t15)):
        bundle = types.SimpleNamespace(transformer=types.SimpleNamespace(config=_config(config)),
                                       vae=types.SimpleNamespace(config=_config(vae)), text_encoder=t5,
                                       dtype=torch.bfloat16)
        got = stage_activation_bytes(bundle)
        assert got == {**expected[version], "text_encoder": (4 * 226 * 4096 + 3 * 226 * 10240) * 2
                       + 2 * 64 * 226 * 226 * 4}, (version, json.dumps(got))
    assert expected["1.0"]["transformer"] == 3_058_040_832 and expected["1.5"]["transformer"] == 7_759_675_392
    assert round(expected["1.0"]["vae_untiled"] / GIB, 2) == 14.83 and round(expected["1.5"]["vae_untiled"] / GIB,
                                                                             2) == 44.82


def test_auto_plans_cogvideox_1_5_at_its_own_size():
    """The same weights, CogVideoX 1.5's activations at 81x768x1360 (7.23 GiB while sampling): on a 16 GiB card the
    largest stage no longer fits whole (10.39 + 7.23 + 2), block does (0.53 + 7.23 + 2); 1.0 there fits model."""
    acts_15 = dict(ACTS_5B, transformer=7_759_675_392)
    assert choose_offload(int(16 * GIB), WEIGHTS_5B, acts_15, streamed=STREAMED_5B)[0] == "block"
    assert choose_offload(int(16 * GIB), WEIGHTS_5B, ACTS_5B, streamed=STREAMED_5B)[0] == "model"


def test_auto_on_the_cpu_keeps_everything_in_place():
    b = make_bundle("auto", "cpu")
    assert b.offload == "none" and b.placement.home(b.transformer) == "resident"


def test_module_bytes_counts_tied_weights_once():
    c = tiny.build_components()
    t5 = c["text_encoder"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert module_bytes(t5) == sum(p.numel() * 4 for p in t5.parameters())  # parameters() yields it once
