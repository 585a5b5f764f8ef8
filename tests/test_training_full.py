"""Full-parameter fine-tuning (``--train full``) of Reg-DPO and its SFT mode on both bases: one trainer step equals a
hand-written one (the loss written out with diffusers' modules loaded from the folder on their own, its gradient by
autograd, clipped and stepped by AdamW's formula here), the reference is a frozen copy streamed through group
offloading, and the exports reload to the trained weights in diffusers (``from_pretrained``, ``from_single_file``'s
Wan conversion) and in the CogVideoX Model Loader's single-file reader. ComfyUI core's loader: test_host_wan_full.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from magicmirror_video.testing import tiny, tiny_wan
from magicmirror_video.training.config import load_config
from magicmirror_video.training.train_regdpo import RegDPOTrainConfig, RegDPOTrainer, main
from magicmirror_video.training.trainer import step_generator

LR, EPS, WD, BETAS, MAX_NORM, BETA = 1e-3, 1e-6, 0.01, (0.9, 0.95), 1.0, 5.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return {"cogvideox": tiny.build_model_folder(str(root / "cog")),
            "wan2.1-t2v": tiny_wan.build_model_folder(str(root / "wan21"), "wan2.1-t2v"),
            "wan2.2-t2v-a14b": tiny_wan.build_model_folder(str(root / "a14b"), "wan2.2-t2v-a14b"),
            "one_pair": tiny.write_gt_pairs(str(root / "one"), n=1), "pairs": tiny.write_gt_pairs(str(root / "two"))}


def full_config(model, data, out, *extra):
    argv = ["--model_path", model, "--data", data, "--train", "full", "--num_frames", "5", "--height", "32", "--width",
            "32", "--max_steps", "1", "--mixed_precision", "no", "--report_to", "none", "--checkpointing_steps", "0",
            "--lr_scheduler", "constant", "--learning_rate", str(LR), "--adam_epsilon", str(EPS),
            "--adam_weight_decay", str(WD), "--max_grad_norm", str(MAX_NORM), "--beta", str(BETA), "--output_dir",
            str(out), *extra]
    return load_config(RegDPOTrainConfig, argv)


def adamw_step(params: dict, grads: dict) -> dict:
    """One AdamW step (the first: m = (1 − β1)·g, v = (1 − β2)·g², bias-corrected; decoupled weight decay) after
    clipping the gradients' global norm to MAX_NORM (coefficient MAX_NORM / (norm + 1e-6), at most 1)."""
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    clip = min(1.0, MAX_NORM / (float(norm) + 1e-6))
    out = {}
    for name, p in params.items():
        if name not in grads:  # no gradient: AdamW leaves it
            out[name] = p.clone()
            continue
        g = grads[name] * clip
        m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0]), v / (1 - BETAS[1])
        out[name] = p * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)
    return out


