"""Reg-DPO: loss and logged quantities, step-0 sanity, Eq. 5 gradient, stability, pair-parallel,
GT-Pair builder, resume, export."""

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

from magicmirror_video.models.video_io import write_video
from magicmirror_video.testing import tiny
from magicmirror_video.training.config import load_config
from magicmirror_video.training.losses import regdpo_loss
from magicmirror_video.training.train_regdpo import PRESETS, RegDPOTrainConfig, RegDPOTrainer


@pytest.mark.parametrize("mode,r", [("regdpo", 0.0), ("fixed", 7.0), ("dpo", 0.0), ("sft", 0.0)])
def test_loss_and_logged_quantities_match_hand_computation(mode, r):
    err_w, err_l = torch.tensor([0.30, 0.20]), torch.tensor([0.50, 0.10])
    ref_w, ref_l = torch.tensor([0.35, 0.20]), torch.tensor([0.45, 0.15])
    beta = 10.0
    loss, logs = regdpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, mode=mode, r=r)
    s = [(0.30 - 0.35) - (0.50 - 0.45), (0.20 - 0.20) - (0.10 - 0.15)]  # [-0.10, +0.05]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    l_dpo = [-math.log(sig(-beta * v)) for v in s]
    dgr = [beta * (1 - sig(-beta * v)) for v in s]
    reg = {"regdpo": dgr, "fixed": [r, r], "dpo": [0, 0], "sft": [0, 0]}[mode]
    per = [0.30, 0.20] if mode == "sft" else [l_dpo[i] + reg[i] * [0.30, 0.20][i] for i in range(2)]
    expect = {"s": sum(s) / 2, "L_DPO": sum(l_dpo) / 2, "DGR": sum(dgr) / 2, "r": sum(reg) / 2,
              "DGR+r": (sum(dgr) + sum(reg)) / 2, "win_gap": (-0.05 + 0.0) / 2, "lose_gap": (0.05 - 0.05) / 2,
              "implicit_accuracy": 0.5}
    assert loss.item() == pytest.approx(sum(per) / 2, rel=1e-6)
    for k, v in expect.items():
        assert float(logs[k]) == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from magicmirror_video.training.presets import build_tiny_regdpo
    out = tmp_path_factory.mktemp("regdpo")
    return build_tiny_regdpo(load_config(RegDPOTrainConfig, ["--preset", "tiny", "--output_dir", str(out)], PRESETS))


def built(config, tmp_path, **kw):
    from accelerate import Accelerator
    trainer = RegDPOTrainer(dataclasses.replace(config, output_dir=str(tmp_path), **kw))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    return trainer, module, trainer.collate([trainer.dataset()[0]])


