"""Pure torch + diffusers model code of MagicMirror Video.

Nothing here imports ComfyUI or the pack's ``nodes``/``training`` packages, so every
module is importable and testable on its own. Inside the pack use relative imports.
"""
