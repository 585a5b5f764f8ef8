"""DualReal: skip-term init, official math and file format, controller, gradient masking, training."""

import dataclasses
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights, straight_and_resumed

from magicmirror_video.models.dualreal import (
    DualRealAdapters,
    DualRealConfig,
    DualRealPatch,
    StageBlender,
    config_from_state_dict,
    inject_dualreal,
    load_dualreal,
    save_dualreal,
)
from magicmirror_video.models.sampler import rotary_embeddings
from magicmirror_video.testing import reference_json, tiny
from magicmirror_video.training.config import load_config
from magicmirror_video.training.train_dualreal import PRESETS, DualRealTrainConfig, DualRealTrainer


def inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 4, 4, 6, generator=g), torch.randn(batch, 9, 32, generator=g),
            torch.full((batch,), 600), torch.randn(1, 1, 16, generator=g))


def run(t, video, text, timestep):
    with torch.no_grad():
        return t(hidden_states=video, encoder_hidden_states=text, timestep=timestep,
                 image_rotary_emb=rotary_embeddings(t, 32, 48, 3, 8, "cpu"), return_dict=False)[0]


def reference_with_hooks(t, adds):
    """Run the unmodified diffusers model with forward hooks that add ``adds(block, kind, x)`` to the
    attention and feed-forward outputs (x = their modulated inputs)."""
    handles = []
    for i, blk in enumerate(t.transformer_blocks):
        def attn_hook(mod, args, kwargs, out, i=i):
            x = torch.cat([kwargs["encoder_hidden_states"], kwargs["hidden_states"]], dim=1)
            extra = adds(i, "attn", x)
            n = kwargs["encoder_hidden_states"].shape[1]
            return out[0] + extra[:, n:], out[1] + extra[:, :n]

        def ff_hook(mod, args, out, i=i):
            return out + adds(i, "ff", args[0])
        handles += [blk.attn1.register_forward_hook(attn_hook, with_kwargs=True), blk.ff.register_forward_hook(ff_hook)]
    return handles


def test_fresh_adapters_add_only_the_documented_skip_term():
    t = tiny.build_components(num_layers=4)["transformer"]
    video, text, timestep, cond = inputs()
    adapters = DualRealAdapters(DualRealConfig.for_transformer(t, condition_dim=16, hidden_dim=8, n_groups=2))
    undo, state = inject_dualreal(t, adapters, cond)
    try:
        ours = run(t, video, text, timestep)
    finally:
        undo()
    assert torch.allclose(state.alpha, torch.full_like(state.alpha, 0.1))  # sigmoid(0) * 0.2
    handles = reference_with_hooks(t, lambda i, kind, x: 0.2 * x)  # α·x + (0.2 − α)·x
    try:
        expected = run(t, video, text, timestep)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, run(t, video, text, timestep))  # the skip term is not nothing


def official_adapter(sd, prefix, x, cond=None):
    """The official Adapter: x + up(gelu(down(x + condition_linear(c))))."""
    h = x
    if cond is not None and f"{prefix}.condition_linear.weight" in sd:
        h = h + F.linear(cond, sd[f"{prefix}.condition_linear.weight"], sd[f"{prefix}.condition_linear.bias"])
    h = F.linear(h, sd[f"{prefix}.down_linear.weight"], sd[f"{prefix}.down_linear.bias"])
    return F.linear(F.gelu(h), sd[f"{prefix}.up_linear.weight"], sd[f"{prefix}.up_linear.bias"]) + x


