"""The few ComfyUI services the nodes use, imported lazily.

Inside ComfyUI these are ``folder_paths``, ``comfy.utils.ProgressBar``,
``comfy.model_management`` (devices per kind of model under the launch flags, interrupts, and the
model manager every placement reports to) and core's CLIP objects (a T5-XXL from
``models/text_encoders/`` encoding prompts).
Outside it (unit tests, ``make demo``) the same calls work headless: model folders come from
``$MAGICMIRROR_MODELS_DIR`` (default ``./models``), progress is a no-op, the device is the CPU
(or CUDA when available) and placements move modules themselves.
"""

from __future__ import annotations

import logging
import os

import torch

from ..models.cogvideox import TextEmbedCache
from ..models.placement import Placement, module_bytes
from ..models.text import PromptEncoder

logger = logging.getLogger(__name__)

# Our model folder names -> default sub-folder of ComfyUI's models/ directory.
MODEL_FOLDERS = {
    "CogVideo": "CogVideo",
    "diffusion_models": "diffusion_models",
    "loras": "loras",
    "insightface": "insightface",
    "photomaker": "photomaker",
    "clip_vision": "clip_vision",
    "magicmirror": "magicmirror",
    "dualreal": "dualreal",
    "metrics": "metrics",  # optional evaluation models: CurricularFace, Inception, RAFT, CLIP and DINO folders
}
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".bin", ".pth", ".pt", ".ckpt")


def _folder_paths():
    try:
        import folder_paths  # ComfyUI's module; absent outside ComfyUI
    except ImportError:
        return None
    return folder_paths


def register_model_folders() -> None:
    """Make ComfyUI aware of our model folders (idempotent; runs at pack import)."""
    fp = _folder_paths()
    if fp is None:
        return
    for kind, sub in MODEL_FOLDERS.items():
        path = os.path.join(fp.models_dir, sub)
        if kind not in fp.folder_names_and_paths or path not in fp.get_folder_paths(kind):
            fp.add_model_folder_path(kind, path)
        exts = fp.folder_names_and_paths[kind][1]
        if isinstance(exts, set):
            exts.update(WEIGHT_EXTENSIONS)


def model_roots(kind: str) -> list[str]:
    """Every folder searched for models of ``kind`` (e.g. ``CogVideo``), in priority order."""
    fp = _folder_paths()
    if fp is not None:
        return list(fp.get_folder_paths(kind))
    base = os.environ.get("MAGICMIRROR_MODELS_DIR", os.path.join(os.getcwd(), "models"))
    return [os.path.join(base, MODEL_FOLDERS.get(kind, kind))]


def list_model_folders(kind: str, marker: str | None = None) -> list[str]:
    """Sub-folders of the ``kind`` roots (optionally only those containing ``marker``)."""
    names = set()
    for root in model_roots(kind):
        if os.path.isdir(root):
            for n in os.listdir(root):
                if os.path.isdir(os.path.join(root, n)) and (marker is None or os.path.exists(os.path.join(root, n, marker))):
                    names.add(n)
    return sorted(names)


