"""The type stubs of the extension module name exactly what the built module has."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import rsoptim
from rsoptim import _rsoptim


def _stub_names() -> dict[str, list[str]]:
    stub = Path(rsoptim.__file__).with_name("_rsoptim.pyi")
    tree = ast.parse(stub.read_text())
    names: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            star = [args.vararg] if args.vararg else []
            names[node.name] = [a.arg for a in args.posonlyargs + args.args + star + args.kwonlyargs]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = []
        elif isinstance(node, ast.ClassDef):
            names[node.name] = []
    return names


def test_stub_and_module_have_the_same_names():
    public = {n for n in dir(_rsoptim) if not n.startswith("__")}
    assert set(_stub_names()) == public


def test_stub_signatures_name_the_modules_arguments():
    for name, stub_args in _stub_names().items():
        obj = getattr(_rsoptim, name)
        if callable(obj) and not isinstance(obj, type):
            assert list(inspect.signature(obj).parameters) == stub_args, name


def test_package_ships_py_typed():
    assert Path(rsoptim.__file__).with_name("py.typed").exists()


def test_stub_exception_classes_have_the_modules_bases():
    assert issubclass(_rsoptim.BufferOverlapError, ValueError)
