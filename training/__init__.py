"""Headless trainers for every adapter the MagicMirror Video nodes load.

Run from the pack's root folder, e.g. ``python -m training.train_magicmirror``. Importing this
package makes the pack itself importable as ``magicmirror_video`` (without running ComfyUI's
entry point), so trainers, tests, the demo and benchmarks use the exact modules the nodes use.
"""

from __future__ import annotations

import os
import sys
import types

PACK_NAME = "magicmirror_video"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def register_pack() -> types.ModuleType:
    """Register the pack root as the package ``magicmirror_video`` (idempotent)."""
    pack = sys.modules.get(PACK_NAME)
    if pack is None:
        pack = types.ModuleType(PACK_NAME)
        pack.__path__ = [PACK_ROOT]
        pack.__file__ = os.path.join(PACK_ROOT, "__init__.py")
        sys.modules[PACK_NAME] = pack
    return pack


register_pack()
