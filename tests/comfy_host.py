"""Helpers for host tests: run this pack inside a real, local ComfyUI.

Host tests start ComfyUI as a separate process (with ComfyUI's own Python
environment), load this pack into it through a symlink in a throw-away base
directory, submit workflows over ComfyUI's HTTP API and inspect the results.
Nothing in the ComfyUI checkout is modified: custom nodes, models, input,
output, temp, user data and the database all live under a temporary folder.

The module has no test functions; it is imported by ``tests/test_host_*.py``.
Only the standard library is used, so it runs in the pack's test venv.

Typical use::

    paths = require_comfyui()  # skips the test when COMFYUI_PATH is unset
    with ComfyServer(*paths, pack_dir=PACK_DIR, model_root=models, tmp_dir=tmp) as srv:
        api = ui_to_api(json.load(open("workflows/x.json")), srv.object_info())
        entry = srv.run_prompt(api, timeout=600)
        videos = srv.output_files(entry)

Environment variables:

* ``COMFYUI_PATH``   -- a ComfyUI checkout (the folder holding ``main.py``).
* ``COMFYUI_PYTHON`` -- the Python of ComfyUI's environment
  (defaults to the interpreter running the tests).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "HOST_SKIP_REASON",
    "PACK_MODULE_NAME",
    "ComfyError",
    "PromptRejected",
    "PromptFailed",
    "ComfyServer",
    "comfyui_paths",
    "widget_names",
    "ui_to_api",
    "format_history_error",
]

HOST_SKIP_REASON = (
    "set COMFYUI_PATH=/path/to/ComfyUI (and COMFYUI_PYTHON=/path/to/ComfyUI/venv/bin/python) "
    "to run host tests"
)

# Name of the pack's folder inside custom_nodes/: what `git clone` of the repository
# gives, deliberately not a Python identifier (ComfyUI registers the pack under its
# folder path, and the pack must load from any folder name).
PACK_MODULE_NAME = "ComfyUI-MagicMirror-Video"


def comfyui_paths() -> tuple[str, str] | None:
    """Return ``(COMFYUI_PATH, COMFYUI_PYTHON)`` from the environment.

    ``None`` when ``COMFYUI_PATH`` is unset or empty (host tests should skip).
    ``COMFYUI_PYTHON`` defaults to ``sys.executable``.
    """
    comfyui_path = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfyui_path:
        return None
    python = os.environ.get("COMFYUI_PYTHON", "").strip() or sys.executable
    return comfyui_path, python


def require_comfyui() -> tuple[str, str]:
    """``comfyui_paths()``, or skip the calling test with the how-to-enable message."""
    import pytest

    paths = comfyui_paths()
    if paths is None:
        pytest.skip(HOST_SKIP_REASON)
    return paths


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class ComfyError(RuntimeError):
    """A ComfyUI request or prompt did not succeed.

    ``details`` holds the raw JSON ComfyUI answered with (or ``None``).
    """

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


class PromptRejected(ComfyError):
    """``POST /prompt`` answered 400: the prompt failed validation."""


class PromptFailed(ComfyError):
    """The prompt was queued but its execution ended in an error."""


def _format_validation_error(body: Mapping[str, Any]) -> str:
    """Render a ``POST /prompt`` 400 answer as readable text."""
    lines = []
    error = body.get("error")
    if isinstance(error, Mapping):
        msg = error.get("message", "")
        details = error.get("details", "")
        lines.append(f"{msg}: {details}" if details else str(msg))
    elif error:
        lines.append(str(error))
    for node_id, node_error in (body.get("node_errors") or {}).items():
        class_type = node_error.get("class_type", "?")
        for err in node_error.get("errors", []):
            text = err.get("message", "")
            if err.get("details"):
                text += f": {err['details']}"
            lines.append(f"node {node_id} ({class_type}): {text}")
    return "\n".join(lines) or json.dumps(body)


def format_history_error(entry: Mapping[str, Any]) -> str | None:
    """Return the error text of a failed history entry, ``None`` if it succeeded.

    ComfyUI stores execution events in ``entry["status"]["messages"]`` as
    ``[event_name, data]`` pairs; a failure is an ``execution_error`` (with
    ``exception_type``, ``exception_message`` and ``traceback``) or an
    ``execution_interrupted`` event.
    """
    status = entry.get("status") or {}
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            trace = "".join(data.get("traceback") or [])
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}"
                + (f"\n{trace}" if trace else "")
            )
        if event == "execution_interrupted":
            return f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    if status.get("status_str") == "error":
        return "execution failed: " + json.dumps(status)
    return None


# --------------------------------------------------------------------------
# The ComfyUI server
# --------------------------------------------------------------------------


def _free_port() -> int:
    """Ask the OS for a currently unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _yaml_str(value: str) -> str:
    """Quote a string for YAML (a JSON string is a valid YAML double-quoted scalar)."""
    return json.dumps(value)


