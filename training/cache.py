"""Precompute cache: VAE posteriors and T5 embeddings on disk, so the VAE and the text encoder can
leave memory while the transformer trains.

Entries are safetensors files ``<root>/<key[:2]>/<key>.safetensors`` with a JSON-able ``__metadata__``
and a checksum. Two kinds:

* ``latents`` -- ``mean``, ``logvar`` ``[C, T, h, w]``: the VAE posterior of one clip. Draw fresh latents
  each step with :func:`sample_latents`; they are *unscaled*, the caller multiplies by
  ``vae.config.scaling_factor`` exactly as with ``vae.encode(x).latent_dist.sample()``.
* ``text`` -- ``prompt_embeds`` ``[L, D]``: T5 output for one caption (226 tokens, as diffusers).

Keys are sha256 digests: of the media's content hash + height, width, num_frames, sampling and model
id (latents), or of the caption's hash + model id + max length (text). Renaming or moving a file keeps
its entries; editing it (or changing the resolution or the model) makes new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .data import MediaDataset, Sample, is_image, item_generator, load_media

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"
_CHECKSUM_KEY = "mmv_checksum"
_FORMAT_KEY = "mmv_cache_format"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def content_hash(path: str, chunk_size: int = 1 << 20) -> str:
    """sha256 of the file's bytes (read in chunks), memoised per ``(path, mtime, size)``."""
    path = os.path.abspath(path)
    st = os.stat(path)
    memo_key = (path, st.st_mtime_ns, st.st_size)
    digest = _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        digest = _HASH_MEMO[memo_key] = h.hexdigest()
    return digest


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def key_for_media(path: str, *, height: int, width: int, num_frames: int, sampling: str, model_id: str,
                  per_frame: bool = False, condition: str | None = None) -> str:
    """Cache key of a clip's VAE posterior (``per_frame``: of each picked frame encoded alone, as an image;
    ``condition``: of what a model specification makes of its first frame, named so). Images ignore ``num_frames``
    / ``sampling`` (always F=1)."""
    if is_image(path):
        num_frames, sampling = 1, "image"
    elif sampling == "random":
        raise ValueError("sampling='random' draws a new window every epoch, a cache entry would freeze one; "
                         "precompute with sampling='uniform' or 'start', or train without the cache")
    payload = {"kind": "latents", "v": CACHE_FORMAT, "media": content_hash(path), "height": int(height),
               "width": int(width), "num_frames": int(num_frames), "sampling": sampling, "model_id": str(model_id)}
    if per_frame:
        payload["per_frame"] = True
    if condition is not None:
        payload["condition"] = condition
    return _digest(payload)


