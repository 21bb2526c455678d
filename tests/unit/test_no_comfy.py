"""The library modules and this suite must work without ComfyUI installed."""

import ast
import os
import subprocess
import sys
from pathlib import Path

UNIT_FOLDER = Path(__file__).resolve().parent
REPOSITORY = UNIT_FOLDER.parents[1]

# Modules that import comfy or folder_paths, which the unit suite must not import.
COMFY_MODULES = {"comfy", "folder_paths", "nodes", "comfy_extras", "dreamcache_core.builder",
                 "dreamcache_core.comfy_patch"}

PLAIN_MODULES = ("dreamcache_core.adapter", "dreamcache_core.adapter_io", "dreamcache_core.cache",
                 "dreamcache_core.comfy_folders", "dreamcache_core.convert_adapter", "dreamcache_core.image",
                 "dreamcache_core.layers", "dreamcache_core.masks", "dreamcache_core.patch",
                 "dreamcache_core.safetensors_io")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_unit_tests_import_no_comfy():
    for path in sorted(UNIT_FOLDER.glob("*.py")):
        for name in imported_modules(path):
            top_level = name.split(".")[0]
            assert name not in COMFY_MODULES, f"{path.name} imports {name}"
            assert top_level not in COMFY_MODULES, f"{path.name} imports {name}"


def test_plain_modules_import_without_comfy():
    script = ("import sys\n"
              f"for name in {PLAIN_MODULES!r}:\n"
              "    __import__(name)\n"
              "found = sorted(name for name in sys.modules if name.split('.')[0] in ('comfy', 'folder_paths'))\n"
              "print(','.join(found))\n")
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, env=environment,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == ""


def test_module_names_unique_across_suites():
    # Both suites import test files as top-level modules (pytest's default "prepend" import mode),
    # so a file name used in both folders stops collection when they run together.
    real_comfy_names = {path.name for path in (UNIT_FOLDER.parent / "real_comfy").glob("*.py")}
    for path in sorted(UNIT_FOLDER.glob("*.py")):
        if path.name != "conftest.py":
            assert path.name not in real_comfy_names, f"tests/unit/{path.name} also exists in tests/real_comfy"
