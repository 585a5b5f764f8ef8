"""Multi-resolution, multi-length training: buckets of (frames, height, width).

``--buckets 49x480x720 49x720x480 17x480x720`` lists the shapes a run trains at (``--buckets auto``: derived from
the data, see :func:`derive_buckets`); without it every sample has the one shape ``--num_frames`` x ``--height`` x
``--width``, as before. Each sample goes to its nearest bucket (:func:`nearest_bucket`, the rule of the common video
trainers: the longest bucket the clip is long enough for, then the nearest aspect ratio among the buckets of that
length) and is read at the bucket's shape: its frames picked by ``--frame_sampling`` and every frame resized with its
aspect kept until it covers the bucket, then centre-cropped (``data.resize_crop``). The precompute cache keys entries by
size and frame count, so each sample's entry is its bucket's.

A batch never mixes buckets. :class:`BucketSampler` gives the batch of a micro-step as a pure function of (seed,
micro-step, rank): the micro-step's bucket is drawn with probability proportional to its sample count (the same draw on
every rank, so the data-parallel ranks of a micro-step all train one bucket, each its own slice), then every rank takes
its slice of that bucket's endless stream of shuffled epochs at the place the bucket's earlier micro-steps left it.
Nothing is carried between steps, so a run resumed from a checkpoint continues exactly where the uninterrupted run
would be. With one bucket the stream is the trainers' earlier one, sample for sample.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Sequence

import torch

from .config import InputError

logger = logging.getLogger(__name__)

AUTO = "auto"
_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_SPATIAL = re.compile(r"^(\d+)x(\d+)$")


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One training shape: ``frames`` (4k+1; 1 for images) of ``height`` x ``width`` pixels."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def pick(self) -> dict:
        """The shape as ``load_media`` / the cache take it."""
        return dict(num_frames=self.frames, height=self.height, width=self.width)

    def still(self) -> "Bucket":
        """The same size at one frame (images of a video bucket list)."""
        return Bucket(1, self.height, self.width)


def parse_buckets(values: Sequence[str], option: str = "--buckets", *, spatial: bool = False) -> list[Bucket] | str:
    """``["49x480x720", "17x480x720"]`` (entries may hold several, split by spaces or commas) -> buckets in the order
    given, duplicates dropped; ``["auto"]`` -> :data:`AUTO`; ``[]`` -> ``[]``. ``spatial``: entries are
    ``HEIGHTxWIDTH`` (one frame; ``1xHxW`` is accepted too)."""
    tokens = [t for v in values for t in re.split(r"[\s,]+", str(v).strip()) if t]
    if tokens == [AUTO] and not spatial:
        return AUTO
    example = "512x512 384x640" if spatial else "49x480x720 49x720x480 17x480x720 (or auto)"
    out = []
    for token in tokens:
        match = _SHAPE.match(token) or (_SPATIAL.match(token) if spatial else None)
        if match is None or (spatial and len(match.groups()) == 3 and match[1] != "1"):
            form = "HEIGHTxWIDTH" if spatial else "FRAMESxHEIGHTxWIDTH"
            raise InputError(f"{option} {token!r}: write each bucket as {form}, e.g. {option} {example}")
        numbers = [int(g) for g in match.groups()]
        bucket = Bucket(1, *numbers) if len(numbers) == 2 else Bucket(*numbers)
        if bucket not in out:
            out.append(bucket)
    return out


def media_shape(path: str) -> tuple[int, int, int]:
    """``(frames, height, width)`` of an image (1 frame; EXIF rotation applied) or a video, from the file's header."""
    from .data import is_image

    if is_image(path):
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees: load_image transposes it
                width, height = height, width
        return 1, height, width
    from ..models.video_io import probe_video

    info = probe_video(path)
    return info.frames, info.height, info.width


def aspect_distance(height: int, width: int, bucket: Bucket) -> float:
    """How far the bucket's aspect ratio is from ``width / height``: ``|log(ratio of the ratios)|`` (a portrait and a
    landscape frame of the same proportions are equally far from a square)."""
    return abs(math.log(bucket.width / bucket.height) - math.log(width / height))


