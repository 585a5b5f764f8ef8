"""MagicMirror training: loss terms, masking, config, overfit, exact resume, export, DDP."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler
from safetensors.torch import load_file

from magicmirror_video.testing import tiny
from magicmirror_video.training import losses
from magicmirror_video.training.config import InputError, load_config
from magicmirror_video.training.train_magicmirror import (
    PRESETS,
    MagicMirrorTrainConfig,
    MagicMirrorTrainer,
    fit_points,
    main,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scheduler():
    return CogVideoXDDIMScheduler.from_config(tiny.SCHEDULER_CONFIG)


def test_v_prediction_loss_terms_match_hand_computation():
    s = scheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 500, 999])
    a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # forward process, by hand
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the v target, by hand
    torch.testing.assert_close(s.add_noise(x0, noise, t), x_t)
    torch.testing.assert_close(losses.x0_from_v(s, x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    w = losses.loss_weights(s, t)
    torch.testing.assert_close(w, (1 / (1 - s.alphas_cumprod[t].double())).float())
    assert w[2] == pytest.approx(1.0)  # zero terminal SNR: ᾱ_999 = 0
    pred = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    expected = torch.stack([w[i] * ((pred[i] - x0[i]) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(losses.v_prediction_loss(pred, x0, w), expected)
    assert losses.identity_loss(torch.tensor([1.0, 0.25])).tolist() == [0.0, 0.75]


def test_face_region_mask_and_masked_loss():
    mask = losses.box_to_latent_mask(torch.tensor([[8.0, 16.0, 24.0, 40.0]]), 64, 64, 8)
    assert mask.shape == (1, 1, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[2:5, 1:3] = 1  # rows y 16..40 -> cells 2..4, columns x 8..24 -> cells 1..2
    assert torch.equal(mask[0, 0, 0], expected)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 2, 4, 8, 8, generator=g)
    pred = x0.clone()
    pred[..., 0, 0] += 5.0  # an error outside the face box is ignored by the masked loss
    w = torch.ones(1)
    assert losses.v_prediction_loss(pred, x0, w, mask).item() == 0.0
    assert losses.v_prediction_loss(pred, x0, w).item() > 0
    pred[..., 3, 1] += 2.0  # inside: mean over the 6 cells x 2 frames x 4 channels
    assert losses.v_prediction_loss(pred, x0, w, mask).item() == pytest.approx(4.0 * 2 * 4 / (6 * 2 * 4))


def test_fit_points_follow_the_loader_resize_crop():
    from magicmirror_video.training.data import resize_crop
    img = torch.zeros(1, 3, 100, 200)
    img[0, :, 30, 150] = 1.0  # a dot at (x=150, y=30)
    out = resize_crop(img, 64, 64)
    y, x = divmod(int(out[0, 0].argmax()), 64)
    mapped = fit_points(torch.tensor([150.0, 30.0]), 200, 100, 64, 64)
    assert abs(mapped[0] - x) <= 1 and abs(mapped[1] - y) <= 1


def test_config_precedence_file_flags_and_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.002\nmax_steps: 7\nvalidation_prompts: [a, b]\n")
    (tmp_path / "c.toml").write_text('stage = "video"\nnum_frames = 9\n')
    c = load_config(MagicMirrorTrainConfig, ["--preset", "tiny", "--config", str(tmp_path / "c.yaml"),
                                             "--max_steps", "9", "--no-gradient_checkpointing"], PRESETS)
    assert (c.learning_rate, c.max_steps, c.height, c.validation_prompts) == (0.002, 9, 64, ["a", "b"])
    assert c.gradient_checkpointing is False and c.num_frames == 1  # stage image: single frames (the default)
    c = load_config(MagicMirrorTrainConfig, ["--config", str(tmp_path / "c.toml")])
    assert (c.stage, c.num_frames) == ("video", 9)
    with pytest.raises(InputError, match="stage=image trains on single frames but num_frames=9"):
        load_config(MagicMirrorTrainConfig, ["--config", str(tmp_path / "c.toml"), "--stage", "image"])
    with pytest.raises(InputError, match="stage=video trains on clips but num_frames=1"):
        load_config(MagicMirrorTrainConfig, ["--stage", "video"])
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(InputError, match="unknown config field 'learning_rat' .did you mean 'learning_rate'"):
        load_config(MagicMirrorTrainConfig, ["--config", str(tmp_path / "bad.yaml")])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A resolved tiny config (assets built once) to copy into each test's output dir."""
    out = tmp_path_factory.mktemp("mm-tiny")
    from magicmirror_video.training.presets import build_tiny_magicmirror
    config = load_config(MagicMirrorTrainConfig, ["--preset", "tiny", "--output_dir", str(out)], PRESETS)
    return build_tiny_magicmirror(config)


