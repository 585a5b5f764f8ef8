"""``python -m training.evaluate``: report JSON/CSV/PNG, Table-1 layout, unreadable videos skipped, bad input =
exit 2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")

from magicmirror_video.models import metrics  # noqa: E402
from magicmirror_video.models.video_io import read_video, write_video  # noqa: E402
from magicmirror_video.testing import tiny, tiny_faces  # noqa: E402
from magicmirror_video.training import evaluate  # noqa: E402


def _frames(specs, h=240, w=320) -> torch.Tensor:
    rgb = np.stack([tiny_faces.synthetic_face_image(h, w, center=c, radius=r, seed=s) for c, r, s in specs])
    return torch.from_numpy(rgb).float() / 255.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("evaluate")
    tiny_faces.build_fake_insightface_pack(str(root / "insightface"))
    videos = root / "videos"
    videos.mkdir()
    write_video(str(videos / "a_face.mp4"), _frames([((150 + 4 * t, 120), 50, 1) for t in range(9)]))
    write_video(str(videos / "b_dark.mp4"), _frames([(None, None, t) for t in range(5)]))
    (videos / "c_broken.mp4").write_bytes(b"\x00\x00\x00 this is not a video")
    (videos / "notes.txt").write_text("not a video, ignored")
    refs = root / "refs"
    refs.mkdir()
    for seed in (1, 2):
        face = tiny_faces.synthetic_face_image(200, 180, center=(90, 100), radius=60, seed=seed)
        Image.fromarray(face).save(refs / f"r{seed}.png")
    Image.fromarray(tiny_faces.synthetic_face_image(100, 100, radius=None)).save(root / "dark.png")
    tiny.build_clip_vision_checkpoint(str(root / "clip.safetensors"))
    return root


def _args(data, *extra):
    return ["--insightface", str(data / "insightface"), "--no_progress", *map(str, extra)]


def test_evaluate_folder_writes_report_csv_png_and_skips_unreadable(data, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "eval" / "report.json"
    code = evaluate.main(_args(data, "--videos", data / "videos", "--references", data / "refs", "--output", out))
    assert code == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["video"].rsplit("/", 1)[-1]: r for r in report["videos"]}
    assert sorted(rows) == ["a_face.mp4", "b_dark.mp4", "c_broken.mp4"]  # notes.txt is not a video
    assert rows["c_broken.mp4"]["error"].startswith("unreadable video")
    assert report["skipped"] == [{"video": rows["c_broken.mp4"]["video"], "error": rows["c_broken.mp4"]["error"]}]
    face, dark = rows["a_face.mp4"], rows["b_dark.mp4"]
    assert face["num_frames"] == 9 and face["face_rate"] == 1.0 and face["num_references"] == 2
    assert dark["face_rate"] == 0.0 and dark["face_sim"] is None and "no face in any frame" in dark["notes"][0]
    # the row is what evaluate_video gives on the decoded file with the two references
    from magicmirror_video.models.face_analysis import FaceAnalyzer

    analyzer = FaceAnalyzer(str(data / "insightface"))
    refs = metrics.reference_faces(analyzer, [np.array(Image.open(data / "refs" / f"{n}.png")) for n in ("r1", "r2")])
    expected = metrics.evaluate_video(read_video(rows["a_face.mp4"]["video"])[0], analyzer=analyzer, references=refs)
    for key in ("face_sim", "sim_decay", "fm_ref", "fm_inter", "dynamics"):
        assert face[key] == pytest.approx(getattr(expected, key), abs=1e-9), key
    assert face["dynamics"] > 0.5  # the face moves 4 px/frame
    # mean/std table over the scored videos, Table-1 layout
    summary = report["summary"]
    assert summary["face_sim"] == {"mean": pytest.approx(face["face_sim"]), "std": 0.0, "n": 1}
    assert summary["dynamics"]["n"] == 2 and summary["dynamics"]["mean"] == pytest.approx(
        (face["dynamics"] + dark["dynamics"]) / 2)
    assert summary["clip_i"]["n"] == 0
    header = report["table"].splitlines()[0]
    assert header.startswith("| Method | Face Similarity↑ | Dynamics↑ | Face Motion (FM_ref)↑ |")
    assert f"| videos | {face['face_sim']:.4f} ± 0.0000 |" in report["table"] and "n/a" in report["table"]
    assert report["table"] in stdout and "2 of 3 videos scored (1 with no face in any frame)" in stdout
    assert "skipped" in stdout and "c_broken.mp4" in stdout
    with open(tmp_path / "eval" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["video"].rsplit("/", 1)[-1] for r in table] == ["a_face.mp4", "b_dark.mp4", "c_broken.mp4"]
    assert float(table[0]["face_sim"]) == pytest.approx(face["face_sim"], rel=1e-5) and table[1]["face_sim"] == ""
    assert table[2]["error"].startswith("unreadable video")
    with Image.open(tmp_path / "eval" / "report.png") as png:
        assert png.size[0] >= 640 and png.size[1] > 300


def test_evaluate_manifest_with_per_video_references_and_clip(data, tmp_path):
    manifest = tmp_path / "videos.jsonl"
    rows = [{"video": str(data / "videos" / "a_face.mp4"), "ref_images": [str(data / "refs" / "r1.png")]},
            {"video": str(data / "videos" / "a_face.mp4")},
            {"video": "missing.mp4"},
            {"video": str(data / "videos" / "a_face.mp4"), "ref_image": str(data / "dark.png")}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.json"
    code = evaluate.main(_args(data, "--videos", manifest, "--references", data / "refs" / "r2.png",
                               "--clip_vision", data / "clip.safetensors", "--output", out, "--name", "mine"))
    assert code == 0
    report = json.loads(out.read_text())
    own, default, missing, faceless_ref = report["videos"]
    assert own["references"] == [str(data / "refs" / "r1.png")]
    assert default["references"] == [str(data / "refs" / "r2.png")]
    assert own["face_sim"] > default["face_sim"]  # the video shows identity 1
    assert own["clip_i"] is not None and len(own["curves"]["clip_i"]) == 9
    assert missing["error"].startswith("unreadable video") and str(tmp_path / "missing.mp4") in missing["error"]
    assert faceless_ref["error"].startswith("reference: No face found in reference image 1 of 1")
    assert report["table"].splitlines()[2].startswith("| mine |") and report["summary"]["clip_i"]["n"] == 2


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "json file", "image manifest", "no references",
                                  "reference not an image", "no insightface pack", "missing clip"])
def test_evaluate_bad_input_is_one_line_and_exit_2_before_loading_models(case, data, tmp_path, capsys, monkeypatch):
    from magicmirror_video.models import face_analysis

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(face_analysis.FaceAnalyzer, "__init__", no_model)
    videos, refs = str(data / "videos"), str(data / "refs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "images.jsonl").write_text(json.dumps({"image": str(data / "refs" / "r1.png")}) + "\n")
    argv, snippet = {
        "missing folder": (["--videos", tmp_path / "nope", "--references", refs], "--videos not found"),
        "empty folder": (["--videos", tmp_path / "empty", "--references", refs], "no videos"),
        "json file": (["--videos", tmp_path / "x.json", "--references", refs], "a folder of videos or a .jsonl"),
        "image manifest": (["--videos", tmp_path / "images.jsonl", "--references", refs], "manifest of images"),
        "no references": (["--videos", videos], "no references for 3 of 3 videos"),
        "reference not an image": (["--videos", videos, "--references", data / "videos" / "a_face.mp4"],
                                   "must be images"),
        "no insightface pack": (["--videos", videos, "--references", refs, "--insightface", tmp_path],
                                "insightface pack 'antelopev2' not found"),
        "missing clip": (["--videos", videos, "--references", refs, "--clip_vision", tmp_path / "c.safetensors"],
                         "--clip_vision not found"),
    }[case]
    code = evaluate.main(_args(data, *argv, "--output", tmp_path / "r.json"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and snippet in err, err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_faceless_global_reference_is_exit_2(data, tmp_path, capsys):
    code = evaluate.main(_args(data, "--videos", data / "videos", "--references", data / "dark.png",
                               "--output", tmp_path / "r.json"))
    assert code == 2 and "No face found in reference image 1 of 1" in capsys.readouterr().err