def key_for_text(caption: str, *, model_id: str, max_length: int = 226) -> str:
    """Cache key of a caption's T5 embeddings."""
    return _digest({"kind": "text", "v": CACHE_FORMAT, "text": hashlib.sha256(caption.encode("utf-8")).hexdigest(),
                    "model_id": str(model_id), "max_length": int(max_length)})


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def sample_latents(entry: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh draw ``mean + exp(logvar / 2) * eps`` from a cached posterior (same as diffusers'
    ``latent_dist.sample(generator)``). Unscaled: multiply by ``vae.config.scaling_factor``."""
    mean, logvar = entry["mean"], entry["logvar"]
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps


class PrecomputeCache:
    """A folder of safetensors entries addressed by key; writes are atomic (temp file + ``os.replace``)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        os.makedirs(self.root, exist_ok=True)
        self.hits = self.misses = 0

    def path_for(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}: use letters, digits, '_', '-' or '.'")
        return os.path.join(self.root, key[:2], f"{key}.safetensors")

    def _read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        from safetensors import safe_open

        path = self.path_for(key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            expected = meta.get(_CHECKSUM_KEY)
            if expected is not None and expected != _checksum(tensors):
                raise ValueError("checksum mismatch")
        except Exception as e:  # truncated / garbled file: safetensors raises several error types
            logger.warning("cache entry %s is corrupt (%s: %s); treating it as missing, it will be recomputed",
                           path, type(e).__name__, e)
            return None
        return tensors, meta

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is absent or corrupt (corrupt entries log a warning)."""
        entry = self._read(key)
        return None if entry is None else entry[0]

    def metadata(self, key: str) -> dict | None:
        """The metadata stored with an entry (values JSON-decoded where possible)."""
        entry = self._read(key)
        if entry is None:
            return None
        out = {}
        for k, v in entry[1].items():
            if k in (_CHECKSUM_KEY, _FORMAT_KEY):
                continue
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
        """Write an entry atomically (a crash never leaves a half-written entry under its final name)."""
        from safetensors.torch import save_file

        if not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise TypeError(f"cache entries are non-empty dicts of tensors, got {type(tensors).__name__} "
                            f"with keys {list(tensors or [])}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        meta[_CHECKSUM_KEY], meta[_FORMAT_KEY] = _checksum(tensors), CACHE_FORMAT
        path = self.path_for(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=os.path.dirname(path))
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def get_or_compute(self, key: str, fn: Callable[[], dict[str, torch.Tensor]],
                       metadata: dict | None = None) -> dict[str, torch.Tensor]:
        """The cached entry, or ``fn()`` stored under ``key`` (and returned as stored: CPU, contiguous)."""
        entry = self.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        tensors = fn()
        if not isinstance(tensors, dict):
            raise TypeError(f"the compute function must return a dict of tensors, got {type(tensors).__name__}")
        self.put(key, tensors, metadata)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
    """``pixels`` [F, 3, H, W] in [-1, 1] -> ``{"mean", "logvar"}`` [C, T, h, w] (VAE posterior, unscaled), the VAE
    run on ``device`` (where the caller placed it)."""
    x = pixels.permute(1, 0, 2, 3).unsqueeze(0).to(device, vae.dtype)  # [1, 3, F, H, W]
    dist = vae.encode(x).latent_dist
    return {"mean": dist.mean[0], "logvar": dist.logvar[0]}


def encode_frames(vae, pixels: torch.Tensor, device: torch.device | str, chunk: int = 8) -> dict[str, torch.Tensor]:
    """``pixels`` [F, 3, H, W] -> ``{"mean", "logvar"}`` [F, C, h, w]: each frame encoded alone, as an image, the VAE
    run on ``device``."""
    means, logvars = [], []
    for start in range(0, pixels.shape[0], chunk):
        x = pixels[start:start + chunk, :, None].to(device, vae.dtype)  # [n, 3, 1, H, W]
        dist = vae.encode(x).latent_dist
        means.append(dist.mean[:, :, 0])
        logvars.append(dist.logvar[:, :, 0])
    return {"mean": torch.cat(means), "logvar": torch.cat(logvars)}


@torch.no_grad()
def encode_text(text_encoder, tokenizer, caption: str, max_length: int = 226, *,
                device: torch.device | str) -> dict[str, torch.Tensor]:
    """``caption`` -> ``{"prompt_embeds"}`` [L, D], tokenized and encoded exactly as diffusers' CogVideoX (ids
    past the table, as a tokenizer copy's extra tokens, embed as :func:`~..models.text.t5_encode` does), the text
    encoder run on ``device``."""
    from ..models.text import t5_encode, tokenize

    ids = tokenize(tokenizer, caption, max_length).input_ids.to(device)
    return {"prompt_embeds": t5_encode(text_encoder, ids)[0]}


def precompute(samples: Sequence[Sample], *, vae=None, text_encoder=None, tokenizer=None, cache: PrecomputeCache,
               device: torch.device | str, height: int, width: int, num_frames: int, sampling: str = "uniform",
               model_id: str,
               max_length: int = 226, caption_transform: Callable[[str], str] | None = None,
               progress: bool = True) -> list[dict[str, str]]:
    """Fill ``cache`` for ``samples`` (batch 1): VAE posteriors when ``vae`` is given, T5 embeddings when
    ``text_encoder`` and ``tokenizer`` are. Existing entries are kept. Returns the keys per sample,
    ``[{"latents": key, "text": key}, ...]`` (only the kinds computed). ``device``: where the given models run (the
    caller placed them there).

    Latents are stored unscaled; multiply :func:`sample_latents` by ``vae.config.scaling_factor``.
    ``caption_transform`` rewrites a caption before encoding (e.g. removing a trigger word).
    Enable ``vae.enable_tiling()`` / ``enable_slicing()`` yourself for large clips.
    """
    from ..models.text import MAX_TEXT_TOKENS

    if max_length > MAX_TEXT_TOKENS:
        raise ValueError(f"max_length={max_length}: CogVideoX accepts at most {MAX_TEXT_TOKENS} T5 tokens")
    if text_encoder is not None and tokenizer is None:
        raise ValueError("precompute: text_encoder given without its tokenizer")
    if vae is None and text_encoder is None:
        raise ValueError("precompute: pass a vae, a text_encoder (with tokenizer), or both")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with diffusers / transformers; stay usable without it
        def tqdm(it, **_):
            return it

    hits0, misses0 = cache.hits, cache.misses
    keys = []
    for sample in tqdm(samples, desc="precompute", unit="sample", disable=not progress):
        entry_keys = {}
        if vae is not None:
            key = key_for_media(sample.media, height=height, width=width, num_frames=num_frames, sampling=sampling,
                                model_id=model_id)
            meta = {"kind": "latents", "media": sample.media, "height": height, "width": width,
                    "num_frames": num_frames, "sampling": sampling, "model_id": model_id,
                    "scaling_factor": getattr(getattr(vae, "config", None), "scaling_factor", None)}
            cache.get_or_compute(key, lambda s=sample: encode_latents(vae, load_media(
                s.media, num_frames=num_frames, height=height, width=width, sampling=sampling), device), meta)
            entry_keys["latents"] = key
        if text_encoder is not None:
            caption = caption_transform(sample.caption) if caption_transform else sample.caption
            key = key_for_text(caption, model_id=model_id, max_length=max_length)
            meta = {"kind": "text", "caption": caption, "model_id": model_id, "max_length": max_length}
            cache.get_or_compute(key, lambda c=caption: encode_text(text_encoder, tokenizer, c, max_length,
                                                                device=device), meta)
            entry_keys["text"] = key
        keys.append(entry_keys)
    logger.info("precompute: %d samples, %d entries computed, %d already cached in %s", len(samples),
                cache.misses - misses0, cache.hits - hits0, cache.root)
    return keys


class CachedDataset(Dataset):
    """Training items from a filled cache: ``{"latents": [C, T, h, w] (a fresh, unscaled posterior draw),
    "prompt_embeds": [L, D], "caption", "index", "extra", "media"}``; kinds without a key are left out.
    Draws are deterministic per ``(seed, epoch, index)`` like :class:`~training.data.MediaDataset`."""

    def __init__(self, samples: Sequence[Sample], cache: PrecomputeCache, keys: Sequence[dict[str, str]], *,
                 seed: int = 0):
        if len(samples) != len(keys):
            raise ValueError(f"{len(samples)} samples but {len(keys)} key sets; pass what precompute() returned")
        self.samples, self.cache, self.keys = list(samples), cache, list(keys)
        self.seed, self.epoch = seed, 0

    set_epoch = MediaDataset.set_epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _entry(self, index: int, kind: str) -> dict[str, torch.Tensor]:
        entry = self.cache.get(self.keys[index][kind])
        if entry is None:
            raise KeyError(f"no cached {kind} for {self.samples[index].media!r} (item {index}) in {self.cache.root}; "
                           "run precompute() with the same settings first")
        return entry

    def __getitem__(self, index: int) -> dict:
        sample, keys = self.samples[index], self.keys[index]
        item = {"caption": sample.caption, "index": index, "extra": dict(sample.extra), "media": sample.media}
        if "latents" in keys:
            entry = self._entry(index, "latents")
            item["latents"] = sample_latents(entry, item_generator(self.seed, self.epoch, index))
        if "text" in keys:
            item["prompt_embeds"] = self._entry(index, "text")["prompt_embeds"]
        return item


class TrainingCache:
    """The precompute cache as the trainers use it: :meth:`fill` encodes what a trainer asks for once (VAE
    posteriors of media at a size and frame pick, first frames as the model's image condition, text embeddings of
    captions) through the model specification (:class:`~.spec.ModelSpec`), then items read it back, so the VAE and
    the text encoder can leave memory while the transformer trains."""

    def __init__(self, root: str, *, model_id: str, spec):
        self.store, self.model_id, self.spec = PrecomputeCache(root), model_id, spec
        self.max_length = spec.text_max_length

    def media_key(self, path: str, *, num_frames: int, height: int, width: int, sampling: str,
                  per_frame: bool = False) -> str:
        return key_for_media(path, height=height, width=width, num_frames=num_frames, sampling=sampling,
                             model_id=self.model_id, per_frame=per_frame)

    def condition_key(self, path: str, *, clip_frames: int, height: int, width: int) -> str:
        return key_for_media(path, height=height, width=width, num_frames=1, sampling="start", model_id=self.model_id,
                             condition=self.spec.image_condition_key(clip_frames))

    def fill(self, media: Sequence[dict], captions: Sequence[str], *, tokenizer=None, progress: bool = True) -> None:
        """``media``: dicts of :meth:`media_key`'s arguments (path, num_frames, height, width, sampling[,
        per_frame]), or of :meth:`condition_key`'s with ``image_condition`` = the clip's frame count (the first
        frame as the model's image condition); ``tokenizer``: a copy of the model's (extra tokens) for the
        captions. Existing entries are kept."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with diffusers / transformers
            def tqdm(it, **_):
                return it

        spec = self.spec
        for item in tqdm(media, desc="cache media", unit="item", disable=not progress):
            size = dict(height=item["height"], width=item["width"])
            if "image_condition" in item:
                frames = item["image_condition"]
                self.store.get_or_compute(
                    self.condition_key(item["path"], clip_frames=frames, **size),
                    lambda i=item: _no_grad(spec.encode_image_condition)(
                        load_media(i["path"], num_frames=1, sampling="start", **size), frames),
                    {"kind": "image_condition", "media": item["path"], "clip_frames": frames, **size})
                continue
            pick = dict(num_frames=item["num_frames"], sampling=item["sampling"], **size)
            encode = (lambda x: encode_frames(spec.vae, x, spec.device)) if item.get("per_frame") else spec.encode_media
            self.store.get_or_compute(self.media_key(item["path"], per_frame=item.get("per_frame", False), **pick),
                                      lambda i=item: _no_grad(encode)(load_media(i["path"], **pick)),
                                      {"kind": "latents", "media": item["path"], **pick})
        for caption in tqdm(captions, desc="cache captions", unit="caption", disable=not progress):
            self.store.get_or_compute(key_for_text(caption, model_id=self.model_id, max_length=self.max_length),
                                      lambda c=caption: _no_grad(spec.encode_text)(c, tokenizer),
                                      {"kind": "text", "caption": caption, "model_id": self.model_id})

    def _get(self, key: str, what: str) -> dict:
        entry = self.store.get(key)
        if entry is None:
            raise KeyError(f"no cached {what} in {self.store.root}; fill the cache with the same settings first")
        return entry

    def latents(self, path: str, generator: torch.Generator, *, per_frame: bool = False, mode: bool = False,
                **pick) -> torch.Tensor:
        """A posterior draw (unscaled; ``mode``: the mean) [C, T, h, w], or [F, C, h, w] per frame."""
        entry = self._get(self.media_key(path, per_frame=per_frame, **pick), path)
        return entry["mean"] if mode else sample_latents(entry, generator)

    def image_condition(self, path: str, *, clip_frames: int, height: int, width: int) -> dict:
        """The entry the specification made of ``path``'s first frame
        (:meth:`~.spec.ModelSpec.encode_image_condition`)."""
        return self._get(self.condition_key(path, clip_frames=clip_frames, height=height, width=width),
                         f"image condition of {path}")

    def text(self, caption: str) -> torch.Tensor:
        key = key_for_text(caption, model_id=self.model_id, max_length=self.max_length)
        return self._get(key, f"embedding of {caption!r}")["prompt_embeds"]


def _no_grad(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run
