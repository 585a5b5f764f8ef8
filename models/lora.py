"""CogVideoX LoRAs: read diffusers/PEFT, kohya and ComfyUI files; apply them as reversible patches.

Key formats understood (all normalised to a module path of ``CogVideoXTransformer3DModel``):

* diffusers / PEFT: ``transformer.<path>.lora_A.weight`` / ``lora_B.weight``; the scale comes
  from the ``lora_adapter_metadata`` safetensors entry (``lora_alpha / r``, with
  ``rank_pattern``/``alpha_pattern``/``use_rslora``) when present, else ``alpha / rank`` when the
  caller knows the alpha the file was trained with (``alpha=``; e.g. the subject LoRA loader's 64),
  else 1 (diffusers' rule). Files this pack exports have the scale baked into ``lora_B`` (metadata
  ``lora_scale: baked``) and always load at scale 1.
  ``base_model.model.`` (PEFT ``save_pretrained``) and bare paths are accepted too.
* kohya: ``lora_unet_<path with _>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
  (scale ``alpha / rank``; rank when no alpha).
* ComfyUI: ``diffusion_model.<path>.lora_down/lora_up`` (+ ``.alpha``) or ``.lora_A/.lora_B``.

A :class:`LoraPatch` adds ``strength * scale * up(down(x))`` to each target layer's output
through forward hooks: nothing in the model's weights changes, several LoRAs stack, and
removing the hooks restores the base model bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re

import torch
import torch.nn.functional as F

from .cogvideox import (
    BASE_MODEL_KEY,
    WeightsFileError,
    check_base_model,
    read_safetensors,
    read_torch_pickle,
    unrecorded_base_note,
    write_safetensors,
)
from .patches import forward_hook_patch, run_context

logger = logging.getLogger(__name__)

_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_DOT_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
_SUFFIXES = {  # key suffix -> (role, naming)
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
}


class LoraMismatchError(ValueError):
    """A LoRA that does not fit the loaded model."""


@dataclasses.dataclass
class LoraLayer:
    down: torch.Tensor  # [r, in] (Linear) or [r, in, k, k] (Conv2d)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    scale: float = 1.0


@dataclasses.dataclass
class LoraWeights:
    """A parsed LoRA file: layers keyed by the *file's* module name (format already stripped)."""

    name: str
    layers: dict[str, LoraLayer]
    kohya: bool = False  # names use "_" instead of "." and must be matched against the model
    metadata: dict = dataclasses.field(default_factory=dict)


def _split_key(key: str):
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None, None


