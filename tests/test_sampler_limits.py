"""Cancel inside a step, and requests too large for the device refused before they run.

* **Cancel**: the sampler's ``interrupt`` check runs before every transformer block (a forward pre-hook, ahead of the
  blocks' diffusers hooks) and before every call of the VAE decoder (a batch of latent frames; of a tile with
  tiling). A cancel pressed while block k runs stops the run before block k + 1 starts (blocks counted), for the base
  model, a full stack of methods and block offloading; afterwards the base model is bit for bit what it was (weights,
  no hooks, the same video) and every group diffusers' group offloading onloaded is back on the offload device.
* **Up-front refusal**: on a simulated device (a host manager reporting its capacity; the CPU itself is never
  refused) a request whose activations (``models/memory.py``) exceed what the device can give the stage beyond its
  weights is refused before anything runs, with one line naming the estimate, the room and the largest size that
  fits, all recomputed here from ``memory.py``'s formulas by brute force; a request that fits runs and gives the same
  video as without the check.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import bundle_from_components
from test_composition import MAKERS, assert_base_intact

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.memory import (
    transformer_activation_bytes,
    vae_decode_activation_bytes,
    vae_encode_activation_bytes,
)
from magicmirror_video.models.placement import Placement
from magicmirror_video.models.sampler import ActivationMemoryError, decode_latents, sample_video
from magicmirror_video.models.text import TextConditioning, encode_prompt
from magicmirror_video.testing import reference_json, tiny

KW = dict(num_frames=9, height=32, width=32, steps=2, cfg=6.0, seed=1)
LAYERS = 6
GIB = 2**30


class Cancelled(Exception):
    """What ComfyUI's interrupt raises (``InterruptProcessingException``), here."""


class Cancel:
    """A cancel pressed while block ``at_block`` of the ``at_forward``-th transformer forward runs (forward hooks set
    the flag); the check raises once it is set. Counts the blocks that ran and the checks made."""

    def __init__(self, transformer, at_forward, at_block):
        self.pressed, self.blocks_run, self.checks, self.forwards = False, 0, 0, 0
        self.at_forward, self.at_block = at_forward, at_block
        self.handles = [transformer.register_forward_pre_hook(self._forward)]
        self.handles += [b.register_forward_hook(self._block(i)) for i, b in enumerate(transformer.transformer_blocks)]

    def _forward(self, module, args):
        self.forwards += 1

    def _block(self, index):
        def hook(module, args, output):
            self.blocks_run += 1
            if self.forwards == self.at_forward and index == self.at_block:
                self.pressed = True
        return hook

    def __call__(self):
        self.checks += 1
        if self.pressed:
            raise Cancelled("cancel")

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def world():
    b = bundle_from_components(tiny.build_components(num_layers=LAYERS))
    pos = encode_prompt(b, "a man img is walking on the beach at sunset", trigger="img")
    neg = encode_prompt(b, "blurry, low quality")
    weights = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    return b, pos, neg, weights, sample_video(b, pos, neg, **KW)


@pytest.mark.parametrize("stack", [(), ("magicmirror", "subject", "dualreal", "regdpo_lora")],
                         ids=["base", "stacked"])
def test_cancel_lands_before_the_next_block(world, stack):
    b, pos, neg, weights, base = world
    model = b
    for name in stack:
        model = model.with_patch(MAKERS[name](b))
    forwards_per_step = 2 if stack else 1  # two-way MagicMirror runs CFG's negative prompt as a forward of its own
    at_forward, at_block = forwards_per_step + 1, 2  # the second step's first forward, while block 2 runs
    cancel = Cancel(b.transformer, at_forward, at_block)
    try:
        with pytest.raises(Cancelled):
            sample_video(model, pos, neg, **KW, interrupt=cancel)
    finally:
        cancel.close()
    # the whole first step, then blocks 0..2 of the next forward: block 3 never started
    assert cancel.blocks_run == forwards_per_step * LAYERS + at_block + 1
    assert cancel.checks == cancel.blocks_run + 1 + 1  # before every block that ran, after step 1, the refusing one
    assert_base_intact(b, weights, pos, neg, base)


