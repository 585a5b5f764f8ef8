"""T5 prompt encoding for CogVideoX (226-token cap), cached per text encoder."""

from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 226  # CogVideoX was trained with exactly this many T5 tokens


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """A T5-encoded prompt: embeds [1, L, D] (float32, CPU) and the token ids [1, L] that made them."""

    prompt: str
    embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: bool = False


def tokenize(tokenizer, prompt: str, max_length: int = MAX_TEXT_TOKENS):
    """Tokenize exactly as diffusers' CogVideoX pipelines do (pad to ``max_length``, truncate)."""
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt")


def encode_prompt(bundle, prompt: str, max_length: int = MAX_TEXT_TOKENS) -> TextConditioning:
    """Encode ``prompt`` with the bundle's T5; repeated prompts come from the bundle's cache."""
    if max_length > MAX_TEXT_TOKENS:
        raise ValueError(f"max_length={max_length}: CogVideoX accepts at most {MAX_TEXT_TOKENS} T5 tokens")
    key = (prompt, max_length)
    cached = bundle.text_cache.get(key)
    if cached is not None:
        return cached
    tokens = tokenize(bundle.tokenizer, prompt, max_length)
    full_len = len(bundle.tokenizer(prompt, add_special_tokens=True).input_ids)
    truncated = full_len > max_length
    if truncated:
        logger.warning("Prompt is %d T5 tokens; CogVideoX keeps the first %d: %r", full_len, max_length, prompt)
    with torch.no_grad(), bundle.on_device(bundle.text_encoder) as te:
        device = next(te.parameters()).device
        embeds = te(tokens.input_ids.to(device))[0]
    cond = TextConditioning(prompt=prompt, embeds=embeds.float().cpu(), input_ids=tokens.input_ids,
                            attention_mask=tokens.attention_mask, truncated=truncated)
    bundle.text_cache.put(key, cond)
    return cond
