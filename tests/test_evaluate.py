"""``python -m training.evaluate``: the three protocols on one folder, report JSON/CSV/PNG with per-video rows and
counted aggregates, exit codes (unreadable videos = 1 unless --skip-unreadable, bad input = 2 before any model)."""

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
from magicmirror_video.testing import tiny, tiny_faces, tiny_metrics  # noqa: E402
from magicmirror_video.training import evaluate  # noqa: E402


def _frames(specs, h=240, w=320) -> torch.Tensor:
    rgb = np.stack([tiny_faces.synthetic_face_image(h, w, center=c, radius=r, seed=s) for c, r, s in specs])
    return torch.from_numpy(rgb).float() / 255.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("evaluate")
    tiny_faces.build_fake_insightface_pack(str(root / "insightface"), "antelopev2")
    tiny_faces.build_fake_insightface_pack(str(root / "insightface"), "buffalo_l")
    videos = root / "videos"
    videos.mkdir()
    write_video(str(videos / "a_face.mp4"), _frames([((150 + 4 * t, 120), 50, 1) for t in range(9)]), fps=8)
    write_video(str(videos / "b_dark.mp4"), _frames([(None, None, t) for t in range(5)]), fps=8)
    write_video(str(videos / "c_lost.mp4"), _frames([((160, 120), 50, 1)] * 10 + [(None, None, 0)] * 7), fps=16)
    (videos / "a_face.txt").write_text("a person img waves at the camera")
    refs = root / "refs"
    refs.mkdir()
    for seed in (1, 2):
        face = tiny_faces.synthetic_face_image(200, 180, center=(90, 100), radius=60, seed=seed)
        Image.fromarray(face).save(refs / f"r{seed}.png")
    Image.fromarray(tiny_faces.synthetic_face_image(100, 100, radius=None)).save(root / "dark.png")
    tiny.build_clip_vision_checkpoint(str(root / "clip.safetensors"))
    broken = root / "with_broken"
    broken.mkdir()
    for name in ("a_face.mp4", "b_dark.mp4"):
        (broken / name).write_bytes((videos / name).read_bytes())
    (broken / "z_broken.mp4").write_bytes(b"\x00\x00\x00 this is not a video")
    (broken / "notes.txt").write_text("not a video, ignored")
    metric_dir = root / "metrics"  # beside insightface/: found without flags
    tiny_metrics.build_curricularface_file(str(metric_dir / "glint360k_curricular_face_r101_backbone.bin"))
    tiny_metrics.build_clip_folder(str(metric_dir / "clip-vit-tiny"))
    tiny_metrics.build_dino_folder(str(metric_dir / "dino-tiny"))
    return root


def _args(data, *extra):
    return ["--insightface", str(data / "insightface"), "--no_progress", *map(str, extra)]


def _rows(report):
    return {r["video"].rsplit("/", 1)[-1]: r for r in report["videos"]}


