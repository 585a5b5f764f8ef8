"""Where a model's modules live and where they run: one placement layer for every stage.

A :class:`Placement` owns the execution device (where forwards run), the offload device (where weights wait,
normally the CPU) and the offload mode. Every stage brings the modules it uses to the execution device through
:meth:`Placement.run` and gets them back afterwards, also when the stage raises or is interrupted:

============  ====================================================  =====================================
mode          base components (transformer, T5, VAE)                between runs on the execution device
============  ====================================================  =====================================
``none``      on the execution device from load                      transformer + T5 + VAE
``model``     moved there for their stage, moved back after it       nothing
``sequential`` transformer and T5 stream their weights leaf by leaf   nothing (one leaf at a time while
              (diffusers group offloading, ``leaf_level``, CUDA      running, the next one prefetched)
              streams when available); the VAE moves as in model
``block``     the transformer streams block by block (diffusers     nothing (one transformer block at a
              group offloading, ``block_level``, one block per       time while running, the next one
              group, CUDA streams when available), T5 as in          prefetched, plus the embeddings and
              ``sequential``, the VAE as in ``model``                output layers during a forward)
============  ====================================================  =====================================

Streamed weights always wait in CPU memory. With CUDA streams diffusers pins each group's CPU weights on the fly
(``low_cpu_mem_usage``): page-locked memory is bounded by the groups in flight (the running one and the prefetched
one), not a pinned copy of the whole model (10.4 GiB for the 5B transformer, 8.9 GiB for T5-XXL), at the cost of a
host-side copy per transfer.

Modules that are not base components — patch adapters (:meth:`~.patches.ModelPatch.models`), CLIP vision towers,
the face encoder — are moved in for the stage that uses them and moved back after it, in every mode. ``auto`` is
resolved once, at load, by :func:`choose_offload` from the free memory of the execution device and the components'
sizes: ``none``, else ``model``, else ``block`` (far less memory than ``model``, fewer and larger transfers than
``sequential``), else ``sequential``.

A component may run and wait on devices of its own (``devices`` by role, e.g. ComfyUI keeps the text encoder on the
CPU under ``--lowvram`` and the VAE's offload device on the GPU under ``--gpu-only``): :meth:`Placement.device_of`
and :meth:`Placement.offload_device_of` say where; a component that runs on the CPU beside an accelerator does not
stream. Nothing reads a device off a module's parameters: the execution device is :attr:`Placement.device`
(:meth:`Placement.device_of` for a component), and the inputs of a stage go there. A host with a model manager
(ComfyUI, through ``nodes/host.py``) plugs in as a :class:`ModelManager`: it then does the moves, so it can count the
memory, evict other models to make room and evict ours when another model needs the memory.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Iterator, Protocol, Sequence

import torch

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "none", "model", "sequential", "block")
STREAMED_MODES = ("sequential", "block")  # modes whose base components stream their weights
PLACEMENT_KEY = "_mmv_placement"  # a transformer's placement, kept on it (patches applied outside a sampler find it)
GIB = 2**30
# Room kept free beyond the weights and activation estimates when ``auto`` decides: the allocator's slack plus the
# largest patch adapter a run may add (MagicMirror: 746M parameters, 1.39 GiB in bf16).
AUTO_HEADROOM = int(2.0 * GIB)


class ModelManager(Protocol):
    """A host's memory manager (ComfyUI's ``comfy.model_management``, wrapped in ``nodes/host.py``)."""

    def load(self, modules: Sequence[torch.nn.Module], placement: "Placement", memory_required: int) -> None:
        """Bring ``modules`` to their execution devices (:meth:`Placement.device_of`), evicting other models as
        needed, with ``memory_required`` bytes left free beside them (the stage's activations and what its streamed
        components hold)."""

    def unload(self, modules: Sequence[torch.nn.Module]) -> None:
        """Give ``modules`` back to the offload device and forget them."""

    def free(self, memory_required: int, device: torch.device, keep: Sequence[torch.nn.Module] = ()) -> None:
        """Make ``memory_required`` bytes free on ``device`` (for a stage whose weights stream) without evicting
        ``keep`` (the modules of the stages running now)."""

    def empty_cache(self) -> None:
        """Return cached, unused memory to the device (between stages)."""

    def available(self, device: torch.device) -> int | None:
        """Bytes this pack's models may use on ``device`` (free memory plus what the host can evict)."""

    def capacity(self, device: torch.device) -> int | None:
        """Bytes a stage could use on ``device`` once the host evicted all it can (free plus evictable), whatever
        its loading policy; None for a device without separate memory (optional: ``available`` stands in)."""

    def loads_whole(self, device: torch.device) -> bool:
        """Whether the host brings a model onto ``device`` only whole; False when it loads what fits and runs the rest
        layer by layer (optional: True when absent)."""


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (each tensor once; works on the meta device)."""
    if module is None:
        return 0
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def largest_leaf_bytes(module: torch.nn.Module) -> int:
    """Bytes of the largest leaf module's own tensors: what a leaf-level stream holds at a time."""
    return max((module_bytes(m) for m in module.modules() if not list(m.children())), default=0)