def test_step_zero_sanity(tiny_pairs, tmp_path):
    _, module, batch = built(tiny_pairs, tmp_path, beta=500.0)
    loss, logs = module(batch, torch.Generator().manual_seed(0))
    assert float(logs["s"]) == 0.0
    assert float(logs["L_DPO"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(logs["DGR"]) == pytest.approx(250.0, rel=1e-6)


def perturb(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.loras[0].up.values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("mode", ["regdpo", "dpo"])
def test_autograd_gradient_equals_eq5(tiny_pairs, tmp_path, mode):
    """∇L = −[2(DGR + r)(y_w − ŷ_w)ᵀ∇ŷ_w − 2·DGR·(y_l − ŷ_l)ᵀ∇ŷ_l] / N (err is a mean over N elements)."""
    _, module, batch = built(tiny_pairs, tmp_path, beta=50.0, mode=mode)
    perturb(module)
    params = [p for p in module.loras[0].parameters() if p.requires_grad]
    loss, logs = module(batch, torch.Generator().manual_seed(3))
    autograd = torch.autograd.grad(loss, params)
    out = module.outputs(batch, torch.Generator().manual_seed(3))
    dgr, r = float(logs["DGR"]), float(logs["r"])
    n = out["pred_w"][0].numel()
    gw = -(out["target_w"] - out["pred_w"]).detach() / n
    gl = -(out["target_l"] - out["pred_l"]).detach() / n
    expected = torch.autograd.grad([out["pred_w"], out["pred_l"]], params,
                                   grad_outputs=[2 * (dgr + r) * gw, -2 * dgr * gl])
    assert dgr > 1e-3 and (r == 0.0) == (mode == "dpo")
    for a, e in zip(autograd, expected):  # float32 autograd vs the same formula: agree to 1e-4 of the scale
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, atol=1e-4 * float(a.abs().max()), rtol=1e-4)


def test_pair_parallel_equals_sequential(tiny_pairs, tmp_path):
    results = []
    for parallel in (True, False):
        _, module, batch = built(tiny_pairs, tmp_path / str(parallel), pair_parallel=parallel)
        perturb(module)
        loss, _ = module(batch, torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(loss, [p for p in module.loras[0].parameters() if p.requires_grad])
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):  # batch-2 vs batch-1 GEMMs: float32 rounding only
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-4 * float(a.abs().max()), rtol=1e-4)


def win_gap_after_training(config, tmp_path, mode, steps=30, lr=3e-3):
    _, module, batch = built(config, tmp_path / mode, mode=mode)
    opt = torch.optim.AdamW([p for p in module.loras[0].parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss, _ = module(batch, torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [float(module(batch, torch.Generator().manual_seed(100 + k))[1]["win_gap"]) for k in range(4)]


def test_regdpo_keeps_the_winner_error_down_where_dpo_lets_it_rise(tiny_pairs, tmp_path):
    """Observed on the tiny model (bench/regdpo_stability.py prints the full trajectories): on held-out noise
    draws, r = DGR leaves the winner's error below the reference's (Win Gap < 0) while vanilla DPO lets it
    rise above it (Win Gap > 0), as the paper reports for real models."""
    reg = win_gap_after_training(tiny_pairs, tmp_path, "regdpo")
    dpo = win_gap_after_training(tiny_pairs, tmp_path, "dpo")
    assert sum(reg) / 4 < 0 < sum(dpo) / 4, (reg, dpo)


def test_gt_pair_builder_filters_reports_and_resumes(tmp_path):
    from magicmirror_video.models.cogvideox import load_cogvideox
    from magicmirror_video.training.build_gt_pairs import build_pairs
    from magicmirror_video.training.data import read_manifest
    src = tmp_path / "real"
    src.mkdir()
    moving = torch.zeros(24, 40, 48, 3)
    for t in range(24):  # a square moving 4 px per frame (mean frame difference ~0.03)
        x = (4 * t) % 36
        moving[t, 8:24, x:x + 12, 1] = 1.0
    write_video(str(src / "good.mp4"), moving, fps=8)
    write_video(str(src / "short.mp4"), moving[:5], fps=8)
    write_video(str(src / "static.mp4"), torch.full((24, 40, 48, 3), 0.5), fps=8)
    write_video(str(src / "tiny.mp4"), moving[:, :16, :16], fps=8)
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    names = ["good", "short", "static", "tiny", "corrupt"]
    (src / "videos.txt").write_text("".join(f"{n}.mp4\n" for n in names))
    (src / "prompts.txt").write_text("".join("a car drives along a mountain road\n" for _ in names))
    model = tiny.build_model_folder(str(tmp_path / "model"))
    bundle = load_cogvideox(model, dtype=torch.float32)
    samples = read_manifest(str(src), check_files=False)
    kw = dict(num_frames=9, height=32, width=32, fps=8, min_short_side=24, steps=2)
    stats = build_pairs(samples, bundle, str(tmp_path / "out"), **kw)
    reasons = {os.path.basename(p): r for p, r in stats["skipped"]}
    assert stats["written"] == 1 and set(reasons) == {"short.mp4", "static.mp4", "tiny.mp4", "corrupt.mp4"}
    assert "too short" in reasons["short.mp4"] and "static" in reasons["static.mp4"]
    assert "resolution" in reasons["tiny.mp4"] and "corrupt" in reasons["corrupt.mp4"]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "pairs.jsonl")]
    assert len(rows) == 1 and rows[0]["seed"] == 0
    from magicmirror_video.models.video_io import read_video
    for key in ("winner", "loser"):
        frames, fps = read_video(str(tmp_path / "out" / rows[0][key]))
        assert frames.shape[:3] == (9, 32, 32) and fps == 8
    loser_mtime = os.path.getmtime(tmp_path / "out" / rows[0]["loser"])
    again = build_pairs(samples, bundle, str(tmp_path / "out"), **kw)
    assert again["written"] == 0 and again["already_done"] == 1
    assert os.path.getmtime(tmp_path / "out" / rows[0]["loser"]) == loser_mtime
    os.remove(tmp_path / "out" / rows[0]["loser"])  # a crash mid-pair: the row's video is gone
    third = build_pairs(samples, bundle, str(tmp_path / "out"), **kw)
    assert third["written"] == 1 and not [f for f in os.listdir(tmp_path / "out" / "pairs") if ".tmp-" in f]


def test_resume_and_export_load_in_node_and_diffusers(tiny_pairs, tmp_path, monkeypatch):
    from conftest import assert_same_weights, straight_and_resumed
    a, b, straight = straight_and_resumed(RegDPOTrainer, tiny_pairs, tmp_path, 3, max_steps=6, checkpointing_steps=3,
                                          lr_scheduler="cosine")
    assert_same_weights(a, b)

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    shutil.copy(straight, models / "loras" / "regdpo.safetensors")
    os.symlink(os.path.dirname(tiny_pairs.model_path), models / "CogVideo")
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models))
    from diffusers import CogVideoXPipeline

    from magicmirror_video import nodes
    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    (patched,) = m["MMV_CogVideoXLoraLoader"]().load_lora(model, "regdpo.safetensors", 1.0)
    enc = m["MMV_CogVideoXTextEncode"]()
    prompt = "a car drives along a mountain road with snow"
    (pos,), (neg,) = enc.encode(model, prompt, ""), enc.encode(model, "", "")
    ours = m["MMV_CogVideoXSampler"]().sample(patched, pos, neg, width=32, height=32, num_frames=9, steps=2, cfg=6.0,
                                              seed=1, scheduler="DDIM")[0]["samples"]
    base = m["MMV_CogVideoXSampler"]().sample(model, pos, neg, width=32, height=32, num_frames=9, steps=2, cfg=6.0,
                                              seed=1, scheduler="DDIM")[0]["samples"]
    assert not torch.equal(ours, base)
    pipe = CogVideoXPipeline.from_pretrained(tiny_pairs.model_path)
    pipe.load_lora_weights(str(models / "loras"), weight_name="regdpo.safetensors")
    ref = pipe(prompt=prompt, negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=2,
               guidance_scale=6.0, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    torch.testing.assert_close(ours, ref.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)
