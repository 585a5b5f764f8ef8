"""Dataset layer shared by every trainer of the pack: manifests, media decoding, ``MediaDataset``.

Manifest layouts (see :func:`read_manifest`):

* ``metadata.jsonl`` -- one JSON object per line, e.g.
  ``{"video": "clips/0001.mp4", "caption": "a man img is walking", "ref_images": ["faces/0001.png"]}``.
  Media key: the first of ``media, video, image, file_name, path``; caption key: the first of
  ``caption, prompt, text``; every other key is kept in ``Sample.extra``. Relative paths (the
  media and the path-valued extras in :data:`PATH_KEYS`) resolve against the manifest's folder.
* a folder with ``metadata.jsonl``, or the finetrainers / CogVideo-finetune layout
  ``prompts.txt`` + ``videos.txt`` (and/or ``images.txt``), one entry per line, line-aligned.

Pixels come out as ``[F, 3, H, W]`` float in ``[-1, 1]``: frames are resized (aspect kept) to cover
``H x W`` and centre-cropped; ``F = num_frames`` for videos (``4k + 1``) and ``F = 1`` for images.
Only the picked frames are decoded into memory (``models/video_io.read_frames``).

Errors are :class:`~training.config.InputError` subclasses with one-line messages naming the file
and manifest line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import InputError

MEDIA_KEYS = ("media", "video", "image", "file_name", "path", "tgt", "winner")  # tgt: S2I pair; winner: GT-Pair
CAPTION_KEYS = ("caption", "prompt", "text")
# Extra keys whose values (a path or a list of paths) are resolved and checked like the media.
PATH_KEYS = frozenset({"media", "video", "image", "file_name", "path", "ref_image", "ref_images", "reference",
                       "faces", "src", "tgt", "mask", "first_frame", "winner", "loser"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
SAMPLING_MODES = ("uniform", "start", "random")
MAX_REPORTED = 5  # missing files named in one error before "and K more"


class MediaError(InputError):
    """A media file that cannot be used as asked (undecodable, too short, ...). Names the file."""


class ManifestError(InputError):
    """A manifest that cannot be read (format, missing keys)."""


class MissingInputError(InputError, FileNotFoundError):
    """A manifest, media or model path that does not exist."""


@dataclasses.dataclass
class Sample:
    """One manifest row: absolute media path, caption, and every other manifest key in ``extra``;
    ``where`` names the row (``<manifest>, line N``) and ``media_key`` the key the media came from."""

    media: str
    caption: str
    extra: dict = dataclasses.field(default_factory=dict)
    where: str = ""
    media_key: str = "media"


# --------------------------------------------------------------------------------------------- manifests


def is_image(path: str) -> bool:
    """True for still-image files (decided by extension); everything else is decoded as video."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS


def resolve_path(path: str, base_dir: str) -> str:
    """``path`` made absolute against ``base_dir`` (``~`` expanded, normalised)."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.abspath(path)


def write_jsonl(path: str, rows: list[dict]) -> str:
    """Write a manifest (one JSON object per line) atomically: temp file, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
    return path


