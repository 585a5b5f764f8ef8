"""The pack's errors as ComfyUI shows them: the class name and the message, without a module path.

ComfyUI reports a node's exception as ``exception_type`` (``execution.full_type_name``: the class's module and
qualified name, unless the module is ``builtins``) and ``exception_message``. ComfyUI imports a custom node pack under
its folder path, so the module of every exception class defined here would read
``/…/custom_nodes/ComfyUI-MagicMirror-Video.models.sampler``. At the node boundary an exception of a class defined in
this pack therefore leaves as an instance of a subclass of its own class that names the same class under
``builtins``: ComfyUI shows ``SamplingInputError`` and the sentence; the exception is otherwise the same object
(message, attributes, traceback, cause) and still an instance of the pack's class for Python callers.
"""

from __future__ import annotations

import functools

# the pack's root package: "magicmirror_video" when installed, the folder path under ComfyUI
PACK = __name__.rsplit(".", 2)[0]
_PLAIN: dict[type, type] = {}


def defined_in_pack(cls: type) -> bool:
    return cls.__module__ == PACK or cls.__module__.startswith(PACK + ".")


def plain_class(cls: type) -> type:
    """The subclass of ``cls`` that ComfyUI names by its class name alone (made once per class)."""
    if cls not in _PLAIN:
        _PLAIN[cls] = type(cls.__name__, (cls,), {"__module__": "builtins", "__qualname__": cls.__qualname__,
                                                  "__doc__": cls.__doc__})
    return _PLAIN[cls]


def plain_errors(function):
    """``function`` re-raising the pack's exceptions under their plain class names (see the module docstring)."""
    if getattr(function, "_plain_errors", False):
        return function

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as e:
            if defined_in_pack(type(e)):
                try:
                    e.__class__ = plain_class(type(e))
                except TypeError:  # (a class whose instance layout differs from its subclass's: raised as it is)
                    pass
            raise

    call._plain_errors = True
    return call


def plain_node_errors(node_classes) -> None:
    """Wrap each node class's ``FUNCTION`` with :func:`plain_errors` (in place; again is a no-op)."""
    for cls in node_classes:
        setattr(cls, cls.FUNCTION, plain_errors(getattr(cls, cls.FUNCTION)))
