"""T5 prompt encoding for CogVideoX (226-token cap), cached per text encoder."""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

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


def prompt_tokenizer(bundle, prompt: str):
    """The tokenizer for ``prompt``: the model's own, or (cached per text encoder) its copy with the extra
    tokens when the prompt uses one."""
    if not any(t in prompt for t in EXTRA_TOKENS):
        return bundle.tokenizer
    derived = bundle.text_cache.derived
    if "extended_tokenizer" not in derived:
        derived["extended_tokenizer"] = with_extra_tokens(bundle.tokenizer)
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
    embeds[beyond] = emb.weight.float().mean(0).to(embeds.dtype)
    return text_encoder(inputs_embeds=embeds)[0]


def encode_prompt(bundle, prompt: str, max_length: int = MAX_TEXT_TOKENS,
                  trigger: str | None = None) -> TextConditioning:
    """Encode ``prompt`` with the bundle's T5; repeated prompts come from the bundle's cache.

    With ``trigger`` (e.g. ``"img"``), every stand-alone trigger word is removed and the class
    word before it is marked in ``identity_mask`` (used by identity adapters such as MagicMirror).
    Without it the prompt is encoded verbatim, exactly as diffusers does.
    """
    if max_length > MAX_TEXT_TOKENS:
        raise ValueError(f"max_length={max_length}: CogVideoX accepts at most {MAX_TEXT_TOKENS} T5 tokens")
    key = (prompt, max_length, trigger)
    cached = bundle.text_cache.get(key)
    if cached is not None:
        return cached
    text, spans = split_trigger(prompt, trigger)
    tokenizer = prompt_tokenizer(bundle, text)
    tokens = tokenize(tokenizer, text, max_length)
    full_len = len(tokenizer(text, add_special_tokens=True).input_ids)
    truncated = full_len > max_length
    if truncated:
        logger.warning("Prompt is %d T5 tokens; CogVideoX keeps the first %d: %r", full_len, max_length, prompt)
    with torch.no_grad(), bundle.on_device(bundle.text_encoder) as te:
        device = next(te.parameters()).device
        embeds = t5_encode(te, tokens.input_ids.to(device))
    cond = TextConditioning(prompt=prompt, embeds=embeds.float().cpu(), input_ids=tokens.input_ids,
                            attention_mask=tokens.attention_mask, truncated=truncated, encoded_prompt=text,
                            identity_mask=identity_token_mask(tokenizer, text, spans, max_length))
    bundle.text_cache.put(key, cond)
    return cond
