"""The package's names, loaded on first use (syncbn/__init__.py, PEP 562)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import syncbn

PACKAGE = Path(syncbn.__file__).parent


def test_no_submodule_shares_a_public_name_that_is_not_the_submodule_itself():
    # Importing syncbn.X binds the module X over the package's attribute X: a function named
    # like its module would turn into that module once anything imported the module.
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    exported_modules = {"comm", "functional"}
    assert sorted((set(syncbn.__all__) & modules) - exported_modules) == []


def test_every_public_name_is_what_it_names_whatever_was_imported_before():
    # In a fresh process, every submodule is imported first, then each public name is read.
    code = ("import importlib, pkgutil, types, syncbn\n"
            "for info in pkgutil.iter_modules(syncbn.__path__):\n"
            "    if info.name not in ('pytest_plugin', '_pytest_rank', 'lightning'):\n"
            "        importlib.import_module('syncbn.' + info.name)\n"
            "wrong = [n for n in syncbn.__all__ if n not in ('comm', 'functional')\n"
            "         and isinstance(getattr(syncbn, n), types.ModuleType)]\n"
            "print(wrong)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