def test_cancel_between_steps_without_a_press_changes_nothing(world):
    """The check alone (never pressed) leaves the video bit for bit as without it."""
    b, pos, neg, _, base = world
    cancel = Cancel(b.transformer, at_forward=-1, at_block=-1)
    try:
        out = sample_video(b, pos, neg, **KW, interrupt=cancel)
    finally:
        cancel.close()
    assert torch.equal(out, base) and cancel.checks == KW["steps"] * (LAYERS + 1)


@pytest.mark.parametrize("cache", ["first_block_cache", "taylorseer"])
def test_the_check_under_a_cache_changes_nothing(world, cache):
    """The pre-hook runs ahead of the caches' block hooks (also for blocks a cache skips): the same video."""
    from magicmirror_video.models.speed import SpeedOptions

    b, pos, neg, _, _ = world
    model = b.with_speed(SpeedOptions(cache, threshold=0.3) if cache == "first_block_cache" else
                         SpeedOptions(cache, interval=2, start_step=1))
    kw = dict(KW, steps=3)
    plain = sample_video(model, pos, neg, **kw)
    cancel = Cancel(b.transformer, at_forward=-1, at_block=-1)
    try:
        assert torch.equal(sample_video(model, pos, neg, **kw, interrupt=cancel), plain)
    finally:
        cancel.close()
    assert cancel.checks == 3 * (LAYERS + 1)


def test_compiled_blocks_check_too_and_share_one_graph():
    """ComfyUI always passes the check: with compile (regional, eager backend: tracing only) the blocks still call it,
    the cancel lands before the next block, and the compiled-graph count does not grow with the blocks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from magicmirror_video.models.speed import SpeedOptions

    graphs = []
    for layers in (4, 6):
        b = bundle_from_components(tiny.build_components(num_layers=layers))
        pos, neg = encode_prompt(b, "a man walking"), encode_prompt(b, "")
        model = b.with_speed(SpeedOptions(compile=True, compile_backend="eager"))
        torch._dynamo.reset()
        counters.clear()
        cancel = Cancel(b.transformer, at_forward=-1, at_block=-1)
        try:
            sample_video(model, pos, neg, **KW, interrupt=cancel)
            assert cancel.checks == KW["steps"] * (layers + 1)
            graphs.append(counters["stats"]["unique_graphs"])
            cancel.at_forward, cancel.at_block, cancel.forwards, cancel.blocks_run = 2, 1, 0, 0
            with pytest.raises(Cancelled):
                sample_video(model, pos, neg, **KW, interrupt=cancel)
        finally:
            cancel.close()
        assert cancel.blocks_run == layers + 2
        assert all(blk._compiled_call_impl is None for blk in b.transformer.transformer_blocks)
    assert graphs[0] == graphs[1], graphs


def test_cancel_with_block_offloading_puts_every_group_back(monkeypatch):
    """Block mode: the forward cut short had onloaded the embeddings' group (offloaded only at the end of a forward)
    and its blocks one by one; after the cancel every group's last move is its offload."""
    from diffusers.hooks.group_offloading import ModuleGroup

    c = tiny.build_components(num_layers=LAYERS)
    for m in (c["transformer"], c["vae"], c["text_encoder"]):
        m.requires_grad_(False)
    b = CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                        tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=torch.float32,
                        device=torch.device("cpu"), offload="block")
    pos, neg = encode_prompt(b, "a man walking"), encode_prompt(b, "")
    weights = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    base = sample_video(b, pos, neg, **KW)
    moves = {}
    for name in ("onload_", "offload_"):
        original = getattr(ModuleGroup, name)

        def spy(self, _original=original, _name=name):
            moves.setdefault(self.offload_leader, []).append(_name)
            return _original(self)

        monkeypatch.setattr(ModuleGroup, name, spy)
    cancel = Cancel(b.transformer, at_forward=1, at_block=3)
    try:
        with pytest.raises(Cancelled):
            sample_video(b, pos, neg, **KW, interrupt=cancel)
    finally:
        cancel.close()
    assert cancel.blocks_run == 4
    t = b.transformer
    assert moves[t][0] == "onload_" and "onload_" in moves[t.transformer_blocks[3]]  # (what the forward brought in)
    assert all("onload_" not in moves.get(block, []) for block in t.transformer_blocks[4:])  # never started
    assert all(moves[m][-1] == "offload_" for m in (t, *t.transformer_blocks)), moves  # all back on the CPU
    assert_base_intact(b, weights, pos, neg, base)


