"""The GT-Pair builder's command line: CogVideoX and Wan loser generators (Wan's losers against diffusers' own
pipelines), several generators in one manifest, data-parallel under ``accelerate launch`` (2 CPU processes),
resume (also of a folder written before the generator column), and bad or fully-filtered input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from magicmirror_video.models.video_io import read_video, write_video
from magicmirror_video.testing import tiny, tiny_wan
from magicmirror_video.training import build_gt_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = ["--num_frames", "9", "--height", "32", "--width", "32", "--fps", "8", "--min_short_side", "24", "--steps", "2",
      "--precision", "fp32"]
CLIPS = ["c0.mp4", "c1.mp4", "c2.mp4", "c3.mp4", "c5.mp4"]  # the usable clips of the `real` input, in pair order


def moving(offset: int, frames: int = 24) -> torch.Tensor:
    clip = torch.zeros(frames, 40, 48, 3)
    for t in range(frames):  # a square moving 4 px per frame (mean frame difference ~0.03)
        x = (4 * t + offset) % 36
        clip[t, 8:24, x:x + 12, 1] = 1.0
    return clip


def write_input(folder, names, frames=None) -> str:
    """A prompts.txt + videos.txt input listing ``names`` (videos c<k>.mp4 written as moving squares)."""
    folder.mkdir(exist_ok=True)
    for n in set(names):
        if n.endswith(".mp4") and not (folder / n).exists():
            k = int(n[1:-4])
            write_video(str(folder / n), moving(3 * k, frames=(frames or {}).get(n, 24)), fps=8)
    (folder / "videos.txt").write_text("".join(f"{n}\n" for n in names))
    (folder / "prompts.txt").write_text("".join(f"a car drives along a mountain road {n[:-4]}\n" for n in names))
    return str(folder)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Clips c0..c5 (c4 too short) listed with c0 twice and a still image: 5 distinct usable clips; a tiny
    CogVideoX T2V folder and tiny Wan folders."""
    root = tmp_path_factory.mktemp("gt")
    src = root / "real"
    src.mkdir()
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(src / "still.png")
    names = [f"c{k}.mp4" for k in range(6)] + ["c0.mp4", "still.png"]
    write_input(src, names, frames={"c4.mp4": 5})
    wan = {v: tiny_wan.build_model_folder(str(root / v), v) for v in ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-ti2v")}
    return {"input": str(src), "model": tiny.build_model_folder(str(root / "cog")), "wan": wan, "root": root}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(real, out, processes: int, generators: list[str]):
    args = ["-m", "training.build_gt_pairs", "--input", real["input"], "--output", str(out), *generators, *KW]
    if processes > 1:  # a gloo group of CPU processes (see test_training_magicmirror's DDP test), on a free port:
        # other test runs on this machine may hold accelerate's default one
        args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows_of(out):
    return [json.loads(line) for line in open(out / "pairs.jsonl")]


def mtimes(out):
    return {f: os.path.getmtime(out / "pairs" / f) for f in os.listdir(out / "pairs")}


def test_two_processes_two_generators_build_each_pair_once_and_resume(real, tmp_path):
    """A CogVideoX and a Wan 2.1 I2V generator over 2 processes: one row per clip and generator, equal to what one
    process makes; a re-run writes nothing."""
    generators = ["--model_path", real["model"], "--generator", "wan=" + real["wan"]["wan2.1-i2v"]]
    out = tmp_path / "two"
    stdout = launch(real, out, 2, generators)
    assert "10 pairs written, 0 already done, 3 skipped" in stdout, stdout
    # clip i belongs to process i % 2 for both generators: c0 c2 (c4 too short) and c1 c3 c5
    assert "process 0: 4 written, 0 done, process 1: 6 written, 0 done" in stdout, stdout
    assert "per generator: cog: 5 written, 0 done, wan: 5 written, 0 done" in stdout, stdout
    assert "c4.mp4: too short" in stdout and "c0.mp4: duplicate" in stdout and "still.png: an image" in stdout
    rows = rows_of(out)
    assert sorted((os.path.basename(r["source"]), r["generator"]) for r in rows) == sorted(
        (c, g) for c in CLIPS for g in ("cog", "wan"))  # each pair once, none missing
    assert [r["seed"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 5, 5]  # seed + clip index, whoever made it
    for r in rows:
        assert set(r) == {"winner", "loser", "first_frame", "caption", "seed", "source", "generator"}
        assert r["loser"].endswith(f"_loser_{r['generator']}.mp4")
        for key in ("winner", "loser"):
            frames, fps = read_video(str(out / r[key]))
            assert frames.shape == (9, 32, 32, 3) and fps == 8
        assert os.path.isfile(out / r["first_frame"])
    for c in CLIPS:  # both generators' pairs of a clip share its winner and first frame
        winners = {(r["winner"], r["first_frame"]) for r in rows if os.path.basename(r["source"]) == c}
        assert len(winners) == 1
    assert not [f for f in os.listdir(out / "pairs") if ".tmp-" in f]
    # The same pairs as one process makes (the independent reference for the sharding).
    single = tmp_path / "one"
    launch(real, single, 1, generators)
    assert rows_of(single) == rows
    # A re-run finds everything done: nothing is regenerated, the manifest is the same.
    before = mtimes(out)
    again = launch(real, out, 2, generators)
    assert "0 pairs written, 10 already done, 3 skipped" in again, again
    assert rows_of(out) == rows and mtimes(out) == before


def reference_frames(variant, folder, caption, first_frame_png, seed, size, cfg=5.0):
    """diffusers' own pipeline (its own loader) on the same prompt, image, seed and settings: frames [F,H,W,3]."""
    import diffusers

    cls = {"wan2.1-t2v": diffusers.WanPipeline, "wan2.1-i2v": diffusers.WanImageToVideoPipeline,
           "wan2.2-ti2v": diffusers.WanImageToVideoPipeline}[variant]  # TI2V-5B as image-to-video
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=caption, height=size, width=size, num_frames=9, num_inference_steps=2, guidance_scale=cfg,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    if cls is diffusers.WanImageToVideoPipeline:
        kwargs["image"] = Image.open(first_frame_png).convert("RGB")
    return torch.from_numpy(pipe(**kwargs).frames[0])


@pytest.mark.parametrize("variant", ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-ti2v"])
def test_wan_losers_equal_diffusers_pipeline(real, tmp_path, monkeypatch, variant):
    """A Wan generator's losers are diffusers' WanPipeline / WanImageToVideoPipeline output for the row's caption,
    first frame and seed at Wan's default guidance (5), compared bit for bit before writing (the frames the builder
    hands to write_video: libx264 does not encode tiny random-looking frames byte-identically from run to run, so the
    files are not compared with a second encode)."""
    from magicmirror_video.models import video_io
    from magicmirror_video.training.loser_generators import GenerationSettings, folder_generator

    written, write = {}, video_io.write_video

    def recording_write(path, frames, **kwargs):
        written[os.path.abspath(path)] = frames.clone()
        return write(path, frames, **kwargs)

    monkeypatch.setattr(video_io, "write_video", recording_write)
    src = write_input(tmp_path / "in", ["c1.mp4", "c2.mp4"])
    out = tmp_path / "out"
    argv = ["--input", src, "--output", str(out), "--model_path", real["wan"][variant], "--seed", "7", *KW]
    assert build_gt_pairs.main(argv) == 0
    rows = rows_of(out)
    assert [(os.path.basename(r["source"]), r["generator"], r["seed"]) for r in rows] == [
        ("c1.mp4", variant, 7), ("c2.mp4", variant, 8)]
    for r in rows:
        first_png = str(out / r["first_frame"])
        ref = reference_frames(variant, real["wan"][variant], r["caption"], first_png, r["seed"], 32)
        assert ref.shape == (9, 32, 32, 3) and ref.std() > 0.01
        assert torch.equal(written[str(out / r["loser"])], ref)
        frames, fps = read_video(str(out / r["loser"]))
        assert frames.shape == (9, 32, 32, 3) and fps == 8
    # The generator on its own: the same frames, from the first frame as a tensor; its weights let go afterwards.
    generator = folder_generator(real["wan"][variant])
    assert generator.image_conditioned == (variant != "wan2.1-t2v")
    first = torch.from_numpy(np.array(Image.open(out / rows[0]["first_frame"]).convert("RGB"))).float() / 255.0
    with generator.loaded(GenerationSettings(num_frames=9, height=32, width=32, steps=2, dtype=torch.float32)):
        assert torch.equal(generator.generate(rows[0]["caption"], first, rows[0]["seed"]),
                           written[str(out / rows[0]["loser"])])
    assert generator.model is None


def legacy_folder(out, name):
    """Turn a one-generator folder into what the builder wrote before the generator column: losers
    ``<i>_loser.mp4``, rows without ``generator``; markers ``<i>.json`` for the first clips, only the manifest's
    rows (the oldest layout, no markers) for the others."""
    rows = []
    for k, row in enumerate(rows_of(out)):
        stem = row["winner"].split("/")[-1].split("_")[0]
        old = {**{key: v for key, v in row.items() if key != "generator"},
               "loser": os.path.join("pairs", f"{stem}_loser.mp4")}
        os.replace(out / row["loser"], out / old["loser"])
        os.remove(out / "pairs" / f"{stem}_{name}.json")
        if k < 2:
            (out / "pairs" / f"{stem}.json").write_text(json.dumps(old))
        rows.append(old)
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_an_old_one_generator_folder_resumes_and_takes_a_second_generator(real, tmp_path, capsys, loads):
    src = write_input(tmp_path / "in", ["c1.mp4", "c2.mp4", "c3.mp4"])
    out = tmp_path / "out"
    cog = ["--model_path", real["model"]]
    wan = ["--generator", "t2v=" + real["wan"]["wan2.1-t2v"]]
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *cog, *KW]) == 0
    capsys.readouterr()
    old = legacy_folder(out, "cog")
    assert loads == ["cog"]
    before = mtimes(out)
    # The same generator again: everything is done, the rows gain the generator column, nothing is written.
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *cog, *KW]) == 0
    assert "0 pairs written, 3 already done, 0 skipped" in capsys.readouterr().out
    assert rows_of(out) == [{**r, "generator": "cog"} for r in old] and mtimes(out) == before
    assert loads == ["cog"]  # nothing to make: nothing loaded
    # A second generator: only its losers are made, from the clips' existing winners and first frames.
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *cog, *wan, *KW]) == 0
    assert "3 pairs written, 3 already done, 0 skipped" in capsys.readouterr().out
    assert loads == ["cog", "wan2.1-t2v"]  # only the generator with work left
    rows = rows_of(out)
    assert [r for r in rows if r["generator"] == "cog"] == [{**r, "generator": "cog"} for r in old]
    new = [r for r in rows if r["generator"] == "t2v"]
    assert [(r["winner"], r["first_frame"], r["source"], r["seed"]) for r in new] == [
        (r["winner"], r["first_frame"], r["source"], r["seed"]) for r in old]
    assert [r["loser"] for r in new] == [f"pairs/00000{k}_loser_t2v.mp4" for k in range(3)]
    now = mtimes(out)
    assert all(now[f] == t for f, t in before.items() if f.endswith((".mp4", ".png")))  # winners kept
    # Listed the other way round the old rows still belong to cog (the manifest names them now): no duplicates.
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *wan, *cog, *KW]) == 0
    assert "0 pairs written, 6 already done, 0 skipped" in capsys.readouterr().out
    assert rows_of(out) == rows and mtimes(out) == now and loads == ["cog", "wan2.1-t2v"]