class ComfyServer:
    """A ComfyUI process with this pack installed, in a throw-away base directory.

    Layout created under ``tmp_dir``::

        base/custom_nodes/<PACK_MODULE_NAME> -> pack_dir   (symlink)
        base/{input,output,temp,user}/                     (ComfyUI creates them)
        base/comfyui.db                                    (ComfyUI's sqlite DB)
        extra_model_paths.yaml                             (maps model_root)
        comfyui.log                                        (stdout + stderr)

    ``model_root`` (optional) is a folder whose subfolders are model folders
    (``CogVideo/``, ``loras/``, ``diffusion_models/`` ...). Each subfolder is
    registered under its own name through ComfyUI's extra-model-paths YAML, so
    ``folder_paths.get_filename_list("CogVideo")`` sees its files. Folder names
    ComfyUI does not know yet are created by that YAML (ComfyUI's loader calls
    ``folder_paths.add_model_folder_path`` for every key, creating unknown
    names with an empty extension filter, i.e. all files listed); a later
    ``add_model_folder_path`` call by the pack appends its own default path.
    Pass ``model_folders`` to choose the mapping ``{folder_name: relative_path}``
    explicitly instead.

    Use as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        comfyui_path: str | os.PathLike,
        python: str | os.PathLike,
        pack_dir: str | os.PathLike,
        model_root: str | os.PathLike | None,
        tmp_dir: str | os.PathLike,
        *,
        pack_name: str = PACK_MODULE_NAME,
        model_folders: Mapping[str, str] | None = None,
        startup_timeout: float = 300.0,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        require_pack_import: bool = True,
    ):
        self.comfyui_path = Path(comfyui_path).resolve()
        # Keep a venv's python path as given (resolving its symlink would leave the venv).
        self.python = str(Path(python).absolute()) if os.sep in str(python) else str(python)
        self.pack_dir = Path(pack_dir).resolve()
        self.model_root = Path(model_root).resolve() if model_root is not None else None
        self.tmp_dir = Path(tmp_dir).resolve()
        if not pack_name or os.sep in pack_name or pack_name.startswith("."):
            raise ValueError(f"pack_name must be a plain folder name, got {pack_name!r}")
        self.pack_name = pack_name
        self.model_folders = dict(model_folders) if model_folders is not None else None
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.require_pack_import = require_pack_import

        self.base_dir = self.tmp_dir / "base"
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.log_path = self.tmp_dir / "comfyui.log"
        self.yaml_path = self.tmp_dir / "extra_model_paths.yaml"
        self.port: int | None = None
        self.client_id = uuid.uuid4().hex
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._object_info: dict | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _supported_flags(self) -> set[str]:
        """The ``--flags`` this ComfyUI's ``main.py --help`` lists (fast: exits at arg parsing)."""
        proc = subprocess.run(
            [self.python, "main.py", "--help"],
            cwd=self.comfyui_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise ComfyError(
                f"`{self.python} main.py --help` failed in {self.comfyui_path}:\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", proc.stdout))

    def _write_model_paths_yaml(self) -> None:
        """Write an extra_model_paths YAML mapping ``model_root``'s subfolders."""
        if self.model_folders is not None:
            folders = self.model_folders
        else:
            folders = {p.name: p.name for p in sorted(self.model_root.iterdir()) if p.is_dir()}
        lines = [
            "# Written by tests/comfy_host.py: models for host tests.",
            "magicmirror_host_tests:",
            f"  base_path: {_yaml_str(str(self.model_root))}",
        ]
        lines += [f"  {_yaml_str(name)}: {_yaml_str(rel)}" for name, rel in folders.items()]
        self.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        """The command line that starts ComfyUI (flags checked against ``--help``)."""
        flags = self._supported_flags()
        if "--base-directory" not in flags:
            raise ComfyError(
                f"ComfyUI at {self.comfyui_path} has no --base-directory flag; "
                "host tests need a newer ComfyUI"
            )
        cmd = [
            self.python, "main.py",
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--output-directory", str(self.output_dir),
        ]
        if "--disable-auto-launch" in flags:
            cmd.append("--disable-auto-launch")
        if "--database-url" in flags:
            # The default database lives inside the ComfyUI checkout; keep it here.
            cmd += ["--database-url", f"sqlite:///{self.base_dir / 'comfyui.db'}"]
        if self.model_root is not None:
            cmd += ["--extra-model-paths-config", str(self.yaml_path)]
        return cmd + self.extra_args

    def start(self) -> None:
        """Create the base directory, start ComfyUI and wait until it answers."""
        if self._proc is not None:
            raise ComfyError("server already started")
        if not (self.comfyui_path / "main.py").is_file():
            raise ComfyError(f"no main.py in COMFYUI_PATH={self.comfyui_path}")
        if not (self.pack_dir / "__init__.py").is_file():
            raise ComfyError(f"no __init__.py in pack dir {self.pack_dir}")

        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / self.pack_name
        if not link.is_symlink():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        if self.model_root is not None:
            self._write_model_paths_yaml()

        self.port = _free_port()
        cmd = self.command()
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            # No network here: fail fast instead of waiting on hub time-outs.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            DO_NOT_TRACK="1",
        )
        # The test venv's variables must not leak into ComfyUI's interpreter.
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)
        env.update(self.env)

        self._log_file = open(self.log_path, "wb")
        self._log_file.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.comfyui_path,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group, killed as a whole in stop()
        )
        atexit.register(self.stop)  # also when the test run ends without reaching stop()
        try:
            self._wait_ready()
            if self.require_pack_import:
                self._check_pack_imported()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll ``/object_info`` until it answers; ComfyUI listens only after loading all nodes."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise ComfyError(
                    f"ComfyUI exited with code {self._proc.returncode} during start-up.\n"
                    f"--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                self._object_info = self.get_json("/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ComfyError(
                    f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f}s.\n"
                    f"--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _check_pack_imported(self) -> None:
        """Raise if ComfyUI reported the pack as failed to import (it carries on otherwise)."""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        pack_path = str(self.base_dir / "custom_nodes" / self.pack_name)
        if not any("(IMPORT FAILED)" in line and line.rstrip().endswith(pack_path) for line in lines):
            return
        # ComfyUI logs the traceback, then "Cannot import <path> module for custom nodes: <error>".
        excerpt = self.log_tail(200)
        for end, line in enumerate(lines):
            if line.startswith(f"Cannot import {pack_path} "):
                start = end
                while start > 0 and not lines[start].startswith("Traceback"):
                    start -= 1
                excerpt = "\n".join(lines[start : end + 1])
                break
        raise ComfyError(f"ComfyUI failed to import the pack {self.pack_dir}:\n{excerpt}\n(log: {self.log_path})")

    def stop(self) -> None:
        """Terminate ComfyUI's whole process group (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 80) -> str:
        """The last ``lines`` lines of ComfyUI's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP ---------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None, timeout: float = 60):
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get_json(self, path: str, timeout: float = 60) -> Any:
        """``GET path`` and decode the JSON answer."""
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> Any:
        """``POST path`` with a JSON body and decode the JSON answer."""
        return self._request("POST", path, payload, timeout=timeout)

    def object_info(self, refresh: bool = False) -> dict:
        """``GET /object_info``: every node class ComfyUI knows, with its inputs/outputs."""
        if refresh or self._object_info is None:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    # -- prompts --------------------------------------------------------------

    def submit(self, api_prompt: Mapping[str, Any], workflow: Mapping[str, Any] | None = None) -> str:
        """Queue an API-format prompt; return its ``prompt_id``.

        ``workflow`` (the UI-format JSON, optional) is passed as
        ``extra_pnginfo.workflow`` like the frontend does, so saved files embed it.
        Raises :class:`PromptRejected` when validation fails (HTTP 400).
        """
        payload: dict[str, Any] = {"prompt": api_prompt, "client_id": self.client_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        try:
            answer = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as err:
            raw = err.read().decode("utf-8", errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                raise PromptRejected(f"POST /prompt answered {err.code}: {raw}") from None
            raise PromptRejected(_format_validation_error(body), body) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt has finished; return its entry.

        On timeout the running prompt is interrupted and ``TimeoutError`` raised.
        """
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI is not running.\n--- log tail ---\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if time.monotonic() > deadline:
                self.post_json("/interrupt", {})
                raise TimeoutError(
                    f"prompt {prompt_id} did not finish within {timeout:.0f}s.\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run_prompt(
        self,
        api_prompt: Mapping[str, Any],
        timeout: float = 600,
        workflow: Mapping[str, Any] | None = None,
    ) -> dict:
        """Queue ``api_prompt``, wait for it and return its history entry.

        The entry is ``{"prompt": [...], "outputs": {node_id: {...}},
        "status": {"status_str", "completed", "messages"}, "meta": {...}}``.
        Raises :class:`PromptRejected` (validation) or :class:`PromptFailed`
        (execution error; message has node, exception and traceback).
        """
        prompt_id = self.submit(api_prompt, workflow=workflow)
        entry = self.wait(prompt_id, timeout)
        error = format_history_error(entry)
        if error is not None:
            raise PromptFailed(f"{error}\n--- log tail ---\n{self.log_tail(40)}", entry)
        return entry

    def run_prompt_expect_error(self, api_prompt: Mapping[str, Any], timeout: float = 600) -> str:
        """Run a prompt that must fail; return ComfyUI's error text.

        The text is the validation error of a 400 answer from ``/prompt``, or
        the ``execution_error`` of the history entry. Raises ``AssertionError``
        when the prompt succeeds.
        """
        try:
            entry = self.run_prompt(api_prompt, timeout)
        except (PromptRejected, PromptFailed) as err:
            return str(err)
        raise AssertionError(f"prompt was expected to fail but succeeded: {json.dumps(entry['outputs'])}")

    def output_files(self, entry: Mapping[str, Any], node_id: str | None = None) -> list[Path]:
        """Files listed in a history entry's outputs (all nodes, or just ``node_id``).

        Every output node reports results as ``{"filename", "subfolder", "type"}``
        items (SaveVideo under ``"images"`` with ``"animated": [true]``); ``type``
        ``output``/``temp``/``input`` selects the base folder.
        """
        roots = {
            "output": self.output_dir,
            "temp": self.base_dir / "temp",
            "input": self.input_dir,
        }
        files = []
        for nid, outputs in (entry.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for items in outputs.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, Mapping) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files


# --------------------------------------------------------------------------
# UI-format workflow -> API-format prompt
# --------------------------------------------------------------------------

# Input types the frontend turns into widgets (a list type is a legacy combo).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Frontend-only ("virtual") nodes: never sent to the backend.
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

MODE_MUTED = 2  # LGraphEventMode.NEVER: node and everything reading from it is dropped
MODE_BYPASS = 4  # LGraphEventMode.BYPASS: outputs pass through a matching input


def widget_names(node_info: Mapping[str, Any]) -> list[str | None]:
    """Names of a node's widget values, in ``widgets_values`` order.

    Follows the frontend: inputs in ``input_order`` (required, then optional)
    whose type has a widget and that are not ``forceInput``. A widget stays a
    widget (and keeps its value slot) when a link is connected to it. Entries
    that are ``None`` are frontend-only values the backend never sees:

    * after an INT with ``control_after_generate`` (by default any INT named
      ``seed`` or ``noise_seed``): the "control_after_generate" mode
      (``"fixed"``/``"randomize"``...);
    * after a COMBO with ``control_after_generate``: that mode and the
      "control_filter_list" string.

    An upload button the frontend appends for ``image_upload``/``video_upload``
    combos comes last and is simply left over (e.g. LoadImage's ``"image"``).
    """
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {sec: list(inputs.get(sec) or {}) for sec in ("required", "optional")}
    names: list[str | None] = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or []:
            spec = specs.get(name)
            if not spec:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            if isinstance(kind, list):
                kind = "COMBO"
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            names.append(name)
            if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                names.append(None)
            elif kind == "COMBO" and opts.get("control_after_generate"):
                names += [None, None]
    return names


def _input_default(node_info: Mapping[str, Any], name: str) -> Any:
    """The ``default`` of input ``name`` (first option of a combo), or raise KeyError."""
    for section in ("required", "optional"):
        spec = (node_info.get("input") or {}).get(section, {}).get(name)
        if spec:
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            if "default" in opts:
                return opts["default"]
            options = spec[0] if isinstance(spec[0], list) else opts.get("options")
            if options:
                return options[0]
    raise KeyError(name)


def _types_match(a: Any, b: Any) -> bool:
    """Loose version of LiteGraph.isValidConnection for slot types."""
    if a in ("*", "", None, 0) or b in ("*", "", None, 0):
        return True
    a_set = {t.strip().upper() for t in str(a).split(",")}
    b_set = {t.strip().upper() for t in str(b).split(",")}
    return bool(a_set & b_set)


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """Convert a UI-format workflow (frontend save file) into an API-format prompt.

    Returns ``{node_id: {"class_type": str, "inputs": {...}, "_meta": {"title"}}}``
    with links as ``[origin_node_id, origin_slot]``. Mirrors the frontend's
    ``graphToPrompt``:

    * ``widgets_values`` (a list, or a dict keyed by input name) is mapped onto
      :func:`widget_names`; missing trailing values fall back to defaults; list
      values are wrapped as ``{"__value__": [...]}``.
    * a connected input (socket or widget) takes the link instead of the value;
      inputs are identified by the link id in the node's ``inputs`` entries.
    * Note/MarkdownNote are dropped; links through Reroute nodes are followed;
      a link from a PrimitiveNode becomes the primitive's value.
    * muted nodes (mode 2) are dropped with the inputs linked to them;
      bypassed nodes (mode 4) pass an input of the matching type through.

    Subgraphs and group nodes are not supported (``ValueError``).
    """
    nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
    links: dict[int, tuple[str, int]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, Mapping):  # schema 1.0: link objects
            links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))
        else:  # schema 0.4: [id, origin_id, origin_slot, target_id, target_slot, type]
            links[link[0]] = (str(link[1]), int(link[2]))

    def input_link(node: Mapping[str, Any], index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def bypass_input(node: Mapping[str, Any], slot: int, want_type: Any) -> int | None:
        """Index of the input a bypassed node passes to output ``slot`` (frontend rule)."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else "*"
        if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type) and _types_match(
            inputs[slot].get("type"), want_type
        ):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _types_match(inp.get("type"), out_type) and _types_match(inp.get("type"), want_type):
                return i
        return None

    # resolve() results besides a ``[id, slot]`` link and a ``_Value``:
    _MISSING = object()  # nothing upstream: the input keeps its widget value, if any
    _DROPPED = object()  # upstream node is muted: the input is removed altogether

    class _Value:
        """A constant coming from a PrimitiveNode instead of a link."""

        def __init__(self, value: Any):
            self.value = value

    def resolve(link_id: int, want_type: Any, seen: frozenset = frozenset()) -> Any:
        """Follow a link to a real producing node: ``[id, slot]``, a _Value, _MISSING or _DROPPED."""
        if link_id is None or link_id not in links or link_id in seen:
            return _MISSING
        seen = seen | {link_id}
        origin_id, origin_slot = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return _DROPPED
        mode = origin.get("mode", 0)
        if mode == MODE_MUTED:
            return _DROPPED
        if origin["type"] == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return _Value(values[0]) if values else _MISSING
        if origin["type"] in UI_ONLY_TYPES:  # Reroute: output slot k passes input k
            return resolve(input_link(origin, origin_slot), want_type, seen)
        if mode == MODE_BYPASS:
            index = bypass_input(origin, origin_slot, want_type)
            return _MISSING if index is None else resolve(input_link(origin, index), want_type, seen)
        return [origin_id, origin_slot]

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        class_type = node["type"]
        if class_type in UI_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(class_type)
        if info is None:
            raise ValueError(
                f"node {node_id}: type {class_type!r} is not in /object_info "
                "(pack not loaded, subgraph or group node?)"
            )

        inputs: dict[str, Any] = {}
        names = widget_names(info)
        values = node.get("widgets_values")
        if isinstance(values, Mapping):
            value_of = {name: values[name] for name in names if name is not None and name in values}
        else:
            values = list(values or [])
            value_of = {name: values[i] for i, name in enumerate(names) if name is not None and i < len(values)}
        for name in names:
            if name is None:
                continue
            value = value_of[name] if name in value_of else _input_default(info, name)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value

        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            source = resolve(inp["link"], inp.get("type"))
            if source is _DROPPED:
                inputs.pop(name, None)
            elif isinstance(source, _Value):
                value = source.value
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            elif source is not _MISSING:
                inputs[name] = source

        prompt[node_id] = {
            "class_type": class_type,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or class_type},
        }
    return prompt
