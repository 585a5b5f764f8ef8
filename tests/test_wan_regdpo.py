"""Reg-DPO and SFT on Wan 2.1 / 2.2 (flow matching) through the same trainer as CogVideoX: the flow-matching SFT loss
against a computation written here, step-0 sanity and Eq. 5's gradient, the trainer x variant x mode matrix, Wan
2.2 A14B's two experts, resume, the precompute cache and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from magicmirror_video.testing import tiny_wan
from magicmirror_video.testing.tiny import write_gt_pairs
from magicmirror_video.training.config import load_config
from magicmirror_video.training.train_regdpo import RegDPOTrainConfig, RegDPOTrainer, main

CAPTION = "a car drives along a mountain road with snow"


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    folders = {v: tiny_wan.build_model_folder(str(root / v), v) for v in tiny_wan.VARIANTS}
    return {"models": folders, "pairs": write_gt_pairs(str(root / "data")), "root": root}


def config_for(wan_root, variant, tmp_path, *extra):
    argv = ["--model_path", wan_root["models"][variant], "--data", wan_root["pairs"], "--num_frames", "5",
            "--height", "32", "--width", "32", "--max_steps", "2", "--mixed_precision", "no", "--report_to", "none",
            "--checkpointing_steps", "0", "--no-gradient_checkpointing", "--output_dir", str(tmp_path / "out"), *extra]
    return load_config(RegDPOTrainConfig, argv)


def built(config, **overrides):
    from accelerate import Accelerator

    trainer = RegDPOTrainer(dataclasses.replace(config, **overrides))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    return trainer, module, trainer.collate([trainer.dataset()[0], trainer.dataset()[1]])


def perturb(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in module.loras:
            for p in lora.up.values():
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------ the losses, by hand

@pytest.mark.parametrize("variant", ["wan2.1-t2v", "wan2.2-ti2v"])
def test_sft_loss_equals_the_flow_matching_loss_written_out(wan_root, tmp_path, variant):
    """``--mode sft``: ε ~ N(0, 1), u ~ U(0, 1), σ = s·u / (1 + (s − 1)·u), x_t = (1 − σ)·x0 + σ·ε, the transformer at
    1000·σ, loss = mean((v̂ − (ε − x0))²) — written out here with diffusers' modules only (TI2V: the first frame
    given, its tokens at t = 0, the error over the other frames)."""
    trainer, module, batch = built(config_for(wan_root, variant, tmp_path, "--mode", "sft"))
    perturb(module)
    loss, logs = module(batch, torch.Generator().manual_seed(11))
    m = trainer.spec.model
    vae, transformer, shift = m.vae, m.transformer, m.scheduler_config["flow_shift"]
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        post = vae.encode(batch["winner"].permute(0, 2, 1, 3, 4)).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        x0 = (z - mean) / std
        first = None
        if variant == "wan2.2-ti2v":
            first = (vae.encode(batch["first_frame"][:, :, None]).latent_dist.mode() - mean) / std
        text = m.text_encoder(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        text = text * batch["attention_mask"][..., None]
    eps = torch.randn(x0.shape, generator=g)
    u = torch.rand(2, generator=g, dtype=torch.float64)
    sigma = (shift * u / (1 + (shift - 1) * u)).float().view(-1, 1, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * eps
    t = sigma.flatten() * 1000
    if first is not None:
        xt = torch.cat([first, xt[:, :, 1:]], dim=2)
        hw = xt.shape[-1] // 2 * xt.shape[-2] // 2
        t = torch.cat([torch.zeros(2, hw), t[:, None].expand(2, (xt.shape[2] - 1) * hw)], dim=1)
    pred = transformer(hidden_states=xt, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    err = (pred - (eps - x0)) ** 2
    expected = (err[:, :, 1:] if first is not None else err).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert set(logs) == {"err_w"}


@pytest.mark.parametrize("variant", ["wan2.1-i2v", "wan2.2-t2v-a14b"])
def test_step_zero_sanity(wan_root, tmp_path, variant):
    _, module, batch = built(config_for(wan_root, variant, tmp_path), beta=500.0)
    loss, logs = module(batch, torch.Generator().manual_seed(0))
    assert float(logs["s"]) == 0.0
    assert float(logs["L_DPO"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(logs["DGR"]) == pytest.approx(250.0, rel=1e-6)


@pytest.mark.parametrize("variant,mode", [("wan2.1-i2v", "regdpo"), ("wan2.2-i2v-a14b", "dpo")])
def test_autograd_gradient_equals_eq5(wan_root, tmp_path, variant, mode):
    """∇L = Σ_rows −[2(DGR + r)(y_w − ŷ_w)ᵀ∇ŷ_w − 2·DGR·(y_l − ŷ_l)ᵀ∇ŷ_l] / (N·B) with the velocity as y."""
    _, module, batch = built(config_for(wan_root, variant, tmp_path), beta=50.0, mode=mode)
    perturb(module)
    params = [p for p in module.parameters() if p.requires_grad]
    loss, _ = module(batch, torch.Generator().manual_seed(3))
    autograd = torch.autograd.grad(loss, params, allow_unused=True)
    out = module.outputs(batch, torch.Generator().manual_seed(3))
    spec = module.spec
    err = {k: spec.error(out[f"{p}_{k}"], out[f"target_{k}"]).detach() for k in ("w", "l") for p in ("pred",)}
    ref = {k: spec.error(out[f"ref_{k}"], out[f"target_{k}"]) for k in ("w", "l")}
    s = (err["w"] - ref["w"]) - (err["l"] - ref["l"])
    dgr = 50.0 * (1 - torch.sigmoid(-50.0 * s))
    r = dgr if mode == "regdpo" else torch.zeros_like(dgr)
    n, b = out["pred_w"][0].numel(), out["pred_w"].shape[0]
    scale = lambda v: v.view(-1, 1, 1, 1, 1) / (n * b)  # noqa: E731
    gw = -2 * scale(dgr + r) * (out["target_w"] - out["pred_w"]).detach()
    gl = 2 * scale(dgr) * (out["target_l"] - out["pred_l"]).detach()
    expected = torch.autograd.grad([out["pred_w"], out["pred_l"]], params, grad_outputs=[gw, gl], allow_unused=True)
    assert (dgr > 1e-3).all()
    used = 0
    for a, e in zip(autograd, expected):
        if a is None:  # an expert no row of this batch went to
            assert e is None
            continue
        used += 1
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, atol=1e-4 * float(a.abs().max()), rtol=1e-4)
    assert used > 0


# ------------------------------------------------------------------ the trainer on every variant

MATRIX = ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-ti2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"]


@pytest.mark.parametrize("mode", ["sft", "regdpo"])
@pytest.mark.parametrize("variant", MATRIX)
def test_trainer_runs_two_steps_on_every_variant(wan_root, tmp_path, variant, mode, capsys):
    from safetensors import safe_open

    from magicmirror_video.models.wan import folder_variant

    argv = ["--model_path", wan_root["models"][variant], "--data", wan_root["pairs"], "--num_frames", "5", "--height",
            "32", "--width", "32", "--max_steps", "2", "--mixed_precision", "no", "--report_to", "none",
            "--checkpointing_steps", "0", "--output_dir", str(tmp_path / "out"), "--mode", mode,
            "--learning_rate", "1e-3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    two = "a14b" in variant
    names = ["regdpo_high_noise.safetensors", "regdpo_low_noise.safetensors"] if two else ["regdpo.safetensors"]
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == names
    for name in names:
        assert name in printed
        with safe_open(str(tmp_path / "out" / name), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["method"] == "regdpo" and meta["mode"] == mode and json.loads(meta["rank"]) == 16
        assert meta["base_model"] == str(folder_variant(wan_root["models"][variant]))  # the variant it trained on
        assert all(k.startswith("diffusion_model.blocks.") for k in keys), keys[:3]
        assert {k.split(".")[3] for k in keys} >= {"self_attn", "cross_attn", "ffn"}
        if two:
            assert meta["expert"] == name.split("_", 1)[1].rsplit(".", 1)[0]


def test_sft_step_runs_one_forward_over_the_winners(wan_root, tmp_path):
    """No loser latents, no reference forward: one transformer call per step (regdpo: pair-parallel model + LoRA-off
    reference = two calls over winner and loser)."""
    for mode, calls_expected, keys in (("sft", 1, {"winner"}), ("regdpo", 2, {"winner", "loser"})):
        trainer, module, batch = built(config_for(wan_root, "wan2.1-t2v", tmp_path / mode), mode=mode)
        assert keys <= set(batch) and ("loser" in batch) == (mode != "sft")
        calls = []
        handle = trainer.spec.model.transformer.register_forward_pre_hook(
            lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        module(batch, torch.Generator().manual_seed(0))
        handle.remove()
        assert len(calls) == calls_expected and set(calls) == {2 if mode == "sft" else 4}


def test_one_expert_trains_its_own_sigma_range(wan_root, tmp_path):
    for expert, other in (("high_noise", "low_noise"), ("low_noise", "high_noise")):
        trainer, module, batch = built(config_for(wan_root, "wan2.2-t2v-a14b", tmp_path / expert, "--experts", expert))
        model = trainer.spec.model
        assert getattr(model, "transformer" if other == "high_noise" else "transformer_2") is None  # never loaded
        assert len(module.loras) == 1 and trainer.spec.expert_names == [expert]
        draw = trainer.spec.draw_noise(torch.zeros(64, 4, 3, 4, 4), torch.Generator().manual_seed(0))
        assert ((draw.timesteps >= 875) == (expert == "high_noise")).all()
        path = str(tmp_path / expert / "regdpo.safetensors")
        os.makedirs(tmp_path / expert, exist_ok=True)
        trainer.module, trainer.step = module, 0
        assert trainer.export(path) == [str(tmp_path / expert / f"regdpo_{expert}.safetensors")]


def test_resume_is_bit_identical_after_a_kill(wan_root, tmp_path):
    from conftest import assert_same_weights, straight_and_resumed
    from safetensors.torch import load_file

    config = config_for(wan_root, "wan2.2-i2v-a14b", tmp_path, "--learning_rate", "1e-3", "--batch_size", "2")
    a, b, straight = straight_and_resumed(RegDPOTrainer, config, tmp_path, 2, max_steps=4, checkpointing_steps=2,
                                          lr_scheduler="cosine")
    assert_same_weights(a, b)
    low = [load_file(str(tmp_path / run / "regdpo_low_noise.safetensors")) for run in ("straight", "killed")]
    assert_same_weights(*low)
    for trained in (a, low[0]):  # rows went to both experts, and each expert's LoRA trained
        assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)


def test_precompute_cache_keeps_umt5_vae_and_clip_out_of_the_steps(wan_root, tmp_path, monkeypatch):
    """I2V 2.1 with the cache: after filling, a step never calls UMT5, the VAE encoder or CLIP; a second run encodes
    nothing; the cached conditions equal the uncached ones."""
    config = config_for(wan_root, "wan2.1-i2v", tmp_path, "--precompute_cache", "--cache_dir", str(tmp_path / "c"),
                        "--frame_sampling", "start")
    trainer = RegDPOTrainer(config)
    original_fill = RegDPOTrainer.fill_cache
    counts = {}

    def fill_then_forbid(self):
        original_fill(self)
        counts["misses"] = self.cache.store.misses
        m = self.spec.model
        for name, module in (("umt5", m.text_encoder), ("vae", m.vae.encoder), ("clip", m.image_encoder)):
            module.register_forward_pre_hook(lambda *_, name=name: (_ for _ in ()).throw(
                AssertionError(f"{name} ran during a training step")))

    monkeypatch.setattr(RegDPOTrainer, "fill_cache", fill_then_forbid)
    trainer.train()
    assert counts["misses"] == 2 * 2 + 2 + 1  # winner + loser clips, 2 first-frame conditions, 1 caption
    again = RegDPOTrainer(dataclasses.replace(config, output_dir=str(tmp_path / "again")))
    again.train()
    assert counts["misses"] == 0


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing loaded

def test_bad_input_is_one_line_before_any_model_loads(wan_root, tmp_path, capsys, no_model_loads):
    import shutil

    from magicmirror_video.testing import tiny
    from magicmirror_video.training import train_dualreal, train_magicmirror, train_subject_replay

    models, root = wan_root["models"], wan_root["root"]
    cog = tiny.build_model_folder(str(tmp_path / "cog"))
    broken = str(tmp_path / "a14b-no-expert")
    shutil.copytree(models["wan2.2-t2v-a14b"], broken)
    shutil.rmtree(os.path.join(broken, "transformer_2"))
    no_loser = write_gt_pairs(str(tmp_path / "noloser"), loser=False)
    base = ["--data", wan_root["pairs"], "--num_frames", "5", "--height", "32", "--width", "32", "--output_dir",
            str(tmp_path / "out")]
    cases = [
        (main, ["--model_path", broken, *base], ["Wan2.2-T2V-A24w", "missing transformer_2/"]),
        (main, ["--model_path", models["wan2.1-t2v"], *base[2:], "--data", no_loser], ["no 'loser' column",
                                                                                       "--mode sft"]),
        (main, ["--model_path", models["wan2.1-t2v"], *base, "--experts", "high_noise"], ["--experts high_noise",
                                                                                        "one transformer"]),
        (main, ["--model_path", cog, *base, "--experts", "low_noise"], ["--experts", "CogVideoX"]),
        (main, ["--model_path", cog, *base, "--flow_shift", "5"], ["--flow_shift", "CogVideoX"]),
        (main, ["--model_path", models["wan2.2-ti2v"], *base[:-4], "--height", "48", "--width", "32",
                "--output_dir", str(tmp_path / "out")], ["--height 48", "multiples of 32"]),
        (main, ["--model_path", str(root), *base], ["not a diffusers"]),
        (train_magicmirror.main, ["--model_path", models["wan2.1-t2v"], "--data", wan_root["pairs"], "--output_dir",
                                  str(tmp_path / "out")], ["Wan2.1-T2V-24w", "MagicMirror", "CogVideoX folder"]),
        (train_dualreal.main, ["--model_path", models["wan2.1-t2v"], "--identity_data", wan_root["pairs"],
                               "--clip_vision", wan_root["pairs"], *base], ["Wan2.1-T2V-24w", "DualReal"]),
        (train_subject_replay.main, ["--model_path", models["wan2.1-i2v"], "--pairs", wan_root["pairs"], *base],
         ["Wan2.1-I2V-24w", "subject"]),
    ]
    capsys.readouterr()  # the folders' progress bars
    for entry, argv, expected in cases:
        assert entry(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        for text in expected:
            assert text in err[0], (text, err[0])
        assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_gives_the_same_gradients(wan_root, tmp_path):
    """Wan's blocks recomputed in the backward (the trainers' default) give the gradients of a plain backward."""
    grads = []
    for checkpointing in (False, True):
        config = config_for(wan_root, "wan2.2-ti2v", tmp_path / str(checkpointing))
        trainer, module, batch = built(config, gradient_checkpointing=checkpointing)
        assert trainer.spec.model.transformer.gradient_checkpointing == checkpointing
        perturb(module)
        loss, _ = module(batch, torch.Generator().manual_seed(2))
        grads.append(torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad]))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