def configured(tiny_run, out, **kw):
    import dataclasses
    return dataclasses.replace(tiny_run, output_dir=str(out), **kw)


def test_overfit_one_sample(tiny_run, tmp_path):
    """With one sample and a fixed noise/timestep draw the loss must fall by at least half."""
    trainer = MagicMirrorTrainer(configured(tiny_run, tmp_path, learning_rate=3e-3))
    from accelerate import Accelerator
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    data = trainer.dataset()
    batch = trainer.collate([data[0]])
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(60):
        loss, _ = module(batch, torch.Generator().manual_seed(123))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert min(history[-5:]) <= 0.5 * history[0], history[:3] + history[-3:]


def test_resume_after_kill_gives_bit_identical_weights(tiny_run, tmp_path, monkeypatch):
    from conftest import assert_same_weights, straight_and_resumed
    a, b, _ = straight_and_resumed(MagicMirrorTrainer, tiny_run, tmp_path, 3, max_steps=6, checkpointing_steps=3,
                                   lr_scheduler="cosine", lr_warmup_steps=1)
    assert_same_weights(a, b)
    fresh = load_file(MagicMirrorTrainer(configured(tiny_run, tmp_path / "c", max_steps=3, lr_scheduler="cosine",
                                                    lr_warmup_steps=1, checkpointing_steps=0)).train())
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # the comparison can fail


