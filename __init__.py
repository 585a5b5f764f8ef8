"""MagicMirror Video: identity- and subject-preserving video generation on CogVideoX for ComfyUI.

The repository root is the import package ``magicmirror_video`` (``pip install .``), with the
subpackages ``models`` (pure torch + diffusers), ``nodes`` (ComfyUI), ``training`` (headless
trainers) and ``testing`` (tiny random models for tests and demos). ComfyUI loads this file from
``custom_nodes/<any folder name>/`` and reads ``NODE_CLASS_MAPPINGS``; the node classes are imported
only then, so ``import magicmirror_video.models`` never pulls in the nodes. Every import of the pack first checks
the installed torch, diffusers, transformers and accelerate against the minimums of ``versions.py``.
"""

from .versions import check_versions

check_versions()  # one line naming each package older than the pack needs (versions.py), before anything uses it

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name):
    if name in __all__:
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