@pytest.mark.parametrize("tiling", [False, True], ids=["whole", "tiled"])
def test_cancel_lands_between_decoder_calls(world, tiling, monkeypatch):
    b = world[0]
    vae = b.vae
    if tiling:  # tiles of 32 pixels: a 48x48 video is four tiles
        for name, value in (("tile_sample_min_height", 32), ("tile_sample_min_width", 32),
                            ("tile_latent_min_height", 4), ("tile_latent_min_width", 4)):
            monkeypatch.setattr(vae, name, value)
    latent = torch.randn(1, 4, 5, 6, 6, generator=torch.Generator().manual_seed(0))  # 17 frames: 2 frame batches
    calls = []
    handle = vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    full = decode_latents(b, latent, tiling=tiling)
    total = len(calls)
    assert total == (8 if tiling else 2)
    calls.clear()

    def cancel():
        if calls:  # pressed while the first decoder call ran
            raise Cancelled("cancel")

    with pytest.raises(Cancelled):
        decode_latents(b, latent, tiling=tiling, interrupt=cancel)
    handle.remove()
    assert len(calls) == 1 and vae.use_tiling is False
    assert not vae.decoder._forward_pre_hooks
    assert torch.equal(decode_latents(b, latent, tiling=tiling), full)


# ------------------------------------------------------------------------------------------- up-front refusal


class SimulatedDevice:
    """A host manager for a device of ``capacity`` bytes (free plus evictable): records what it is asked to load."""

    def __init__(self, capacity, partial=False):
        self.capacity_bytes, self.loads, self.partial = capacity, [], partial

    def load(self, modules, placement, memory_required):
        self.loads.append([type(m).__name__ for m in modules])

    def unload(self, modules):
        pass

    def free(self, memory_required, device):
        pass

    def empty_cache(self):
        pass

    def available(self, device):
        return self.capacity_bytes

    def capacity(self, device):
        return self.capacity_bytes

    def loads_whole(self, device):
        return not self.partial