def test_exported_adapter_loads_in_the_node_and_changes_the_video(tiny_run, tmp_path, monkeypatch):
    assert main(["--preset", "tiny", "--output_dir", str(tmp_path), "--max_steps", "4", "--checkpointing_steps", "0"]) == 0
    out = tmp_path / "magicmirror.safetensors"
    models = tmp_path / "node-models"
    (models / "magicmirror").mkdir(parents=True)
    shutil.copy(out, models / "magicmirror" / "trained.safetensors")
    os.symlink(os.path.dirname(tiny_run.model_path), models / "CogVideo")
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models))
    from magicmirror_video import nodes
    from magicmirror_video.models.cogvideox import read_safetensors
    from magicmirror_video.models.magicmirror import FaceEmbeds
    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    faces_file = sorted((tmp_path / "tiny-assets" / "dataset" / "faces").iterdir())[0]
    t = read_safetensors(str(faces_file))[0]
    faces = FaceEmbeds(arcface=t["arcface"], x_id=t["x_id"], clip_penultimate=t["clip_penultimate"])
    (patched,) = m["MMV_MagicMirrorApply"]().apply(model, "trained.safetensors", faces, 1.0)
    enc = m["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "a person img smiling in a garden"), enc.encode(model, "")
    kw = dict(width=32, height=32, num_frames=9, steps=2, cfg=6.0, seed=0, scheduler="DDIM")
    a = m["MMV_CogVideoXSampler"]().sample(patched, pos, neg, **kw)[0]["samples"]
    b = m["MMV_CogVideoXSampler"]().sample(model, pos, neg, **kw)[0]["samples"]
    assert (a - b).abs().max() > 1e-4


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    # `accelerate launch --cpu` starts one process (its multi-CPU mode needs MPI); the torchrun-based
    # launcher with 2 processes gives a gloo process group on a machine without GPUs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train_magicmirror",
           "--preset", "tiny", "--output_dir", str(tmp_path), "--max_steps", "3", "--checkpointing_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 2 ranks hold identical trainable weights" in proc.stderr + proc.stdout
    assert (tmp_path / "magicmirror.safetensors").is_file()
    assert os.path.isdir(tmp_path / "checkpoints" / "step-00000002")


def test_tensorboard_logs_and_validation_videos(tiny_run, tmp_path):
    pytest.importorskip("tensorboard")
    faces = sorted(os.listdir(os.path.join(os.path.dirname(tiny_run.data), "faces")))[0]
    config = configured(tiny_run, tmp_path, max_steps=2, checkpointing_steps=0, report_to="tensorboard",
                        validation_steps=2, validation_prompts=["a person img waves"], validation_num_frames=5,
                        validation_steps_sampling=2,
                        validation_faces=os.path.join(os.path.dirname(tiny_run.data), "faces", faces))
    MagicMirrorTrainer(config).train()
    events = [f for _, _, files in os.walk(tmp_path / "logs") for f in files if f.startswith("events.out.tfevents")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "logs" / "magicmirror"))
    acc.Reload()
    assert {"loss", "loss_noise", "lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    from magicmirror_video.models.video_io import read_video
    frames, _ = read_video(str(tmp_path / "validation" / "step-00000002-0.mp4"))
    assert frames.shape[:3] == (5, 64, 64)


def test_prepare_pairs_filters_and_reports(tiny_run, tmp_path):
    from PIL import Image

    from magicmirror_video.models.face_analysis import FaceAnalyzer
    from magicmirror_video.models.face_encoder import FaceEncoder
    from magicmirror_video.models.id_encoder import load_photomaker_id_encoder
    from magicmirror_video.testing import tiny_faces
    from magicmirror_video.training.prepare_magicmirror import prepare
    assets = os.path.dirname(os.path.dirname(tiny_run.model_path))
    people = tmp_path / "people"
    for ident, seed, n in (("carol", 3, 2), ("dave", 4, 1)):
        (people / ident).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(tiny_faces.synthetic_face_image(128, 128, center=(60 + 4 * k, 64), radius=28 + 3 * k,
                                                            seed=seed)).save(people / ident / f"{k}.png")
    Image.fromarray(tiny_faces.synthetic_face_image(128, 128, radius=None)).save(people / "carol" / "dark.png")
    (people / "carol" / "broken.png").write_bytes(b"not an image")
    encoder = FaceEncoder(FaceAnalyzer(os.path.join(assets, "insightface")),
                          load_photomaker_id_encoder(os.path.join(assets, "photomaker-v2.bin")))
    stats = prepare(str(people), str(tmp_path / "data"), encoder, min_similarity=0.65)
    assert stats["targets"] == 2 and stats["single_file"] == ["dave"]
    assert [os.path.basename(p) for p in stats["no_face"]] == ["dark.png"]
    assert [os.path.basename(p) for p, _ in stats["unreadable"]] == ["broken.png"]
    from magicmirror_video.training.data import read_manifest
    rows = read_manifest(str(tmp_path / "data" / "metadata.jsonl"))
    assert len(rows) == 2 and all(r.extra["similarity"] > 0.65 for r in rows)
    assert all(" img" in r.caption for r in rows) and all(os.path.isfile(r.extra["faces"]) for r in rows)
    strict = prepare(str(people), str(tmp_path / "strict"), encoder, min_similarity=0.9999999)
    assert strict["targets"] == 0 and strict["below_threshold"] == 2


def built(tiny_run, out, **kw):
    trainer = MagicMirrorTrainer(configured(tiny_run, out, **kw))
    from accelerate import Accelerator
    trainer.accelerator = Accelerator(cpu=True)
    return trainer, trainer.build()


def test_identity_loss_embeds_the_references_with_its_own_network(tiny_run, tmp_path, monkeypatch):
    """The reference side of the identity loss is the loss network (arcface_path) applied to the stored aligned
    reference crops — the same network as the generated side, never insightface's ONNX embedding."""
    from PIL import Image

    from magicmirror_video.models import arcface
    from magicmirror_video.models.cogvideox import read_safetensors

    trainer, module = built(tiny_run, tmp_path)
    data = trainer.dataset()
    batch = trainer.collate([data[0]])
    seen = {}
    original = arcface.identity_cosine

    def spy(model, ref, frames, kps):
        seen["ref"] = ref
        return original(model, ref, frames, kps)

    monkeypatch.setattr(arcface, "identity_cosine", spy)
    module(batch, torch.Generator().manual_seed(0))
    # independently: the loss network on the crop files prepare_magicmirror wrote, resized to 112 (PIL)
    net = arcface.load_arcface_torch(tiny_run.arcface_path)
    faces_path = trainer.samples[0].extra["faces"]
    n = read_safetensors(faces_path)[0]["x_id"].shape[0]
    stem = os.path.splitext(os.path.basename(faces_path))[0]
    crops = [Image.open(os.path.join(os.path.dirname(os.path.dirname(faces_path)), "crops", f"{stem}-ref{k}.png"))
             for k in range(n)]
    x = torch.stack([torch.from_numpy(np.array(c.convert("RGB"))) for c in crops])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(net(x).float(), dim=-1).mean(0)
    expected = torch.nn.functional.normalize(emb, dim=-1)
    torch.testing.assert_close(seen["ref"][0], expected, atol=1e-5, rtol=1e-5)
    onnx_ref = torch.nn.functional.normalize(read_safetensors(faces_path)[0]["arcface"].float(), dim=-1).mean(0)
    assert not torch.allclose(seen["ref"][0], torch.nn.functional.normalize(onnx_ref, dim=-1), atol=1e-2)


def test_batches_with_different_reference_counts(tiny_run, tmp_path):
    """prepare_magicmirror --max_refs k gives rows with 1..k references; such rows share a batch (grouped by
    count inside the forward), and each row's prediction equals the one it gets alone."""
    from magicmirror_video.training.train_magicmirror import reference_groups

    trainer, module = built(tiny_run, tmp_path, id_loss_weight=0.0)
    data = trainer.dataset()
    one, other = data[0], dict(data[1])
    for key in ("x_id", "clip_penultimate"):  # the second sample gets two references
        other[key] = torch.cat([other[key], other[key].flip(0) * 0.5])
    assert reference_groups([one["x_id"], other["x_id"], one["x_id"]]) == [[0, 2], [1]]
    batch = trainer.collate([one, other])
    captured = []
    spec = module.spec
    original = spec.forward
    spec.forward = lambda *a, **k: captured.append(original(*a, **k)) or captured[-1]
    try:
        loss, _ = module(batch, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)
        assert [c.shape[0] for c in captured] == [1, 1]  # one forward per reference count
        g = torch.Generator().manual_seed(0)
        latents = spec.pad_frames(spec.video_latents(batch, g))
        _, t, noisy = spec.add_noise(latents, g)
        alone = []
        for i, item in enumerate((one, other)):
            single = trainer.collate([item])
            from magicmirror_video.models.magicmirror import inject_magicmirror
            adapter = module.adapter
            undo = inject_magicmirror(spec.transformer, adapter,
                                      face_tokens=adapter.face_tokens(single["clip_penultimate"][0]),
                                      id_vec=adapter.id_vector(single["x_id"][0]), identity_mask=single["identity_mask"])
            try:
                alone.append(original(noisy[i:i + 1], spec.text_embeds(single), t[i:i + 1]))
            finally:
                undo()
    finally:
        spec.forward = original
    for got, want in zip(captured, alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