def read_manifest(path: str, *, check_files: bool = True, max_reported: int = MAX_REPORTED) -> list[Sample]:
    """Read a dataset manifest: a ``metadata.jsonl`` file, or a folder holding ``metadata.jsonl`` or
    ``prompts.txt`` + ``videos.txt`` / ``images.txt``.

    With ``check_files`` every media path (and every path-valued extra) must exist; the missing ones
    are reported together with their manifest line numbers.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise MissingInputError(f"dataset manifest not found: {path} (pass a metadata.jsonl file or a folder "
                                "holding metadata.jsonl or prompts.txt + videos.txt/images.txt)")
    if os.path.isfile(path) and os.path.basename(path) in ("prompts.txt", "videos.txt", "images.txt"):
        path = os.path.dirname(path)
    if os.path.isdir(path):
        jsonl = os.path.join(path, "metadata.jsonl")
        if os.path.isfile(jsonl):
            samples, refs = _read_jsonl(jsonl)
        elif os.path.isfile(os.path.join(path, "prompts.txt")):
            samples, refs = _read_txt_layout(path)
        else:
            raise MissingInputError(
                f"no manifest in {path}: expected metadata.jsonl, or prompts.txt with videos.txt and/or images.txt")
        manifest = jsonl if os.path.isfile(jsonl) else os.path.join(path, "prompts.txt")
    else:
        samples, refs = _read_jsonl(path)
        manifest = path
    if not samples:
        raise ManifestError(f"dataset manifest {manifest} has no entries; add one row per sample")
    if check_files:
        _check_files(refs, max_reported)
    return samples


def _read_jsonl(path: str) -> tuple[list[Sample], list[tuple[str, int, str, str]]]:
    """Parse ``metadata.jsonl``; returns samples and ``(file, line, field, path)`` for every path."""
    base = os.path.dirname(path)
    samples, refs = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}, line {lineno}: invalid JSON ({e.msg}, column {e.colno}): "
                                    f"{line[:80]!r}") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            media_key = next((k for k in MEDIA_KEYS if k in row), None)
            caption_key = next((k for k in CAPTION_KEYS if k in row), None)
            if media_key is None:
                raise ManifestError(f"{path}, line {lineno}: no media path; expected one of the keys "
                                    f"{', '.join(MEDIA_KEYS)} (found: {', '.join(row) or 'none'})")
            if caption_key is None:
                raise ManifestError(f"{path}, line {lineno}: no caption; expected one of the keys "
                                    f"{', '.join(CAPTION_KEYS)} (found: {', '.join(row)})")
            media, caption = row.pop(media_key), row.pop(caption_key)
            if not isinstance(media, str) or not media.strip():
                raise ManifestError(f"{path}, line {lineno}: {media_key!r} must be a non-empty path string, "
                                    f"got {media!r}")
            if not isinstance(caption, str):
                raise ManifestError(f"{path}, line {lineno}: {caption_key!r} must be a string, got {caption!r}")
            media = resolve_path(media, base)
            refs.append((path, lineno, media_key, media))
            extra = {}
            for key, value in row.items():
                if key in PATH_KEYS:
                    value = _resolve_extra(value, base, path, lineno, key, refs)
                extra[key] = value
            samples.append(Sample(media=media, caption=caption, extra=extra, where=f"{path}, line {lineno}",
                                  media_key=media_key))
    return samples, refs


def _resolve_extra(value: Any, base: str, file: str, lineno: int, key: str, refs: list) -> Any:
    """Resolve a path-valued extra (a string or a list of strings); other values pass through."""
    if isinstance(value, str) and value:
        out = resolve_path(value, base)
        refs.append((file, lineno, key, out))
        return out
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        out = [resolve_path(v, base) for v in value]
        refs.extend((file, lineno, f"{key}[{i}]", p) for i, p in enumerate(out))
        return out
    return value


def _read_lines(path: str) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as ``(line number, stripped text)``."""
    with open(path, encoding="utf-8-sig") as f:
        return [(i, line.strip()) for i, line in enumerate(f, start=1) if line.strip()]


def _read_txt_layout(folder: str) -> tuple[list[Sample], list[tuple[str, int, str, str]]]:
    """finetrainers / CogVideo-finetune layout: ``prompts.txt`` line-aligned with ``videos.txt`` and/or
    ``images.txt``. With both, the video is the media and the image goes to ``extra["image"]``."""
    prompts_file = os.path.join(folder, "prompts.txt")
    prompts = _read_lines(prompts_file)
    columns = {}
    for name in ("videos.txt", "images.txt"):
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            columns[name] = _read_lines(file)
            if len(columns[name]) != len(prompts):
                raise ManifestError(f"{prompts_file} has {len(prompts)} entries but {file} has {len(columns[name])} "
                                 "(blank lines ignored); the files must be line-aligned, one entry per line")
    if not columns:
        raise MissingInputError(f"{folder} has prompts.txt but neither videos.txt nor images.txt; add the media "
                                "list, one path per line")
    media_name = "videos.txt" if "videos.txt" in columns else "images.txt"
    samples, refs = [], []
    for i, (_, caption) in enumerate(prompts):
        lineno, media = columns[media_name][i]
        media = resolve_path(media, folder)
        refs.append((os.path.join(folder, media_name), lineno, "media", media))
        extra = {}
        if media_name == "videos.txt" and "images.txt" in columns:
            img_line, image = columns["images.txt"][i]
            extra["image"] = resolve_path(image, folder)
            refs.append((os.path.join(folder, "images.txt"), img_line, "image", extra["image"]))
        samples.append(Sample(media=media, caption=caption, extra=extra,
                              where=f"{os.path.join(folder, media_name)}, line {lineno}",
                              media_key="video" if media_name == "videos.txt" else "image"))
    return samples, refs


