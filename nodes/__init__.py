"""ComfyUI node classes. Thin: parse inputs, call ``models/``, return outputs."""

from . import cogvideox, dualreal, errors, host, magicmirror, metrics, subject

NODE_CLASS_MAPPINGS = {**cogvideox.NODE_CLASS_MAPPINGS, **magicmirror.NODE_CLASS_MAPPINGS, **subject.NODE_CLASS_MAPPINGS,
                       **dualreal.NODE_CLASS_MAPPINGS, **metrics.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**cogvideox.NODE_DISPLAY_NAME_MAPPINGS, **magicmirror.NODE_DISPLAY_NAME_MAPPINGS,
                              **subject.NODE_DISPLAY_NAME_MAPPINGS, **dualreal.NODE_DISPLAY_NAME_MAPPINGS,
                              **metrics.NODE_DISPLAY_NAME_MAPPINGS}

errors.plain_node_errors(NODE_CLASS_MAPPINGS.values())  # the pack's errors without module paths in ComfyUI
host.register_model_folders()
