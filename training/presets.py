"""Self-contained demo data for ``--preset tiny``: tiny random models and a synthetic face dataset.

Everything is generated locally (no download): a tiny CogVideoX folder, a fake insightface pack,
a tiny PhotoMaker-V2 checkpoint, a tiny arcface_torch backbone, and two synthetic "identities"
of three photos each, turned into a training manifest by the real data-prep code.
"""

from __future__ import annotations

import dataclasses
import os

import torch


def _filled(config, **paths):
    """``config`` with the generated ``paths`` and ``tiny_demo`` off. The fields are exactly those the config's
    ``tiny_demo`` declares (``generates``): ``load_config`` refuses ``tiny_demo`` with any of them set, so no value
    the user set is replaced here."""
    declared = next(f for f in dataclasses.fields(config) if f.name == "tiny_demo").metadata["generates"]
    if set(paths) != set(declared):
        raise RuntimeError(f"the tiny builder fills {sorted(paths)} but tiny_demo declares {sorted(declared)}")
    return dataclasses.replace(config, **paths, tiny_demo=False)


def build_tiny_magicmirror(config):
    """Fill ``config`` (a MagicMirrorTrainConfig) with paths to freshly generated tiny assets.

    Under ``accelerate launch`` the main process builds them while the others wait.
    """
    from accelerate import PartialState

    from .trainer import use_cpu

    with PartialState(cpu=use_cpu()).main_process_first():
        return _build_tiny_magicmirror(config)


def _build_tiny_magicmirror(config):
    from PIL import Image

    from ..models.arcface import IResNet
    from ..models.face_analysis import FaceAnalyzer
    from ..models.face_encoder import FaceEncoder
    from ..models.id_encoder import load_photomaker_id_encoder
    from ..testing import tiny, tiny_faces
    from .prepare_magicmirror import prepare

    root = os.path.join(config.output_dir, "tiny-assets")
    model = os.path.join(root, "CogVideo", "tiny-t2v")
    if not os.path.isdir(os.path.join(model, "transformer")):
        tiny.build_model_folder(model)
    insightface = os.path.join(root, "insightface")
    tiny_faces.build_fake_insightface_pack(insightface)
    photomaker = tiny.build_photomaker_checkpoint(os.path.join(root, "photomaker-v2.bin"))
    arcface = os.path.join(root, "arcface_r_tiny.pth")
    torch.manual_seed(0)
    torch.save(IResNet((1, 1, 1, 1)).state_dict(), arcface)

    people = os.path.join(root, "people")
    for ident, seed in (("alice", 1), ("bob", 2)):
        os.makedirs(os.path.join(people, ident), exist_ok=True)
        for k, (cy, cx, r) in enumerate(((64, 64, 30), (70, 56, 26), (58, 72, 34))):
            image = tiny_faces.synthetic_face_image(128, 128, center=(cx, cy), radius=r, seed=seed)
            Image.fromarray(image).save(os.path.join(people, ident, f"{k}.png"))
            with open(os.path.join(people, ident, f"{k}.png.txt"), "w") as f:
                f.write(f"a person img smiling in a garden, photo {k}")
    encoder = FaceEncoder(FaceAnalyzer(insightface), load_photomaker_id_encoder(photomaker))
    data = os.path.join(root, "dataset")
    stats = prepare(people, data, encoder, min_similarity=0.65)
    if stats["targets"] == 0:
        raise SystemExit(f"tiny preset: no training pairs were built ({stats})")
    return _filled(config, model_path=model, data=os.path.join(data, "metadata.jsonl"), arcface_path=arcface)


def build_tiny_subject(config):
    """Tiny CogVideoX + 4 synthetic S2I pairs + 3 short synthetic videos for ``train_subject_replay --preset tiny``."""
    from accelerate import PartialState

    from .trainer import use_cpu

    with PartialState(cpu=use_cpu()).main_process_first():
        return _build_tiny_subject(config)


def _build_tiny_subject(config):
    paths = _tiny_video_assets(os.path.join(config.output_dir, "tiny-assets"))
    return _filled(config, model_path=paths["model"], data=paths["videos"], pairs=paths["pairs"])