def list_model_files(kind: str) -> list[str]:
    """Weight files under the ``kind`` roots, as relative paths (ComfyUI's file lists)."""
    fp = _folder_paths()
    if fp is not None:
        return [f for f in fp.get_filename_list(kind) if f.endswith(WEIGHT_EXTENSIONS)]
    files = set()
    for root in model_roots(kind):
        for dirpath, _, filenames in os.walk(root, followlinks=True):
            for f in filenames:
                if f.endswith(WEIGHT_EXTENSIONS):
                    files.add(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(files)


def resolve_model_file(kind: str, name: str) -> str:
    """Absolute path of ``name`` in the ``kind`` folders; the error lists every path searched."""
    from ..models.cogvideox import find_model_file

    return find_model_file(name, model_roots(kind), what=f"{kind} file")


def torch_device() -> torch.device:
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return mm.get_torch_device()


def offload_device() -> torch.device:
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu")
    return mm.unet_offload_device()


def device_total_memory() -> int | None:
    """Bytes of the execution device's memory in all (ComfyUI's count, else CUDA's); None on the CPU or MPS."""
    device = torch_device()
    if device.type in ("cpu", "mps"):
        return None
    mm = _model_management()
    if mm is not None:
        return mm.get_total_memory(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def component_devices() -> dict:
    """``{role: (execution device, offload device)}`` as ComfyUI core places its own models of that kind under the
    launch flags (``text_encoder_device()``, ``vae_device()`` and their offload devices): the CogVideoX text encoder
    and VAE, and ``clip_vision`` for the image encoders (core's CLIP vision uses the text encoder's devices). Empty
    headless (everything on :func:`torch_device`)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return {}
    text = (mm.text_encoder_device(), mm.text_encoder_offload_device())
    return {"text_encoder": text, "clip_vision": text, "vae": (mm.vae_device(), mm.vae_offload_device())}


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op headless)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class ProgressBar:
    """ComfyUI's progress bar when running inside ComfyUI, else a no-op with the same API."""

    def __init__(self, total: int):
        try:
            import comfy.utils
        except ImportError:
            self._bar = None
        else:
            self._bar = comfy.utils.ProgressBar(total)
        self.total = total

    def update_absolute(self, value: int, total: int | None = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, total)


# ----------------------------------------------------------------------------- ComfyUI's model manager

_PATCHER_KEY = "_mmv_model_patcher"  # a module's ModelPatcher, kept on the module (dies with it)
_HOLDERS: dict = {}


def _model_management():
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm


def _holder(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` inside a plain ``nn.Module`` named after it: ComfyUI's ModelPatcher writes attributes such as
    ``device`` on its model, which diffusers and transformers models define as read-only properties."""
    name = f"MMV_{type(module).__name__}"  # what ComfyUI's log and its list of loaded models show
    if name not in _HOLDERS:
        _HOLDERS[name] = type(name, (torch.nn.Module,), {"__doc__": f"A {type(module).__name__} of MagicMirror Video."})
    holder = _HOLDERS[name]()
    holder.module = module
    return holder


_CAST_TO = "_mmv_cast_to"  # where a module's own tensors go for its forward when core left them elsewhere
_CAST_SAVED = "_mmv_cast_saved"  # [forwards running, the tensors they replaced] while copies are in place


def _cast_in(module, args):
    saved = module.__dict__.get(_CAST_SAVED)
    if saved is not None:  # a forward of the module inside its own forward: the copies are there already
        saved[0] += 1
        return
    device, moved = module.__dict__[_CAST_TO], []
    for tensors in (module._parameters, module._buffers):
        for name, t in tensors.items():
            if t is not None and t.device != device:
                moved.append((tensors, name, t))
                copy = t.to(device, non_blocking=True)
                tensors[name] = torch.nn.Parameter(copy, t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                    else copy
    if moved:  # (nothing is written when the module is loaded: its forward stays free of side effects)
        module.__dict__[_CAST_SAVED] = [1, moved]


def _cast_out(module, args, output):
    saved = module.__dict__.get(_CAST_SAVED)
    if saved is not None:
        saved[0] -= 1
        if not saved[0]:
            del module.__dict__[_CAST_SAVED]
            for tensors, name, t in saved[1]:
                tensors[name] = t


def castable(module: torch.nn.Module, device: torch.device) -> None:
    """Let ComfyUI load ``module`` partly and unload part of it, as it does its own models (``--lowvram``,
    ``--novram``, a card too small for the model, another model needing the room): every submodule with tensors of
    its own brings copies of those that are not on ``device`` there for its forward and drops them after it — what
    core's own layers (``comfy.ops``) do with their weights. Submodules whose parameters are all their own get core's
    ``comfy_cast_weights`` flag, so its partial loading counts them as it counts its own layers."""
    for m in module.modules():
        if not m._parameters and not m._buffers:
            continue
        if _CAST_TO not in m.__dict__:
            m.register_forward_pre_hook(_cast_in, prepend=True)
            m.register_forward_hook(_cast_out, always_call=True)
            if m._parameters and not any(c._parameters for c in m.modules() if c is not m):
                m.comfy_cast_weights = False
        m.__dict__[_CAST_TO] = torch.device(device)


class ComfyModelManager:
    """``comfy.model_management`` as the placements' model manager (:class:`~..models.placement.ModelManager`).

    Each module a stage needs becomes a ``comfy.model_patcher.ModelPatcher`` (load and offload devices from its
    placement) loaded with ``load_models_gpu`` (the transformer together with the run's adapters, with the stage's
    activation estimate and what its streamed components hold): ComfyUI counts its memory, evicts other models to
    make room, evicts ours when another model needs the memory, and "Unload models" / ``POST /free`` unloads them.
    Core decides how much of each module it loads, as for its own models: whole when it fits, partly under
    ``--lowvram`` or on a card too small, nothing under ``--novram`` — the modules are :func:`castable`, so what core
    leaves on the offload device (or takes back to make room) comes in for each forward. Freeing room for a streamed
    stage keeps the modules of the running stages loaded.
    """

    @staticmethod
    def patcher(module: torch.nn.Module, placement: Placement):
        device, offload = placement.device_of(module), placement.offload_device_of(module)
        patcher = module.__dict__.get(_PATCHER_KEY)
        if patcher is None or (patcher.load_device, patcher.offload_device) != (device, offload):
            import comfy.model_patcher

            patcher = comfy.model_patcher.ModelPatcher(_holder(module), load_device=device, offload_device=offload,
                                                       size=module_bytes(module))
            module.__dict__[_PATCHER_KEY] = patcher
        castable(module, device)
        return patcher

    def load(self, modules, placement, memory_required):
        _model_management().load_models_gpu([self.patcher(m, placement) for m in modules],
                                            memory_required=memory_required)

    def unload(self, modules):
        mm = _model_management()
        patchers = [m.__dict__.get(_PATCHER_KEY) for m in modules]
        for i in reversed(range(len(mm.current_loaded_models))):
            loaded = mm.current_loaded_models[i]
            if any(loaded.model is p for p in patchers if p is not None):
                loaded.model_unload()
                mm.current_loaded_models.pop(i)

    def free(self, memory_required, device, keep=()):
        mm = _model_management()
        patchers = [m.__dict__.get(_PATCHER_KEY) for m in keep]
        kept = [lm for lm in mm.current_loaded_models if any(lm.model is p for p in patchers if p is not None)]
        mm.free_memory(memory_required, device, keep_loaded=kept)

    def empty_cache(self):
        _model_management().soft_empty_cache()

    def available(self, device):
        mm = _model_management()
        if mm.vram_state == mm.VRAMState.NO_VRAM and not mm.is_device_cpu(device):
            return 0
        return self.capacity(device)

    def loads_whole(self, device) -> bool:
        """Whether core brings a model onto ``device`` only whole (``--highvram`` / ``--gpu-only``); otherwise it
        loads what fits and runs the rest layer by layer from the offload device."""
        mm = _model_management()
        return mm.vram_state in (mm.VRAMState.HIGH_VRAM, mm.VRAMState.SHARED)

    def capacity(self, device):
        """Free plus evictable memory on ``device`` whatever the loading policy (under --novram activations still
        run there); None on the CPU."""
        mm = _model_management()
        if mm.is_device_cpu(device):
            return None
        evictable = sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == device)
        return mm.get_free_memory(device) + evictable


def model_manager() -> ComfyModelManager | None:
    """ComfyUI's model manager inside ComfyUI; None headless (placements then move modules themselves)."""
    return ComfyModelManager() if _model_management() is not None else None


def placement(mode: str = "model", role: str = "clip_vision") -> Placement:
    """A placement for a model outside a CogVideoX bundle (face encoder, CLIP vision) on the devices ComfyUI gives
    models of that ``role`` (:func:`component_devices`; the CLIP vision's by default, headless the torch device): by
    default it waits on the offload device and comes in for each use."""
    device, offload = component_devices().get(role, (torch_device(), offload_device()))
    return Placement(device, offload, mode, model_manager())


# ----------------------------------------------------------------------------- T5 from a ComfyUI CLIP

T5_V1_1_VOCAB = 32100  # google/t5-v1_1-xxl's tokenizer (CogVideoX's)


def clip_t5_part(clip) -> tuple[str, object]:
    """(key in the CLIP's tokens, its Hugging Face T5 tokenizer) of a ComfyUI CLIP with a T5 encoder."""
    tokens = clip.tokenize("")
    for key in tokens:
        sub = getattr(clip.tokenizer, key, None) or getattr(clip.tokenizer, f"clip_{key}", None)
        inner = getattr(sub, "tokenizer", None)
        if inner is not None and type(inner).__name__.startswith("T5Tokenizer"):
            return key, inner
    raise ValueError(f"this CLIP ({', '.join(tokens)}) has no T5 encoder. Load t5xxl_fp16.safetensors (or "
                     "t5xxl_fp8_e4m3fn.safetensors) from models/text_encoders/ with core's Load CLIP, type sd3.")


class ClipT5(PromptEncoder):
    """The T5 of a ComfyUI CLIP as the pack's prompt encoder.

    The prompt is tokenized by CogVideoX's rule (226 tokens, padded and truncated like diffusers) with the CLIP's
    own Hugging Face T5 tokenizer — not ComfyUI's word-splitting tokenizer, whose ``(word:1.2)`` weighting would
    change the ids — and those ids run through the CLIP's T5 with weight 1 (``encode_from_tokens``, so ComfyUI
    loads the CLIP as usual). The other encoders of a multi-encoder CLIP get no tokens. Embeddings are cached on
    the CLIP object.
    """

    def __init__(self, clip):
        self.clip = clip
        self.key, self.tokenizer = clip_t5_part(clip)
        if self.tokenizer.vocab_size != T5_V1_1_VOCAB:
            logger.warning("this CLIP's T5 tokenizer has %d tokens; CogVideoX was trained with T5 v1.1's %d (use "
                           "t5xxl_fp16.safetensors, type sd3)", self.tokenizer.vocab_size, T5_V1_1_VOCAB)
        self.cache = clip.__dict__.setdefault("_mmv_text_cache", TextEmbedCache())

    def encode(self, input_ids):
        tokens = {key: [] for key in self.clip.tokenize("")}
        tokens[self.key] = [[(int(i), 1.0) for i in input_ids[0].tolist()]]
        return self.clip.encode_from_tokens(tokens).float().cpu()