def largest_block_bytes(module: torch.nn.Module) -> int:
    """Bytes a block-level stream holds at a time: the largest block of the module's own ``ModuleList`` /
    ``Sequential`` children (what diffusers' block-level group offloading streams; lists nested inside a block, such
    as ``attn1.to_out``, are part of their block) plus every tensor outside them (embeddings, output layers: diffusers
    keeps them on the device for a whole forward)."""
    blocks = [b for m in module.children() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) for b in m]
    return max((module_bytes(b) for b in blocks), default=0) + module_bytes(module) - sum(module_bytes(b)
                                                                                             for b in blocks)


def streamed_bytes(module: torch.nn.Module, level: str) -> int:
    """Bytes a streamed module holds on the device while it runs: two leaves (``"leaf"``/``"sequential"``: the
    running one and the prefetched one) or, at ``"block"`` level, two of its blocks and every tensor outside them."""
    if level != "block":
        return 2 * largest_leaf_bytes(module)
    blocks = [b for m in module.children() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) for b in m]
    return largest_block_bytes(module) + max((module_bytes(b) for b in blocks), default=0)


def trainable(module: torch.nn.Module) -> bool:
    """Whether some parameter of ``module`` requires grad (an optimizer's, not the placement's to move)."""
    return any(p.requires_grad for p in module.parameters())


def choose_offload(available: int | None, weights: dict, stage_activations: dict, *, streamed: dict | None = None,
                   none_activations: int | None = None, headroom: int = AUTO_HEADROOM) -> tuple[str, str]:
    """Pick the offload mode the way ComfyUI picks full / partial loading, from byte counts.

    ``available``: bytes free for the model on the execution device (None: no accelerator memory to manage, e.g.
    the CPU). ``weights``: bytes per component that runs on that device, e.g. ``{"transformer": ..., "vae": ...}``.
    ``stage_activations``: ``{component: activation bytes of the stage that runs it}``. ``streamed``: ``{"block":
    {component: bytes it holds while streaming}}`` (the components ``block`` mode streams; the others move whole).
    ``none_activations``: the largest activations a stage may need while every component stays resident (e.g. an
    untiled decode; default: the largest of ``stage_activations``). Returns ``(mode, reason)``:

    * ``none`` when all the weights, ``none_activations`` and ``headroom`` fit;
    * ``model`` when the largest single stage (its weights + activations) and ``headroom`` fit;
    * ``block`` when the largest stage with the streamed components' share fits (given ``streamed["block"]``);
    * ``sequential`` otherwise (weights stream leaf by leaf; only activations and two leaves need the device).
    """
    if available is None:
        return "none", "the execution device has no separate memory to manage"
    total = sum(weights.values())
    act = max(stage_activations.values(), default=0) if none_activations is None else none_activations
    stage = max((weights[k] + stage_activations.get(k, 0) for k in weights), default=0)
    gib = {"available": available / GIB, "all": (total + act + headroom) / GIB, "stage": (stage + headroom) / GIB}
    if total + act + headroom <= available:
        return "none", "all components fit: {all:.1f} GiB needed, {available:.1f} GiB available".format(**gib)
    if stage + headroom <= available:
        return "model", ("the largest stage fits ({stage:.1f} GiB) but not all components at once ({all:.1f} GiB); "
                         "{available:.1f} GiB available").format(**gib)
    held = (streamed or {}).get("block")
    if held is not None:
        block = max((held.get(k, weights[k]) + stage_activations.get(k, 0) for k in weights), default=0)
        gib["block"] = (block + headroom) / GIB
        if block + headroom <= available:
            return "block", ("the largest stage alone ({stage:.1f} GiB) does not fit in {available:.1f} GiB, with the "
                             "transformer streaming block by block it does ({block:.1f} GiB)").format(**gib)
    return "sequential", ("even the largest stage alone ({stage:.1f} GiB) does not fit in {available:.1f} GiB: "
                          "weights stream").format(**gib)


