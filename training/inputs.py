"""Input checks every trainer runs before any model loads (``Trainer.validate_inputs``).

Each check raises :class:`~training.config.InputError` with one line: what is wrong, where (option,
file, manifest line) and how to fix it. Nothing here loads a model or decodes more than a file header,
so a bad run stops in well under a second instead of after model loading.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from .config import InputError
from .data import MissingInputError, Sample, is_image, read_manifest

# What a manifest of each kind carries, to say what was passed instead of what was expected.
MANIFEST_KINDS = (("loser", "a Reg-DPO GT-Pair manifest (winner/loser)"),
                  ("src", "a subject-replay S2I pair manifest (src/tgt)"),
                  ("faces", "a MagicMirror manifest (faces/face_box/face_kps/size)"))


def check_required(config, required: dict) -> None:
    """Every ``required`` field (name -> what to pass) is set."""
    missing = [f"--{name} ({what})" for name, what in required.items() if not getattr(config, name)]
    if missing:
        raise InputError(f"set {', '.join(missing)}, or run --preset tiny for a self-contained demo")


def check_size(num_frames: int, height: int, width: int,
               options: tuple = ("--num_frames", "--height", "--width")) -> None:
    """4k+1 frames and sides that are multiples of 16, named by the options they came from."""
    from ..models.sampler import SamplingInputError, check_video_size

    try:
        check_video_size(num_frames, height, width)
    except SamplingInputError as e:
        option = options[("num_frames", "height", "width").index(str(e).split("=", 1)[0])]
        raise InputError(f"{option}: {e}") from None


def check_path(path: str, option: str, what: str, *, folder: bool | None = False) -> str:
    """``path`` exists (a file, a folder when ``folder``, either when ``folder is None``)."""
    path = os.path.abspath(os.path.expanduser(path))
    ok = os.path.exists(path) if folder is None else os.path.isdir(path) if folder else os.path.isfile(path)
    if not ok:
        kind = "path" if folder is None else "folder" if folder else "file"
        raise MissingInputError(f"{option}: {what} {kind} not found: {path}")
    return path


def check_model_folder(path: str, option: str = "--model_path", *, bases: Sequence[str] = ("cogvideox",),
                       method: str = "") -> dict:
    """A complete diffusers folder of one of ``bases`` (``models/bases.py``); returns ``{"base", "variant",
    "transformer_config", "spatial_multiple"}`` read from its JSON files (nothing loaded). ``method`` names the
    trainer in the refusal of another base."""
    from ..models import wan
    from ..models.bases import BASE_NAMES, UnknownBaseError, detect_base
    from ..models.cogvideox import missing_components, variant_of

    path = check_path(path, option, "model", folder=True)
    try:
        base = detect_base(path)
    except UnknownBaseError as e:
        raise InputError(f"{option}: {e}") from None
    missing = wan.missing_components(path) if base == "wan" else missing_components(path)
    if "transformer" in missing:
        raise MissingInputError(f"{option}: {path} is not a complete diffusers {BASE_NAMES[base]} folder: missing "
                                f"{', '.join(m + '/' for m in missing)} (download the whole model)")
    config = _read_json(os.path.join(path, "transformer", "config.json"), option)
    if base == "wan":
        variant = wan.folder_variant(path)
        vae = _read_json(os.path.join(path, "vae", "config.json"), option) if "vae" not in missing else {}
        multiple = vae.get("scale_factor_spatial", 8) * config.get("patch_size", [1, 2, 2])[-1]
        example = {("2.1", "T2V"): "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                   ("2.1", "I2V"): "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
                   ("2.2", "T2V"): "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                   ("2.2", "I2V"): "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                   ("2.2", "TI2V"): "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}[variant.version, variant.task]
    else:
        import types

        variant = variant_of(types.SimpleNamespace(**{"patch_size_t": None, **config}))
        multiple, example = 16, "THUDM/CogVideoX-5b"
    if base not in bases:
        allowed = " or ".join(BASE_NAMES[b] for b in bases)
        raise InputError(f"{option}: {path} is a {variant} folder; {method or 'this trainer'} trains {allowed} "
                         f"(its adapters are built for {allowed}'s blocks): pass a {allowed} folder")
    if missing:
        raise MissingInputError(f"{option}: {path} is not a complete diffusers {variant} folder: missing "
                                f"{', '.join(m + '/' for m in missing)} (download the whole model, e.g. {example})")
    return {"base": base, "variant": variant, "transformer_config": config, "spatial_multiple": multiple}


def _read_json(path: str, option: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{option}: cannot read {path} ({e}); download the model again") from None


def check_text_to_video(transformer_config: dict, method: str, option: str = "--model_path") -> None:
    """``method`` trains on text-to-video CogVideoX (its paper's base model): refuse an image-to-video folder."""
    if transformer_config.get("in_channels") == 2 * (transformer_config.get("out_channels") or 0):
        raise InputError(f"{option}: this is an image-to-video CogVideoX (in_channels = 2 x out_channels); {method} "
                         "trains text-to-video models (e.g. THUDM/CogVideoX-5b or CogVideoX1.5-5B): pass a T2V folder")


def manifest_kind(sample: Sample) -> str:
    keys = {sample.media_key, *sample.extra}
    return next((what for key, what in MANIFEST_KINDS if key in keys), "a plain media/caption manifest")


def check_manifest(path: str, option: str, *, columns: Sequence[str] = (), expected: str = "") -> list[Sample]:
    """Read a manifest (files must exist) and check that every row has ``columns`` (a column is present
    when it is the row's media key or one of its other keys)."""
    try:
        samples = read_manifest(path)
    except InputError as e:
        raise type(e)(f"{option}: {e}") from None
    for s in samples:
        absent = [c for c in columns if c != s.media_key and c not in s.extra]
        if absent:
            raise InputError(f"{option}: {s.where}: no {', '.join(repr(c) for c in absent)} column; this looks like "
                             f"{manifest_kind(s)}, but {option} needs {expected}")
    return samples


def check_media(samples: Sequence[Sample], option: str, *, num_frames: int, keys: Sequence[str] = ("media",),
                videos_only: bool = False) -> None:
    """Every media path under ``keys`` of every row can be used: images open, videos have at least
    ``num_frames`` frames (read from the container header; no frame is decoded)."""
    from PIL import Image

    from ..models.video_io import probe_video

    for s in samples:
        for key in keys:
            path = s.media if key == "media" else s.extra.get(key)
            if not path:
                continue
            label = s.media_key if key == "media" else key
            where = f"{option}: {s.where} ({label}) {path}"
            if is_image(path):
                if videos_only:
                    raise InputError(f"{where}: is an image but {option} takes videos of num_frames={num_frames} "
                                     "frames; use a video or drop the row")
                try:
                    with Image.open(path) as im:
                        im.size  # noqa: B018 - the header is read here
                except (OSError, SyntaxError, ValueError) as e:
                    raise InputError(f"{where}: cannot read the image ({e}); re-save or drop it") from None
                continue
            try:
                frames = probe_video(path).frames
            except Exception as e:  # av.FFmpegError, IndexError (no video stream), ...
                raise InputError(f"{where}: cannot open the video ({' '.join(str(e).split()) or type(e).__name__}); "
                                 "re-encode or drop it") from None
            if frames < num_frames:
                most = max(1, (frames - 1) // 4 * 4 + 1)
                raise InputError(f"{where}: has {frames} frames, fewer than num_frames={num_frames}; lower "
                                 f"--num_frames (4k+1, at most {most} for this clip) or drop the row")


def check_numbers(samples: Sequence[Sample], option: str, shapes: dict) -> None:
    """Per-row numeric extras of a fixed shape, e.g. ``{"face_box": (4,), "face_kps": (5, 2), "size": (2,)}``."""
    def shape_of(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return ()
        if isinstance(value, list) and value:
            inner = {shape_of(v) for v in value}
            if len(inner) == 1 and None not in inner:
                return (len(value), *inner.pop())
        return None

    for s in samples:
        for key, shape in shapes.items():
            if shape_of(s.extra.get(key)) != tuple(shape):
                raise InputError(f"{option}: {s.where}: {key}={s.extra.get(key)!r} is not {'x'.join(map(str, shape))} "
                                 "numbers; rebuild the manifest with python -m training.prepare_magicmirror")
