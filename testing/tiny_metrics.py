"""Tiny random optional metric models, written at test time (no weights in git, nothing downloaded).

- :func:`build_clip_folder`: a transformers CLIP folder with both towers, a byte-level tokenizer (every byte a
  token, no merges) and a PIL image processor at 32 px: what ``--clip_text`` / the Video Metrics ``clip_text``
  input load for CLIP-T.
- :func:`build_dino_folder`: a transformers ``ViTModel`` folder named ``dino-*`` with its image processor (DINO-I).
- :func:`build_curricularface_file`: a small TFace IR backbone saved as a ``.bin`` state dict under the released
  CurricularFace file name (FaceSim-Cur); ``units``/``widths`` make it small, the layout is the real one.
"""

from __future__ import annotations

import json
import os

import torch


def build_clip_folder(path: str, seed: int = 0, image_size: int = 32) -> str:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=8,
                  image_size=image_size)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    from transformers import CLIPTokenizer

    try:  # transformers 5: the vocabulary and merges themselves
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    except TypeError:  # transformers 4: their files
        tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    tokenizer.save_pretrained(path)
    _image_processor("CLIP", image_size).save_pretrained(path)
    return path


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE tokenizers (GPT-2, CLIP) stand for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _image_processor(family: str, size: int):
    import transformers

    if family == "CLIP":
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def build_dino_folder(path: str, seed: int = 0, image_size: int = 32) -> str:
    """``path`` should be named ``dino-...`` (that is how the metric folders are recognised)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                               patch_size=8, image_size=image_size), add_pooling_layer=False)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    _image_processor("ViT", image_size).save_pretrained(path)
    return path


def build_curricularface_file(path: str, seed: int = 0, units=(1, 2, 1, 1), widths=(8, 16, 24, 32),
                              embedding_dim: int = 64) -> str:
    """A random IR backbone with randomised BatchNorm statistics, saved with ``torch.save`` (a plain state dict, as
    the released ``.bin``)."""
    from ..models.curricularface import IRBackbone, IRConfig

    torch.manual_seed(seed)
    model = IRBackbone(IRConfig(units=tuple(units), widths=tuple(widths), stem_width=widths[0],
                                embedding_dim=embedding_dim))
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