def _peft_scales(metadata: dict) -> tuple[float | None, float | None, dict, dict, bool]:
    """(lora_alpha, r, alpha_pattern, rank_pattern, use_rslora) from diffusers' adapter metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, None, {}, {}, False
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraMismatchError(f"the LoRA's lora_adapter_metadata is not valid JSON ({e.msg}); re-save the file "
                                "with diffusers' save_lora_weights.") from None
    if not isinstance(meta, dict):
        raise LoraMismatchError("the LoRA's lora_adapter_metadata is not a JSON object; re-save the file.")
    meta = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in meta.items()}
    for name in ("lora_alpha", "r"):
        value = meta.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise LoraMismatchError(f"the LoRA's lora_adapter_metadata has {name}={value!r}; it must be a positive "
                                    "number.")
    for name in ("alpha_pattern", "rank_pattern"):
        if not isinstance(meta.get(name) or {}, dict):
            raise LoraMismatchError(f"the LoRA's lora_adapter_metadata has a {name} that is not a JSON object.")
    return (meta.get("lora_alpha"), meta.get("r"), meta.get("alpha_pattern") or {}, meta.get("rank_pattern") or {},
            bool(meta.get("use_rslora", False)))


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale_is_baked(metadata: dict) -> bool:
    """True for LoRAs exported by this pack (alpha / rank already multiplied into ``lora_B``); files from
    before the ``lora_scale`` marker are recognised by their pack metadata (method + alpha)."""
    return metadata.get("lora_scale") == "baked" or ("method" in metadata and "alpha" in metadata)


def parse_lora_state_dict(state_dict: dict, metadata: dict | None = None, name: str = "lora",
                          alpha: float | None = None) -> LoraWeights:
    """Normalise a LoRA state dict of any supported format into :class:`LoraWeights`.

    ``alpha``: the alpha the LoRA was trained with, for files that do not record one (no ``.alpha``
    keys, no ``lora_adapter_metadata``, scale not baked): their scale becomes ``alpha / rank`` instead
    of diffusers' 1. Files that record their scale ignore it.
    """
    metadata = metadata or {}
    if any(".lora_magnitude_vector" in k or k.endswith(".dora_scale") for k in state_dict):
        raise LoraMismatchError(f"{name}: DoRA LoRAs are not supported; export a plain LoRA.")
    groups: dict[str, dict] = {}
    unknown = []
    kohya = False
    for key, tensor in state_dict.items():
        module, role = _split_key(key)
        if module is None:
            unknown.append(key)
            continue
        for p in _KOHYA_PREFIXES:
            if module.startswith(p):
                module, kohya = module[len(p):], True
                break
        else:
            for p in _DOT_PREFIXES:
                if module.startswith(p):
                    module = module[len(p):]
                    break
        groups.setdefault(module, {})[role] = tensor
    if not groups:
        raise LoraMismatchError(
            f"{name}: no LoRA weights found (expected keys ending in lora_A/lora_B or lora_down/lora_up; "
            f"first keys: {list(state_dict)[:5]}).")
    try:
        peft_alpha, r, alpha_pattern, rank_pattern, rslora = _peft_scales(metadata)
    except LoraMismatchError as e:
        raise LoraMismatchError(f"{name}: {e}") from None
    layers = {}
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraMismatchError(f"{name}: layer {module!r} has only {sorted(parts)} (needs both down and up).")
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if "alpha" in parts:
            scale = float(parts["alpha"]) / rank
        elif peft_alpha is not None:
            a = _pattern_value(alpha_pattern, module, peft_alpha)
            rr = _pattern_value(rank_pattern, module, r or rank)
            scale = a / (rr ** 0.5 if rslora else rr)
        elif alpha is not None and not scale_is_baked(metadata):
            scale = float(alpha) / rank
        else:
            scale = 1.0
        layers[module] = LoraLayer(down=down, up=up, scale=scale)
    return LoraWeights(name=name, layers=layers, kohya=kohya, metadata=metadata)


def load_lora_file(path: str, alpha: float | None = None) -> LoraWeights:
    """Read a LoRA file (.safetensors preferred; .bin/.pt/.pth only via weights_only pickle); ``alpha`` as
    in :func:`parse_lora_state_dict`."""
    if path.endswith(".safetensors"):
        state_dict, metadata = read_safetensors(path)
    else:
        state_dict, metadata = read_torch_pickle(path), {}
    lora = parse_lora_state_dict(state_dict, metadata, name=os.path.basename(path), alpha=alpha)
    if BASE_MODEL_KEY not in metadata:
        logger.warning(unrecorded_base_note(f"LoRA {lora.name!r}"))
    return lora


def resolve_lora_targets(lora: LoraWeights, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, LoraLayer]]:
    """Map the LoRA's layers onto the transformer's modules, checking shapes.

    Raises :class:`LoraMismatchError` when nothing matches (a LoRA for another model), when a
    matching layer has the wrong shape (e.g. a CogVideoX-2B LoRA on a 5B model), or when the file records another
    base model (:data:`~.cogvideox.BASE_MODEL_KEY`: 1.0 / 1.5, T2V / I2V).
    """
    modules = dict(transformer.named_modules())
    lookup = {n.replace(".", "_"): n for n in modules} if lora.kohya else None
    matched, unmatched = {}, []
    for key, layer in lora.layers.items():
        path = lookup.get(key) if lookup is not None else key
        module = modules.get(path) if path is not None else None
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            unmatched.append(key)
            continue
        in_f = module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels
        out_f = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        if layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
            width = getattr(getattr(transformer, "config", None), "num_attention_heads", 0) * getattr(
                getattr(transformer, "config", None), "attention_head_dim", 0)
            raise LoraMismatchError(
                f"LoRA {lora.name!r} does not fit this model: layer {path!r} is {in_f}->{out_f} in the model "
                f"(transformer width {width}) but {layer.down.shape[1]}->{layer.up.shape[0]} in the LoRA. "
                "It was trained for another CogVideoX size (2B LoRAs have width 1920, 5B LoRAs 3072).")
        matched[path] = (module, layer)
    if not matched:
        raise LoraMismatchError(
            f"LoRA {lora.name!r}: none of its {len(lora.layers)} layers match a layer of this CogVideoX "
            f"transformer (e.g. {unmatched[:3]}). It is probably a LoRA for another model; CogVideoX LoRA "
            "layers look like 'transformer_blocks.0.attn1.to_q'.")
    try:
        check_base_model(lora.metadata.get(BASE_MODEL_KEY), transformer, f"LoRA {lora.name!r}")
    except ValueError as e:
        raise LoraMismatchError(str(e)) from None
    if unmatched:
        logger.warning("LoRA %s: %d of %d layers match nothing in the model and are ignored: %s",
                       lora.name, len(unmatched), len(lora.layers), unmatched[:5])
    return matched


# A module flagged with this attribute (value "reference") is computing the reference branch of a
# subject-reference run; LoRA layers scoped to the reference branch act only then (models/subject.py).
BRANCH_ATTR = "_mmv_branch"


def _lora_hook(module: torch.nn.Module, down, up, scale: float, reference_only: bool = False,
               dropout: torch.nn.Module | None = None, owner=None, key: str | None = None):
    """Forward hook adding ``scale * up(down(x))``. With ``owner`` (a :class:`TrainableLora`) ``down``/``up`` are
    looked up in it by ``key`` at every call (so wrappers that re-create its parameters, as FSDP does, are
    followed) and the hook does nothing while ``owner.enabled`` is False."""
    conv = isinstance(module, torch.nn.Conv2d)

    def hook(mod, args, output):
        if owner is not None and not owner.enabled:
            return output
        if reference_only and getattr(mod, BRANCH_ATTR, None) != "reference":
            return output
        x = args[0] if dropout is None else dropout(args[0])
        d, u = (owner.down[key], owner.up[key]) if owner is not None else (down, up)
        d, u = d.to(x.dtype), u.to(x.dtype)
        if conv:
            return output + F.conv2d(F.conv2d(x, d, stride=mod.stride, padding=mod.padding), u) * scale
        return output + F.linear(F.linear(x, d), u) * scale

    return hook


def _is_reference_only(path: str, reference_only) -> bool:
    return any(path == p or path.endswith("." + p) for p in reference_only)


@dataclasses.dataclass(frozen=True, eq=False)
class LoraPatch:
    """Patch adding a LoRA with ``strength`` for a sampling run (see :mod:`.patches`).

    ``reference_only``: module names (e.g. ``"norm1.linear"``) whose LoRA acts only on the
    reference branch of a subject-reference run (``models/subject.py``).
    """

    lora: LoraWeights
    strength: float = 1.0
    reference_only: tuple = ()

    @property
    def name(self) -> str:
        return f"lora:{self.lora.name}@{self.strength:g}"

    _module: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def apply(self, transformer, context=None):
        """Hooks whose down/up live on the run's device in its dtype (``context``; never the weights' device, which
        is the offload device or meta while weights stream)."""
        targets = resolve_lora_targets(self.lora, transformer)
        context = run_context(transformer, context)
        device, dtype = context.device, context.dtype
        hooks = []
        for path, (module, layer) in targets.items():
            hooks.append((module, _lora_hook(module, layer.down.to(device, dtype), layer.up.to(device, dtype),
                                             layer.scale * self.strength,
                                             _is_reference_only(path, self.reference_only))))
        return forward_hook_patch(hooks)

    def models(self) -> list:
        if "module" not in self._module:
            self._module["module"] = LoraModule(self.lora)
        return [self._module["module"]]


class LoraModule(torch.nn.Module):
    """A LoRA's tensors as one module, so the placement layer moves and counts them like an adapter's weights.
    The :class:`LoraWeights` layers always refer to the module's tensors: one copy, wherever it is."""

    def __init__(self, lora: LoraWeights):
        super().__init__()
        self.lora, self.slots = lora, {}
        for i, (name, layer) in enumerate(lora.layers.items()):
            self.register_buffer(f"down_{i}", layer.down)
            self.register_buffer(f"up_{i}", layer.up)
            self.slots[name] = i

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name, i in self.slots.items():
            layer = self.lora.layers[name]
            layer.down, layer.up = self._buffers[f"down_{i}"], self._buffers[f"up_{i}"]
        return out


