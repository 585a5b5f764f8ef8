"""Which base model a diffusers folder holds, read from its JSON files (nothing is loaded).

The pack knows two bases: ``"cogvideox"`` (``CogVideoXTransformer3DModel``) and ``"wan"``
(``WanTransformer3DModel``, Wan 2.1 and 2.2). The transformer's config names its class; the folder's
``model_index.json`` names the pipeline. Both are checked, so a half-copied folder is reported too.
"""

from __future__ import annotations

import json
import os

BASES = {"CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan"}
BASE_NAMES = {"cogvideox": "CogVideoX", "wan": "Wan"}


class UnknownBaseError(ValueError):
    """A folder that is not a diffusers folder of a base the pack knows."""


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnknownBaseError(f"cannot read {path} ({' '.join(str(e).split())}); download the model again") from None


def transformer_class(folder: str) -> str | None:
    """``_class_name`` of ``<folder>/transformer/config.json`` (None when the file is absent)."""
    path = os.path.join(folder, "transformer", "config.json")
    return read_json(path).get("_class_name") if os.path.isfile(path) else None


def detect_base(folder: str) -> str:
    """``"cogvideox"`` or ``"wan"`` for a diffusers folder; :class:`UnknownBaseError` (one line) otherwise."""
    name = transformer_class(folder)
    if name is None:
        index = os.path.join(folder, "model_index.json")
        name = (read_json(index).get("transformer") or [None, None])[1] if os.path.isfile(index) else None
    if name not in BASES:
        known = " or ".join(f"{v} ({k})" for k, v in BASE_NAMES.items())
        found = f"its transformer is {name}" if name else "it has no transformer/config.json"
        raise UnknownBaseError(f"{folder} is not a diffusers {known} folder: {found}")
    return BASES[name]
