"""Non-destructive model patches.

A patch node never edits the shared transformer. It returns a new bundle that *records*
a :class:`ModelPatch`; the sampler applies all recorded patches for one run inside
:func:`applied_patches` and removes them on exit, on error and on interrupt alike, so the
base model seen by any other branch of the graph (or the next run) is unchanged.

Methods that change the blocks (MagicMirror, subject reference, DualReal) register an extension
with the transformer's block runner (:mod:`.block_runner`); LoRAs add forward hooks to the linear
layers the runner calls. Either way any set of patches stacks, in any order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

from .block_runner import block_runner
from .placement import placement_of
from .speed import casting_hooks

Undo = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class SamplingContext:
    """What a patch may need to know about the run it is applied for: the text conditionings
    (``positive`` carries the identity-token mask MagicMirror fuses) and where the run happens (the execution
    device and dtype; :func:`applied_patches` fills them from the transformer's placement when not given)."""

    positive: object = None
    negative: object = None
    device: torch.device | None = None
    dtype: torch.dtype | None = None


@runtime_checkable
class ModelPatch(Protocol):
    """A reversible change to a transformer.

    ``apply`` installs the change and returns a callable that removes it exactly (hooks removed,
    extensions unregistered); it runs with ``context.device``/``context.dtype`` set, after the modules of
    ``models()`` were brought there. Optional members: ``method`` (a name shown in messages; at most one patch
    per method unless ``stackable``, checked wherever patches reach a model), ``conditional_only`` (CFG's negative
    prompt must run as a forward of its own), ``models()`` (the ``nn.Module``s the patch owns, e.g. its adapters: the
    placement layer moves and counts them with the transformer, like ComfyUI's patch ``models()``), ``outputs()``
    (results of the last run, merged into the sampler's LATENT), and for the speed options (:mod:`.speed`):
    ``cache_notes(kind)`` (what a cache of :class:`~.speed.CacheKind` ``kind`` skips of the patch, one line each;
    raises :class:`~.speed.SpeedConflictError` for a cache it cannot act with), ``compilable`` (False: torch.compile
    would compile one graph per block) and ``attention_bias`` (a description when the patch puts a bias on the joint
    attention's scores, which only the native attention backend takes).
    """

    name: str

    def apply(self, transformer: torch.nn.Module, context: SamplingContext | None = None) -> Undo: ...


class PatchConflictError(ValueError):
    """Two patches that cannot act on one model together."""


def run_context(transformer, context: SamplingContext | None = None) -> SamplingContext:
    """``context`` with the execution device and dtype filled in from the transformer's placement (the bundle that
    loaded it) and dtype, where the caller did not give them."""
    context = context or SamplingContext()
    if context.device is not None and context.dtype is not None:
        return context
    placement = placement_of(transformer)
    if placement is None and context.device is None:
        raise ValueError("no execution device for the patches: pass SamplingContext(device=..., dtype=...) or use a "
                         "transformer loaded through a CogVideoXBundle")
    return dataclasses.replace(context, device=context.device or placement.device,
                               dtype=context.dtype or transformer.dtype)


def check_can_add(patches, patch) -> None:
    """Raise :class:`PatchConflictError` if ``patch`` cannot join ``patches`` (checked at the patch node, before
    any run): a method that changes the blocks may be applied once per model."""
    method = getattr(patch, "method", None)
    if method is None or getattr(patch, "stackable", False):
        return
    for other in patches:
        if getattr(other, "method", None) == method:
            raise PatchConflictError(
                f"{method} is already applied to this model ({other.name}); a second {method} on the same model "
                f"would apply its changes twice. Use one {method} node per model (it takes several reference "
                "images), or branch from the model before the first one.")


def check_patches(patches) -> None:
    """Raise :class:`PatchConflictError` if ``patches`` hold a method twice (every way patches reach a model: a
    bundle built or replaced with them, :func:`applied_patches`)."""
    for i, patch in enumerate(patches):
        check_can_add(patches[:i], patch)


def conditional_only(patches) -> bool:
    """Whether some patch needs CFG's negative prompt run as a forward of its own."""
    return any(getattr(p, "conditional_only", False) for p in patches)


def patch_models(patches) -> list:
    """The ``nn.Module``s the patches own (each once), to be placed with the transformer for a run."""
    out = []
    for patch in patches:
        for module in (patch.models() if hasattr(patch, "models") else ()):
            if all(module is not m for m in out):
                out.append(module)
    return out


def patch_outputs(patches) -> dict:
    """The merged ``outputs()`` of the patches' last run (e.g. DualReal's α history)."""
    out = {}
    for patch in patches:
        if hasattr(patch, "outputs"):
            out.update(patch.outputs())
    return out


@contextlib.contextmanager
def applied_patches(transformer: torch.nn.Module, patches, context: SamplingContext | None = None
                    ) -> Iterator[torch.nn.Module]:
    """Apply ``patches`` in order for the duration of the block; undo them in reverse order. Patches that need the
    execution device and dtype take them from ``context`` or else the transformer's placement (:func:`run_context`)."""
    patches = tuple(patches)
    check_patches(patches)
    block_runner(transformer)  # every run goes through the runner (installed once per transformer)
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.callback(patch.apply(transformer, context))
        yield transformer


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in the run's compute ``dtype``: cast in place when frozen; a cast copy when it has trainable
    parameters (a trainer's validation run must not turn its fp32 weights into bf16). Layers stored in another dtype
    and computed in ``dtype`` (diffusers' layerwise casting, :func:`~.speed.store_adapter_like`) are left as stored."""
    stored = {id(p) for m, hook in casting_hooks(module) if hook.compute_dtype == dtype for p in m.parameters()}
    params = [p for p in module.parameters() if id(p) not in stored]
    if all(p.dtype == dtype for p in params):
        return module
    if any(p.requires_grad for p in params):
        import copy

        return copy.deepcopy(module).requires_grad_(False).to(dtype)
    return module.to(dtype)


def forward_hook_patch(modules_and_hooks) -> Undo:
    """Register forward hooks ``[(module, hook), ...]``; return the undo that removes them all."""
    handles = [module.register_forward_hook(hook) for module, hook in modules_and_hooks]

    def undo() -> None:
        for h in handles:
            h.remove()

    return undo
