"""training.data / training.cache: manifests, media decoding and sampling, dataset determinism, the
precompute cache. Synthetic media are written at test time; frame i of a test clip is a flat grey of
value ``BASE + STEP * i`` so the decoded pixels tell which frames were picked."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from magicmirror_video.models.video_io import read_video, write_video
from magicmirror_video.training.cache import (
    CachedDataset,
    PrecomputeCache,
    content_hash,
    key_for_media,
    key_for_text,
    precompute,
    sample_latents,
)
from magicmirror_video.training.data import (
    MediaDataset,
    MediaError,
    Sample,
    collate_samples,
    frame_indices,
    load_media,
    read_manifest,
)

T, H, W = 17, 40, 56
BASE, STEP = 20, 12  # frame i is grey (BASE + STEP * i) / 255


def write_clip(path, num_frames=T, height=H, width=W, base=BASE):
    """A clip whose frame i is a flat grey encoding i (lossless H.264)."""
    values = (base + STEP * torch.arange(num_frames)).float() / 255.0
    frames = values.view(-1, 1, 1, 1).expand(num_frames, height, width, 3).contiguous()
    return write_video(str(path), frames, fps=8, crf=0)


def write_image(path, height=H, width=W, color=(200, 30, 90)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", (width, height), color).save(str(path))
    return str(path)


def picked_frames(pixels: torch.Tensor) -> list[int]:
    """Frame indices encoded in ``pixels`` [F, 3, H, W] in [-1, 1] (allowing codec error)."""
    values = (pixels.mean(dim=(1, 2, 3)) + 1) * 127.5
    idx = (values - BASE) / STEP
    assert torch.allclose(idx, idx.round(), atol=0.35), f"frame values off the grid: {values.tolist()}"
    return idx.round().int().tolist()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("media") / "clip.mp4")


# ------------------------------------------------------------------------------------------------ manifests


def test_read_manifest_jsonl_file_and_folder(tmp_path, monkeypatch):
    write_clip(tmp_path / "clips" / "a.mp4", num_frames=5)
    write_image(tmp_path / "img" / "b.png")
    face = write_image(tmp_path / "faces" / "f.png")
    abs_img = write_image(tmp_path / "elsewhere" / "c.jpg")
    rows = [{"video": "clips/a.mp4", "caption": "a man img walks", "ref_images": ["faces/f.png"],
             "face_box": [1, 2, 30, 40]},
            {"file_name": "img/b.png", "prompt": "a red cat", "src": "faces/f.png", "tgt": "img/b.png"},
            {"image": abs_img, "text": "a dog"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    monkeypatch.chdir(tmp_path / "img")  # relative paths resolve against the manifest, not the cwd

    samples = read_manifest(str(tmp_path / "metadata.jsonl"))
    assert [s.media for s in samples] == [str(tmp_path / "clips" / "a.mp4"), str(tmp_path / "img" / "b.png"), abs_img]
    assert [s.caption for s in samples] == ["a man img walks", "a red cat", "a dog"]
    assert samples[0].extra == {"ref_images": [face], "face_box": [1, 2, 30, 40]}
    assert samples[1].extra == {"src": face, "tgt": str(tmp_path / "img" / "b.png")}
    assert samples[2].extra == {}
    assert read_manifest(str(tmp_path)) == samples  # the folder form finds metadata.jsonl


def test_read_manifest_txt_layout(tmp_path):
    for i in range(3):
        write_clip(tmp_path / "videos" / f"{i}.mp4", num_frames=5)
        write_image(tmp_path / "images" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("first\nsecond\n\nthird\n")  # blank lines are ignored
    (tmp_path / "videos.txt").write_text("".join(f"videos/{i}.mp4\n" for i in range(3)))
    (tmp_path / "images.txt").write_text("".join(f"images/{i}.png\n" for i in range(3)))

    samples = read_manifest(str(tmp_path))
    assert [s.caption for s in samples] == ["first", "second", "third"]
    assert [s.media for s in samples] == [str(tmp_path / "videos" / f"{i}.mp4") for i in range(3)]
    assert [s.extra["image"] for s in samples] == [str(tmp_path / "images" / f"{i}.png") for i in range(3)]

    os.remove(tmp_path / "videos.txt")  # images only: the images are the media
    samples = read_manifest(str(tmp_path / "prompts.txt"))
    assert [s.media for s in samples] == [str(tmp_path / "images" / f"{i}.png") for i in range(3)]
    assert all(s.extra == {} for s in samples)


def test_manifest_count_mismatch(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    (tmp_path / "videos.txt").write_text("x.mp4\ny.mp4\n")
    with pytest.raises(ValueError, match=r"prompts\.txt has 3 entries but .*videos\.txt has 2"):
        read_manifest(str(tmp_path))


def test_manifest_missing_files_listed_with_lines(tmp_path):
    write_image(tmp_path / "ok.png")
    rows = [{"image": "ok.png", "caption": "fine"}]
    rows += [{"video": f"gone{i}.mp4", "caption": "x"} for i in range(4)]
    rows[0]["ref_images"] = ["ok.png", "nope.png"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(str(tmp_path), max_reported=3)
    msg = str(e.value)
    assert "5 of 7 files" in msg
    assert "line 1 (ref_images[1])" in msg and "nope.png" in msg
    assert "line 2 (video)" in msg and "gone0.mp4" in msg and "line 3 (video)" in msg
    assert "gone3.mp4" not in msg and "and 2 more" in msg
    assert len(read_manifest(str(tmp_path), check_files=False)) == 5


def test_txt_layout_missing_files_name_the_list_and_line_they_are_in(tmp_path):
    """A clip missing from videos.txt (or an image from images.txt) is reported against that file and its line,
    never against prompts.txt, which lists no paths."""
    write_image(tmp_path / "0.png")
    write_image(tmp_path / "1.png")
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    (tmp_path / "images.txt").write_text("0.png\ngone.png\n")
    with pytest.raises(FileNotFoundError) as e:  # images only
        read_manifest(str(tmp_path))
    msg = str(e.value)
    assert f"1 of 2 files listed in {tmp_path / 'images.txt'} are missing" in msg, msg
    assert f"images.txt line 2 (media) {tmp_path / 'gone.png'}" in msg and "prompts.txt" not in msg, msg

    (tmp_path / "images.txt").write_text("0.png\n1.png\n")
    (tmp_path / "videos.txt").write_text("gone.mp4\n0.png\n")  # with both lists the video is the media
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(str(tmp_path))
    msg = str(e.value)
    assert f"1 of 4 files listed in {tmp_path / 'videos.txt'} are missing" in msg, msg
    assert f"videos.txt line 1 (media) {tmp_path / 'gone.mp4'}" in msg and "prompts.txt" not in msg, msg

    (tmp_path / "images.txt").write_text("0.png\ngone.png\n")  # missing in both lists: both named
    with pytest.raises(FileNotFoundError, match=r"2 of 4 files listed in \S*videos\.txt and \S*images\.txt are "
                                                r"missing: videos\.txt line 1 \(media\) .*; images\.txt line 2 \(image\)"):
        read_manifest(str(tmp_path))


def test_manifest_format_errors(tmp_path):
    m = tmp_path / "metadata.jsonl"
    m.write_text("")
    with pytest.raises(ValueError, match="no entries"):
        read_manifest(str(m))
    m.write_text('{"video": "a.mp4", "caption": "ok"}\n{"video": "b.mp4", "caption": \n')
    with pytest.raises(ValueError, match=r"line 2: invalid JSON"):
        read_manifest(str(m))
    m.write_text('{"clip": "a.mp4", "caption": "ok"}\n')
    with pytest.raises(ValueError, match=r"line 1: no media path.*found: clip, caption"):
        read_manifest(str(m))
    m.write_text('{"video": "a.mp4", "title": "ok"}\n')
    with pytest.raises(ValueError, match=r"line 1: no caption"):
        read_manifest(str(m))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(str(tmp_path / "empty_dir"))


# ------------------------------------------------------------------------------------------------ media


def test_image_resize_covers_and_centre_crops(tmp_path):
    # 40x80 image: red | green | blue bands of widths 20 | 40 | 20. Covering 32x32 scales to 32x64
    # and the centre crop keeps exactly the green band.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :20, 0], arr[:, 20:60, 1], arr[:, 60:, 2] = 255, 255, 255
    Image.fromarray(arr).save(tmp_path / "bands.png")
    x = load_media(str(tmp_path / "bands.png"), num_frames=49, height=32, width=32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    inner = x[0, :, :, 2:-2]
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=1e-4)  # green
    assert torch.allclose(inner[[0, 2]], -torch.ones_like(inner[[0, 2]]), atol=1e-4)
    # upscaling keeps the aspect too (40x80 -> 64x128 -> crop 64x96)
    assert load_media(str(tmp_path / "bands.png"), num_frames=1, height=64, width=96).shape == (1, 3, 64, 96)
    # transparency is composited on white
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.allclose(load_media(str(tmp_path / "clear.png"), num_frames=1, height=8, width=8), torch.ones(1, 3, 8, 8))


def test_video_shape_range_and_values(clip):
    x = load_media(clip, num_frames=9, height=24, width=32)
    assert x.shape == (9, 3, 24, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    ref, _ = read_video(clip)  # an independent decode: frames [::2] at native size
    y = load_media(clip, num_frames=9, height=H, width=W)
    assert torch.allclose(y, ref[::2].permute(0, 3, 1, 2) * 2 - 1, atol=1e-5)


@pytest.mark.parametrize("num_frames,expected", [(5, [0, 4, 8, 12, 16]), (9, list(range(0, 17, 2))),
                                                 (17, list(range(17))), (1, [0])])
def test_uniform_sampling(clip, num_frames, expected):
    assert picked_frames(load_media(clip, num_frames=num_frames, height=16, width=16)) == expected


def test_start_and_random_sampling(clip):
    assert picked_frames(load_media(clip, num_frames=5, height=16, width=16, sampling="start")) == [0, 1, 2, 3, 4]
    starts = set()
    for seed in range(8):
        got = picked_frames(load_media(clip, num_frames=5, height=16, width=16, sampling="random",
                                       generator=torch.Generator().manual_seed(seed)))
        expected_start = int(torch.randint(0, T - 5 + 1, (1,), generator=torch.Generator().manual_seed(seed)))
        assert got == list(range(expected_start, expected_start + 5))
        starts.add(got[0])
    assert len(starts) > 1
    assert frame_indices(T, 5, "random", torch.Generator().manual_seed(1)) == \
        frame_indices(T, 5, "random", torch.Generator().manual_seed(1))


def test_more_packets_than_decodable_frames(clip, monkeypatch):
    """An index that over-counts frames (packets that decode to nothing) falls back to the decoded count."""
    from magicmirror_video.models import video_io

    real = video_io.index_video(clip)
    over = video_io.VideoIndex(pts=real.pts + tuple(range(10**6, 10**6 + 8)), keyframes=real.keyframes,
                               fps=real.fps, seekable=False)
    monkeypatch.setattr(video_io, "index_video", lambda path: over)
    assert picked_frames(load_media(clip, num_frames=5, height=16, width=16)) == [0, 4, 8, 12, 16]
    with pytest.raises(MediaError, match="has 17 frames"):
        load_media(clip, num_frames=21, height=16, width=16)


def test_video_too_short(clip):
    with pytest.raises(MediaError, match=r"clip\.mp4 has 17 frames but num_frames=21.*smaller --num_frames.*17"):
        load_media(clip, num_frames=21, height=16, width=16)


def test_num_frames_must_be_4k_plus_1(clip):
    with pytest.raises(ValueError, match=r"num_frames=8 is not of the form 4k\+1.*5 or 9"):
        load_media(clip, num_frames=8, height=16, width=16)
    with pytest.raises(ValueError, match="4k"):
        MediaDataset([Sample(clip, "x")], num_frames=48, height=16, width=16)
    with pytest.raises(ValueError, match="sampling"):
        load_media(clip, num_frames=5, height=16, width=16, sampling="middle")


def test_corrupt_and_missing_media(tmp_path, clip):
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "garbage.png").write_bytes(b"not a png at all" * 10)
    data = open(clip, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    for name in ("garbage.mp4", "garbage.png", "truncated.mp4"):
        with pytest.raises(MediaError, match=name.replace(".", r"\.")):
            load_media(str(tmp_path / name), num_frames=5, height=16, width=16)
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        load_media(str(tmp_path / "absent.mp4"), num_frames=5, height=16, width=16)


# ------------------------------------------------------------------------------------------------ dataset


def test_dataset_deterministic_per_seed_epoch_index(clip, tmp_path):
    img = write_image(tmp_path / "still.png")
    samples = [Sample(clip, "clip", {"k": [1]}), Sample(clip, "clip again"), Sample(img, "still")]
    ds = MediaDataset(samples, num_frames=5, height=16, width=16, sampling="random", seed=3)
    item = ds[0]
    assert set(item) >= {"pixels", "caption", "index", "extra"} and item["index"] == 0
    assert item["caption"] == "clip" and item["extra"] == {"k": [1]} and ds[2]["pixels"].shape == (1, 3, 16, 16)
    item["extra"]["k"].append(2)  # items never share state with the samples
    assert samples[0].extra == {"k": [1]}

    def windows(d, epoch, order=(0, 1)):
        d.set_epoch(epoch)
        return {i: picked_frames(d[i]["pixels"])[0] for i in order}

    first = windows(ds, 0)
    assert windows(ds, 0, order=(1, 0)) == first  # access order does not matter
    fresh = MediaDataset(samples, num_frames=5, height=16, width=16, sampling="random", seed=3)
    assert windows(fresh, 4) == windows(ds, 4)  # a resumed run sees the same items
    assert any(windows(ds, e) != first for e in range(1, 6))  # epochs reshuffle windows
    other = MediaDataset(samples, num_frames=5, height=16, width=16, sampling="random", seed=4)
    assert any(windows(other, e) != windows(ds, e) for e in range(6))

    batch = collate_samples([ds[0], ds[1]])
    assert batch["pixels"].shape == (2, 5, 3, 16, 16) and batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="cannot share a batch"):
        collate_samples([ds[0], ds[2]])


def test_dataloader_workers_reproduce(clip):
    ds = MediaDataset([Sample(clip, str(i)) for i in range(4)], num_frames=5, height=8, width=8,
                      sampling="random", seed=0)
    ds.set_epoch(2)
    direct = torch.stack([ds[i]["pixels"] for i in range(4)])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    assert torch.equal(torch.cat([b["pixels"] for b in loader]), direct)


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hit_skips_compute_and_files_are_clean(tmp_path):
    cache = PrecomputeCache(str(tmp_path / "cache"))
    calls = []

    def fn():
        calls.append(1)
        return {"mean": torch.randn(4, 2, 3, 3), "logvar": torch.randn(4, 2, 3, 3)}

    key = key_for_text("a cat", model_id="m")
    first = cache.get_or_compute(key, fn, {"note": "x", "n": 3})
    second = cache.get_or_compute(key, fn)
    assert len(calls) == 1 and cache.hits == 1 and cache.misses == 1
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert cache.metadata(key) == {"note": "x", "n": 3}
    assert cache.get("0" * 64) is None
    files = [os.path.join(d, f) for d, _, fs in os.walk(cache.root) for f in fs]
    assert files == [cache.path_for(key)]  # no temp files left behind


def test_cache_keys(tmp_path):
    a = write_clip(tmp_path / "a.mp4", num_frames=5)
    kw = dict(height=32, width=48, num_frames=5, sampling="uniform", model_id="THUDM/CogVideoX-5b")
    key = key_for_media(a, **kw)
    assert key == key_for_media(a, **kw)
    copy = tmp_path / "moved.mp4"
    copy.write_bytes(open(a, "rb").read())
    assert key_for_media(str(copy), **kw) == key  # content-addressed: moving a file keeps its entry
    variants = [dict(kw, height=48), dict(kw, width=32), dict(kw, model_id="other"), dict(kw, sampling="start"),
                dict(kw, num_frames=1)]
    assert len({key} | {key_for_media(a, **v) for v in variants}) == len(variants) + 1
    write_clip(tmp_path / "a.mp4", num_frames=5, base=40)  # new content, same path
    assert content_hash(a) != content_hash(str(copy)) and key_for_media(a, **kw) != key
    with pytest.raises(ValueError, match="random"):
        key_for_media(a, **dict(kw, sampling="random"))
    img = write_image(tmp_path / "i.png")  # images are F=1 whatever the clip settings
    assert key_for_media(img, **kw) == key_for_media(img, **dict(kw, num_frames=9, sampling="random"))
    t = key_for_text("a cat", model_id="m")
    assert len({t, key_for_text("a dog", model_id="m"), key_for_text("a cat", model_id="n"),
                key_for_text("a cat", model_id="m", max_length=128)}) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_cache_corrupt_entry_recomputed(tmp_path, caplog, damage):
    cache = PrecomputeCache(str(tmp_path))
    key = key_for_text("x", model_id="m")
    cache.put(key, {"prompt_embeds": torch.arange(64.0).view(8, 8)})
    path = cache.path_for(key)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) - 40]
    elif damage == "flip":
        data[-10] ^= 0xFF  # inside the tensor bytes: only the checksum can tell
    else:
        data = bytearray(b"\xff" * 7)
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING, logger="magicmirror_video.training.cache"):
        assert cache.get(key) is None
    assert "corrupt" in caplog.text and path in caplog.text
    fresh = {"prompt_embeds": torch.ones(8, 8)}
    out = cache.get_or_compute(key, lambda: fresh)
    assert cache.misses == 1 and torch.equal(out["prompt_embeds"], fresh["prompt_embeds"])
    assert torch.equal(cache.get(key)["prompt_embeds"], fresh["prompt_embeds"])  # overwritten


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    cache = PrecomputeCache(str(tmp_path))
    key = key_for_text("y", model_id="m")
    cache.put(key, {"prompt_embeds": torch.zeros(2, 2)})

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, {"prompt_embeds": torch.ones(2, 2)})
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert files == [f"{key}.safetensors"]  # no temp file, the old entry intact
    monkeypatch.undo()
    assert torch.equal(cache.get(key)["prompt_embeds"], torch.zeros(2, 2))


def test_precompute_matches_direct_encode(tmp_path, components, clip):
    vae, te, tok = components["vae"], components["text_encoder"], components["tokenizer"]
    img = write_image(tmp_path / "face.png", color=(120, 60, 200))
    samples = [Sample(clip, "a man img is walking on the beach"), Sample(img, "a cat sits on a red sofa")]
    cache = PrecomputeCache(str(tmp_path / "cache"))
    kw = dict(height=H, width=W, num_frames=9, sampling="uniform", model_id="tiny")
    keys = precompute(samples, vae=vae, text_encoder=te, tokenizer=tok, cache=cache, device="cpu",
                      progress=False, **kw)
    assert cache.misses == 4 and [set(k) for k in keys] == [{"latents", "text"}] * 2

    # independent reference: decode with read_video, take every 2nd frame, encode directly
    frames, _ = read_video(clip)
    x = (frames[::2].permute(3, 0, 1, 2)[None] * 2 - 1)  # [1, 3, 9, H, W]
    ximg = torch.from_numpy(np.array(Image.open(img))).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1
    # ximg: [1, 3, 1, H, W]
    with torch.no_grad():
        for key, pixels in ((keys[0]["latents"], x), (keys[1]["latents"], ximg)):
            dist = vae.encode(pixels).latent_dist
            entry = cache.get(key)
            assert entry["mean"].shape == dist.mean.shape[1:] and entry["logvar"].shape == dist.logvar.shape[1:]
            assert torch.allclose(entry["mean"], dist.mean[0], atol=1e-5)
            assert torch.allclose(entry["logvar"], dist.logvar[0], atol=1e-5)
            g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            assert torch.allclose(sample_latents(entry, g1), dist.sample(g2)[0], atol=1e-5)
    assert cache.get(keys[0]["latents"])["mean"].shape[1] == 3  # 9 frames -> 3 latent frames
    assert cache.metadata(keys[0]["latents"])["scaling_factor"] == vae.config.scaling_factor

    for sample, k in zip(samples, keys):
        ids = tok(sample.caption, padding="max_length", max_length=226, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = te(ids).last_hidden_state[0]
        got = cache.get(k["text"])["prompt_embeds"]
        assert got.shape == (226, te.config.d_model) and torch.allclose(got, ref, atol=1e-6)

    # second run: everything cached, nothing recomputed
    assert precompute(samples, vae=vae, text_encoder=te, tokenizer=tok, cache=cache, device="cpu",
                      progress=False, **kw) == keys
    assert cache.misses == 4 and cache.hits == 4

    ds = CachedDataset(samples, cache, keys, seed=1)
    a, b = ds[0], ds[0]
    assert torch.equal(a["latents"], b["latents"]) and a["prompt_embeds"].shape == (226, te.config.d_model)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["latents"], a["latents"])  # a fresh posterior draw per epoch
    os.remove(cache.path_for(keys[1]["latents"]))
    with pytest.raises(KeyError, match="run precompute"):
        ds[1]


def test_precompute_rejects_random_sampling(tmp_path, clip):
    with pytest.raises(ValueError, match="random"):
        precompute([Sample(clip, "x")], vae=torch.nn.Linear(1, 1), cache=PrecomputeCache(str(tmp_path)),
                   device="cpu", height=16, width=16, num_frames=5, sampling="random", model_id="m", progress=False)
