"""``python -m training.<tool>`` in the pack's root folder, the form the design card names.

There, Python imports this folder as the top-level package ``training``, under which the tools'
relative imports (``from ..models import ...``) cannot resolve. :func:`install` puts a finder on
``sys.meta_path`` that serves every ``training.<tool>`` from the installed package
``magicmirror_video.training.<tool>``: ``-m`` runs the tool's code as the installed module would
run it, and a plain ``import training.<tool>`` returns the installed module itself, so every module
exists once. The pack must be installed (``pip install -e .``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

PACKAGE = "magicmirror_video"


class _InstalledToolFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if not name.startswith("training."):
            return None
        try:
            real = importlib.util.find_spec(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"{name} needs the pack installed as the package {PACKAGE!r}: run `pip install -e .` in the pack's "
                f"root folder (or `pip install .[train]`), then `python -m {PACKAGE}.{name}` works from any "
                "folder.") from e
        if real is None:
            return None
        # The spec carries the installed name (so a run's relative imports resolve inside the package)
        # and this loader, which answers runpy's get_code for the `training.*` name it asks with.
        return importlib.util.spec_from_loader(real.name, self, origin=real.origin,
                                               is_package=real.submodule_search_locations is not None)

    def create_module(self, spec):
        return importlib.import_module(spec.name)  # the installed module itself

    def exec_module(self, module):
        pass  # already executed by its import

    def get_code(self, name):
        real = importlib.util.find_spec(f"{PACKAGE}.{name}")
        return real.loader.get_code(real.name)


def install() -> None:
    if not any(isinstance(f, _InstalledToolFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstalledToolFinder())