def fmt(n):
    """How the message writes byte counts."""
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def weight_bytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def meta_5b_bundle(manager, mode="model"):
    """CogVideoX-5B's transformer and VAE (the real configs) on the meta device, bf16, on a simulated CUDA device:
    nothing can run (no weights), so a refusal is the only way through."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(
            reference_json("cogvideox/transformer_config_5b.json")).to(torch.bfloat16)
        vae = AutoencoderKLCogVideoX.from_config(reference_json("cogvideox/vae_config.json")).to(torch.bfloat16)
    placement = Placement("cuda", "cpu", mode, manager)
    return CogVideoXBundle(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                           scheduler_config=reference_json("cogvideox/scheduler_config_5b.json"), dtype=torch.bfloat16,
                           device=torch.device("cuda"), placement=placement)


def prompt(width=4096):
    ids = torch.zeros(1, 226, dtype=torch.long)
    return TextConditioning(prompt="", embeds=torch.zeros(1, 226, width), input_ids=ids,
                            attention_mask=torch.ones_like(ids))


def test_2048_square_49_frames_on_5b_is_refused_before_anything_runs(monkeypatch):
    """The issue's request (the T2V workflow at 2048x2048x49) on a 24 GiB device, model offload: refused with the
    estimate, the room and the largest sizes that fit, every number from memory.py's formulas here."""
    moves = []
    monkeypatch.setattr(Placement, "_move", lambda self, modules, onload: moves.append(onload))
    manager = SimulatedDevice(24 * GIB)
    b = meta_5b_bundle(manager)
    config = b.transformer.config

    def need(f, h, w):
        return transformer_activation_bytes(config, f, h, w, batch=2, element_size=2)

    weights = weight_bytes(b.transformer)
    room = 24 * GIB - weights
    assert weights == pytest.approx(10.4 * GIB, rel=0.01) and need(49, 2048, 2048) > room
    square = max(s for s in range(16, 2049, 16) if need(49, s, s) <= room)
    frames = max(f for f in range(1, 49, 4) if need(f, 2048, 2048) <= room)
    with pytest.raises(ActivationMemoryError) as err:
        sample_video(b, prompt(), prompt(), num_frames=49, height=2048, width=2048, steps=50, cfg=6.0)
    message = str(err.value)
    print(f"\n{message}")
    assert "\n" not in message
    assert (f"the transformer (CFG batch of 2) needs about {fmt(need(49, 2048, 2048))} of activations for 49 frames "
            f"of 2048x2048 (width x height), but cuda can give it {fmt(room)} ({fmt(24 * GIB)} free or held by "
            f"models that can be unloaded, less {fmt(weights)} of weights): the largest size that fits is "
            f"{square}x{square} at 49 frames or {frames} frames at 2048x2048") in message
    assert "offload 'block' or 'sequential'" in message
    assert manager.loads == [] and True not in moves  # nothing was brought to the device
    # the sizes named do fit, and one step up does not
    assert need(49, square, square) <= room < need(49, square + 16, square + 16)
    assert need(frames, 2048, 2048) <= room < need(frames + 4, 2048, 2048)


def test_5b_at_its_native_size_passes_the_check(monkeypatch):
    from magicmirror_video.models.placement import streamed_bytes
    from magicmirror_video.models.sampler import check_sampling_memory

    def simulated_stream(self, module, level):  # (diffusers' group offloading cannot offload meta weights)
        self._homes[module], self._held[module] = "streamed", streamed_bytes(module, level)

    monkeypatch.setattr(Placement, "_move", lambda self, modules, onload: None)
    monkeypatch.setattr(Placement, "_stream", simulated_stream)
    for mode in ("model", "block"):
        b = meta_5b_bundle(SimulatedDevice(24 * GIB), mode)
        check_sampling_memory(b, 49, 480, 720, cfg=6.0)  # 2.9 GiB of activations
    # block mode: the weights stream, two blocks (plus the embeddings) take room; 2048x2048x49 still does not fit
    with pytest.raises(ActivationMemoryError) as err:
        check_sampling_memory(b, 49, 2048, 2048, cfg=6.0)
    assert f"less {fmt(streamed_bytes(b.transformer, 'block'))} of weights)" in str(err.value)
    assert "offload 'block'" not in str(err.value)


def test_a_manager_that_loads_part_of_a_model_leaves_the_weights_out_of_the_room(monkeypatch):
    """5B in model mode on a 12 GiB card: a host that brings models in only whole (ComfyUI's --highvram) leaves
    12 GiB less the 10.4 GiB transformer for 2.9 GiB of activations: refused; one that loads what fits and runs the
    rest layer by layer (ComfyUI's default) gives the activations the whole card: the same request passes."""
    from magicmirror_video.models.sampler import check_sampling_memory

    monkeypatch.setattr(Placement, "_move", lambda self, modules, onload: None)
    whole = meta_5b_bundle(SimulatedDevice(12 * GIB), "model")
    with pytest.raises(ActivationMemoryError) as err:
        check_sampling_memory(whole, 49, 480, 720, cfg=6.0)
    assert f"less {fmt(weight_bytes(whole.transformer))} of weights" in str(err.value)
    check_sampling_memory(meta_5b_bundle(SimulatedDevice(12 * GIB, partial=True), "model"), 49, 480, 720, cfg=6.0)


