"""The pieces ComfyUI's launch flags rely on, without ComfyUI (the flag x mode matrix itself runs core's own
model management in ``tests/test_host_memory_flags.py``):

* the simulated card (``testing/fake_cuda.py``) fails where a GPU fails: a layer whose weights stayed on the CPU
  while its input is on ``cuda:0`` raises CUDA's device error, ``.numpy()`` of a card tensor too, and the card counts
  each storage once;
* ``nodes/host.castable`` (what lets core load a module partly or take part of it back): a module with some layers on
  the card and some on the CPU runs, bit for bit as on the CPU, the CPU layers' weights coming in for their forward
  and left on the CPU afterwards — also when the forward raises;
* per-component devices: a component with a role of its own (ComfyUI's text encoder on the CPU under ``--lowvram``)
  runs there, is never streamed beside an accelerator and takes its inputs there;
* streamed weights pin on the fly (diffusers' ``low_cpu_mem_usage``), not a page-locked copy of the whole model.
"""

from __future__ import annotations

import pytest
import torch

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.placement import Placement
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny
from magicmirror_video.testing.fake_cuda import FakeCuda

GIB = 2**30


@pytest.fixture
def card():
    fake = FakeCuda(GIB)
    undo = fake.install()
    try:
        yield fake
    finally:
        undo()


def test_the_simulated_card_fails_where_a_gpu_fails(card):
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with card:
        on_card = x.to("cuda")
        assert on_card.device == torch.device("cuda", 0) and on_card.is_cuda and not x.is_cuda
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            layer(on_card)  # weights on the CPU, input on the card
        with pytest.raises(TypeError, match="numpy"):
            on_card.numpy()
        layer.to("cuda")
        out = layer(on_card)
        assert out.is_cuda and torch.equal(out.cpu(), torch.nn.functional.linear(x, layer.weight.cpu(),
                                                                                  layer.bias.cpu()))
        assert card.used() == 8 * 4 * 4 + 4 * 4 + on_card.nbytes + out.nbytes
        view = on_card[:1]  # a view: the same storage, counted once
        assert view.is_cuda and card.used() == 8 * 4 * 4 + 4 * 4 + on_card.nbytes + out.nbytes
        layer.to("cpu")
        assert not layer.weight.is_cuda and card.used() == on_card.nbytes + out.nbytes
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(GIB, dtype=torch.uint8, device="cuda")


def test_castable_layers_bring_their_weights_for_their_forward(card):
    from magicmirror_video.nodes.host import castable

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    expected = model(x)
    with card:
        castable(model, torch.device("cuda", 0))
        model[0].to("cuda")  # what core loaded; the rest stayed on the CPU (a partial load)
        assert model[0].comfy_cast_weights is False and model[3].comfy_cast_weights is False  # core's lowvram flag
        out = model(x.to("cuda"))
        assert out.is_cuda and torch.equal(out.cpu(), expected)
        assert not model[3].weight.is_cuda and not model[1].weight.is_cuda  # back on the CPU after the forward
        assert model[0].weight.is_cuda
        model[3].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(KeyboardInterrupt("cancel")))
        with pytest.raises(KeyboardInterrupt):
            model(x.to("cuda"))
        assert not model[3].weight.is_cuda and "_mmv_cast_saved" not in model[3].__dict__  # restored on errors too


def make_bundle(placement):
    c = tiny.build_components(num_layers=1)
    for m in (c["transformer"], c["vae"], c["text_encoder"]):
        m.requires_grad_(False)
    return CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                           tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=torch.float32,
                           device=placement.device, placement=placement)


