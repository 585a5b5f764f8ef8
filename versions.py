"""The oldest releases of torch, diffusers, transformers and accelerate the pack runs on, checked once at import.

pyproject.toml and requirements.txt declare the same minimums (tests/test_packaging.py keeps them equal). Why each:

* diffusers 0.41.0 — the newest diffusers features the pack uses came earlier: MagCache (``MagCacheConfig``) in
  0.37.0, TaylorSeer in 0.36.0, the attention dispatcher (``dispatch_attention_fn``), ``FirstBlockCacheConfig``,
  ``compile_repeated_blocks``, ``cache_context`` and Wan 2.2's pipelines (``boundary_ratio``, ``expand_timesteps``)
  in 0.35.0, group offloading with streams and ``low_cpu_mem_usage`` and layerwise casting in 0.33.0. But up to 0.40
  group offloading fails on a machine without an accelerator (``torch.accelerator.current_accelerator()`` is None
  there), which the ``sequential`` and ``block`` offload modes use; 0.41.0 is the first release that runs them on the
  CPU.
* torch 2.6 — what diffusers 0.41 itself declares (``torch>=2.6``); the pack needs nothing newer.
* transformers 4.56.0 — the loaders pass ``dtype=`` to ``from_pretrained`` (T5, UMT5, CLIP vision), which older
  releases took for a config attribute and ignored (the encoders then loaded in float32).
* accelerate 1.0.0 — ``Accelerator(project_config=..., kwargs_handlers=...)``, ``PartialState``, ``gather_object``,
  ``init_empty_weights`` and the FSDP configs in training/accelerate_configs/ (the trainers' tests pass on it).
"""

from __future__ import annotations

import re
from importlib import metadata

PACK_NAME = "MagicMirror Video"
MINIMUM_VERSIONS = {"torch": "2.6", "diffusers": "0.41.0", "transformers": "4.56.0", "accelerate": "1.0.0"}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.13.0+cpu"`` -> (2, 13, 0), ``"0.41.0.dev0"`` -> (0, 41, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def version_problem(package: str, needed: str, installed: str | None) -> str | None:
    """One line saying that ``installed`` (None: not installed) is older than ``needed``, with the pip command; None
    when it is not."""
    if installed is not None:
        have, need = release(installed), release(needed)
        width = max(len(have), len(need))
        if have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need)):
            return None
    found = "not installed" if installed is None else f"found {installed}"
    how = (f"install torch>={needed} built for your GPU (the install command pytorch.org gives for it)"
           if package == "torch" else f"pip install -U '{package}>={needed}'")
    return f"{PACK_NAME} needs {package}>={needed} ({found}): {how}"


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise ImportError with one line per package older than :data:`MINIMUM_VERSIONS` (the first line names it)."""
    problems = [line for package, needed in MINIMUM_VERSIONS.items()
                if (line := version_problem(package, needed, installed_version(package)))]
    if problems:
        raise ImportError("\n".join(problems))
