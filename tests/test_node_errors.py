"""The pack's errors as ComfyUI reports them: ``exception_type`` is the class name alone (no module path with the
pack's folder in it) and ``exception_message`` the sentence, for a pack loaded the way ComfyUI loads custom nodes
(under its folder path). The real server's answer is checked in tests/test_host_workflows.py."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent



def comfy_type_name(klass: type) -> str:
    """ComfyUI's execution.full_type_name, written out: the type name of a node's exception in /history and the UI."""
    return klass.__qualname__ if klass.__module__ == "builtins" else klass.__module__ + "." + klass.__qualname__


LOAD_AS_COMFYUI = """{type_name}
import importlib.util, json, os, sys
folder = sys.argv[1]
name = folder.replace(".", "_x_")  # what ComfyUI's load_custom_node names a pack folder
spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
node = pack.NODE_CLASS_MAPPINGS["MMV_CogVideoXSpeed"]()
try:
    node.apply(None, "pyramid_attention_broadcast", -1.0, -1, 10, 5, False, "native")
except Exception as e:
    own = type(e).__mro__[1]
    print(json.dumps({"exception_type": comfy_type_name(type(e)), "exception_message": str(e),
                      "own_class": comfy_type_name(own), "is_value_error": isinstance(e, ValueError)}))
""".replace("{type_name}", inspect.getsource(comfy_type_name))


def test_a_node_error_reads_without_module_path_when_loaded_as_comfyui_loads_it(tmp_path):
    folder = tmp_path / "custom_nodes" / "ComfyUI-MagicMirror-Video"
    folder.parent.mkdir()
    folder.symlink_to(ROOT, target_is_directory=True)
    out = subprocess.run([sys.executable, "-c", LOAD_AS_COMFYUI, str(folder)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # what ComfyUI showed before: the class's module is the folder path
    assert seen["own_class"] == str(folder).replace(".", "_x_") + ".models.speed.SpeedSettingError"
    assert seen["exception_type"] == "SpeedSettingError" and seen["is_value_error"]
    assert seen["exception_message"] == (
        "pyramid_attention_broadcast: start_step 10 and end_step 5 leave no step to cache (the steps start_step <= i < "
        "end_step reuse it); set end_step above start_step, or -1 for the last step.")


def test_plain_errors_keep_the_exception_and_leave_foreign_ones_alone():
    """Only the pack's classes are renamed; the exception is the same object (message, attributes, cause) and still
    an instance of the pack's class; exceptions of other packages pass unchanged (ComfyUI's interrupt among them)."""
    from magicmirror_video.models.sampler import SamplingInputError
    from magicmirror_video.nodes.errors import plain_errors

    type_name = comfy_type_name
    cause = KeyError("inner")
    raised = SamplingInputError("num_frames=10 is not of the form 4k+1 (the VAE compresses time by 4); use 9 or 13.")
    raised.detail = 7

    def fails(error):
        if error is raised:
            raise error from cause
        raise error

    with pytest.raises(SamplingInputError) as info:
        plain_errors(fails)(raised)
    assert info.value is raised and raised.detail == 7 and raised.__cause__ is cause
    assert type_name(type(info.value)) == "SamplingInputError"
    assert str(info.value) == "num_frames=10 is not of the form 4k+1 (the VAE compresses time by 4); use 9 or 13."
    assert type_name(SamplingInputError) == "magicmirror_video.models.sampler.SamplingInputError"

    class InterruptProcessingException(Exception):  # (as comfy.model_management defines it)
        pass

    for foreign in (InterruptProcessingException(), RuntimeError("CUDA out of memory"), FileNotFoundError("x")):
        with pytest.raises(type(foreign)) as info:
            plain_errors(fails)(foreign)
        assert type(info.value) is type(foreign)


def test_every_node_function_is_wrapped():
    from magicmirror_video import NODE_CLASS_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert getattr(getattr(cls, cls.FUNCTION), "_plain_errors", False), name
