"""ComfyUI node classes. Thin: parse inputs, call ``models/``, return outputs."""

from . import cogvideox, dualreal, host, magicmirror, metrics, subject

NODE_CLASS_MAPPINGS = {**cogvideox.NODE_CLASS_MAPPINGS, **magicmirror.NODE_CLASS_MAPPINGS, **subject.NODE_CLASS_MAPPINGS,
                       **dualreal.NODE_CLASS_MAPPINGS, **metrics.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**cogvideox.NODE_DISPLAY_NAME_MAPPINGS, **magicmirror.NODE_DISPLAY_NAME_MAPPINGS,
                              **subject.NODE_DISPLAY_NAME_MAPPINGS, **dualreal.NODE_DISPLAY_NAME_MAPPINGS,
                              **metrics.NODE_DISPLAY_NAME_MAPPINGS}

host.register_model_folders()
