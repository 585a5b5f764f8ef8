"""The few ComfyUI services the nodes use, imported lazily.

Inside ComfyUI these are ``folder_paths``, ``comfy.utils.ProgressBar`` and
``comfy.model_management``. Outside it (unit tests, ``make demo``) the same calls work
headless: model folders come from ``$MAGICMIRROR_MODELS_DIR`` (default ``./models``),
progress is a no-op and the device is the CPU (or CUDA when available).
"""

from __future__ import annotations

import os

import torch

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
