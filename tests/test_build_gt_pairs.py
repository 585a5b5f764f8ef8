"""The GT-Pair builder's command line: data-parallel under ``accelerate launch`` (2 CPU processes), resume,
and bad or fully-filtered input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from magicmirror_video.models.video_io import read_video, write_video
from magicmirror_video.testing import tiny
from magicmirror_video.training import build_gt_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = ["--num_frames", "9", "--height", "32", "--width", "32", "--fps", "8", "--min_short_side", "24", "--steps", "2",
      "--precision", "fp32"]


def moving(offset: int, frames: int = 24) -> torch.Tensor:
    clip = torch.zeros(frames, 40, 48, 3)
    for t in range(frames):  # a square moving 4 px per frame (mean frame difference ~0.03)
        x = (4 * t + offset) % 36
        clip[t, 8:24, x:x + 12, 1] = 1.0
    return clip


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Clips c0..c5 (c4 too short) listed with c0 twice: 5 distinct usable clips."""
    root = tmp_path_factory.mktemp("gt")
    src = root / "real"
    src.mkdir()
    for k in range(6):
        write_video(str(src / f"c{k}.mp4"), moving(3 * k, frames=5 if k == 4 else 24), fps=8)
    names = [f"c{k}" for k in range(6)] + ["c0"]
    (src / "videos.txt").write_text("".join(f"{n}.mp4\n" for n in names))
    (src / "prompts.txt").write_text("".join(f"a car drives along a mountain road {n}\n" for n in names))
    return {"input": str(src), "model": tiny.build_model_folder(str(root / "model")), "root": root}


def launch(real, out, processes: int):
    args = ["-m", "training.build_gt_pairs", "--input", real["input"], "--output", str(out), "--model_path",
            real["model"], *KW]
    if processes > 1:  # a gloo group of CPU processes (see test_training_magicmirror's DDP test)
        args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows_of(out):
    return [json.loads(line) for line in open(out / "pairs.jsonl")]


def test_two_processes_build_each_pair_once_and_resume(real, tmp_path):
    out = tmp_path / "two"
    stdout = launch(real, out, 2)
    assert "5 pairs written, 0 already done, 2 skipped" in stdout, stdout
    # pair i belongs to process i % 2: c0 c2 (c4 too short) and c1 c3 c5
    assert "process 0: 2 written, 0 done, process 1: 3 written, 0 done" in stdout, stdout
    assert "c4.mp4: too short" in stdout and "c0.mp4: duplicate" in stdout
    rows = rows_of(out)
    sources = [os.path.basename(r["source"]) for r in rows]
    assert sorted(sources) == ["c0.mp4", "c1.mp4", "c2.mp4", "c3.mp4", "c5.mp4"]  # each once, none missing
    assert [r["seed"] for r in rows] == [0, 1, 2, 3, 5]  # seed + pair index, whichever process made it
    for r in rows:
        for key in ("winner", "loser"):
            frames, fps = read_video(str(out / r[key]))
            assert frames.shape == (9, 32, 32, 3) and fps == 8
        assert os.path.isfile(out / r["first_frame"])
    assert not [f for f in os.listdir(out / "pairs") if ".tmp-" in f]
    # The same pairs as one process makes (the independent reference for the sharding).
    single = tmp_path / "one"
    launch(real, single, 1)
    assert rows_of(single) == rows
    # A re-run finds everything done: nothing is regenerated, the manifest is the same.
    stamps = {r["loser"]: os.path.getmtime(out / r["loser"]) for r in rows}
    again = launch(real, out, 2)
    assert "0 pairs written, 5 already done, 2 skipped" in again, again
    assert rows_of(out) == rows and all(os.path.getmtime(out / k) == t for k, t in stamps.items())


@pytest.fixture
def no_model_loads(monkeypatch):
    from magicmirror_video.models import cogvideox

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing can be built")

    monkeypatch.setattr(cogvideox, "load_cogvideox", refuse)


def test_every_clip_filtered_exits_non_zero_with_the_summary(real, tmp_path, capsys, no_model_loads):
    src = tmp_path / "short"
    src.mkdir()
    for k in range(2):
        write_video(str(src / f"s{k}.mp4"), moving(k, frames=5), fps=8)
    (src / "videos.txt").write_text("s0.mp4\ns1.mp4\n")
    (src / "prompts.txt").write_text("a car\na car\n")
    code = build_gt_pairs.main(["--input", str(src), "--output", str(tmp_path / "out"), "--model_path", real["model"],
                                *KW])
    captured = capsys.readouterr()
    assert code == 1
    assert "0 pairs written, 0 already done, 2 skipped" in captured.out and "s1.mp4: too short" in captured.out
    assert captured.err.strip().startswith("error: no GT-Pair in") and len(captured.err.strip().splitlines()) == 1
    assert rows_of(tmp_path / "out") == []


def test_static_clips_are_filtered_after_decoding_and_the_exit_is_non_zero(real, tmp_path, capsys):
    src = tmp_path / "static"
    src.mkdir()
    write_video(str(src / "still.mp4"), torch.full((24, 40, 48, 3), 0.5), fps=8)
    (src / "videos.txt").write_text("still.mp4\n")
    (src / "prompts.txt").write_text("a car\n")
    code = build_gt_pairs.main(["--input", str(src), "--output", str(tmp_path / "out"), "--model_path", real["model"],
                                *KW])
    assert code == 1 and "still.mp4: static" in capsys.readouterr().out


@pytest.mark.parametrize("change,expected", [
    (("--input", "absent"), "--input: dataset manifest not found"),
    (("--num_frames", "8"), "--num_frames: num_frames=8 is not of the form 4k+1"),
    (("--width", "40"), "--width: width=40 is not a multiple of 16"),
    (("--model_path", "absent"), "--model_path: CogVideoX model folder not found"),
])
def test_bad_input_exits_2_before_the_model_loads(real, tmp_path, capsys, no_model_loads, change, expected):
    argv = ["--input", real["input"], "--output", str(tmp_path / "out"), "--model_path", real["model"], *KW]
    option, value = change
    argv[argv.index(option) + 1] = str(tmp_path / value) if value == "absent" else value
    assert build_gt_pairs.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and expected in captured.err, captured.err
    assert not (tmp_path / "out").exists()
