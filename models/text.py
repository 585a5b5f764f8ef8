"""T5 prompt encoding for CogVideoX (226-token cap), cached per text encoder."""

from __future__ import annotations

import abc
import dataclasses
import logging
import re

import torch

from .cogvideox import TextEmbedCache

logger = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 226  # CogVideoX was trained with exactly this many T5 tokens
DEFAULT_TRIGGER = "img"  # MagicMirror / PhotoMaker convention: "a man img is walking"
EXTRA_TOKENS = ("<cls>",)  # special tokens a method's prompts use (subject reference: "<cls> a teddy bear ...")


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """A T5-encoded prompt: embeds [1, L, D] (float32, CPU) and the token ids [1, L] that made them.

    ``identity_mask`` [1, L] marks the tokens of the class word that stood before the trigger word
    (the trigger itself is removed before encoding); all False when the prompt has no trigger.
    """

    prompt: str
    embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: bool = False
    identity_mask: torch.Tensor | None = None
    encoded_prompt: str = ""  # the text T5 saw (trigger removed)


def split_trigger(prompt: str, trigger: str | None = DEFAULT_TRIGGER) -> tuple[str, list[tuple[int, int]]]:
    """Remove every stand-alone ``trigger`` word; return the cleaned prompt and the character spans
    (in it) of the class words that preceded each trigger. ``"a man img walks"`` -> ``("a man walks", [(2, 5)])``."""
    if not trigger:
        return prompt, []
    pattern = re.compile(rf"([^\s]+?)([^\w\s]*)(\s+){re.escape(trigger)}(?![\w])")
    out, spans, last = [], [], 0
    for m in pattern.finditer(prompt):
        out.append(prompt[last:m.start()])
        start = sum(len(p) for p in out)
        word = m.group(1)
        out.append(word + m.group(2))
        spans.append((start, start + len(word)))
        last = m.end()
    out.append(prompt[last:])
    return "".join(out), spans


def identity_token_mask(tokenizer, prompt: str, spans, max_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
    """Bool [1, max_length]: the tokens of ``prompt`` that overlap a character span in ``spans``."""
    mask = torch.zeros(1, max_length, dtype=torch.bool)
    if not spans:
        return mask
    enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_offsets_mapping=True)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(s < b and e > a for a, b in spans):
            mask[0, i] = True
    return mask


def tokenize(tokenizer, prompt: str, max_length: int = MAX_TEXT_TOKENS):
    """Tokenize exactly as diffusers' CogVideoX pipelines do (pad to ``max_length``, truncate)."""
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt")


def with_extra_tokens(tokenizer):
    """A copy of ``tokenizer`` that also knows :data:`EXTRA_TOKENS` as special tokens (ids after the
    vocabulary). The model's own tokenizer is never edited."""
    import copy

    missing = [t for t in EXTRA_TOKENS if t not in tokenizer.get_vocab()]
    if not missing:
        return tokenizer
    extended = copy.deepcopy(tokenizer)
    extended.add_special_tokens({"additional_special_tokens": missing})
    return extended


class PromptEncoder(abc.ABC):
    """A T5 encoder as prompts see it: its tokenizer, its embedding cache and ``encode(input_ids)``.

    :class:`BundleT5` is the CogVideoX folder's own T5; ``nodes/host.py`` adapts a ComfyUI CLIP (core's Load CLIP
    with ``t5xxl_fp16.safetensors``) to the same interface, so both give identical conditionings.
    """

    tokenizer = None
    cache: TextEmbedCache

    @abc.abstractmethod
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [1, L] -> T5 output [1, L, D] (float32, CPU)."""


def t5_memory(text_encoder, tokens: int) -> int:
    """The text-encode stage's activation estimate (:mod:`.memory`) for one prompt of ``tokens`` tokens."""
    from .memory import t5_activation_bytes

    c = text_encoder.config
    return t5_activation_bytes(c.d_model, c.d_ff, c.num_heads, tokens, element_size=text_encoder.dtype.itemsize)