def _check_files(refs: Sequence[tuple[str, int, str, str]], max_reported: int) -> None:
    """Every referenced path exists; the error names the files that list the missing ones (``videos.txt`` /
    ``images.txt`` of a folder layout, not its ``prompts.txt``) and their lines."""
    missing = [r for r in refs if not os.path.isfile(r[3])]
    if not missing:
        return
    named = [f"{os.path.basename(file)} line {lineno} ({field}) {p}"
             for file, lineno, field, p in missing[:max_reported]]
    more = f" and {len(missing) - max_reported} more" if len(missing) > max_reported else ""
    listing = " and ".join(dict.fromkeys(file for file, *_ in missing))
    raise MissingInputError(f"{len(missing)} of {len(refs)} files listed in {listing} are missing: "
                            f"{'; '.join(named)}{more} (fix the paths or drop those rows; relative paths resolve "
                            "against the manifest's folder)")


# --------------------------------------------------------------------------------------------- media


def check_num_frames(num_frames: int) -> None:
    """CogVideoX's VAE keeps the first frame and compresses the rest 4x: clips need ``4k + 1`` frames."""
    is_int = isinstance(num_frames, numbers.Integral) and not isinstance(num_frames, bool)
    if not is_int or num_frames < 1 or (num_frames - 1) % 4:
        lo = (int(num_frames) - 1) // 4 * 4 + 1 if is_int and num_frames > 0 else 1
        raise InputError(f"num_frames={num_frames!r} is not of the form 4k+1 (CogVideoX's VAE compresses time 4x "
                         f"after the first frame); use e.g. {lo} or {lo + 4} (1, 5, 9, ..., 49)")


def frame_indices(total: int, num_frames: int, sampling: str = "uniform",
                  generator: torch.Generator | None = None, path: str = "") -> list[int]:
    """Which of ``total`` frames to keep: ``uniform`` (evenly spaced over the clip), ``start`` (the first
    ``num_frames``) or ``random`` (a random window of consecutive frames, drawn with ``generator``)."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r}; expected one of {', '.join(SAMPLING_MODES)}")
    if total < num_frames:
        raise MediaError(f"{path or 'video'} has {total} frames but num_frames={num_frames} were asked; use a "
                         f"smaller --num_frames (4k+1, at most {max(1, (total - 1) // 4 * 4 + 1)}) or drop this clip")
    if sampling == "uniform":
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    start = 0
    if sampling == "random":
        start = int(torch.randint(0, total - num_frames + 1, (1,), generator=generator).item())
    return list(range(start, start + num_frames))


def load_image(path: str) -> np.ndarray:
    """``[1, H, W, 3]`` uint8; EXIF rotation applied, transparency composited on white."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.array(im.convert("RGB"))[None]
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise MediaError(f"cannot decode image {path}: {e}; re-save or drop it") from e


def first_frame(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 of an image (as :func:`load_image`) or of a video's first frame (only that one is
    decoded)."""
    if is_image(path):
        return load_image(path)[0]
    from ..models.video_io import read_frames

    try:
        return read_frames(path, [0])[0]
    except Exception as e:  # av.FFmpegError, VideoDecodeError, IndexError (no video stream)
        raise MediaError(f"cannot decode video {path}: {' '.join(str(e).split())}; re-encode or drop it") from e


def _load_video(path: str, num_frames: int, sampling: str, generator: torch.Generator | None) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 with the frames chosen by :func:`frame_indices`; only those are decoded into
    memory (:func:`~models.video_io.read_frames` seeks to them)."""
    import av

    from ..models.video_io import VideoDecodeError, index_video, read_frames

    try:
        index = index_video(path)
        state = generator.get_state() if generator is not None else None
        indices = frame_indices(index.frames, num_frames, sampling, generator, path)
        try:
            return read_frames(path, indices, index)
        except VideoDecodeError as e:  # fewer decodable frames than packets: pick again from what decodes
            if not e.decoded:
                raise
            if generator is not None:
                generator.set_state(state)
            return read_frames(path, frame_indices(e.decoded, num_frames, sampling, generator, path))
    except (av.FFmpegError, IndexError, UnicodeDecodeError, VideoDecodeError) as e:  # IndexError: no video stream
        raise MediaError(f"cannot decode video {path}: {' '.join(str(e).split())}; re-encode or drop it") from e