@pytest.fixture
def loads(monkeypatch):
    """The folders each generator loads, in order; each load checks that the models loaded before it are gone."""
    import gc
    import weakref

    from magicmirror_video.models import cogvideox, wan

    record, alive = [], []

    def spy(load):
        def loading(folder, **kwargs):
            gc.collect()
            assert not [ref for ref in alive if ref() is not None], "a generator's model is still loaded"
            model = load(folder, **kwargs)
            record.append(os.path.basename(folder))
            alive.append(weakref.ref(model.transformer))
            return model
        return loading

    monkeypatch.setattr(cogvideox, "load_cogvideox", spy(cogvideox.load_cogvideox))
    monkeypatch.setattr(wan, "load_wan", spy(wan.load_wan))
    return record


def test_generators_load_one_at_a_time_and_a_folder_of_another_format_or_clip_order_is_refused(real, tmp_path,
                                                                                                capsys, loads):
    src = write_input(tmp_path / "in", ["c1.mp4", "c2.mp4"])
    out = tmp_path / "out"
    generators = ["--model_path", real["model"], "--model_path", real["wan"]["wan2.1-i2v"]]
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *generators, *KW]) == 0
    assert loads == ["cog", "wan2.1-i2v"]  # the CogVideoX model was let go before Wan loaded (checked by `loads`)
    assert "4 pairs written" in capsys.readouterr().out
    before = mtimes(out)
    kw = list(KW)
    kw[kw.index("--num_frames") + 1] = "5"
    assert build_gt_pairs.main(["--input", src, "--output", str(out), *generators, *kw]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "000000_winner.mp4 has 9 frames 32x32 at 8 fps but this run makes 5" in err
    swapped = write_input(tmp_path / "swapped", ["c2.mp4", "c1.mp4"])
    assert build_gt_pairs.main(["--input", swapped, "--output", str(out), *generators, *KW]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "the input's clips changed order" in err, err
    assert mtimes(out) == before and loads == ["cog", "wan2.1-i2v"]


def test_every_clip_filtered_exits_non_zero_with_the_summary(real, tmp_path, capsys, no_model_loads):
    src = write_input(tmp_path / "short", ["c0.mp4", "c1.mp4"], frames={"c0.mp4": 5, "c1.mp4": 5})
    code = build_gt_pairs.main(["--input", src, "--output", str(tmp_path / "out"), "--model_path", real["model"],
                                *KW])
    captured = capsys.readouterr()
    assert code == 1
    assert "0 pairs written, 0 already done, 2 skipped" in captured.out and "c1.mp4: too short" in captured.out
    assert captured.err.strip().startswith("error: no GT-Pair in") and len(captured.err.strip().splitlines()) == 1
    assert rows_of(tmp_path / "out") == []


def test_static_clips_are_filtered_before_any_model_loads(real, tmp_path, capsys, no_model_loads):
    src = tmp_path / "static"
    src.mkdir()
    write_video(str(src / "still.mp4"), torch.full((24, 40, 48, 3), 0.5), fps=8)
    (src / "videos.txt").write_text("still.mp4\n")
    (src / "prompts.txt").write_text("a car\n")
    code = build_gt_pairs.main(["--input", str(src), "--output", str(tmp_path / "out"), "--model_path", real["model"],
                                "--generator", "wan=" + real["wan"]["wan2.1-i2v"], *KW])
    assert code == 1 and "still.mp4: static" in capsys.readouterr().out


@pytest.mark.parametrize("generators,options,needs", [
    (["wan2.1-t2v"], [], "81 frames at 16 fps need 5.00 s"),  # Wan: 81 frames at 16 fps
    (["wan2.1-t2v"], ["--fps", "8"], "81 frames at 8 fps need 10.00 s"),  # the user's --fps is kept
    (["wan2.1-i2v", "wan2.2-ti2v"], ["--num_frames", "17"], "17 frames at 16 fps need 1.00 s"),
    (["cog"], [], "49 frames at 8 fps need 6.00 s"),  # CogVideoX: 49 frames at 8 fps
    (["cog", "wan2.1-t2v"], ["--num_frames", "33", "--fps", "12", "--width", "832"], "33 frames at 12 fps need 2.67 s"),
])
def test_the_format_defaults_to_the_generators_and_keeps_the_users_options(real, tmp_path, capsys, no_model_loads,
                                                                          generators, options, needs):
    src = write_input(tmp_path / "short", ["c0.mp4"], frames={"c0.mp4": 8})  # 1 s at 8 fps: too short for all
    argv = ["--input", src, "--output", str(tmp_path / "out"), "--min_short_side", "24", *options]
    for g in generators:
        argv += ["--model_path", real["model"] if g == "cog" else real["wan"][g]]
    assert build_gt_pairs.main(argv) == 1
    out = capsys.readouterr().out
    assert f"c0.mp4: too short: 8 frames at 8 fps = 1.00 s; {needs}" in out, out


def incomplete_a14b(root):
    path = root / "a14b"
    if not path.exists():
        tiny_wan.build_model_folder(str(path), "wan2.2-t2v-a14b")
        shutil.rmtree(path / "transformer_2")
    return str(path)


def not_a_base(root):
    path = root / "unet"
    (path / "transformer").mkdir(parents=True, exist_ok=True)
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return str(path)


def images_only(root):
    path = root / "images"
    path.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(path / "a.png")
    (path / "images.txt").write_text("a.png\n")
    (path / "prompts.txt").write_text("a car\n")
    return str(path)


@pytest.mark.parametrize("change,expected", [
    ({"--input": "absent"}, "--input: dataset manifest not found"),
    ({"--input": images_only}, "--input: every row of"),
    ({"--num_frames": "8"}, "--num_frames: num_frames=8 is not of the form 4k+1"),
    ({"--width": "40"}, "--width: width=40 is not a multiple of 16"),
    ({"--model_path": "absent"}, "--model_path: model folder not found"),
    ({"--model_path": not_a_base}, "is not a diffusers CogVideoX (cogvideox) or Wan (wan) folder: its transformer is "
                                   "UNet2DConditionModel"),
    ({"--model_path": incomplete_a14b}, "is not a complete diffusers Wan folder: missing transformer_2/"),
    ({"--model_path": "wan2.2-ti2v", "--width": "48"}, "--width: width=48 is not a multiple of 32 for generator "
                                                       "wan2.2-ti2v (Wan2.2-TI2V-24w: 16x VAE downsampling times 2x2"),
    ({"--model_path": None}, "no loser generator: pass --model_path"),
    ({"--generator": "wan2.1-t2v"}, "/wan2.1-t2v: expected NAME=PATH"),
    ({"--generator": "my model=wan2.1-t2v"}, "generator name 'my model' cannot be part of a file name"),
    ({"--generator": "cog=wan2.1-t2v"}, "--generator cog: two generators are named 'cog'"),
    ({"--generator": "wan=wan2.1-t2v", "--num_frames": None}, "--num_frames: the generators' defaults differ (cog "
                                                              "(cogvideox): 49, wan (wan): 81)"),
    ({"--generator": "wan=wan2.1-t2v", "--width": None}, "--width: the generators' defaults differ"),
])
def test_bad_input_exits_2_before_a_model_loads(real, tmp_path, capsys, no_model_loads, change, expected):
    capsys.readouterr()  # building a folder below may print
    argv = ["--input", real["input"], "--output", str(tmp_path / "out"), "--model_path", real["model"], *KW]
    for option, value in change.items():
        if value is None:
            del argv[argv.index(option):argv.index(option) + 2]
            continue
        if callable(value):
            value = value(tmp_path)
        elif value == "absent":
            value = str(tmp_path / value)
        elif value in real["wan"]:
            value = real["wan"][value]
        elif "=" in value and value.split("=")[1] in real["wan"]:
            value = value.split("=")[0] + "=" + real["wan"][value.split("=")[1]]
        if option in argv and option != "--generator":
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    capsys.readouterr()
    assert build_gt_pairs.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and expected in captured.err, captured.err
    assert not (tmp_path / "out").exists()