def _tiny_video_assets(root: str) -> dict:
    """Tiny T2V folder, 4 synthetic S2I pairs (pairs/metadata.jsonl) and 3 clips (videos/prompts.txt+videos.txt)."""
    import json

    import numpy as np
    from PIL import Image

    from ..models.video_io import write_video
    from ..testing import tiny

    model = os.path.join(root, "CogVideo", "tiny-t2v")
    if not os.path.isdir(os.path.join(model, "transformer")):
        tiny.build_model_folder(model)
    rng = np.random.default_rng(0)
    pairs_dir, videos_dir = os.path.join(root, "pairs"), os.path.join(root, "videos")
    os.makedirs(pairs_dir, exist_ok=True)
    os.makedirs(videos_dir, exist_ok=True)
    rows = []
    for k in range(4):  # a coloured square (the "subject") on two backgrounds
        colour = rng.integers(40, 255, 3)
        for name, bg in (("src", 230), ("tgt", 30)):
            img = np.full((48, 48, 3), bg, np.uint8)
            y, x = rng.integers(4, 20, 2)
            img[y:y + 24, x:x + 24] = colour
            Image.fromarray(img).save(os.path.join(pairs_dir, f"{k}-{name}.png"))
        rows.append({"src": f"{k}-src.png", "tgt": f"{k}-tgt.png", "caption": "a teddy bear is sitting on a table"})
    with open(os.path.join(pairs_dir, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    prompts, videos = [], []
    for k in range(3):  # a square moving across a gradient
        frames = torch.zeros(17, 40, 40, 3)
        frames[..., 0] = torch.linspace(0, 1, 40)[None, None, :]
        for t in range(17):
            frames[t, 10:22, 2 + t:14 + t, 1] = 1.0
        write_video(os.path.join(videos_dir, f"{k}.mp4"), frames, fps=8)
        prompts.append("a car drives along a mountain road with snow")
        videos.append(f"{k}.mp4")
    with open(os.path.join(videos_dir, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    with open(os.path.join(videos_dir, "videos.txt"), "w") as f:
        f.write("\n".join(videos) + "\n")
    return {"model": model, "videos": videos_dir, "pairs": os.path.join(pairs_dir, "metadata.jsonl")}


def build_tiny_dualreal(config):
    """Tiny CogVideoX + tiny CLIP vision + synthetic identity images and motion clips (``--preset tiny``)."""
    from accelerate import PartialState

    from .trainer import use_cpu

    with PartialState(cpu=use_cpu()).main_process_first():
        return _build_tiny_dualreal(config)


def _build_tiny_dualreal(config):
    import numpy as np
    from PIL import Image

    from ..testing import tiny

    root = os.path.join(config.output_dir, "tiny-assets")
    assets = _tiny_video_assets(root)  # model + clips
    clip = tiny.build_clip_vision_checkpoint(os.path.join(root, "clip_vision.safetensors"))
    ident = os.path.join(root, "identity")
    os.makedirs(ident, exist_ok=True)
    rng = np.random.default_rng(1)
    names = []
    for k in range(3):  # the same "dog": a brown disc at different places
        img = np.full((48, 48, 3), 200, np.uint8)
        y, x = rng.integers(14, 34, 2)
        yy, xx = np.mgrid[:48, :48]
        img[(yy - y) ** 2 + (xx - x) ** 2 < 100] = (120, 70, 30)
        Image.fromarray(img).save(os.path.join(ident, f"{k}.png"))
        names.append(f"{k}.png")
    with open(os.path.join(ident, "images.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(ident, "prompts.txt"), "w") as f:
        f.write("\n".join(["a dog *"] * len(names)) + "\n")
    return _filled(config, model_path=assets["model"], data=assets["videos"], identity_data=ident, clip_vision=clip)


def build_tiny_regdpo(config):
    """Tiny CogVideoX + 3 synthetic real clips turned into GT-Pairs by ``build_gt_pairs`` (``--preset tiny``)."""
    from accelerate import PartialState

    from .trainer import use_cpu

    with PartialState(cpu=use_cpu()).main_process_first():
        return _build_tiny_regdpo(config)


def _build_tiny_regdpo(config):
    from ..models.cogvideox import load_cogvideox
    from .build_gt_pairs import build_pairs
    from .data import read_manifest

    root = os.path.join(config.output_dir, "tiny-assets")
    assets = _tiny_video_assets(root)
    pairs_dir = os.path.join(root, "gt-pairs")
    bundle = load_cogvideox(assets["model"], dtype=torch.float32)
    build_pairs(read_manifest(assets["videos"]), bundle, pairs_dir, num_frames=config.num_frames, height=config.height,
                width=config.width, fps=8, min_short_side=16, steps=2, cfg=6.0)
    return _filled(config, model_path=assets["model"], data=os.path.join(pairs_dir, "pairs.jsonl"))