def nearest_bucket(frames: int, height: int, width: int, buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket a sample of ``frames`` x ``height`` x ``width`` trains in: among the buckets it has enough frames
    for, those of the most frames; among them the nearest aspect ratio (:func:`aspect_distance`), then the larger
    area, then the earlier in the list. None when the sample is shorter than every bucket."""
    fitting = [b for b in buckets if b.frames <= frames]
    if not fitting:
        return None
    longest = max(b.frames for b in fitting)
    same = [b for b in fitting if b.frames == longest]
    return min(same, key=lambda b: (aspect_distance(height, width, b), -b.height * b.width, buckets.index(b)))


def derive_buckets(shapes: Sequence[tuple[int, int, int]], *, num_frames: int, height: int, width: int,
                   multiple: int = 16) -> list[Bucket]:
    """``--buckets auto``: one bucket per distinct shape the data asks for — each sample at its own aspect ratio with
    about ``height x width`` pixels (sides rounded to ``multiple``), and the most frames of the form 4k+1 it has, at
    most ``num_frames`` (images: 1). Sorted."""
    area, out = height * width, set()
    for frames, h, w in shapes:
        count = 1 if frames == 1 else min(num_frames, (frames - 1) // 4 * 4 + 1)
        aspect = w / h
        side = lambda x: max(multiple, round(x / multiple) * multiple)  # noqa: E731
        out.add(Bucket(count, side(math.sqrt(area / aspect)), side(math.sqrt(area * aspect))))
    return sorted(out)


def assign_buckets(samples: Sequence, buckets: Sequence[Bucket], *, option: str, keys: Sequence[str] = ("media",),
                   listing: str = "--buckets", shape_of=media_shape) -> tuple[list, list[Bucket]]:
    """Each sample's bucket, from its files' headers (``shape_of``: :func:`media_shape`, or a caller's memo of it):
    the aspect ratio of the first of ``keys`` (``"media"``: the sample's media, else an extra column), the frame count
    the shortest of them has. Samples no bucket fits (shorter than every bucket) are left out with a warning; when
    that is every sample, one :class:`InputError` line. Returns ``(kept samples, their buckets)``."""
    kept, assigned, left_out, lengths = [], [], [], []
    for s in samples:
        paths = [s.media if k == "media" else s.extra.get(k) for k in keys]
        shapes = [shape_of(p) for p in paths if p]
        frames = min(f for f, _, _ in shapes)
        lengths.append(frames)
        bucket = nearest_bucket(frames, shapes[0][1], shapes[0][2], buckets)
        if bucket is None:
            left_out.append(s)
            continue
        kept.append(s)
        assigned.append(bucket)
    if not kept:
        shortest = min(b.frames for b in buckets)
        longest_clip = max(lengths)
        fix = (f"add a bucket of at most {max(1, (longest_clip - 1) // 4 * 4 + 1)} frames (4k+1)" if longest_clip > 1
               else "these are images: give buckets of 1 frame (1xHEIGHTxWIDTH)")
        raise InputError(f"{option}: no sample fits any bucket of {listing} {' '.join(map(str, buckets))}: the "
                         f"{len(samples)} samples have {min(lengths)}-{longest_clip} frames, every bucket needs at "
                         f"least {shortest}; {fix}")
    if left_out:
        logger.warning("%s: %d of %d samples are shorter than every bucket of %s and are left out (e.g. %s)", option,
                       len(left_out), len(samples), listing, "; ".join(s.where or s.media for s in left_out[:3]))
    counts = {b: assigned.count(b) for b in buckets if b in assigned}
    logger.info("%s: %s", option, ", ".join(f"{b}: {n}" for b, n in counts.items()))
    return kept, assigned


class BucketSampler:
    """Which samples a micro-step trains on (see the module doc): :meth:`indices` of ``slot`` (the micro-step's place
    in its stream: ``step · accumulation + micro``) and ``rank``. ``buckets`` holds each dataset index's bucket;
    ``salt`` keeps the draws of several streams (the tasks of a task-switching trainer) apart."""

    BLOCK = 4096  # slots whose buckets are drawn together (one generator each)

    def __init__(self, buckets: Sequence, seed: int, salt: int = 0):
        order = sorted(set(buckets), key=lambda b: (b is None, b or Bucket(0, 0, 0)))
        self.buckets = order
        self.groups = [[i for i, b in enumerate(buckets) if b == bucket] for bucket in order]
        self.seed, self.salt = seed, salt
        total = sum(len(g) for g in self.groups)
        self.cumulative = torch.tensor([len(g) for g in self.groups], dtype=torch.float64).cumsum(0) / total
        self._draws: dict[int, torch.Tensor] = {}
        self._before: list[torch.Tensor] = [torch.zeros(len(self.groups), dtype=torch.long)]  # counts before block b

    def _block(self, block: int) -> torch.Tensor:
        """The bucket of every slot of ``block``, drawn with probabilities proportional to the buckets' sizes."""
        if block not in self._draws:
            from .trainer import step_generator

            u = torch.rand(self.BLOCK, generator=step_generator(self.seed, self.salt, -3, block), dtype=torch.float64)
            self._draws[block] = torch.searchsorted(self.cumulative, u, right=True).clamp_(max=len(self.groups) - 1)
        return self._draws[block]

    def bucket_of(self, slot: int) -> int:
        """The index (in :attr:`buckets`) of the bucket ``slot`` trains."""
        if len(self.groups) == 1:
            return 0
        return int(self._block(slot // self.BLOCK)[slot % self.BLOCK])

    def earlier(self, slot: int, bucket: int) -> int:
        """How many slots before ``slot`` trained ``bucket``."""
        if len(self.groups) == 1:
            return slot
        block, offset = divmod(slot, self.BLOCK)
        while len(self._before) <= block:
            b = len(self._before) - 1
            self._before.append(self._before[-1] + torch.bincount(self._block(b), minlength=len(self.groups)))
        return int(self._before[block][bucket]) + int((self._block(block)[:offset] == bucket).sum())

    def indices(self, slot: int, rank: int, processes: int, batch_size: int) -> list[tuple[int, int]]:
        """``(epoch, dataset index)`` of the ``batch_size`` samples of ``rank`` in ``slot``: one bucket, the same on
        every rank; the bucket's stream of shuffled epochs continued where its earlier slots left it."""
        from .trainer import sample_indices

        bucket = self.bucket_of(slot)
        group = self.groups[bucket]
        position = (self.earlier(slot, bucket) * processes + rank) * batch_size
        return [(epoch, group[i]) for epoch, i in sample_indices(len(group), self.seed, position, batch_size)]


__all__ = ["AUTO", "Bucket", "BucketSampler", "assign_buckets", "derive_buckets", "media_shape", "nearest_bucket",
           "parse_buckets"]