@pytest.mark.parametrize("mode", ["model", "sequential", "block"])
def test_a_component_runs_on_its_roles_device(card, mode):
    """ComfyUI under --lowvram runs text encoders on the CPU: T5 with the role ``text_encoder`` on the CPU runs there
    (its prompt ids too), is not streamed beside the card, while the transformer streams / moves to the card."""
    reference = encode_prompt(make_bundle(Placement("cpu")), "a man img is walking", trigger="img").embeds
    with card:
        cpu = torch.device("cpu")
        placement = Placement("cuda", "cpu", mode, devices={"text_encoder": (cpu, cpu)})
        b = make_bundle(placement)
        assert placement.device_of(b.text_encoder) == cpu and placement.device_of(b.vae) == torch.device("cuda")
        assert placement.home(b.text_encoder) == "offloaded"
        assert placement.home(b.transformer) == ("streamed" if mode != "model" else "offloaded")
        seen = []
        b.text_encoder.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(next(t for t in (*args, *kwargs.values())
                                                     if isinstance(t, torch.Tensor)).device), with_kwargs=True)
        embeds = encode_prompt(b, "a man img is walking", trigger="img").embeds
        assert seen == [cpu] and not b.text_encoder.shared.weight.is_cuda
        assert torch.equal(embeds, reference)


def test_streamed_weights_are_pinned_on_the_fly(monkeypatch):
    """diffusers pre-pins a full copy of every streamed module unless ``low_cpu_mem_usage`` (10.4 GiB transformer +
    8.9 GiB T5 page-locked on 5B): the placement always asks for pinning per group."""
    import diffusers.hooks

    calls = []
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", lambda module, **kw: calls.append(kw))
    placement = Placement("cpu", "cpu", "block")
    placement.add(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)])), stream=True)
    placement.add(torch.nn.Linear(2, 2), stream="leaf")
    assert [kw["low_cpu_mem_usage"] for kw in calls] == [True, True]
    assert [kw["offload_device"] for kw in calls] == [torch.device("cpu")] * 2


def test_castable_components_run_with_every_other_layer_left_on_the_cpu(card):
    """What core's partial loading leaves: about half of T5's, the transformer's and the VAE's layers (and their
    buffers) on the CPU, the rest on the card; each runs a whole stage on the card — T5's tied embedding and relative
    attention bias, the transformer's patch embedding and norms, the VAE's causal convolutions included — with
    outputs equal to the CPU's bit for bit, and every left-behind tensor back on the CPU afterwards."""
    from magicmirror_video.models.sampler import decode_latents, sample_video
    from magicmirror_video.nodes.host import castable

    kw = dict(num_frames=5, height=32, width=32, steps=1, cfg=6.0, seed=0)
    reference_bundle = make_bundle(Placement("cpu"))
    pos, neg = (encode_prompt(reference_bundle, p) for p in ("a man is walking", "blurry"))
    latents = sample_video(reference_bundle, pos, neg, **kw)
    expected = (pos.embeds, latents, decode_latents(reference_bundle, latents))
    with card:
        placement = Placement("cuda", "cpu", "none")
        b = make_bundle(placement)  # no manager: "resident" components are moved whole at add; put half back
        b.text_cache._items.clear()
        left = []
        for component in (b.text_encoder, b.transformer, b.vae):
            castable(component, torch.device("cuda", 0))
            holders = [m for m in component.modules() if m._parameters or m._buffers]
            for m in holders[::2]:  # its own tensors back to the CPU (not its children's)
                for d in (m._parameters, m._buffers):
                    for name, t in d.items():
                        if t is not None:
                            d[name] = torch.nn.Parameter(t.cpu(), t.requires_grad) if isinstance(
                                t, torch.nn.Parameter) else t.cpu()
                left.append(m)
        got_pos = encode_prompt(b, "a man is walking")
        got_neg = encode_prompt(b, "blurry")
        got_latents = sample_video(b, got_pos, got_neg, **kw)
        video = decode_latents(b, got_latents)
        assert all(not t.is_cuda for m in left for t in (*m._parameters.values(), *m._buffers.values())
                   if t is not None)
        assert got_latents.is_cuda
        got = (got_pos.embeds, got_latents.cpu(), video)
    for name, a, e in zip(("T5", "sampling", "decode"), got, expected):
        assert torch.equal(a, e), name
