"""Trainer configuration precedence and input validation, for all four trainers.

Precedence: defaults < preset < config file < command line, for every field; ``--help`` shows the
trainer's own defaults; ``--print_config`` is what the trainer uses. Validation: bad data, manifests,
media, frame counts and sizes stop with exit code 2 and one stderr line, before any model loads and
before anything is written to output_dir."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing

import pytest
import torch
import yaml
from PIL import Image

from magicmirror_video.models.video_io import write_video
from magicmirror_video.training import train_dualreal, train_magicmirror, train_regdpo, train_subject_replay
from magicmirror_video.training.config import InputError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"magicmirror": train_magicmirror, "subject_replay": train_subject_replay, "dualreal": train_dualreal,
           "regdpo": train_regdpo}
TRAINERS = {"magicmirror": train_magicmirror.MagicMirrorTrainer,
            "subject_replay": train_subject_replay.SubjectReplayTrainer,
            "dualreal": train_dualreal.DualRealTrainer, "regdpo": train_regdpo.RegDPOTrainer}
# The papers' learning rates (MagicMirror §4.1, subject replay §4, DualReal §4, Reg-DPO §4), written out here
# independently of the code.
PAPER_LR = {"magicmirror": 1e-5, "subject_replay": 5e-5, "dualreal": 1e-3, "regdpo": 5e-6}
# Fields whose values constrain each other (stage=image needs num_frames 1; tiny_demo refuses the paths it
# generates): tested on their own below.
COUPLED = {"magicmirror": {"stage", "num_frames", "tiny_demo"}, "subject_replay": {"tiny_demo"},
           "dualreal": {"tiny_demo"}, "regdpo": {"tiny_demo"}}
# The input paths each trainer's --preset tiny builds itself (what each demo has to make: presets.py's builders).
TINY_GENERATED = {"magicmirror": ["model_path", "data", "arcface_path"],
                  "subject_replay": ["model_path", "data", "pairs"],
                  "dualreal": ["model_path", "data", "identity_data", "clip_vision"],
                  "regdpo": ["model_path", "data"]}


def config_class(name):
    return TRAINERS[name].config_class


# ------------------------------------------------------------------------------------------------ precedence


def three_values(kind, default, choices):
    """Three values for the preset, config-file and command-line layers; consecutive ones differ."""
    if choices:
        others = [c for c in choices if c != default]
        return (others[0], default, others[0]) if len(others) == 1 else (others[0], others[1], default)
    if kind is bool:
        return (not default, default, not default)
    if kind is int:
        return (default + 4, default + 8, default + 12)  # keeps 4k+1 frame counts valid
    if kind is float:
        return (default + 0.25, default + 0.5, default + 0.75)
    if kind is list:
        return (["p"], ["f"], ["c"])
    return ("preset-value", "file-value", "cli-value")


def cli_args(name, kind, value):
    if kind is bool:
        return [f"--{name}" if value else f"--no-{name}"]
    if kind is list:
        return [f"--{name}", *value]
    return [f"--{name}", str(value)]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_field_cli_beats_file_beats_preset_beats_default(trainer, tmp_path):
    cls = config_class(trainer)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in COUPLED.get(trainer, ())]
    layered = {}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        layered[f.name] = (default, *three_values(hints[f.name], default, f.metadata.get("choices")))
    presets = {"p": {n: v[1] for n, v in layered.items()}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({n: v[2] for n, v in layered.items()}))
    cli = [a for f in fields for a in cli_args(f.name, hints[f.name], layered[f.name][3])]
    runs = {0: load_config(cls, []), 1: load_config(cls, ["--preset", "p"], presets),
            2: load_config(cls, ["--preset", "p", "--config", str(tmp_path / "run.yaml")], presets),
            3: load_config(cls, ["--preset", "p", "--config", str(tmp_path / "run.yaml"), *cli], presets)}
    for layer, config in runs.items():
        for name, values in layered.items():
            assert getattr(config, name) == values[layer], (trainer, layer, name)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_explicit_learning_rate_is_never_rewritten(trainer, tmp_path):
    cls, presets = config_class(trainer), MODULES[trainer].PRESETS
    assert load_config(cls, []).learning_rate == PAPER_LR[trainer]  # the trainer's own default
    assert load_config(cls, ["--learning_rate", "1e-5"]).learning_rate == 1e-5  # the old shared default, kept
    assert load_config(cls, ["--max_steps", "500"]).learning_rate == PAPER_LR[trainer]
    assert load_config(cls, ["--preset", "tiny"], presets).learning_rate == 1e-3  # preset beats the default
    (tmp_path / "c.yaml").write_text("learning_rate: 2e-4\n")  # YAML reads 2e-4 as a string: coerced
    assert load_config(cls, ["--preset", "tiny", "--config", str(tmp_path / "c.yaml")], presets).learning_rate == 2e-4
    assert load_config(cls, ["--preset", "tiny", "--config", str(tmp_path / "c.yaml"), "--learning_rate", "1e-5"],
                       presets).learning_rate == 1e-5


@pytest.mark.parametrize("trainer", TRAINERS)
def test_help_shows_the_trainers_own_default(trainer, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[trainer].main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    option = text[text.index("--learning_rate LEARNING_RATE ", text.index("options:")):]
    assert f"(default: {PAPER_LR[trainer]!r})" in option[:200], option[:200]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_print_config_is_what_the_trainer_uses(trainer, tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yaml").write_text("max_steps: 7\nseed: 3\n")
    argv = ["--preset", "tiny", "--no-tiny_demo", "--config", str(tmp_path / "c.yaml"), "--learning_rate", "1e-5",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        MODULES[trainer].main([*argv, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    used = {}

    def train(self):  # what the trainer holds, and the learning rate its optimizer gets
        used["config"] = dataclasses.asdict(self.config)
        used["lr"] = self._optimizer([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"]
        return "exported"

    monkeypatch.setattr(TRAINERS[trainer], "train", train)
    assert MODULES[trainer].main(argv) == 0
    assert printed == used["config"] and used["lr"] == printed["learning_rate"] == 1e-5
    assert printed["max_steps"] == 7 and printed["height"] == MODULES[trainer].PRESETS["tiny"]["height"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_preset_tiny_refuses_a_path_the_user_set_instead_of_replacing_it(trainer, tmp_path, capsys, monkeypatch):
    """--preset tiny builds its own model and data; a path the user gave with it (command line or config file) is an
    error naming it, the same with --print_config, before anything is built. --no-tiny_demo keeps the user's path."""
    from magicmirror_video.training import presets

    def never(config):
        raise AssertionError("the tiny demo was built although the user set its paths")

    for name in ("magicmirror", "subject", "dualreal", "regdpo"):
        monkeypatch.setattr(presets, f"build_tiny_{name}", never)
    out, mine = tmp_path / "out", str(tmp_path / "mine")
    tiny = ["--preset", "tiny", "--output_dir", str(out)]
    generated = TINY_GENERATED[trainer]
    listed = f"{', '.join(generated[:-1])} and {generated[-1]}"
    for field in generated:
        for extra in ([], ["--print_config"]):
            assert MODULES[trainer].main([*tiny, f"--{field}", mine, *extra]) == 2
            captured = capsys.readouterr()
            assert captured.err.strip().splitlines() == [
                f"error: --preset tiny generates {listed} itself, but --{field} is set too; drop it to run the demo, "
                "or add --no-tiny_demo to train on your own files with the preset's other settings"], captured.err
            assert captured.out == "" and not out.exists()
        (tmp_path / "mine.yaml").write_text(f"{field}: {mine}\n")
        assert MODULES[trainer].main([*tiny, "--config", str(tmp_path / "mine.yaml"), "--data", mine]) == 2
        line = capsys.readouterr().err.strip()
        both = ["data"] if field == "data" else [n for n in generated if n in (field, "data")]
        named = ", ".join("--data" if n == "data" else f"{n} (in {tmp_path / 'mine.yaml'})" for n in both)
        assert f"itself, but {named} {'is' if len(both) == 1 else 'are'} set too;" in line, line
        config = load_config(config_class(trainer), [*tiny, "--no-tiny_demo", f"--{field}", mine],
                             MODULES[trainer].PRESETS)  # the preset's settings with the user's own path
        assert getattr(config, field) == mine and config.tiny_demo is False
        assert config.height == MODULES[trainer].PRESETS["tiny"]["height"]
    with pytest.raises(SystemExit) as e:  # the control: the demo alone resolves
        MODULES[trainer].main([*tiny, "--print_config"])
    assert e.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["tiny_demo"] is True
    assert MODULES[trainer].main(["--tiny_demo", "--model_path", mine, "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --tiny_demo generates {listed} itself, but --model_path is ")
    with pytest.raises(SystemExit):
        MODULES[trainer].main(["--help"])
    assert f"It fills {listed}, so those cannot be set with it" in " ".join(capsys.readouterr().out.split())


def test_config_file_errors_name_the_field_and_the_file(tmp_path):
    cls = config_class("regdpo")
    (tmp_path / "a.yaml").write_text("max_steps: ten\n")
    with pytest.raises(InputError, match=r"a\.yaml: max_steps='ten' is not a valid int"):
        load_config(cls, ["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "b.yaml").write_text("lr_scheduler: cosin\n")
    with pytest.raises(InputError, match=r"b\.yaml: lr_scheduler='cosin' is not one of"):
        load_config(cls, ["--config", str(tmp_path / "b.yaml")])
    (tmp_path / "c.toml").write_text("max_steps = 2.5\n")
    with pytest.raises(InputError, match=r"c\.toml: max_steps=2.5"):
        load_config(cls, ["--config", str(tmp_path / "c.toml")])
    with pytest.raises(InputError, match="unknown config field 'batch_size'.*pair_batch_size"):
        load_config(config_class("subject_replay"), ["--config", str(_yaml(tmp_path, batch_size=4))])


def test_readme_config_tables_are_generated_from_the_dataclasses():
    from magicmirror_video.training.config import TrainConfig, config_help_markdown
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert config_help_markdown(TrainConfig) in readme
    for trainer in TRAINERS:
        assert config_help_markdown(config_class(trainer), TrainConfig) in readme, trainer


def _yaml(tmp_path, **values):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ------------------------------------------------------------------------------------------------ validation


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs for every trainer (a model folder with only its config: nothing can load from it)."""
    root = tmp_path_factory.mktemp("inputs")
    model = root / "model"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (model / sub).mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps({  # what the base and variant are read from
        "_class_name": "CogVideoXTransformer3DModel", "num_layers": 4, "num_attention_heads": 2,
        "attention_head_dim": 16, "in_channels": 4, "out_channels": 4}))
    frames = torch.rand(17, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    for k in range(3):
        write_video(str(root / f"clip{k}.mp4"), frames, fps=8)
        Image.new("RGB", (48, 40), (40 * k, 90, 200)).save(root / f"img{k}.png")
    (root / "faces").mkdir()
    (root / "faces" / "0.safetensors").write_bytes(b"")  # validation only checks that it exists
    (root / "clip.safetensors").write_bytes(b"")
    mm = [{"media": f"img{k}.png", "caption": "a person img", "faces": "faces/0.safetensors",
           "face_box": [4, 4, 20, 20], "face_kps": [[8, 8]] * 5, "size": [48, 40]} for k in range(3)]
    pairs = [{"src": f"img{k}.png", "tgt": f"img{(k + 1) % 3}.png", "caption": "a teddy bear"} for k in range(3)]
    gt = [{"winner": f"clip{k}.mp4", "loser": f"clip{(k + 1) % 3}.mp4", "caption": "a car",
           "first_frame": f"img{k}.png"} for k in range(3)]
    (root / "videos").mkdir()
    (root / "videos" / "videos.txt").write_text("".join(f"../clip{k}.mp4\n" for k in range(3)))
    (root / "videos" / "prompts.txt").write_text("a car drives\n" * 3)
    (root / "identity").mkdir()
    (root / "identity" / "images.txt").write_text("".join(f"../img{k}.png\n" for k in range(3)))
    (root / "identity" / "prompts.txt").write_text("a dog *\n" * 3)
    mm_videos = [{**r, "media": f"clip{k}.mp4", "size": [32, 32]} for k, r in enumerate(mm)]  # stage=video
    paths = {"root": root, "model": str(model), "mm": jsonl(root / "mm.jsonl", mm),
             "mm_videos": jsonl(root / "mm_videos.jsonl", mm_videos), "pairs": jsonl(root / "pairs.jsonl", pairs),
             "gt": jsonl(root / "gt.jsonl", gt), "videos": str(root / "videos"), "identity": str(root / "identity"),
             "clip": str(root / "clip.safetensors")}
    # The same manifests with one missing media file in row 2, for each trainer's dataset option.
    for name, rows, key, gone in (("mm", mm, "media", "gone.png"), ("pairs", pairs, "tgt", "gone.png"),
                                  ("gt", gt, "loser", "gone.mp4")):
        paths[f"broken_{name}"] = jsonl(root / f"broken_{name}.jsonl", [rows[0], {**rows[1], key: gone}, rows[2]])
    (root / "broken_videos").mkdir()
    (root / "broken_videos" / "videos.txt").write_text("../clip0.mp4\ngone.mp4\n")
    (root / "broken_videos" / "prompts.txt").write_text("a car\na car\n")
    paths["broken_videos"] = str(root / "broken_videos")
    return paths


def valid_args(trainer, p, out):
    size = ["--height", "32", "--width", "32", "--output_dir", str(out)]
    return {
        "magicmirror": ["--model_path", p["model"], "--data", p["mm"], "--id_loss_weight", "0", *size],
        "subject_replay": ["--model_path", p["model"], "--pairs", p["pairs"], "--data", p["videos"], "--num_frames",
                           "9", "--pair_height", "32", "--pair_width", "32", *size],
        "dualreal": ["--model_path", p["model"], "--identity_data", p["identity"], "--data", p["videos"],
                     "--clip_vision", p["clip"], "--num_frames", "9", *size],
        "regdpo": ["--model_path", p["model"], "--data", p["gt"], "--num_frames", "9", *size],
    }[trainer]


def replace(argv, option, value):
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


VIDEO_STAGE = {"magicmirror": ["--stage", "video"]}  # MagicMirror's frame count only applies to stage=video
CASES = {
    "missing dataset": lambda t, p, a: (replace(a, {"subject_replay": "--pairs"}.get(t, "--data"),
                                                str(p["root"] / "absent.jsonl")), ["absent.jsonl", "not found"]),
    "wrong manifest kind": lambda t, p, a: {
        "magicmirror": lambda: (replace(a, "--data", p["gt"]), ["gt.jsonl, line 1", "'faces'", "GT-Pair manifest"]),
        "subject_replay": lambda: (replace(a, "--pairs", p["gt"]), ["gt.jsonl, line 1", "'src', 'tgt'",
                                                                     "GT-Pair manifest"]),
        "dualreal": lambda: (replace(a, "--data", p["identity"]), ["images.txt, line 1", "img0.png", "is an image"]),
        "regdpo": lambda: (replace(a, "--data", p["mm"]), ["mm.jsonl, line 1", "'loser'", "MagicMirror manifest"]),
    }[t](),
    "missing media": lambda t, p, a: {
        "magicmirror": lambda: (replace(a, "--data", p["broken_mm"]), ["line 2 (media)", "gone.png", "missing"]),
        "subject_replay": lambda: (replace(a, "--pairs", p["broken_pairs"]), ["line 2 (tgt)", "gone.png", "missing"]),
        "dualreal": lambda: (replace(a, "--data", p["broken_videos"]), ["line 2 (media)", "gone.mp4", "missing"]),
        "regdpo": lambda: (replace(a, "--data", p["broken_gt"]), ["line 2 (loser)", "gone.mp4", "missing"]),
    }[t](),
    "num_frames not 4k+1": lambda t, p, a: ([*a, *VIDEO_STAGE.get(t, []), "--num_frames", "8"],
                                            ["num_frames=8 is not of the form 4k+1", "9"]),
    "clip too short": lambda t, p, a: ([*(replace(a, "--data", p["mm_videos"]) if t == "magicmirror" else a),
                                        *VIDEO_STAGE.get(t, []), "--num_frames", "21"],
                                       ["has 17 frames, fewer than num_frames=21", "at most 17"]),
    "size not a multiple of 16": lambda t, p, a: ([*a, "--height", "30"], ["height=30 is not a multiple of 16", "32"]),
}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_valid_inputs_pass_validation(trainer, inputs, tmp_path, no_model_loads):
    """The control: the fixture's inputs are valid, so each case below fails for its one injected problem."""
    config = load_config(config_class(trainer), valid_args(trainer, inputs, tmp_path / "out"))
    checked = TRAINERS[trainer](config).validate_inputs()
    assert checked["transformer_config"]["num_layers"] == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_bad_input_exits_2_with_one_line_before_any_model_loads(trainer, case, inputs, tmp_path, capsys,
                                                                 no_model_loads):
    out = tmp_path / "out"
    argv, expected = CASES[case](trainer, inputs, valid_args(trainer, inputs, out))
    started = time.perf_counter()
    code = MODULES[trainer].main(argv)
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not out.exists() and captured.out == ""
    assert elapsed < 0.5, f"validation took {elapsed:.3f} s"


@pytest.mark.parametrize("trainer", ["subject_replay", "dualreal"])
def test_a_clip_missing_from_videos_txt_is_reported_against_videos_txt(trainer, inputs, tmp_path, capsys,
                                                                        no_model_loads):
    """--data as a prompts.txt + videos.txt folder: the error names videos.txt and its line, not prompts.txt."""
    out = tmp_path / "out"
    assert MODULES[trainer].main(replace(valid_args(trainer, inputs, out), "--data", inputs["broken_videos"])) == 2
    line = capsys.readouterr().err.strip()
    listed = os.path.join(inputs["broken_videos"], "videos.txt")
    assert line.startswith(f"error: --data: 1 of 2 files listed in {listed} are missing: videos.txt line 2 (media) "
                           f"{os.path.join(inputs['broken_videos'], 'gone.mp4')} "), line
    assert "prompts.txt" not in line and not out.exists()


@pytest.mark.parametrize("trainer", TRAINERS)
def test_resume_from_a_step_that_has_no_checkpoint_exits_2_before_anything_loads_or_is_written(
        trainer, inputs, tmp_path, capsys, no_model_loads):
    """A prior run left config.yaml and the step-4 checkpoint: --resume_from 7 names the steps there and stops
    (exit 2) before the model loads and before config.yaml is rewritten."""
    out = tmp_path / "out"
    step4 = out / "checkpoints" / "step-00000004"
    step4.mkdir(parents=True)
    (step4 / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (out / "config.yaml").write_bytes(b"learning_rate: 0.001\nseed: 3  # the earlier run's\n")
    before = (out / "config.yaml").read_bytes()
    assert MODULES[trainer].main([*valid_args(trainer, inputs, out), "--resume_from", "7"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --resume_from=7: no checkpoint of step 7 in {out / 'checkpoints'} (available steps: 4); pass one of "
        "them, 'latest', or leave it empty for a fresh run"], captured.err
    assert (out / "config.yaml").read_bytes() == before and captured.out == ""

    def validate(output_dir, resume_from):
        argv = [*valid_args(trainer, inputs, output_dir), "--resume_from", resume_from]
        return TRAINERS[trainer](load_config(config_class(trainer), argv)).validate_inputs()

    validate(out, "4")  # the checkpoint that exists
    with pytest.raises(InputError, match=r"no checkpoint of step 4 in .* \(available steps: none\)"):
        validate(tmp_path / "new", "4")
    validate(tmp_path / "new", "latest")  # no checkpoint yet: the run starts fresh with a warning (documented)


def test_dualreal_n_groups_is_checked_against_the_model(inputs, tmp_path, capsys, no_model_loads):
    argv = [*valid_args("dualreal", inputs, tmp_path / "out"), "--n_groups", "3"]
    assert train_dualreal.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "--n_groups: n_groups=3 does not divide the model's 4 transformer blocks" in line and "1, 2, 4" in line
    assert not (tmp_path / "out").exists()
    config = load_config(train_dualreal.DualRealTrainConfig, [*argv[:-1], "2"])
    assert train_dualreal.DualRealTrainer(config).validate_inputs()["transformer_config"]["num_layers"] == 4


def test_the_command_line_prints_one_line_and_no_traceback(inputs, tmp_path):
    """The real entry point in a fresh interpreter: exit status 2, one stderr line, nothing written."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.train_regdpo", *replace(valid_args("regdpo", inputs, out), "--data",
                                                                      str(tmp_path / "absent.jsonl"))]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --data: dataset manifest not found: {tmp_path / 'absent.jsonl'} (pass a metadata.jsonl file or a "
        "folder holding metadata.jsonl or prompts.txt + videos.txt/images.txt)"]
    assert not out.exists()
    print(f"CLI exit 2 after {elapsed:.2f} s (interpreter start and imports included)")