class TrainableLora(torch.nn.Module):
    """LoRA parameters for ``targets`` of a transformer, applied through the same hooks as
    :class:`LoraPatch` (so training and inference share one code path).

    ``down`` is Kaiming-initialised and ``up`` zero-initialised (a fresh LoRA changes nothing);
    the update is ``alpha / rank * up(down(dropout(x)))``.
    """

    def __init__(self, transformer: torch.nn.Module, targets: list[str], rank: int, alpha: float,
                 dropout: float = 0.0, reference_only: tuple = ()):
        super().__init__()
        self.rank, self.alpha, self.reference_only = rank, alpha, tuple(reference_only)
        self.paths = list(targets)
        self.down, self.up = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        modules = dict(transformer.named_modules())
        for path in self.paths:
            m = modules[path]
            key = path.replace(".", "__")
            if isinstance(m, torch.nn.Conv2d):
                down = torch.empty(rank, m.in_channels, *m.kernel_size)
                up = torch.zeros(m.out_channels, rank, 1, 1)
            else:
                down = torch.empty(rank, m.in_features)
                up = torch.zeros(m.out_features, rank)
            torch.nn.init.kaiming_uniform_(down, a=5 ** 0.5)
            self.down[key], self.up[key] = torch.nn.Parameter(down), torch.nn.Parameter(up)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else None
        self.enabled = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @contextlib.contextmanager
    def disabled(self):
        """The base model for the duration of the block (e.g. the DPO reference, without a second copy)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def apply(self, transformer, context=None):
        modules = dict(transformer.named_modules())
        hooks = []
        for path in self.paths:
            key = path.replace(".", "__")
            hooks.append((modules[path], _lora_hook(modules[path], None, None, self.scale,
                                                    _is_reference_only(path, self.reference_only), self.dropout,
                                                    owner=self, key=key)))
        return forward_hook_patch(hooks)

    def layers(self) -> dict[str, LoraLayer]:
        return {p: LoraLayer(self.down[p.replace(".", "__")].detach(), self.up[p.replace(".", "__")].detach(),
                             self.scale) for p in self.paths}


def find_lora_targets(transformer: torch.nn.Module, names: list[str]) -> list[str]:
    """Module paths of ``transformer`` whose name ends with one of ``names`` (PEFT-style matching)."""
    out = [path for path, m in dict(transformer.named_modules()).items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
           and any(path == n or path.endswith("." + n) for n in names)]
    if not out:
        raise ValueError(f"no module of the transformer matches the LoRA targets {names}")
    return out


def save_lora(path: str, layers: dict[str, LoraLayer], metadata: dict | None = None) -> None:
    """Write a diffusers-format LoRA (``transformer.<path>.lora_A/B.weight``) with the scale baked
    into ``lora_B`` (metadata ``lora_scale: baked``), atomically (temp file + rename) so a crash never
    leaves a half-written file."""
    tensors = {}
    for module, layer in layers.items():
        tensors[f"transformer.{module}.lora_A.weight"] = layer.down
        tensors[f"transformer.{module}.lora_B.weight"] = (layer.up.detach().float() * layer.scale).to(layer.up.dtype)
    write_safetensors(path, tensors, {**(metadata or {}), "lora_scale": "baked"})


__all__ = ["LoraLayer", "LoraWeights", "LoraPatch", "LoraMismatchError", "TrainableLora", "WeightsFileError",
           "find_lora_targets", "load_lora_file", "parse_lora_state_dict", "resolve_lora_targets", "save_lora"]
