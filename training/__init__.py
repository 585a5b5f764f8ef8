"""Headless trainers and data tools for every adapter the MagicMirror Video nodes load.

Installed (``pip install .[train]``) they run from any folder, as console commands
(``magicmirror-train-magicmirror ...``) or ``python -m magicmirror_video.training.<tool>``. In the
pack's root folder ``python -m training.<tool>`` works too (see :mod:`._root_alias`).
"""

if __name__ == "training":  # imported as a top-level package: `python -m training.<tool>` in the pack root
    from ._root_alias import install as _install

    _install()
