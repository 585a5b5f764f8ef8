"""Packaging: the pack is a real package (``magicmirror_video``) that installs with pip, runs its tools
from any folder, imports without ComfyUI, and declares what it imports.

The wheel test builds the wheel, installs it with its ``[train]`` extra into a fresh venv and runs every
console entry point and a tiny training run from a folder outside the repository (about a minute, most of
it pip; the packages come from pip's cache after ``make venv``).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
TOOLS = ["train_magicmirror", "train_subject_replay", "train_dualreal", "train_regdpo", "prepare_magicmirror",
         "build_gt_pairs", "evaluate"]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_requirement_files_match_pyproject():
    assert requirement_lines("requirements.txt") == PROJECT["dependencies"]
    assert requirement_lines("requirements-train.txt") == PROJECT["optional-dependencies"]["train"]
    assert requirement_lines("requirements-dev.txt") == PROJECT["optional-dependencies"]["dev"]


def _imported_top_level(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


# import name -> distribution name, for imports whose names differ
DISTRIBUTIONS = {"PIL": "pillow", "av": "av", "yaml": "pyyaml", "onnxruntime": "insightface", "cv2": "insightface"}
HOST_ONLY = {"comfy", "folder_paths"}  # ComfyUI's own modules, imported lazily by nodes/host.py


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=;! \[]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.mark.parametrize("folder,extras", [("models", ()), ("nodes", ()), ("training", ("train",)),
                                           ("testing", ("dev",))])
def test_dependencies_cover_what_is_imported(folder, extras):
    """Every third-party module a folder imports is declared (runtime deps, plus the folder's extra)."""
    declared = _declared(PROJECT["dependencies"])
    for extra in extras:
        declared |= _declared(PROJECT["optional-dependencies"][extra])
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    third_party = _imported_top_level(folder) - stdlib - HOST_ONLY - {"magicmirror_video", "tomli"}
    # optional: imported only when asked for, with an install hint (torchvision: RAFT and Inception of the evaluation
    # protocols; every ComfyUI install has it)
    third_party -= {"bitsandbytes", "tensorboard", "torchvision"}
    transitive = {"tokenizers", "huggingface_hub"}  # come with transformers / diffusers
    missing = {m for m in third_party - transitive if DISTRIBUTIONS.get(m, m).lower() not in declared}
    assert not missing, f"{folder}/ imports {sorted(missing)} but pyproject.toml does not declare them"


def test_models_import_neither_nodes_nor_training_nor_comfyui():
    for path in (ROOT / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert node.module.split(".")[0] not in ("nodes", "training"), f"{path.name}: {ast.unparse(node)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(node)
                assert "comfy" not in text and "folder_paths" not in text, f"{path.name}: {text}"


def test_every_reference_folder_ships_as_package_data():
    """Each folder of testing/reference/ with JSON files is a listed package whose JSON files are package data, so
    the wheel carries them (reference_json reads them from the installed package)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    for folder in [ROOT / "testing" / "reference", *(ROOT / "testing" / "reference").iterdir()]:
        if folder.is_dir() and any(folder.glob("*.json")):
            package = "magicmirror_video." + ".".join(folder.relative_to(ROOT).parts)
            assert package in setuptools["packages"], package
            assert "*.json" in setuptools["package-data"].get(package, []), package


def test_comfy_registry_fields():
    """[project] and [tool.comfy] as the Comfy Registry specification asks (docs.comfy.org/registry)."""
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", PROJECT["name"]) and len(PROJECT["name"]) < 100
    assert "comfyui" not in PROJECT["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    assert isinstance(PROJECT["license"], str) and (ROOT / "LICENSE").is_file()
    assert PROJECT["urls"]["Repository"].startswith("https://")
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]


def test_every_tool_has_a_console_entry_point():
    scripts = PROJECT["scripts"]
    for tool in TOOLS:
        name = "magicmirror-" + tool.replace("_", "-")
        assert scripts.get(name) == f"magicmirror_video.training.{tool}:main", name


def test_installed_package_is_this_checkout():
    import magicmirror_video.models.sampler as sampler

    assert Path(sampler.__file__).resolve().parent == ROOT / "models"


def run(cmd, cwd, timeout=600, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def test_python_m_training_from_the_pack_root_is_the_installed_module(tmp_path):
    """`python -m training.<tool>` in the root (the design card's form) runs the installed module, with
    relative imports resolved inside the package and no second copy of any module."""
    code = ("import runpy, sys\n"
            "import training.config as alias\n"
            "import magicmirror_video.training.config as real\n"
            "assert alias is real, (alias, real)\n"
            "assert [m for m in sys.modules if m.startswith('training.')] == ['training._root_alias']\n")
    run([sys.executable, "-c", code], cwd=ROOT)
    out = run([sys.executable, "-m", "training.train_regdpo", "--preset", "tiny", "--print_config"], cwd=ROOT)
    assert "beta: 500.0" in out and "lora_rank: 4" in out


def test_wheel_installs_into_a_fresh_venv_and_runs_from_anywhere(tmp_path):
    """Build the wheel, install it (+ [train]) in a new venv, then from a folder outside the repository:
    every console entry point's --help, a two-step tiny DualReal run, and an import without ComfyUI."""
    dist, venv, outside = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT], cwd=tmp_path)
    (wheel,) = dist.glob("magicmirror_video-*.whl")
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    run([py, "-m", "pip", "install", "--quiet", "torch==2.13.0"], cwd=tmp_path, timeout=900)
    run([py, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", f"{wheel}[train]"], cwd=tmp_path,
        timeout=900)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for tool in TOOLS:
        out = run([bin_dir / ("magicmirror-" + tool.replace("_", "-")), "--help"], cwd=outside, env=env)
        assert "usage:" in out
    code = ("import sys, magicmirror_video as m\n"
            "assert 'magicmirror_video.nodes' not in sys.modules  # the nodes load only when ComfyUI asks\n"
            "assert 'MMV_CogVideoXSampler' in m.NODE_CLASS_MAPPINGS\n"
            "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
            "import magicmirror_video.models.sampler as s, magicmirror_video.training.trainer\n"
            "assert 'site-packages' in s.__file__, s.__file__\n"
            "from magicmirror_video.testing import reference_json\n"
            "assert reference_json('cogvideox/transformer_config_5b.json')['num_layers'] == 42\n"
            "assert reference_json('wan/transformer_config_wan2.1_t2v_14b.json')['num_layers'] == 40\n")
    run([py, "-c", code], cwd=outside, env=env)
    out = run([py, "-m", "magicmirror_video.training.train_dualreal", "--preset", "tiny", "--max_steps", "2",
               "--output_dir", outside / "run"], cwd=outside, env=env)
    assert (outside / "run" / "dualreal.safetensors").is_file(), out
    assert not (outside / "training").exists() and not (outside / "magicmirror_video").exists()


def declared_minimums() -> dict[str, str]:
    """``{package: version}`` of pyproject's ``package>=version`` runtime requirements."""
    pairs = (re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r) for r in PROJECT["dependencies"])
    return {m.group(1).lower(): m.group(2) for m in pairs if m}


def test_the_import_check_holds_the_declared_minimums():
    from magicmirror_video.versions import MINIMUM_VERSIONS

    declared = declared_minimums()
    assert MINIMUM_VERSIONS == {name: declared[name] for name in ("torch", "diffusers", "transformers", "accelerate")}


@pytest.mark.parametrize("package, installed", [("diffusers", "0.32.2"), ("transformers", "4.55.4"),
                                                ("accelerate", None), ("torch", "2.5.1+cu124")])
def test_importing_the_pack_with_an_older_package_fails_in_one_line(package, installed):
    """The installed version as importlib.metadata reports it is replaced for one package; importing the pack (as
    ComfyUI or a trainer does) then fails before anything else with one line naming the package, the installed and
    the needed version (pyproject's) and how to update."""
    need = declared_minimums()[package]
    code = f"""
import importlib.metadata as md, sys
real = md.version
def version(name):
    if name != {package!r}:
        return real(name)
    if {installed!r} is None:
        raise md.PackageNotFoundError(name)
    return {installed!r}
md.version = version
try:
    import magicmirror_video.training.train_dualreal
except ImportError as e:
    print(e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    found = "not installed" if installed is None else f"found {installed}"
    how = "install torch>=2.6 built for your GPU" if package == "torch" else f"pip install -U '{package}>={need}'"
    assert proc.stdout.startswith(f"MagicMirror Video needs {package}>={need} ({found}): {how}")
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout


def test_every_module_imports_with_the_declared_minimum_diffusers(tmp_path):
    """A fresh venv with torch 2.13.0 (as the Makefile) and the declared runtime and [train] dependencies, diffusers
    held at its declared minimum by a pip constraint: the import-time version check passes and every module of the
    pack imports — models/, nodes/ (outside ComfyUI: no folder_paths), training/, testing/. insightface and
    tensorboard are left out: imported only when used, and the heaviest downloads (about 2 minutes in all, most of it
    pip; packages come from pip's cache when it has them)."""
    need = declared_minimums()["diffusers"]
    venv, pkg = tmp_path / "venv", tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "magicmirror_video").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "minimum.txt").write_text(f"diffusers=={need}\n")
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "--quiet", "torch==2.13.0"], cwd=tmp_path, timeout=900)
    lazy = ("insightface", "tensorboard")
    requirements = [r for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["train"]
                    if _declared([r]).isdisjoint(lazy)]
    run([py, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", "-c", tmp_path / "minimum.txt",
         *requirements], cwd=tmp_path, timeout=900)
    code = ("import importlib, importlib.metadata as md, pkgutil, sys\n"
            f"assert md.version('diffusers') == {need!r}, md.version('diffusers')\n"
            "import magicmirror_video as m\n"
            "names = []\n"
            "for sub in ('models', 'nodes', 'training', 'testing'):\n"
            "    package = importlib.import_module('magicmirror_video.' + sub)\n"
            "    names += ['magicmirror_video.%s.%s' % (sub, i.name) for i in pkgutil.iter_modules(package.__path__)]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "assert len(m.NODE_CLASS_MAPPINGS) > 10 and 'comfy' not in sys.modules\n"
            "print(len(names), 'modules')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(pkg)
    out = run([py, "-c", code], cwd=tmp_path, env=env)
    modules = [p for folder in ("models", "nodes", "training", "testing") for p in (ROOT / folder).glob("*.py")
               if p.name != "__init__.py"]
    assert out.split()[0] == str(len(modules)), out