def tiny_on_simulated_device(capacity, i2v=False):
    """Tiny components on a simulated device (the CPU computes; the manager reports ``capacity``)."""
    c = tiny.build_components(i2v=i2v, num_layers=2)
    for m in (c["transformer"], c["vae"], c["text_encoder"]):
        m.requires_grad_(False)
    return c, CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                              tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                              dtype=torch.float32, device=torch.device("cpu"),
                              placement=Placement("cpu", "cpu", "model", SimulatedDevice(capacity)))


def test_a_request_that_fits_runs_one_that_does_not_is_refused_before_any_forward():
    c, _ = tiny_on_simulated_device(0)
    config, weights = c["transformer"].config, weight_bytes(c["transformer"])
    fits, too_big = dict(KW, height=32, width=48), dict(KW, height=64, width=96)
    capacity = weights + transformer_activation_bytes(config, 9, 32, 48, batch=2, element_size=4)
    assert transformer_activation_bytes(config, 9, 64, 96, batch=2, element_size=4) > capacity - weights
    plain = bundle_from_components(tiny.build_components(num_layers=2))
    pos, neg = encode_prompt(plain, "a man walking"), encode_prompt(plain, "")
    expected = sample_video(plain, pos, neg, **fits)
    _, b = tiny_on_simulated_device(capacity)
    forwards = []
    handle = b.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        assert torch.equal(sample_video(b, pos, neg, **fits), expected)  # exactly the room it needs: runs
        assert forwards
        forwards.clear()
        loads = len(b.placement.manager.loads)
        with pytest.raises(ActivationMemoryError, match=r"the largest size that fits is 48x32 at 9 frames; or let"):
            sample_video(b, pos, neg, **too_big)
    finally:
        handle.remove()
    assert forwards == [] and len(b.placement.manager.loads) == loads


def test_i2v_first_frame_encoding_is_checked_too():
    c, _ = tiny_on_simulated_device(0, i2v=True)
    vae_config, vae_weights = c["vae"].config, weight_bytes(c["vae"])
    encode = vae_encode_activation_bytes(vae_config, 64, 64, element_size=4)
    _, b = tiny_on_simulated_device(vae_weights + encode - 1, i2v=True)
    transformer_need = transformer_activation_bytes(b.transformer.config, 9, 64, 64, batch=2, element_size=4)
    assert transformer_need < vae_weights + encode - 1 - weight_bytes(b.transformer)  # the transformer fits
    pos = TextConditioning(prompt="", embeds=torch.zeros(1, 226, 32), input_ids=torch.zeros(1, 226, dtype=torch.long),
                           attention_mask=torch.ones(1, 226, dtype=torch.long))
    with pytest.raises(ActivationMemoryError, match=rf"encoding the first frame needs about {fmt(encode)} .* the "
                                                    r"largest size that fits is 48x48 at 9 frames"):
        sample_video(b, pos, pos, **dict(KW, height=64, width=64), image=torch.rand(1, 64, 64, 3))
    assert b.placement.manager.loads == []