def wan_loss(folder, batch, generator, transformer, reference=None):
    """Flow matching written out on Wan: x0 = (posterior draw − mean) / std (the winner's, then with a ``reference``
    the loser's), σ = s·u / (1 + (s − 1)·u), x_t = (1 − σ)·x0 + σ·ε, the transformer at 1000·σ, the error
    mean((v̂ − (ε − x0))²). Without ``reference``: SFT, the winner's error; with it: Reg-DPO (:func:`regdpo`)."""
    import json

    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"))
    text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"))
    shift = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))["flow_shift"]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        def latents(pixels):
            post = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
            return (post.mean + post.std * torch.randn(post.mean.shape, generator=generator) - mean) / std

        clean = {k: latents(batch[name]) for k, name in (("w", "winner"), ("l", "loser"))[:2 if reference else 1]}
        text = text_encoder(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        text = text * batch["attention_mask"][..., None]
    eps = torch.randn(clean["w"].shape, generator=generator)
    u = torch.rand(clean["w"].shape[0], generator=generator, dtype=torch.float64)
    sigma = (shift * u / (1 + (shift - 1) * u)).float().view(-1, 1, 1, 1, 1)

    def error(model, k):
        pred = model(hidden_states=(1 - sigma) * clean[k] + sigma * eps, timestep=sigma.flatten() * 1000,
                     encoder_hidden_states=text, return_dict=False)[0]
        return ((pred - (eps - clean[k])) ** 2).mean()

    return regdpo(error, transformer, reference)


def cogvideox_loss(folder, batch, generator, transformer, reference=None):
    """v-prediction written out on CogVideoX: latents = posterior draws × scaling factor (the winner's, then with a
    ``reference`` the loser's), one noise and timestep, the error mean((v̂ − v)²) with diffusers' ``add_noise`` /
    ``get_velocity``, RoPE from diffusers' pipeline. Without ``reference``: SFT; with it: Reg-DPO (:func:`regdpo`)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from transformers import T5EncoderModel

    vae = AutoencoderKLCogVideoX.from_pretrained(os.path.join(folder, "vae"))
    text_encoder = T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"))
    scheduler = CogVideoXDDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    with torch.no_grad():
        def latents(pixels):
            post = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
            return (z * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)

        clean = {k: latents(batch[name]) for k, name in (("w", "winner"), ("l", "loser"))[:2 if reference else 1]}
        text = text_encoder(batch["input_ids"])[0]
    noise = torch.randn(clean["w"].shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    rope = pipe._prepare_rotary_positional_embeddings(32, 32, clean["w"].shape[1], "cpu")

    def error(model, k):
        noisy = scheduler.add_noise(clean[k], noise, t)
        v = model(hidden_states=noisy, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                  return_dict=False)[0]
        return ((v - scheduler.get_velocity(clean[k], noise, t)) ** 2).mean()

    return regdpo(error, transformer, reference)


def regdpo(error, transformer, reference):
    """SFT (no ``reference``): the winner's error. Reg-DPO: the errors of the model and of the frozen reference,
    s = (err_θ(w) − err_ref(w)) − (err_θ(l) − err_ref(l)), −log σ(−β·s) + DGR·err_θ(w) with DGR = β(1 − σ(−β·s))
    detached."""
    if reference is None:
        return error(transformer, "w")
    err = {k: error(transformer, k) for k in ("w", "l")}
    with torch.no_grad():
        ref = {k: error(reference, k) for k in ("w", "l")}
    s = (err["w"] - ref["w"]) - (err["l"] - ref["l"])
    dgr = BETA * (1 - torch.sigmoid(-BETA * s)).detach()
    return -F.logsigmoid(-BETA * s) + dgr * err["w"]


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("base,mode", [("wan2.1-t2v", "sft"), ("wan2.1-t2v", "regdpo"), ("cogvideox", "sft"),
                                       ("cogvideox", "regdpo")])
def test_one_full_step_equals_a_hand_written_adamw_step_and_the_exports_reload(folders, tmp_path, monkeypatch, base,
                                                                                mode):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
    from safetensors.torch import load_file

    cls = WanTransformer3DModel if base.startswith("wan") else CogVideoXTransformer3DModel
    folder = folders[base]
    extra = ["--mode", mode, "--gradient_checkpointing" if base.startswith("wan") else "--no-gradient_checkpointing"]
    config = full_config(folder, folders["one_pair"], tmp_path / "out", *extra)
    captured = {}

    def capture(self, step):  # the trainer's gradients after backward, before clipping and the optimizer step
        module = self.accelerator.unwrap_model(self.module)
        captured.update({n[2:]: p.grad.clone() for n, p in module.transformers.named_parameters()
                         if p.grad is not None})

    monkeypatch.setattr(RegDPOTrainer, "before_optimizer_step", capture)
    trainer = RegDPOTrainer(config)
    trainer.train()
    module = trainer.accelerator.unwrap_model(trainer.module)
    assert not module.loras and all(p.requires_grad for p in module.transformers.parameters())
    if mode != "sft":  # the reference: a frozen copy, streamed by group offloading
        copy = module.frozen["reference"][0]
        assert trainer.reference_placement.home(copy) == "streamed"
        assert not any(p.requires_grad for p in copy.parameters())
    assert trainer.spec.transformers[0].gradient_checkpointing == base.startswith("wan")
    trained = state(trainer.spec.transformers[0])

    # the same step by hand: the batch of step 0 (one pair: the manifest's row) and the step's generator
    batch = trainer.collate([trainer.dataset()[0]])
    transformer = cls.from_pretrained(os.path.join(folder, "transformer"))
    if base.startswith("wan"):
        transformer.enable_gradient_checkpointing()
    reference = None  # SFT: no reference forward; Reg-DPO: the untrained weights, frozen
    if mode != "sft":
        reference = cls.from_pretrained(os.path.join(folder, "transformer")).requires_grad_(False)
    written_out = wan_loss if base.startswith("wan") else cogvideox_loss
    loss = written_out(folder, batch, step_generator(config.seed, 0, 0), transformer, reference)
    names = [n for n, _ in transformer.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in transformer.named_parameters()], allow_unused=True)
    grads = {n: g for n, g in zip(names, grads) if g is not None}
    assert grads.keys() == captured.keys()
    scale = max(g.abs().max() for g in grads.values())
    grad_diff = max((captured[n] - g).abs().max() for n, g in grads.items())
    assert grad_diff <= 1e-4 * scale, (grad_diff, scale)
    expected = adamw_step({n: p.detach() for n, p in transformer.named_parameters()}, grads)
    weight_diff = max((trained[n] - expected[n]).abs().max() for n in expected)
    moved = max((trained[n] - p.detach()).abs().max() for n, p in transformer.named_parameters())
    assert moved > 0.5 * LR and weight_diff <= 1e-2 * LR, (weight_diff, moved)
    print(f"{base} {mode}: gradient max |diff| {grad_diff:.2e} of max |g| {scale:.2e}; weights after the step max "
          f"|diff| {weight_diff:.2e} (the step moves weights by up to {moved:.2e})")

    # the exports: a diffusers folder and one file, both the trained weights (float32: --mixed_precision no)
    out = tmp_path / "out"
    reloaded = cls.from_pretrained(str(out / "regdpo_transformer" / "transformer"))
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    single = str(out / "regdpo_transformer.safetensors")
    if base.startswith("wan"):
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        converted = convert_wan_transformer_to_diffusers(load_file(single))
        assert converted.keys() == trained.keys() and all(torch.equal(converted[k], trained[k]) for k in trained)
        assert all(k.startswith(("blocks.", "head.", "patch_embedding", "text_embedding", "time_")) for k in
                   load_file(single))  # original Wan names
    else:
        from magicmirror_video.models.cogvideox import load_transformer_file

        model = load_transformer_file(single, dtype=torch.float32, base_config=dict(transformer.config))
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
        assert model.config.num_layers == transformer.config.num_layers


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a14b_full_bf16_exports_both_experts(folders, tmp_path, fresh_accelerator_state):
    """Wan 2.2 A14B, both experts trained in full (bf16 autocast on fp32 master weights): a folder per expert
    (``transformer``, ``transformer_2``) and a file per expert; the weights in bf16 except the modules diffusers keeps
    in float32, each the trained weight in that dtype; the reference copy in bf16 the same way."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    config = full_config(folders["wan2.2-t2v-a14b"], folders["pairs"], tmp_path / "out", "--mixed_precision", "bf16",
                         "--batch_size", "2", "--max_steps", "2")
    trainer = RegDPOTrainer(config)
    trainer.train()
    out = tmp_path / "out"
    module = trainer.accelerator.unwrap_model(trainer.module)
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for copy in module.frozen["reference"]:
        assert {p.dtype for n, p in copy.named_parameters() if not keep & set(n.split("."))} == {torch.bfloat16}
    for transformer, expert, sub in zip(trainer.spec.transformers, ("high_noise", "low_noise"),
                                        ("transformer", "transformer_2")):
        trained = state(transformer)
        assert {v.dtype for v in trained.values()} == {torch.float32}  # master weights
        cast = {k: v if keep & set(k.split(".")) else v.to(torch.bfloat16) for k, v in trained.items()}
        folder = WanTransformer3DModel.from_pretrained(str(out / "regdpo_transformer" / sub),
                                                       torch_dtype=torch.bfloat16).state_dict()
        single = convert_wan_transformer_to_diffusers(load_file(str(out / f"regdpo_transformer_{expert}.safetensors")))
        for loaded in (folder, single):
            assert loaded.keys() == cast.keys()
            for k, v in cast.items():
                assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert [os.path.relpath(p, out) for p in trainer.exported] == [
        "regdpo_transformer_high_noise.safetensors", "regdpo_transformer/transformer",
        "regdpo_transformer_low_noise.safetensors", "regdpo_transformer/transformer_2"]
    assert "Load Diffusion Model" in trainer.use_hint  # what the command line prints after the files