def test_unreadable_video_is_exit_1_unless_skip_unreadable(data, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "eval" / "report.json"
    code = evaluate.main(_args(data, "--videos", data / "with_broken", "--references", data / "refs", "--output", out))
    captured = capsys.readouterr()
    assert code == 1
    assert "2 of 3 videos could not" not in captured.err and "1 of 3 videos could not be read" in captured.err
    assert "--skip-unreadable" in captured.err
    report = json.loads(out.read_text())  # the report is written all the same
    rows = _rows(report)
    assert sorted(rows) == ["a_face.mp4", "b_dark.mp4", "z_broken.mp4"]  # notes.txt is not a video
    assert rows["z_broken.mp4"]["error"].startswith("unreadable video")
    assert report["skipped"] == [{"video": rows["z_broken.mp4"]["video"], "error": rows["z_broken.mp4"]["error"]}]
    assert "failed" in captured.out and "z_broken.mp4" in captured.out
    with open(tmp_path / "eval" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["video"].rsplit("/", 1)[-1] for r in table] == ["a_face.mp4", "b_dark.mp4", "z_broken.mp4"]
    assert table[2]["error"].startswith("unreadable video") and table[1]["face_sim"] == ""
    with Image.open(tmp_path / "eval" / "report.png") as png:
        assert png.size[0] >= 640 and png.size[1] > 300

    assert evaluate.main(_args(data, "--videos", data / "with_broken", "--references", data / "refs", "--output",
                               tmp_path / "r2.json", "--skip-unreadable")) == 0
    assert evaluate.build_parser().parse_args(_args(data, "--videos", "v", "--skip_unreadable")).skip_unreadable


def test_magicmirror_report_rows_counts_and_table(data, tmp_path, capsys):
    from magicmirror_video.models.face_analysis import FaceAnalyzer

    out = tmp_path / "report.json"
    assert evaluate.main(_args(data, "--videos", data / "videos", "--references", data / "refs", "--output", out)) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = _rows(report)
    face, dark, lost = rows["a_face.mp4"], rows["b_dark.mp4"], rows["c_lost.mp4"]
    assert face["num_frames"] == 9 and face["face_rate"] == 1.0 and face["num_references"] == 2
    assert face["fps"] == 8 and lost["fps"] == 16
    assert dark["face_rate"] == 0.0 and dark["face_sim"] is None
    assert lost["face_lost_at"] == 10 and lost["sim_decay"] is not None
    # the row is what evaluate_video gives on the decoded file with the two references
    analyzer = FaceAnalyzer(str(data / "insightface"))
    from PIL import Image

    refs = metrics.reference_faces(analyzer, [np.array(Image.open(data / "refs" / f"{n}.png")) for n in ("r1", "r2")])
    expected = metrics.evaluate_video(read_video(face["video"])[0], analyzer=analyzer, references=refs, fps=8)
    for key in ("face_sim", "sim_decay", "fm_ref", "fm_inter", "dynamics", "dynamic_degree"):
        assert face[key] == pytest.approx(getattr(expected, key), abs=1e-9), key
    assert face["dynamics"] > 2  # the face (a tenth of the frame) moves 4 px/frame at 8 fps: 34 px/s at 256
    # aggregates: the faceless video is left out of face similarity, and said so; counts are frames (pairs for flow)
    summary = report["summary"]
    assert summary["face_sim"]["n"] == 2 and summary["face_sim"]["left_out"] == 1
    assert summary["face_sim"]["reasons"] == {"no face in any frame": 1}
    assert summary["face_sim"]["frames"] == 9 + 10
    assert summary["face_sim"]["mean"] == pytest.approx((face["face_sim"] + lost["face_sim"]) / 2)
    assert summary["dynamics"]["n"] == 3 and summary["dynamics"]["frames"] == sum(
        r["counts"]["dynamics"] for r in rows.values())
    assert lost["counts"]["dynamics"] == len(range(0, 17, 2)) - 1  # 16 fps thinned to 8
    assert summary["dynamic_degree"]["mean"] == pytest.approx(np.mean([r["dynamic_degree"] for r in rows.values()]))
    # the table: one row per video, then the aggregate with n and frames; CLIP-T has a CLIP folder beside insightface
    table = report["table"]
    assert table in stdout and report["settings"]["protocol"] == "magicmirror"
    lines = table.splitlines()
    assert lines[0].startswith("| Video | frames (scored) | Face Similarity↑ | Dynamics (px/s)↑ |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| a_face.mp4", "| b_dark.mp4", "| c_lost.mp4"]
    assert "(n=2, 19 frames; 1 left out: no face in any frame)" in lines[5]
    assert face["clip_t"] is not None and lost["clip_t"] is None
    assert lost["unavailable"]["clip_t"] == "no prompt for this video"
    assert "3 of 3 videos scored (1 with no face in any frame)" in stdout
    assert face["dino_i"] is not None and face["counts"]["dino_i"] == 9


@pytest.mark.parametrize("protocol", ["consisid", "opens2v"])
def test_published_protocol_report(protocol, data, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = evaluate.main(_args(data, "--videos", data / "videos", "--references", data / "refs", "--output", out,
                               "--protocol", protocol))
    assert code == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = _rows(report)
    p = metrics.PROTOCOLS[protocol]
    assert report["settings"]["pack"] == "buffalo_l" and p.describe() in stdout
    assert all(len(r["frame_indices"]) == p.num_frames for r in rows.values())
    assert rows["a_face.mp4"]["references_used"] == 1 and rows["a_face.mp4"]["num_references"] == 2
    dark = rows["b_dark.mp4"]
    assert dark["face_sim"] == 0.0 and dark["face_sim_cur"] == 0.0  # a faceless video scores 0
    summary = report["summary"]
    assert summary["face_sim"]["n"] == 3 and summary["face_sim"]["faceless_as_zero"] == 1
    assert summary["face_sim"]["mean"] == pytest.approx(np.mean([r["face_sim"] for r in rows.values()]))
    assert "incl. 1 faceless = 0" in report["table"]
    lines = report["table"].splitlines()
    # each benchmark's own column order
    first = "FaceSim-Arc↑ | FaceSim-Cur↑" if protocol == "consisid" else "FaceSim-Cur↑ | FaceSim-Arc↑"
    assert lines[0].startswith(f"| Video | frames (scored) | {first} |")
    if protocol == "consisid":  # no Inception weights anywhere: the FID column says so instead of a number
        assert "FID↓" in lines[0] and rows["a_face.mp4"]["face_fid"] is None
        assert rows["a_face.mp4"]["unavailable"]["face_fid"].startswith(("no inception", "needs torchvision"))
    else:
        assert rows["a_face.mp4"]["motion_fb"] is not None and "Motion (motion_fb)" in lines[0]
    print(f"\n{protocol}:\n" + "\n".join(stdout.splitlines()[:2]) + "\n" + report["table"])


def test_evaluate_manifest_with_per_video_references_prompts_and_clip(data, tmp_path):
    manifest = tmp_path / "videos.jsonl"
    rows = [{"video": str(data / "videos" / "a_face.mp4"), "ref_images": [str(data / "refs" / "r1.png")],
             "prompt": "a person waves"},
            {"video": str(data / "videos" / "a_face.mp4")},
            {"video": "missing.mp4"},
            {"video": str(data / "videos" / "a_face.mp4"), "ref_image": str(data / "dark.png")}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.json"
    code = evaluate.main(_args(data, "--videos", manifest, "--references", data / "refs" / "r2.png",
                               "--clip_vision", data / "clip.safetensors", "--output", out, "--name", "mine",
                               "--skip-unreadable"))
    assert code == 0
    report = json.loads(out.read_text())
    own, default, missing, faceless_ref = report["videos"]
    assert own["references"] == [str(data / "refs" / "r1.png")]
    assert default["references"] == [str(data / "refs" / "r2.png")]
    assert own["face_sim"] > default["face_sim"]  # the video shows identity 1
    assert own["clip_i"] is not None and len(own["curves"]["clip_i"]) == 9
    assert own["prompt"] == "a person waves" and own["clip_t"] is not None and default["clip_t"] is None
    assert missing["error"].startswith("unreadable video") and str(tmp_path / "missing.mp4") in missing["error"]
    assert faceless_ref["error"].startswith("reference: No face found in reference image 1 of 1")
    assert report["table"].splitlines()[-1].startswith("| **mine** (2 videos) |")
    assert report["summary"]["clip_i"]["n"] == 2


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "json file", "image manifest", "no references",
                                  "reference not an image", "no insightface pack", "missing clip",
                                  "missing curricularface", "bad protocol"])
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
        "missing curricularface": (["--videos", videos, "--references", refs, "--curricularface", tmp_path / "c.bin"],
                                   "--curricularface not found"),
        "bad protocol": (["--videos", videos, "--references", refs, "--protocol", "vbench"], "invalid choice"),
    }[case]
    with pytest.raises(SystemExit) if case == "bad protocol" else _nothing():
        code = evaluate.main(_args(data, *argv, "--output", tmp_path / "r.json"))
        assert code == 2
    err = capsys.readouterr().err
    assert snippet in err, err
    if case != "bad protocol":
        assert err.startswith("error: ") and err.count("\n") == 1, err
    if case == "no insightface pack":  # every searched path, in the one line
        for path in (tmp_path / "models" / "antelopev2", tmp_path / "models" / "antelopev2" / "antelopev2",
                     tmp_path / "antelopev2"):
            assert f"{path} (missing)" in err
        assert "scrfd_10g_bnkps.onnx" in err
    assert not (tmp_path / "r.json").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_evaluate_faceless_global_reference_is_exit_2(data, tmp_path, capsys):
    code = evaluate.main(_args(data, "--videos", data / "videos", "--references", data / "dark.png",
                               "--output", tmp_path / "r.json"))
    assert code == 2 and "No face found in reference image 1 of 1" in capsys.readouterr().err