def test_decode_too_large_untiled_is_refused_with_tiling_named():
    c, _ = tiny_on_simulated_device(0)
    vae, weights = c["vae"], weight_bytes(c["vae"])

    def need(h, w, tiling):
        return vae_decode_activation_bytes(vae.config, h, w, tiling=tiling, element_size=4)

    latent = torch.randn(1, 4, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # one frame of 256x256
    capacity = weights + need(256, 256, True)  # the tiled decode (tiles of 240x360: all of 256 wide) just fits
    assert need(256, 256, False) > need(256, 256, True)
    _, b = tiny_on_simulated_device(capacity)
    largest = max(s for s in range(16, 257, 16) if need(s, s, False) <= capacity - weights)
    with pytest.raises(ActivationMemoryError) as err:
        decode_latents(b, latent, tiling=False)
    assert str(err.value) == (
        f"decoding needs about {fmt(need(256, 256, False))} of activations for 256x256 (width x height), but cpu can "
        f"give it {fmt(capacity - weights)} ({fmt(capacity)} free or held by models that can be unloaded, less "
        f"{fmt(weights)} of weights): the largest size that fits is {largest}x{largest}; or turn tiling on (about "
        f"{fmt(need(256, 256, True))}).")
    assert b.placement.manager.loads == []
    assert decode_latents(b, latent, tiling=True).shape == (1, 1, 256, 256, 3)


def test_the_cpu_is_never_refused():
    b = bundle_from_components(tiny.build_components())
    assert b.placement.memory_for(b.transformer, b.vae) is None


def test_the_sampler_node_refuses_with_that_line(monkeypatch):
    """The Sampler node passes the message through unchanged (ComfyUI shows the exception's text)."""
    from magicmirror_video.nodes.cogvideox import CogVideoXSampler

    monkeypatch.setattr(Placement, "_move", lambda self, modules, onload: None)
    b = meta_5b_bundle(SimulatedDevice(24 * GIB))
    with pytest.raises(ActivationMemoryError) as err:
        CogVideoXSampler().sample(b, prompt(), prompt(), 2048, 2048, 49, 50, 6.0, 0, "DDIM")
    assert re.fullmatch(r"the transformer \(CFG batch of 2\) needs about [\d.]+ GiB of activations [^\n]+\.",
                        str(err.value))


# ------------------------------------------------------------------------------- the Sampler node's validation


def test_sampler_validation_refuses_what_it_can_before_the_prompt_runs(monkeypatch):
    """ComfyUI calls VALIDATE_INPUTS before running anything: the size rules (the sampler's own message), the ranges
    (which ComfyUI leaves to it), and on a GPU too small for any CogVideoX at that size, the bound with the largest
    size that fits; linked (unknown) values and the CPU pass."""
    from magicmirror_video.nodes import host
    from magicmirror_video.nodes.cogvideox import CogVideoXSampler

    validate = CogVideoXSampler.VALIDATE_INPUTS
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(host, "device_total_memory", lambda: None)
    assert validate(width=2048, height=2048, num_frames=49) is True  # the CPU: nothing to run out of
    assert validate(width=720, height=480, num_frames=10) == "num_frames=10 is not of the form 4k+1 (the VAE " \
        "compresses time by 4); use 9 or 13."
    assert validate(width=40, height=480, num_frames=49).startswith("width=40 is not a multiple of 16")
    assert validate(width=4096, height=480, num_frames=49) == "width=4096 is outside 16..2048."
    assert validate(width=None, height=480, num_frames=10) is True  # a linked width: checked when the sampler runs

    def leanest(f, h, w):  # CogVideoX-2B and CogVideoX 1.5 (two frames a token), batch 1, bf16
        two_b = transformer_activation_bytes({"patch_size": 2, "num_attention_heads": 30, "attention_head_dim": 64},
                                             f, h, w, batch=1, element_size=2)
        one_five = transformer_activation_bytes({"patch_size": 2, "patch_size_t": 2, "num_attention_heads": 48,
                                                 "attention_head_dim": 64}, f, h, w, batch=1, element_size=2)
        return min(two_b, one_five)

    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(host, "device_total_memory", lambda: 8 * GIB)
    assert 8 * GIB < leanest(49, 2048, 2048) < 12 * GIB
    square = max(s for s in range(16, 2049, 16) if leanest(49, s, s) <= 8 * GIB)
    frames = max(f for f in range(1, 49, 4) if leanest(f, 2048, 2048) <= 8 * GIB)
    message = validate(width=2048, height=2048, num_frames=49)
    assert message == (
        f"even the leanest CogVideoX transformer (2B, or 1.5 at two frames a token; batch 1, bf16) needs about "
        f"{fmt(leanest(49, 2048, 2048))} of activations for 49 frames of 2048x2048 (width x height), but cuda:0 can "
        f"give it 8.0 GiB (8.0 GiB in all): the largest size that fits is {square}x{square} at 49 frames or {frames} "
        f"frames at 2048x2048.")
    monkeypatch.setattr(host, "device_total_memory", lambda: 12 * GIB)
    assert validate(width=2048, height=2048, num_frames=49) is True  # the model's own check decides at run time
