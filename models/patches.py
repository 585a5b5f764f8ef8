"""Non-destructive model patches.

A patch node never edits the shared transformer. It returns a new bundle that *records*
a :class:`ModelPatch`; the sampler applies all recorded patches for one run inside
:func:`applied_patches` and removes them on exit, on error and on interrupt alike, so the
base model seen by any other branch of the graph (or the next run) is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

Undo = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class SamplingContext:
    """What a patch may need to know about the run it is applied for.

    ``batch_roles`` names each row of the transformer batch (``["negative", "positive"]`` with
    CFG, as diffusers orders them); ``positive``/``negative`` are the text conditionings.
    """

    positive: object = None
    negative: object = None
    batch_roles: tuple = ("positive",)


@runtime_checkable
class ModelPatch(Protocol):
    """A reversible change to a transformer.

    ``apply`` installs the change and returns a callable that removes it exactly
    (hooks removed, replaced modules and attributes restored).
    """

    name: str

    def apply(self, transformer: torch.nn.Module, context: SamplingContext | None = None) -> Undo: ...


@contextlib.contextmanager
def applied_patches(transformer: torch.nn.Module, patches, context: SamplingContext | None = None
                    ) -> Iterator[torch.nn.Module]:
    """Apply ``patches`` in order for the duration of the block; undo them in reverse order."""
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.callback(patch.apply(transformer, context))
        yield transformer


WRAPPED = "wrapped"  # attribute under which the pack's block wrappers keep the original block


def named_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``model.named_modules()`` with the pack's block wrappers transparent: a module keeps the path it
    has in the unpatched model (``transformer_blocks.0.norm1.linear``) while a patch wraps its block,
    so patches can be applied in any order."""
    out = {}
    for name, module in model.named_modules():
        clean = ".".join(part for part in name.split(".") if part != WRAPPED)
        out[clean] = module  # the wrapped (inner) module comes after its wrapper and wins
    return out


def replace_blocks(transformer: torch.nn.Module, make_wrapper, pre_hook=None) -> Undo:
    """Swap every ``transformer_blocks[i]`` for ``make_wrapper(i, block)`` (a module keeping the block
    as ``.wrapped``) and optionally add a keyword forward pre-hook on the transformer; the returned
    undo restores the original blocks and removes the hook."""
    blocks = transformer.transformer_blocks
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = make_wrapper(i, block)
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre_hook is not None else None

    def undo() -> None:
        if handle is not None:
            handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block

    return undo


def forward_hook_patch(modules_and_hooks) -> Undo:
    """Register forward hooks ``[(module, hook), ...]``; return the undo that removes them all."""
    handles = [module.register_forward_hook(hook) for module, hook in modules_and_hooks]

    def undo() -> None:
        for h in handles:
            h.remove()

    return undo
