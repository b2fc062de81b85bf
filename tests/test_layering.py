"""Imports run one way: scripts -> inference -> engine/evaluation/prepare -> config -> parts -> utils.

Read from the source (ast), every import statement counted, the ones inside functions too:
a lazy import is no way around the order. A failure names the module, the line and the rule.
"""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# room -> layer; a module may import its own room and rooms of a lower layer only
LAYERS = {
    "utils": 0,
    "backbones": 1, "heads": 1, "losses": 1, "data": 1, "detection": 1,
    "config": 2,
    "engine": 3, "evaluation": 3, "prepare": 3,
    "inference": 3.5,  # uses a trained model: evaluation's embedding modes and its eval.json
    "train": 4, "evaluate": 4, "prepare_data": 4, "infer": 4,
}
SCRIPTS = {"train", "evaluate", "prepare_data", "infer"}


def modules():
    """(room, dotted module name, path) of every first-party module (tests and benchmarks excluded)."""
    for room in LAYERS:
        if os.path.isfile(os.path.join(ROOT, f"{room}.py")):
            yield room, room, os.path.join(ROOT, f"{room}.py")
            continue
        for folder, _, files in os.walk(os.path.join(ROOT, room)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield room, rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def imports_of(module: str, path: str):
    """(line, dotted target) of every import in the file, relative ones resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target


def violations():
    found = []
    for room, module, path in modules():
        for line, target in imports_of(module, path):
            other = target.split(".")[0]
            if other not in LAYERS or other == room:
                continue
            where = f"{os.path.relpath(path, ROOT)}:{line} imports {target}"
            if other in SCRIPTS:
                found.append(f"{where}: nothing imports a script")
            elif LAYERS[other] >= LAYERS[room]:
                found.append(f"{where}: {room} (layer {LAYERS[room]}) may import only lower layers, "
                             f"not {other} (layer {LAYERS[other]})")
    return found


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """A lazy upward import inside a function and a relative one are both caught."""
    pkg = tmp_path / "data"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from engine import trainer\n    from . import good\n")
    (pkg / "good.py").write_text("from utils import files\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setitem(LAYERS, "engine", 3)
    found = violations()
    assert len(found) == 1 and "data/bad.py:2 imports engine" in found[0], found


@pytest.mark.parametrize("room", sorted(set(LAYERS) - SCRIPTS))
def test_every_room_exists(room):
    assert os.path.exists(os.path.join(ROOT, room)) or os.path.exists(os.path.join(ROOT, f"{room}.py"))