class BundleT5(PromptEncoder):
    """The bundle's ``text_encoder``, run through its placement (cached per bundle)."""

    def __init__(self, bundle):
        if bundle.text_encoder is None:
            raise ValueError(
                f"{bundle.name or 'This CogVideoX model'} was loaded without text_encoder/: connect a T5-XXL CLIP "
                "to Text Encode's 'clip' input (core's Load CLIP, type sd3, t5xxl_fp16.safetensors or "
                "t5xxl_fp8_e4m3fn.safetensors from models/text_encoders/).")
        self.bundle, self.tokenizer, self.cache = bundle, bundle.tokenizer, bundle.text_cache

    def encode(self, input_ids):
        b, te = self.bundle, self.bundle.text_encoder
        need = t5_memory(te, input_ids.shape[1])
        with torch.no_grad(), b.placement.run(te, memory_required=need):
            return t5_encode(te, input_ids.to(b.placement.device_of(te))).float().cpu()


def prompt_tokenizer(encoder: PromptEncoder, prompt: str):
    """The tokenizer for ``prompt``: the encoder's own, or (cached per encoder) its copy with the extra tokens when
    the prompt uses one."""
    if not any(t in prompt for t in EXTRA_TOKENS):
        return encoder.tokenizer
    derived = encoder.cache.derived
    if "extended_tokenizer" not in derived:
        derived["extended_tokenizer"] = with_extra_tokens(encoder.tokenizer)
    return derived["extended_tokenizer"]


def t5_encode(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """T5 encoder output [B, L, D] for token ids [B, L] (on the encoder's device).

    An id past the embedding table (an extra token of a tokenizer copy whose vocabulary fills the table,
    as tiny test models' do) is embedded as the mean row of the table: deterministic, so training and
    inference agree; that is what resizing the table with that row would give. Real T5 tables have spare
    rows, which such ids use as they are.
    """
    emb = text_encoder.get_input_embeddings()
    rows = emb.weight.shape[0]
    beyond = input_ids >= rows
    if not beyond.any():
        return text_encoder(input_ids)[0]
    embeds = emb(input_ids.clamp(max=rows - 1))
    embeds[beyond] = emb.weight.float().mean(0).to(embeds.device, embeds.dtype)  # (a streamed table waits off-device)
    return text_encoder(inputs_embeds=embeds)[0]


def encode_prompt(bundle, prompt: str, max_length: int = MAX_TEXT_TOKENS, trigger: str | None = None,
                  encoder: PromptEncoder | None = None) -> TextConditioning:
    """Encode ``prompt`` with the bundle's T5 or ``encoder`` (a ComfyUI CLIP); repeated prompts come from the
    encoder's cache.

    With ``trigger`` (e.g. ``"img"``), every stand-alone trigger word is removed and the class
    word before it is marked in ``identity_mask`` (used by identity adapters such as MagicMirror).
    Without it the prompt is encoded verbatim, exactly as diffusers does.
    """
    if max_length > MAX_TEXT_TOKENS:
        raise ValueError(f"max_length={max_length}: CogVideoX accepts at most {MAX_TEXT_TOKENS} T5 tokens")
    encoder = encoder or BundleT5(bundle)
    key = (prompt, max_length, trigger)
    cached = encoder.cache.get(key)
    if cached is not None:
        return cached
    text, spans = split_trigger(prompt, trigger)
    tokenizer = prompt_tokenizer(encoder, text)
    tokens = tokenize(tokenizer, text, max_length)
    full_len = len(tokenizer(text, add_special_tokens=True).input_ids)
    truncated = full_len > max_length
    if truncated:
        logger.warning("Prompt is %d T5 tokens; CogVideoX keeps the first %d: %r", full_len, max_length, prompt)
    embeds = encoder.encode(tokens.input_ids)
    width = bundle.transformer.config.text_embed_dim
    if embeds.shape[-1] != width:
        raise ValueError(f"the text encoder gives {embeds.shape[-1]}-d embeddings but {bundle.variant} reads "
                         f"{width}-d T5 embeddings: use a T5-XXL text encoder (t5xxl_fp16.safetensors).")
    cond = TextConditioning(prompt=prompt, embeds=embeds, input_ids=tokens.input_ids,
                            attention_mask=tokens.attention_mask, truncated=truncated, encoded_prompt=text,
                            identity_mask=identity_token_mask(tokenizer, text, spans, max_length))
    encoder.cache.put(key, cond)
    return cond