def free_memory(device: torch.device, manager: ModelManager | None = None) -> int | None:
    """Bytes available for models on ``device``: the host's count, else CUDA's free memory; None on the CPU."""
    device = torch.device(device)
    if manager is not None:
        return manager.available(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def device_capacity(device: torch.device, manager: ModelManager | None = None) -> int | None:
    """Bytes a stage could get on ``device`` at most: the host's count (free plus evictable), else CUDA's free memory
    plus what torch's allocator holds unused; None on the CPU (nothing to refuse there)."""
    device = torch.device(device)
    if manager is not None:
        return getattr(manager, "capacity", manager.available)(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device)
    return None


def offload_groups(module: torch.nn.Module) -> None:
    """Put every group of diffusers' group offloading in ``module`` back on its offload device. A forward cut short
    (an interrupt, an error) skips the offloads of the groups it had onloaded (the embeddings in block mode, the group
    it prefetched with CUDA streams); the next forward would find them still on the execution device."""
    from diffusers.hooks.group_offloading import GroupOffloadingHook

    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            if isinstance(hook, GroupOffloadingHook) and hook.group.offload_leader is m:
                hook.group.offload_()


def placement_of(module: torch.nn.Module) -> "Placement | None":
    """The placement a bundle gave ``module`` (its transformer), if any."""
    return module.__dict__.get(PLACEMENT_KEY)


class Placement:
    """The execution device, the offload device and the offload mode of a set of modules (see the module doc).

    ``add`` gives a base component its home for the mode (once, at load); ``run`` brings the modules of a stage to
    the execution device for the duration of a ``with`` block. Modules never added are moved in and out by every
    ``run`` (adapters, CLIP, face encoder). ``devices``: ``{role: (execution device, offload device)}`` for the
    components added with that ``role`` (the others use ``device`` and ``offload_device``).
    """

    def __init__(self, device: torch.device | str = "cpu", offload_device: torch.device | str = "cpu",
                 mode: str = "none", manager: ModelManager | None = None, devices: dict | None = None):
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload mode must be one of {OFFLOAD_MODES[1:]} (resolve 'auto' with choose_offload), "
                             f"got {mode!r}")
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.mode, self.manager = mode, manager
        self.devices = {role: (torch.device(a), torch.device(b)) for role, (a, b) in (devices or {}).items()}
        self._homes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> "resident" | "streamed"
        self._where: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # component -> (execution, offload)
        self._held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # streamed module -> bytes it holds on
        # the device while running (:func:`streamed_bytes`)
        self._depth: dict[int, int] = {}  # id(module) -> how many enclosing runs brought it in
        self._running: dict[int, torch.nn.Module] = {}  # id(module) -> module, while a run uses it

    def __repr__(self) -> str:
        host = "" if self.manager is None else f", manager={type(self.manager).__name__}"
        return f"Placement(device={self.device}, offload_device={self.offload_device}, mode={self.mode!r}{host})"

    # ------------------------------------------------------------------ homes
    def add(self, module: torch.nn.Module | None, *, stream: bool | str = False, role: str | None = None) -> None:
        """Give a base component its home for the mode: resident on its execution device (``none``; with a manager
        it loads at first use), streamed (``sequential``/``block`` and
        ``stream``: ``"leaf"`` or ``"block"``, ``True`` = the mode's own level; not for a component a host runs on the
        CPU beside an accelerator), or on its offload device. ``role``: the key of its devices in ``devices``."""
        if module is None or module in self._homes:
            return
        device, offload_device = self.devices.get(role, (self.device, self.offload_device))
        self._where[module] = (device, offload_device)
        if self.mode in STREAMED_MODES and stream and not (device.type == "cpu" != self.device.type):
            self._stream(module, stream if isinstance(stream, str) else self.mode)
        elif self.mode == "none":
            self._homes[module] = "resident"
            self._move([module], onload=self.manager is None)
        else:
            self._homes[module] = "offloaded"
            self._move([module], onload=False)

    def offload(self, module: torch.nn.Module) -> None:
        """Keep a component on the offload device between stages from now on (e.g. a T5 a trainer no longer needs
        resident); stages still bring it in and take it back."""
        if self.home(module) == "streamed":
            raise ValueError("a streamed module already waits on the offload device")
        self._homes[module] = "offloaded"
        self._move([module], onload=False)

    def home(self, module: torch.nn.Module) -> str:
        """``"resident"``, ``"streamed"`` or ``"offloaded"`` (moved in for each stage)."""
        return self._homes.get(module, "offloaded")

    def device_of(self, module: torch.nn.Module | None) -> torch.device:
        """Where ``module`` runs: its role's execution device, else :attr:`device`."""
        return self._where.get(module, (self.device,))[0] if module is not None else self.device

    def offload_device_of(self, module: torch.nn.Module | None) -> torch.device:
        """Where ``module`` waits between its stages (the CPU for a streamed one)."""
        return self._where.get(module, (None, self.offload_device))[1] if module is not None else self.offload_device

    def _stream(self, module: torch.nn.Module, level: str = "sequential") -> None:
        """diffusers' group offloading: at leaf level (``sequential``/``"leaf"``) each leaf's weights come to the
        execution device when it runs and go back after it; at block level (``"block"``) each block of the module's
        ``ModuleList`` does (one block per group), the rest for the module's whole forward. With CUDA streams the next
        leaf / block is prefetched while the current one runs, its CPU weights pinned on the fly
        (``low_cpu_mem_usage``: no page-locked copy of the whole module). The weights wait on the CPU whatever the
        component's offload device (streaming from the GPU to the GPU would save nothing)."""
        from diffusers.hooks import apply_group_offloading

        device = self.device_of(module)
        self._where[module] = (device, torch.device("cpu"))
        self._move([module], onload=False)
        streams = device.type == "cuda" and torch.cuda.is_available()
        block = level == "block"
        apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level" if block else "leaf_level",
                               num_blocks_per_group=1 if block else None, use_stream=streams,
                               record_stream=streams, non_blocking=streams, low_cpu_mem_usage=True)
        self._homes[module] = "streamed"
        self._held[module] = streamed_bytes(module, level)

    def streamed_bytes(self, modules: Sequence[torch.nn.Module]) -> int:
        """What the streamed ones of ``modules`` hold on the device while running (:func:`streamed_bytes`)."""
        return max((self._held.get(m, 0) for m in modules if self.home(m) == "streamed"), default=0)

    def _move(self, modules: Sequence[torch.nn.Module], onload: bool) -> None:
        """The one place that moves whole modules (to their execution device, or back to their offload device)."""
        for module in modules:
            module.to(self.device_of(module) if onload else self.offload_device_of(module))

    # ------------------------------------------------------------------ stages
    def memory_for(self, *modules: torch.nn.Module | None) -> tuple[int, int] | None:
        """``(capacity, weights)`` of a stage that runs ``modules``: the most the execution device can give it
        (:func:`device_capacity`) and how much of that its weights take: whole modules brought in, the two streamed
        units of a streamed one (:func:`streamed_bytes`); without a host manager, modules already on the device take
        nothing more; a host manager that loads part of a model and runs the rest layer by layer (ComfyUI without
        ``--highvram``) needs none of them whole. What is left is the room for its activations. ``modules[0]`` names
        the device (their execution device). None on a device without separate memory (the CPU)."""
        modules = [m for m in {id(m): m for m in modules if m is not None}.values()]
        device = self.device_of(modules[0]) if modules else self.device
        capacity = device_capacity(device, self.manager)
        if capacity is None:
            return None
        partial = self.manager is not None and not getattr(self.manager, "loads_whole", lambda d: True)(device)
        weights = 0
        for m in modules:
            home = self.home(m)
            if home == "streamed":
                weights += self._held.get(m, 0)
            elif (m not in self._homes and trainable(m)) or partial:
                continue  # training code placed it on the device already / core loads what fits
            elif self.manager is not None or (home == "offloaded" and not self._depth.get(id(m))):
                weights += module_bytes(m)
        return capacity, weights

    @contextlib.contextmanager
    def run(self, *modules: torch.nn.Module | None, memory_required: int = 0) -> Iterator[None]:
        """Have ``modules`` usable on their execution devices for the block.

        Offloaded modules are moved in and moved back afterwards — on exit, on errors and on interrupts alike;
        resident ones stay, streamed ones bring their leaves themselves. ``memory_required``: the stage's activation
        estimate (:mod:`.memory`), which a host manager frees room for, together with what the stage's streamed
        components hold (their running and prefetched units), without evicting the modules of running stages.
        Nested runs of a module move it once. Modules that are not components (:meth:`add`) and have trainable
        parameters are brought in but never taken back: training code places them (an optimizer holds their
        parameters).
        """
        unique = list({id(m): m for m in modules if m is not None}.values())
        whole = [m for m in unique if self.home(m) != "streamed"]
        streamed = [m for m in unique if self.home(m) == "streamed"]
        entering = [m for m in whole if not self._depth.get(id(m))]
        incoming = [m for m in entering if self.home(m) == "offloaded"]
        brought = [m for m in incoming if m in self._homes or not trainable(m)]  # and taken back after the block
        for m in unique:
            self._depth[id(m)] = self._depth.get(id(m), 0) + 1
            self._running[id(m)] = m
        try:
            if self.manager is not None:
                need = memory_required + self.streamed_bytes(streamed)
                if entering:
                    self.manager.load(entering, self, need)
                elif streamed:
                    self.manager.free(need, self.device_of(streamed[0]), keep=list(self._running.values()))
            else:
                self._move(incoming, onload=True)
            yield
        except BaseException:
            for m in streamed:
                offload_groups(m)
            raise
        finally:
            for m in unique:
                self._depth[id(m)] -= 1
                if not self._depth[id(m)]:
                    del self._depth[id(m)], self._running[id(m)]
            if self.manager is not None:
                self.manager.unload(brought)
                self.manager.empty_cache()
            else:
                self._move(brought[::-1], onload=False)
