"""Shared fixtures: tiny random CogVideoX models built at test time (no hub, no weights in git)."""

from __future__ import annotations

import os

import pytest
import torch

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.testing import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def bundle_from_components(c: dict, dtype=torch.float32) -> CogVideoXBundle:
    """Wrap diffusers pipeline components in a pack bundle (shares the modules)."""
    return CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=c["text_encoder"],
                           tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), dtype=dtype,
                           device=torch.device("cpu"))


@pytest.fixture
def components():
    """Fresh tiny T2V 1.0 components (float32)."""
    return tiny.build_components()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A ComfyUI-style models/ tree with tiny CogVideoX folders (T2V and I2V)."""
    root = tmp_path_factory.mktemp("models")
    tiny.build_model_folder(str(root / "CogVideo" / "tiny-t2v"))
    tiny.build_model_folder(str(root / "CogVideo" / "tiny-i2v"), i2v=True)
    for sub in ("loras", "diffusion_models"):
        (root / sub).mkdir()
    return root


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    """A ComfyUI-style ``models/insightface`` folder with a fake antelopev2 pack (ONNX graphs written now)."""
    from magicmirror_video.testing import tiny_faces

    root = tmp_path_factory.mktemp("insightface")
    tiny_faces.build_fake_insightface_pack(str(root))
    return str(root)


@pytest.fixture(scope="module")
def analyzer(insightface_root):
    """A CPU ``FaceAnalyzer`` on the fake pack (one per test module: tests may wrap its models)."""
    from magicmirror_video.models.face_analysis import FaceAnalyzer

    return FaceAnalyzer(insightface_root, providers=["CPUExecutionProvider"])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if a base model loads (CogVideoX or Wan) or a trainer makes its accelerator: bad input must be
    refused before."""
    from magicmirror_video.models import cogvideox, wan
    from magicmirror_video.training.trainer import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(cogvideox, "load_cogvideox", refuse)
    monkeypatch.setattr(wan, "load_wan", refuse)
    monkeypatch.setattr(Trainer, "_make_accelerator", refuse)


def straight_and_resumed(trainer_class, config, tmp_path, kill_at: int, **overrides):
    """Train ``config`` straight, and again killed right after the step-``kill_at`` checkpoint then resumed
    with ``resume_from=latest``; return both exported state dicts."""
    import dataclasses

    from safetensors.torch import load_file

    straight = trainer_class(dataclasses.replace(config, output_dir=str(tmp_path / "straight"), **overrides)).train()
    original = trainer_class.save_checkpoint

    def save_then_die(self):
        path = original(self)
        if self.step == kill_at:
            raise KeyboardInterrupt(f"killed after the step-{kill_at} checkpoint")
        return path

    trainer_class.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer_class(dataclasses.replace(config, output_dir=str(tmp_path / "killed"), **overrides)).train()
    finally:
        trainer_class.save_checkpoint = original
    checkpoints = os.listdir(tmp_path / "killed" / "checkpoints")
    assert not [c for c in checkpoints if c.startswith(".tmp")], checkpoints  # no half-written checkpoint
    assert not (tmp_path / "killed" / f"{trainer_class.method}.safetensors").exists()  # nothing exported yet
    resumed = trainer_class(dataclasses.replace(config, output_dir=str(tmp_path / "killed"), resume_from="latest",
                                                **overrides)).train()
    return load_file(straight), load_file(resumed), straight


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