def test_full_with_lora_disabled_reference_is_refused(folders, tmp_path, capsys, no_model_loads):
    argv = ["--model_path", folders["wan2.1-t2v"], "--data", folders["pairs"], "--num_frames", "5", "--height", "32",
            "--width", "32", "--output_dir", str(tmp_path / "out"), "--train", "full", "--reference_model",
            "lora_disabled"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LoRA to switch off" in err[0], err
    assert not (tmp_path / "out").exists()


def test_lora_reference_copy_unchanged_and_offloaded(folders, tmp_path):
    """``--reference_model copy`` with a LoRA: the copy keeps the transformer's dtypes, streams through group
    offloading, and gives the step-0 sanity values (s = 0: the copy is the LoRA-free model)."""
    import math

    from accelerate import Accelerator

    config = full_config(folders["wan2.1-t2v"], folders["pairs"], tmp_path / "out", "--train", "lora",
                         "--reference_model", "copy")
    trainer = RegDPOTrainer(dataclasses.replace(config, beta=500.0))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    trainer.shard_frozen_model(module)
    copy = module.frozen["reference"][0]
    original = trainer.spec.transformers[0]
    assert {n: p.dtype for n, p in copy.named_parameters()} == {n: p.dtype for n, p in original.named_parameters()}
    assert trainer.reference_placement.home(copy) == "streamed"
    loss, logs = module(trainer.collate([trainer.dataset()[0]]), torch.Generator().manual_seed(0))
    assert float(logs["s"]) == 0.0 and float(logs["L_DPO"]) == pytest.approx(math.log(2), rel=1e-6)