def load_frame(path: str, *, num_frames: int, height: int, width: int, sampling: str, position: int) -> torch.Tensor:
    """Frame ``position`` of the ``num_frames`` that :func:`load_media` picks (``uniform``/``start``), as
    ``[3, height, width]`` in ``[-1, 1]``; only that frame is decoded."""
    if is_image(path):
        frames = load_image(path)
    else:
        from ..models.video_io import index_video, read_frames

        index = index_video(path)
        frames = read_frames(path, [frame_indices(index.frames, num_frames, sampling, None, path)[position]], index)
    x = resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), height, width)
    return (x[0] / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[F, 3, h, w]`` float -> ``[F, 3, height, width]``: aspect-preserving resize so the frame covers
    the target (bilinear, antialiased), then a centre crop."""
    h, w = frames.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        frames = frames[..., top:top + height, left:left + width]
    return frames


def load_media(path: str, *, num_frames: int, height: int, width: int, sampling: str = "uniform",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Load an image or video as ``[F, 3, height, width]`` float in ``[-1, 1]``.

    Images give ``F = 1``. Videos give ``F = num_frames`` (must be ``4k + 1``) picked by ``sampling``
    (``uniform``, ``start`` or ``random``; ``random`` draws its window from ``generator``).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r}; expected one of {', '.join(SAMPLING_MODES)}")
    if not os.path.isfile(path):
        raise MissingInputError(f"media file not found: {path}")
    if is_image(path):
        frames = load_image(path)
    else:
        check_num_frames(num_frames)
        frames = _load_video(path, num_frames, sampling, generator)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [F, 3, h, w] in 0..255
    x = resize_crop(x, height, width)
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------- dataset


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, index)`` only, so an item's randomness does not depend
    on worker count, access order or where training resumed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class MediaDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Sample` rows.

    ``ds[i]`` -> ``{"pixels": [F, 3, H, W] float in [-1, 1], "caption": str, "index": i, "extra": dict,
    "media": str}``. Deterministic per ``(seed, epoch, index)``; call :meth:`set_epoch` at the start of
    each epoch (DataLoader workers copy the dataset when an epoch's iterator starts, so this reaches
    them unless ``persistent_workers=True``).
    """

    def __init__(self, samples: Sequence[Sample], *, num_frames: int, height: int, width: int,
                 sampling: str = "uniform", seed: int = 0):
        check_num_frames(num_frames)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling={sampling!r}; expected one of {', '.join(SAMPLING_MODES)}")
        if not samples:
            raise ValueError("MediaDataset needs at least one sample")
        self.samples = list(samples)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.sampling, self.seed, self.epoch = sampling, seed, 0

    @classmethod
    def from_manifest(cls, path: str, **kwargs) -> "MediaDataset":
        return cls(read_manifest(path), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        generator = item_generator(self.seed, self.epoch, index)
        pixels = load_media(sample.media, num_frames=self.num_frames, height=self.height, width=self.width,
                            sampling=self.sampling, generator=generator)
        return {"pixels": pixels, "caption": sample.caption, "index": index,
                "extra": copy.deepcopy(sample.extra), "media": sample.media}


def collate_samples(batch: Iterable[dict]) -> dict:
    """Collate :class:`MediaDataset` items: ``pixels`` stacked to ``[B, F, 3, H, W]``, the rest as lists
    (``index`` as a tensor). Items must share a shape (images and videos cannot share a batch)."""
    batch = list(batch)
    shapes = {tuple(item["pixels"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"items in one batch have different shapes {sorted(shapes)}; images (F=1) and videos "
                         "cannot share a batch: use batch size 1 or separate image and video datasets")
    return {"pixels": torch.stack([item["pixels"] for item in batch]),
            "caption": [item["caption"] for item in batch],
            "index": torch.tensor([item["index"] for item in batch]),
            "extra": [item["extra"] for item in batch],
            "media": [item.get("media") for item in batch]}
