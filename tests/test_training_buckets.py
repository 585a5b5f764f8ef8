"""Multi-resolution, multi-length buckets (training/buckets.py): the bucket rule and the crop on hand-made frames, the
sampler's batches (one bucket each, every rank of a micro-step in the same bucket, each bucket's samples once per
epoch, a fresh sampler at any step equal to one that walked there, one bucket = the trainers' earlier stream), every
trainer on a dataset of mixed sizes and lengths (each batch one bucket, items at their bucket's shape), the precompute
cache per bucket, bit-identical resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from magicmirror_video.models.video_io import write_video
from magicmirror_video.training import trainer as trainer_module
from magicmirror_video.training.buckets import (
    Bucket,
    BucketSampler,
    derive_buckets,
    media_shape,
    nearest_bucket,
    parse_buckets,
)
from magicmirror_video.training.config import InputError, load_config

B = Bucket


# ------------------------------------------------------------------ the rule, by hand

def test_parse_buckets():
    assert parse_buckets(["49x480x720 49x720x480", "17x480x720,49x480x720"]) == [B(49, 480, 720), B(49, 720, 480),
                                                                                  B(17, 480, 720)]
    assert parse_buckets(["auto"]) == "auto" and parse_buckets([]) == []
    assert parse_buckets(["512x512", "1x384x640"], spatial=True) == [B(1, 512, 512), B(1, 384, 640)]
    for bad, spatial in ((["49x480"], False), (["49-480-720"], False), (["9x32x32"], True), (["auto"], True)):
        with pytest.raises(InputError, match="write each bucket as"):
            parse_buckets(bad, spatial=spatial)


def test_nearest_bucket_takes_the_longest_fitting_length_then_the_nearest_aspect():
    buckets = [B(49, 480, 720), B(49, 720, 480), B(17, 480, 720), B(17, 480, 480), B(1, 480, 720)]
    assert nearest_bucket(60, 1080, 1920, buckets) == B(49, 480, 720)  # landscape, long enough for 49
    assert nearest_bucket(49, 1920, 1080, buckets) == B(49, 720, 480)  # portrait
    assert nearest_bucket(48, 1080, 1920, buckets) == B(17, 480, 720)  # too short for 49: the 17-frame buckets
    assert nearest_bucket(30, 500, 520, buckets) == B(17, 480, 480)  # nearly square
    assert nearest_bucket(30, 1920, 1080, buckets) == B(17, 480, 480)  # portrait: the square is nearer than 480x720
    assert nearest_bucket(1, 100, 100, buckets) == B(1, 480, 720)  # an image: only 1-frame buckets
    assert nearest_bucket(12, 100, 100, [B(17, 480, 720)]) is None  # shorter than every bucket
    # log-aspect distance: 2:1 and 1:2 are equally far from a square; ties go to the larger area, then list order
    assert nearest_bucket(9, 100, 100, [B(9, 32, 64), B(9, 64, 32)]) == B(9, 32, 64)
    assert nearest_bucket(9, 100, 100, [B(9, 32, 64), B(9, 96, 48)]) == B(9, 96, 48)


def test_derive_buckets_from_the_data():
    shapes = [(60, 1080, 1920), (30, 1080, 1920), (100, 1920, 1080), (1, 800, 800), (49, 1080, 1920)]
    got = derive_buckets(shapes, num_frames=49, height=480, width=720)
    # about 480 x 720 = 345600 pixels at each aspect ratio, sides multiples of 16; frames 4k+1 up to 49
    assert got == [B(1, 592, 592), B(29, 448, 784), B(49, 448, 784), B(49, 784, 448)]
    for b in got:
        assert b.height % 16 == 0 and b.width % 16 == 0 and abs(b.height * b.width / 345600 - 1) < 0.03


def hand_image(path, height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_crop_rule_on_hand_made_frames(tmp_path):
    """A frame as tall as its bucket and wider keeps its rows and loses equal columns on both sides; a frame as wide as
    its bucket loses equal rows; one twice the bucket's size in both sides is halved (the average of each 2x2 block
    up to the antialiasing filter's edges) and not cropped. The rule picks the bucket of the frame's own aspect."""
    from magicmirror_video.training.data import load_media

    buckets = [B(1, 32, 48), B(1, 48, 32)]
    wide = hand_image(tmp_path / "wide.png", 32, 64, 0)  # aspect 2: nearest 32x48
    tall = hand_image(tmp_path / "tall.png", 80, 32, 1)  # aspect 0.4: nearest 48x32
    assert nearest_bucket(*media_shape(str(tmp_path / "wide.png")), buckets) == B(1, 32, 48)
    assert nearest_bucket(*media_shape(str(tmp_path / "tall.png")), buckets) == B(1, 48, 32)
    to_unit = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1  # noqa: E731
    got = load_media(str(tmp_path / "wide.png"), num_frames=1, height=32, width=48)
    assert torch.equal(got[0], to_unit(wide[:, 8:56]))  # (64 - 48) / 2 = 8 columns off each side
    got = load_media(str(tmp_path / "tall.png"), num_frames=1, height=48, width=32)
    assert torch.equal(got[0], to_unit(tall[16:64]))  # (80 - 48) / 2 = 16 rows off each side
    ys, xs = np.mgrid[:32, :48]
    small = np.stack([2 * xs + 2 * ys + 10 * c for c in range(3)], -1).astype(np.uint8)  # a ramp in x and y
    Image.fromarray(np.repeat(np.repeat(small, 2, 0), 2, 1)).save(tmp_path / "double.png")  # each pixel as 2x2 block
    assert nearest_bucket(*media_shape(str(tmp_path / "double.png")), buckets) == B(1, 32, 48)
    got = load_media(str(tmp_path / "double.png"), num_frames=1, height=32, width=48)
    # halving with the antialiasing triangle filter weighs the inputs 1/8, 3/8, 3/8, 1/8 per axis: on the blocks of a
    # ramp that is the ramp itself, except on the border row and column, where the filter is cut
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert got.shape == (1, 3, 32, 48)
    torch.testing.assert_close(got[0][inner], to_unit(small)[inner], atol=1e-5, rtol=0)
    exif = Image.open(tmp_path / "tall.png")  # EXIF orientation 6 (rotated 90 degrees): the shape as displayed
    info = exif.getexif()
    info[0x0112] = 6
    exif.save(tmp_path / "rotated.jpg", exif=info)
    assert media_shape(str(tmp_path / "rotated.jpg")) == (1, 32, 80)


# ------------------------------------------------------------------ the sampler

def test_sampler_batches_are_one_bucket_alike_on_every_rank_and_walk_each_bucket_by_epochs():
    buckets = [B(9, 32, 48)] * 5 + [B(9, 48, 32)] * 3 + [B(5, 32, 48)] * 2
    sampler = BucketSampler(buckets, seed=7)
    ranks, batch, slots = 2, 2, 400
    seen = {b: [] for b in set(buckets)}
    for slot in range(slots):
        picks = [sampler.indices(slot, rank, ranks, batch) for rank in range(ranks)]
        kinds = {buckets[i] for p in picks for _, i in p}
        assert len(kinds) == 1  # one bucket for the whole micro-step, every rank
        seen[kinds.pop()] += [(e, i) for p in picks for e, i in p]
    counts = {b: len(v) // (ranks * batch) for b, v in seen.items()}
    for b, n in counts.items():  # drawn in proportion to the bucket's size (5 : 3 : 2)
        assert n / slots == pytest.approx(buckets.count(b) / len(buckets), abs=0.08), counts
    for b, stream in seen.items():  # each bucket's stream: its samples once per epoch, epochs in order
        size = buckets.count(b)
        for epoch in range(len(stream) // size):
            chunk = stream[epoch * size:(epoch + 1) * size]
            assert {e for e, _ in chunk} == {epoch} and sorted(i for _, i in chunk) == \
                [i for i, x in enumerate(buckets) if x == b]
    fresh = BucketSampler(buckets, seed=7)  # a resumed run: nothing walked before
    for slot in (399, 9000, 4096 * 3 + 5):
        assert fresh.indices(slot, 1, ranks, batch) == sampler.indices(slot, 1, ranks, batch)
    other = BucketSampler(buckets, seed=8)
    assert [other.bucket_of(s) for s in range(50)] != [sampler.bucket_of(s) for s in range(50)]


def test_one_bucket_is_the_earlier_stream():
    from magicmirror_video.training.trainer import sample_indices

    sampler = BucketSampler([B(9, 32, 32)] * 7, seed=3)
    accumulation, ranks, batch = 3, 2, 2
    for step in range(6):
        for micro in range(accumulation):
            for rank in range(ranks):
                position = ((step * accumulation + micro) * ranks + rank) * batch  # the trainers' formula before
                assert sampler.indices(step * accumulation + micro, rank, ranks, batch) == \
                    sample_indices(7, 3, position, batch)


# ------------------------------------------------------------------ every trainer on mixed data

def write_clip(path, frames: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(1, 1, 1, 3, generator=g).expand(frames, height, width, 3).clone()
    for t in range(frames):
        video[t, 8:20, 2 + t:14 + t] = torch.rand(3, generator=g)
    write_video(str(path), video, fps=8)
    return video


# clips of mixed sizes and lengths, and the bucket each belongs in (by the rule written out)
CLIP_BUCKETS = "9x32x48 9x48x32 5x32x48 5x48x32"
CLIPS = [((9, 32, 48), B(9, 32, 48)), ((9, 48, 32), B(9, 48, 32)), ((13, 32, 48), B(9, 32, 48)),
         ((5, 32, 48), B(5, 32, 48)), ((6, 48, 32), B(5, 48, 32)), ((9, 32, 32), B(9, 32, 48)),  # a tie: list order
         ((11, 64, 48), B(9, 48, 32)), ((3, 32, 48), None)]  # 3 frames: shorter than every bucket, left out


def write_mixed_pairs(root) -> tuple[str, dict]:
    """GT-Pairs of the CLIPS shapes (winner, a noisier loser, the first frame); returns the manifest and each winner's
    expected bucket."""
    os.makedirs(root, exist_ok=True)
    rows, expected = [], {}
    for k, ((frames, height, width), bucket) in enumerate(CLIPS):
        win = write_clip(os.path.join(root, f"w{k}.mp4"), frames, height, width, k)
        write_video(os.path.join(root, f"l{k}.mp4"), (win + 0.3 * torch.rand(win.shape)).clamp(0, 1), fps=8)
        Image.fromarray((win[0] * 255).round().byte().numpy()).save(os.path.join(root, f"f{k}.png"))
        rows.append({"winner": f"w{k}.mp4", "loser": f"l{k}.mp4", "first_frame": f"f{k}.png",
                     "caption": "a car drives along a mountain road with snow"})
        expected[os.path.join(os.path.abspath(root), f"w{k}.mp4")] = bucket
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return os.path.join(root, "pairs.jsonl"), expected


def record_batches(monkeypatch):
    """Every batch the trainer draws, as the list of (dataset, index, item) it fetched."""
    batches = []
    original_fetch = trainer_module.fetch

    def fetch(data, epoch, index):
        item = original_fetch(data, epoch, index)
        batches[-1].append((data, index, item))
        return item

    monkeypatch.setattr(trainer_module, "fetch", fetch)
    for cls in (trainer_module.Trainer, trainer_module.TaskSwitchingTrainer):
        def next_batch(self, data, step, micro, original=cls.next_batch):
            batches.append([])
            return original(self, data, step, micro)

        monkeypatch.setattr(cls, "next_batch", next_batch)
    return batches


def check_batches(batches, expected_of, shape_of, *, at_least=2):
    """Each batch: its items' expected buckets are one, and every item has that bucket's shape; the run used several
    buckets."""
    used = set()
    for batch in batches:
        buckets = {expected_of(data, index) for data, index, _ in batch}
        assert len(buckets) == 1, buckets
        bucket = buckets.pop()
        assert bucket is not None
        for _, _, item in batch:
            assert shape_of(item) == bucket, (shape_of(item), bucket)
        used.add(bucket)
    assert len(used) >= at_least, used
    return used


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from magicmirror_video.testing import tiny, tiny_wan

    root = tmp_path_factory.mktemp("models")
    return {"cog-i2v": tiny.build_model_folder(str(root / "cog-i2v"), i2v=True),
            "wan2.1-i2v": tiny_wan.build_model_folder(str(root / "wan"), "wan2.1-i2v")}


def regdpo_config(model, data, out, *extra):
    from magicmirror_video.training.train_regdpo import RegDPOTrainConfig

    argv = ["--model_path", model, "--data", data, "--buckets", CLIP_BUCKETS, "--height", "32", "--width", "32",
            "--num_frames", "9", "--max_steps", "6", "--batch_size", "2", "--mixed_precision", "no", "--report_to",
            "none", "--checkpointing_steps", "0", "--no-gradient_checkpointing", "--learning_rate", "1e-3",
            "--lora_rank", "4", "--output_dir", str(out), *extra]
    return load_config(RegDPOTrainConfig, argv)


def clip_shape(key):
    def shape(item):
        pixels = item[key]
        return B(pixels.shape[0], pixels.shape[-2], pixels.shape[-1])
    return shape


@pytest.mark.parametrize("base,mode", [("cog-i2v", "regdpo"), ("wan2.1-i2v", "sft")])
def test_regdpo_trains_on_mixed_sizes_and_lengths_one_bucket_per_batch(tiny_models, tmp_path, monkeypatch, base, mode):
    from magicmirror_video.training.train_regdpo import RegDPOTrainer

    data, expected = write_mixed_pairs(tmp_path / "pairs")
    batches = record_batches(monkeypatch)
    trainer = RegDPOTrainer(regdpo_config(tiny_models[base], data, tmp_path / "out", "--mode", mode, "--max_steps",
                                          "4"))
    trainer.train()
    assert math.isfinite(trainer.last_logs["loss"])
    assert len(trainer.pairs) == len(CLIPS) - 1  # the 3-frame pair is left out
    check_batches(batches, lambda d, i: expected[d.samples[i].media], clip_shape("winner"))
    for batch in batches:  # the loser and the first frame at the winner's size
        for _, _, item in batch:
            assert mode == "sft" or item["loser"].shape == item["winner"].shape
            assert item["first_frame"].shape == item["winner"].shape[1:]


def test_regdpo_resume_with_buckets_is_bit_identical(tiny_models, tmp_path):
    from conftest import assert_same_weights, straight_and_resumed

    from magicmirror_video.training.train_regdpo import RegDPOTrainer

    data, _ = write_mixed_pairs(tmp_path / "pairs")
    config = regdpo_config(tiny_models["cog-i2v"], data, tmp_path / "out", "--gradient_accumulation_steps", "2",
                           "--mode", "sft")
    a, b, _ = straight_and_resumed(RegDPOTrainer, config, tmp_path, 2, max_steps=4, checkpointing_steps=2,
                                   lr_scheduler="cosine")
    assert_same_weights(a, b)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_precompute_cache_holds_each_sample_at_its_bucket(tiny_models, tmp_path):
    from safetensors import safe_open

    from magicmirror_video.training.train_regdpo import RegDPOTrainer

    data, expected = write_mixed_pairs(tmp_path / "pairs")
    config = regdpo_config(tiny_models["cog-i2v"], data, tmp_path / "out", "--precompute_cache", "--max_steps", "2",
                           "--cache_dir", str(tmp_path / "cache"), "--frame_sampling", "start")
    RegDPOTrainer(config).train()
    latents = {}
    for folder, _, files in os.walk(tmp_path / "cache"):
        for name in files:
            with safe_open(os.path.join(folder, name), "pt") as f:
                meta = f.metadata()
            if meta.get("kind") == "latents":
                latents.setdefault(meta["media"], []).append(B(*(int(meta[k]) for k in ("num_frames", "height",
                                                                                          "width"))))
    winners = {m: b for m, b in expected.items() if b is not None}
    assert {m: v for m, v in latents.items() if m in winners} == {m: [b] for m, b in winners.items()}
    losers = {m.replace("/w", "/l") for m in winners}
    assert {m: v for m, v in latents.items() if m in losers} == {m.replace("/w", "/l"): [b] for m, b in winners.items()}
    assert len(latents) == 2 * len(winners)  # winners and losers, each once, at the pair's bucket


def mixed_videos(root, shapes) -> dict:
    """``prompts.txt`` + ``videos.txt`` of clips of ``shapes``; returns {path: expected bucket}."""
    os.makedirs(root, exist_ok=True)
    expected = {}
    for k, ((frames, height, width), bucket) in enumerate(shapes):
        write_clip(os.path.join(root, f"{k}.mp4"), frames, height, width, 10 + k)
        expected[os.path.join(os.path.abspath(root), f"{k}.mp4")] = bucket
    with open(os.path.join(root, "videos.txt"), "w") as f:
        f.write("".join(f"{k}.mp4\n" for k in range(len(shapes))))
    with open(os.path.join(root, "prompts.txt"), "w") as f:
        f.write("a car drives along a mountain road with snow\n" * len(shapes))
    return expected


def mixed_images(root, shapes, name) -> dict:
    expected = {}
    for k, ((height, width), bucket) in enumerate(shapes):
        path = os.path.join(os.path.abspath(root), f"{name}{k}.png")
        hand_image(path, height, width, 20 + k)
        expected[path] = bucket
    return expected


def test_dualreal_trains_on_mixed_images_and_clips(tmp_path, monkeypatch):
    from magicmirror_video.training import presets, train_dualreal

    config = presets.build_tiny_dualreal(load_config(train_dualreal.DualRealTrainConfig, [
        "--preset", "tiny", "--output_dir", str(tmp_path)], train_dualreal.PRESETS))
    expected = mixed_videos(tmp_path / "clips", CLIPS[:7])
    identity = tmp_path / "identity"
    identity.mkdir()
    expected.update(mixed_images(identity, [((48, 64), B(1, 32, 48)), ((64, 48), B(1, 48, 32)),
                                            ((40, 64), B(1, 32, 48))], "id"))
    (identity / "images.txt").write_text("".join(f"id{k}.png\n" for k in range(3)))
    (identity / "prompts.txt").write_text("a dog *\n" * 3)
    batches = record_batches(monkeypatch)
    config = dataclasses.replace(config, data=str(tmp_path / "clips"), identity_data=str(identity), num_frames=9,
                                 buckets=CLIP_BUCKETS.split(), max_steps=6, motion_batch_size=2, checkpointing_steps=0)
    trainer = train_dualreal.DualRealTrainer(config)
    trainer.train()
    assert math.isfinite(trainer.last_logs["loss"])
    used = check_batches(batches, lambda d, i: expected[d.samples[i].media], clip_shape("pixels"), at_least=3)
    assert any(b.frames == 1 for b in used) and any(b.frames > 1 for b in used)
    for batch in batches:  # the motion condition: one frame of the clip, at the clip's size
        for _, _, item in batch:
            if "condition_image" in item:
                assert item["condition_image"].shape == (*item["pixels"].shape[-2:], 3)


def test_subject_replay_trains_on_mixed_pairs_and_clips(tmp_path, monkeypatch):
    from magicmirror_video.training import presets, train_subject_replay

    config = presets.build_tiny_subject(load_config(train_subject_replay.SubjectReplayTrainConfig, [
        "--preset", "tiny", "--output_dir", str(tmp_path)], train_subject_replay.PRESETS))
    expected = mixed_videos(tmp_path / "clips", CLIPS[:7])
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    shapes = [((48, 64), B(1, 32, 48)), ((64, 48), B(1, 48, 32)), ((48, 48), B(1, 32, 32)), ((40, 64), B(1, 32, 48))]
    expected.update(mixed_images(pairs, shapes, "tgt"))
    mixed_images(pairs, shapes, "src")
    (pairs / "metadata.jsonl").write_text("".join(json.dumps({"src": f"src{k}.png", "tgt": f"tgt{k}.png",
                                                              "caption": "a teddy bear on a table"}) + "\n"
                                                  for k in range(len(shapes))))
    batches = record_batches(monkeypatch)
    config = dataclasses.replace(config, data=str(tmp_path / "clips"), pairs=str(pairs / "metadata.jsonl"),
                                 num_frames=9, buckets=CLIP_BUCKETS.split(), pair_buckets=["32x48", "48x32", "32x32"],
                                 max_steps=6, conflict_steps=0, checkpointing_steps=0)
    trainer = train_subject_replay.SubjectReplayTrainer(config)
    trainer.train()
    assert math.isfinite(trainer.last_logs["loss"])
    used = check_batches(batches, lambda d, i: expected[d.samples[i].media], clip_shape("target"), at_least=3)
    assert any(b.frames == 1 for b in used) and any(b.frames > 1 for b in used)
    for batch in batches:
        for _, _, item in batch:  # the reference: a frame at the target's size
            assert item["reference"].shape == item["target"].shape[1:]


@pytest.fixture(scope="module")
def magicmirror_tiny(tmp_path_factory):
    from magicmirror_video.training import presets, train_magicmirror

    return presets.build_tiny_magicmirror(load_config(train_magicmirror.MagicMirrorTrainConfig, [
        "--preset", "tiny", "--output_dir", str(tmp_path_factory.mktemp("magicmirror"))], train_magicmirror.PRESETS))


def test_magicmirror_image_stage_trains_on_mixed_sizes(magicmirror_tiny, tmp_path, monkeypatch):
    """Stage 1 with 1-frame buckets: targets padded to other aspect ratios (their face box and keypoints unchanged in
    pixels, ``size`` updated); the boxes and keypoints reach the loss mapped through each target's own bucket."""
    from magicmirror_video.training import train_magicmirror
    from magicmirror_video.training.data import read_manifest
    from magicmirror_video.training.train_magicmirror import fit_points

    config = magicmirror_tiny
    rows = [json.loads(line) for line in open(config.data)]
    folder = os.path.dirname(config.data)
    for k, row in enumerate(rows):  # pad every other target to 128x192 (wide) or 192x128 (tall)
        if k % 3 == 2:
            continue
        image = np.asarray(Image.open(os.path.join(folder, row["media"])))
        pad = ((0, 0), (0, 64)) if k % 3 == 0 else ((0, 64), (0, 0))
        padded = np.pad(image, (*pad, (0, 0)))
        row["media"] = row["media"].replace(".png", "-padded.png")
        Image.fromarray(padded).save(os.path.join(folder, row["media"]))
        row["size"] = [padded.shape[1], padded.shape[0]]
    manifest = os.path.join(folder, "mixed.jsonl")
    with open(manifest, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    expected = {s.media: nearest_bucket(1, s.extra["size"][1], s.extra["size"][0],
                                        [B(1, 64, 96), B(1, 96, 64), B(1, 64, 64)]) for s in read_manifest(manifest)}
    batches = record_batches(monkeypatch)
    config = dataclasses.replace(config, data=manifest, buckets=["1x64x96", "1x96x64", "1x64x64"], max_steps=4,
                                 checkpointing_steps=0, output_dir=str(tmp_path / "out"))
    trainer = train_magicmirror.MagicMirrorTrainer(config)
    trainer.train()
    assert math.isfinite(trainer.last_logs["loss"])
    check_batches(batches, lambda d, i: expected[d.samples[i].media], clip_shape("pixels"), at_least=2)
    for batch in batches:
        for data, index, item in batch:
            s, bucket = data.samples[index], expected[data.samples[index].media]
            box = torch.tensor(s.extra["face_box"], dtype=torch.float32).view(2, 2)
            assert torch.equal(item["face_box"], fit_points(box, *s.extra["size"], bucket.width, bucket.height)
                               .flatten())


# ------------------------------------------------------------------ bad input: one line, before any model loads

def test_bad_buckets_are_one_line_before_any_model_loads(tiny_models, tmp_path, capsys, no_model_loads):
    from magicmirror_video.testing import tiny_wan
    from magicmirror_video.training import train_regdpo, train_subject_replay

    data, _ = write_mixed_pairs(tmp_path / "pairs")
    ti2v = tiny_wan.build_model_folder(str(tmp_path / "ti2v"), "wan2.2-ti2v")
    base = ["--data", data, "--output_dir", str(tmp_path / "out"), "--num_frames", "9", "--height", "32", "--width",
            "32"]
    cases = [
        (train_regdpo.main, ["--model_path", tiny_models["cog-i2v"], *base, "--buckets", "17x32x48", "21x48x32"],
         ["no sample fits any bucket", "17x32x48 21x48x32", "3-13 frames", "at most 13 frames"]),
        (train_regdpo.main, ["--model_path", tiny_models["cog-i2v"], *base, "--buckets", "9x32"],
         ["--buckets '9x32'", "FRAMESxHEIGHTxWIDTH"]),
        (train_regdpo.main, ["--model_path", tiny_models["cog-i2v"], *base, "--buckets", "8x32x48"],
         ["--buckets 8x32x48", "4k+1"]),
        (train_regdpo.main, ["--model_path", tiny_models["cog-i2v"], *base, "--buckets", "9x40x48"],
         ["--buckets 9x40x48", "multiple of 16"]),
        (train_regdpo.main, ["--model_path", ti2v, *base, "--buckets", "9x32x48"],
         ["--buckets 9x32x48", "multiples of 32", "9x32x32"]),
        (train_subject_replay.main, ["--model_path", tiny_models["cog-i2v"], "--pairs", data, *base,
                                     "--pair_buckets", "9x32x32"], ["--pair_buckets '9x32x32'", "HEIGHTxWIDTH"]),
    ]
    capsys.readouterr()
    for entry, argv, expected in cases:
        assert entry(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        for text in expected:
            assert text in err[0], (text, err[0])
        assert not (tmp_path / "out").exists()


def test_magicmirror_stage_and_bucket_frames_must_agree(magicmirror_tiny, tmp_path, capsys, no_model_loads):
    from magicmirror_video.training import train_magicmirror

    config = magicmirror_tiny
    capsys.readouterr()
    argv = ["--model_path", config.model_path, "--data", config.data, "--arcface_path", config.arcface_path,
            "--output_dir", str(tmp_path / "out"), "--buckets", "1x64x64", "9x64x64"]
    assert train_magicmirror.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--buckets 9x64x64: stage=image trains single frames" in err[0], err