def official_controller(sd, emb, tokens):
    c = "controller."
    shift, scale, gate = F.linear(F.silu(emb), sd[c + "timestep_encoder.1.weight"],
                                  sd[c + "timestep_encoder.1.bias"]).chunk(3, dim=1)
    ce = F.linear(tokens.max(dim=1)[0], sd[c + "channel_encoder.0.weight"], sd[c + "channel_encoder.0.bias"])
    h = F.layer_norm(ce, ce.shape[-1:], sd[c + "norm.weight"], sd[c + "norm.bias"], eps=1e-5) * (1 + scale) + shift
    h = F.gelu(F.linear(h, sd[c + "fuse_proj.weight"], sd[c + "fuse_proj.bias"]), approximate="tanh")
    h = F.linear(h, sd[c + "fuse_proj_down.weight"], sd[c + "fuse_proj_down.bias"]) + gate * ce
    h = F.linear(F.relu(F.linear(F.relu(h), sd[c + "fusion_net.1.weight"], sd[c + "fusion_net.1.bias"])),
                 sd[c + "fusion_net.3.weight"], sd[c + "fusion_net.3.bias"])
    return torch.sigmoid(h) * 0.2


def random_adapters(t, seed=3, n_groups=2):
    adapters = DualRealAdapters(DualRealConfig.for_transformer(t, condition_dim=16, hidden_dim=8, n_groups=n_groups))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return adapters


def test_official_adapter_pth_loads_and_matches_the_official_math(tmp_path):
    t = tiny.build_components(num_layers=4)["transformer"]
    video, text, timestep, cond = inputs(batch=2)
    adapters = random_adapters(t)
    sd = {k: v.clone() for k, v in adapters.state_dict().items()}
    torch.save(sd, tmp_path / "adapter.pth")  # the official format: a plain {name: tensor} pickle
    loaded = load_dualreal(str(tmp_path / "adapter.pth"))
    assert loaded.config.n_groups == 2 and loaded.config.num_layers == 4
    undo, state = inject_dualreal(t, loaded, cond)
    try:
        ours = run(t, video, text, timestep)
    finally:
        undo()
    # Reference: capture the time embedding and patch tokens of the unmodified model, then add the
    # official adapters' outputs with hooks.
    captured = {}
    hs = [t.time_embedding.register_forward_hook(lambda m, a, o: captured.__setitem__("emb", o)),
          t.patch_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("tokens", o))]
    run(t, video, text, timestep)
    for h in hs:
        h.remove()
    alpha = official_controller(sd, captured["emb"], captured["tokens"])
    torch.testing.assert_close(state.alpha, alpha, atol=1e-6, rtol=1e-6)
    assert ((alpha > 0) & (alpha < 0.2)).all()

    def adds(i, kind, x):
        a = alpha[:, i // 2].view(-1, 1, 1)
        return (a * official_adapter(sd, f"transformer_blocks.{i}.id_{kind}_adapter", x)
                + (0.2 - a) * official_adapter(sd, f"transformer_blocks.{i}.motion_{kind}_adapter", x, cond))
    handles = reference_with_hooks(t, adds)
    try:
        expected = run(t, video, text, timestep)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    save_dualreal(str(tmp_path / "pack.safetensors"), loaded)
    again = load_dualreal(str(tmp_path / "pack.safetensors"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())
    torch.save({"not": "tensors"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="DualReal"):
        load_dualreal(str(tmp_path / "bad.pth"))


def test_parameter_names_and_shapes_match_the_official_5b_adapter_manifest():
    """The official CogVideoX-5B adapter.pth's keys and shapes (shipped in testing/reference/)."""
    manifest = reference_json("dualreal_adapter_5b.keys.json")
    with torch.device("meta"):
        adapters = DualRealAdapters(DualRealConfig())
    assert {k: list(v.shape) for k, v in adapters.state_dict().items()} == manifest
    assert config_from_state_dict({k: torch.empty(v, device="meta") for k, v in manifest.items()}) == DualRealConfig()


@pytest.mark.parametrize("layers,groups", [(42, 7), (30, 5), (12, 2), (8, 4), (6, 1)])
def test_controller_range_and_group_mapping(layers, groups):
    config = DualRealConfig(width=32, num_layers=layers, time_embed_dim=8, hidden_dim=4, condition_dim=16,
                            n_groups=groups)
    mapping = [config.group_of(i) for i in range(layers)]
    per = layers // groups
    assert mapping == [i // per for i in range(layers)] and set(mapping) == set(range(groups))
    controller = StageBlender(config)
    with torch.no_grad():
        for p in controller.parameters():
            p.normal_(0, 0.05)
    alpha = controller(torch.randn(64, 8), torch.randn(64, 20, 32))
    assert alpha.shape == (64, groups) and ((alpha > 0) & (alpha < 0.2)).all() and alpha.std() > 0
    with torch.no_grad():  # saturated weights: float32 sigmoid reaches its bounds, never beyond
        for p in controller.parameters():
            p.normal_(0, 5.0)
    alpha = controller(torch.randn(64, 8), torch.randn(64, 20, 32))
    assert ((alpha >= 0) & (alpha <= 0.2)).all()


@pytest.fixture(scope="module")
def tiny_dualreal(tmp_path_factory):
    from magicmirror_video.training.presets import build_tiny_dualreal
    out = tmp_path_factory.mktemp("dualreal")
    return build_tiny_dualreal(load_config(DualRealTrainConfig, ["--preset", "tiny", "--output_dir", str(out)], PRESETS))


def test_gradient_masking_keeps_the_other_dimension_bit_identical(tiny_dualreal, tmp_path):
    from accelerate import Accelerator
    trainer = DualRealTrainer(dataclasses.replace(tiny_dualreal, output_dir=str(tmp_path)))
    trainer.accelerator = Accelerator(cpu=True)
    trainer.module = module = trainer.build()
    data = trainer.dataset()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    steps = {kind: next(s for s in range(100) if trainer.task_of(s) == kind) for kind in ("identity", "motion")}
    for kind in ("motion", "identity", "motion"):
        before = {k: v.clone() for k, v in module.adapters.state_dict().items()}
        loss, _ = module(trainer.collate([data[kind][0]], kind), torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.before_optimizer_step(steps[kind])
        opt.step()
        after = module.adapters.state_dict()
        frozen, trained = ("id_", "motion_") if kind == "motion" else ("motion_", "id_")
        for name, value in after.items():
            if f".{frozen}" in name:
                assert torch.equal(value, before[name]), name
        assert any(not torch.equal(after[n], before[n]) for n in after if f".{trained}" in n)
        assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("controller."))


def test_training_resumes_exactly_and_the_adapter_drives_the_nodes(tiny_dualreal, tmp_path, monkeypatch):
    a, b, straight = straight_and_resumed(DualRealTrainer, tiny_dualreal, tmp_path, 3, max_steps=6,
                                          checkpointing_steps=3, lr_scheduler="cosine")
    assert_same_weights(a, b)

    models = tmp_path / "models"
    for sub in ("dualreal", "clip_vision"):
        (models / sub).mkdir(parents=True)
    shutil.copy(straight, models / "dualreal" / "trained.safetensors")
    shutil.copy(tiny_dualreal.clip_vision, models / "clip_vision" / "clip.safetensors")
    os.symlink(os.path.dirname(tiny_dualreal.model_path), models / "CogVideo")
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models))
    from magicmirror_video import nodes
    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    ref = torch.rand(1, 48, 48, 3)
    (dynamic,) = m["MMV_DualRealStageBlender"]().apply(model, "trained.safetensors", "clip.safetensors", ref,
                                                       "dynamic", 0.1)
    (fixed,) = m["MMV_DualRealStageBlender"]().apply(model, "trained.safetensors", "clip.safetensors", ref,
                                                     "fixed", 0.05)
    enc = m["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "a dog * runs across a green field"), enc.encode(model, "")
    kw = dict(width=32, height=32, num_frames=9, steps=3, cfg=6.0, seed=0, scheduler="DDIM")
    (lat_dyn,) = m["MMV_CogVideoXSampler"]().sample(dynamic, pos, neg, **kw)
    (lat_fix,) = m["MMV_CogVideoXSampler"]().sample(fixed, pos, neg, **kw)
    (lat_base,) = m["MMV_CogVideoXSampler"]().sample(model, pos, neg, **kw)
    assert not torch.equal(lat_dyn["samples"], lat_base["samples"])
    alpha = lat_dyn["dualreal_alpha"]
    assert alpha.shape == (3, 1) and ((alpha > 0) & (alpha < 0.2)).all()
    assert torch.allclose(lat_fix["dualreal_alpha"], torch.full((3, 1), 0.05))
    assert "dualreal_alpha" not in lat_base
    (plot,) = m["MMV_DualRealBlendPlot"]().plot(lat_dyn)
    assert plot.ndim == 4 and plot.shape[-1] == 3 and plot.shape[0] == 1
    with pytest.raises(ValueError, match="no DualReal blend"):
        m["MMV_DualRealBlendPlot"]().plot(lat_base)
    assert isinstance(fixed.patches[-1], DualRealPatch)


def test_n_groups_must_split_the_blocks_evenly(tmp_path):
    from magicmirror_video.models.cogvideox import WeightsFileError, write_safetensors
    from magicmirror_video.models.dualreal import default_groups
    with pytest.raises(ValueError, match=r"n_groups=5 does not divide the model's 42 transformer blocks into equal "
                                         r"groups; use one of 1, 2, 3, 6, 7, 14, 21, 42"):
        DualRealConfig(num_layers=42, n_groups=5)  # block 41 would fall in a 6th group (41 // 8)
    for bad in (0, 43):
        with pytest.raises(ValueError, match=f"n_groups={bad} does not divide"):
            DualRealConfig(num_layers=42, n_groups=bad)
    assert [default_groups(n) for n in (2, 4, 20, 30, 42)] == [1, 1, 2, 5, 7]
    t = tiny.build_components(num_layers=4)["transformer"]
    adapters = DualRealAdapters(DualRealConfig.for_transformer(t, condition_dim=16, hidden_dim=8, n_groups=2))
    sd = dict(adapters.state_dict())
    sd["controller.fusion_net.3.weight"] = torch.zeros(3, sd["controller.fusion_net.3.weight"].shape[1])
    sd["controller.fusion_net.3.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "odd.pth")  # an official-format file whose controller has 3 groups for 4 blocks
    with pytest.raises(WeightsFileError, match=r"odd\.pth.*n_groups=3 does not divide the model's 4"):
        load_dualreal(str(tmp_path / "odd.pth"))
    four = DualRealAdapters(DualRealConfig.for_transformer(t, condition_dim=16, hidden_dim=8, n_groups=4))
    with pytest.raises(ValueError, match="made for .* 4 layers.* 3 layers"):  # not an n_groups error
        four.check_compatible(tiny.build_components(num_layers=3)["transformer"])
    config = {**dataclasses.asdict(adapters.config), "n_groups": 3}
    write_safetensors(str(tmp_path / "odd.safetensors"), adapters.state_dict(), {"config": config})
    with pytest.raises(WeightsFileError, match=r"odd\.safetensors.*n_groups=3"):
        load_dualreal(str(tmp_path / "odd.safetensors"))


def test_node_and_trainer_embed_a_non_square_reference_identically(tiny_dualreal, tmp_path, monkeypatch):
    """One preprocessing (centre crop to a square, then resize, as OpenCLIP) for the StageBlender node and the
    trainer: same CLIP embedding for the same 64x40 image, equal to an independent PIL crop + resize and far
    from a stretched image's."""
    import numpy as np
    from PIL import Image

    from magicmirror_video.models.clip_vision import CLIP_MEAN, CLIP_STD, load_clip_vision
    img = np.zeros((40, 64, 3), np.uint8)
    img[:, :12] = (230, 30, 30)  # red and blue side bands: cropped away by a centre crop, kept by a stretch
    img[:, 52:] = (30, 30, 230)
    img[:, 12:52, 1] = np.linspace(40, 220, 40).astype(np.uint8)[None, :]
    img[10:30, 20:44, 2] = 180
    Image.fromarray(img).save(tmp_path / "ref.png")
    trainer = DualRealTrainer(dataclasses.replace(tiny_dualreal, output_dir=str(tmp_path / "run"),
                                                  reference_image=str(tmp_path / "ref.png")))
    trained = trainer.reference_condition(load_clip_vision(tiny_dualreal.clip_vision))

    models = tmp_path / "models"
    for sub in ("dualreal", "clip_vision"):
        (models / sub).mkdir(parents=True)
    shutil.copy(tiny_dualreal.clip_vision, models / "clip_vision" / "clip.safetensors")
    os.symlink(os.path.dirname(tiny_dualreal.model_path), models / "CogVideo")
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models))
    from magicmirror_video import nodes
    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    save_dualreal(str(models / "dualreal" / "a.safetensors"),
                  DualRealAdapters(DualRealConfig.for_transformer(model.transformer, condition_dim=16, hidden_dim=8)))
    image = torch.from_numpy(np.array(Image.open(tmp_path / "ref.png").convert("RGB"))).float()[None] / 255.0
    (patched,) = m["MMV_DualRealStageBlender"]().apply(model, "a.safetensors", "clip.safetensors", image, "dynamic",
                                                       0.1)
    assert torch.equal(patched.patches[-1].condition, trained)

    clip = load_clip_vision(tiny_dualreal.clip_vision)
    size = clip.config.image_size

    def embed(pil):
        x = torch.from_numpy(np.array(pil.resize((size, size), Image.BICUBIC))).float().permute(2, 0, 1) / 255.0
        x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        with torch.no_grad():
            return clip(pixel_values=x[None]).image_embeds
    reference = embed(Image.fromarray(img).crop((12, 0, 52, 40)))
    stretched = embed(Image.fromarray(img))
    gap = (trained[0] - reference).abs().max().item()
    assert gap < 0.01 * (stretched - reference).abs().max().item(), (gap, (stretched - reference).abs().max())


def test_official_recipe_conditions_per_step_kind(tiny_dualreal, tmp_path, monkeypatch):
    """Identity steps pass no motion condition; a motion step's condition is, per clip, the CLIP embedding of one
    of that clip's own frames (checked against CLIP applied to every loaded frame)."""
    from accelerate import Accelerator

    from magicmirror_video.models.clip_vision import image_embeds, load_clip_vision
    from magicmirror_video.training import train_dualreal

    trainer = DualRealTrainer(dataclasses.replace(tiny_dualreal, output_dir=str(tmp_path)))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    data = trainer.dataset()
    conditions = []
    original = train_dualreal.inject_dualreal
    monkeypatch.setattr(train_dualreal, "inject_dualreal",
                        lambda t, a, c, **k: conditions.append(c) or original(t, a, c, **k))
    identity = trainer.collate([data["identity"][0]], "identity")
    motion = trainer.collate([data["motion"][0], data["motion"][1]], "motion")
    module(identity, torch.Generator().manual_seed(0))
    module(motion, torch.Generator().manual_seed(0))
    assert conditions[0] is None
    assert conditions[1].shape == (2, 1, 16)
    clip = load_clip_vision(tiny_dualreal.clip_vision)
    for row in range(2):
        frames = motion["pixels"][row].permute(0, 2, 3, 1) * 0.5 + 0.5  # every frame of that clip, as IMAGEs
        per_frame = image_embeds(clip, frames)
        distance = (per_frame - conditions[1][row, 0]).abs().amax(dim=-1)
        assert distance.min() < 1e-5, distance  # it is one of the clip's own frames
    c = trainer.config
    assert (c.frame_sampling, c.lr_scheduler, c.lr_warmup_steps, c.identity_batch_size) == \
        ("start", "constant", 0, 1)  # (tiny preset); the defaults are the official recipe:
    defaults = DualRealTrainConfig()
    assert (defaults.frame_sampling, defaults.lr_scheduler, defaults.lr_warmup_steps, defaults.motion_batch_size,
            defaults.identity_batch_size) == ("start", "cosine_with_restarts", 200, 3, 1)
