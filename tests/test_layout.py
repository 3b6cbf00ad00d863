"""The package's layout holds: imports point down the layers, every folder says what it holds, and
no file is over 400 lines (STYLE.md)."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "rlhf"

# Lower numbers are lower layers; a module may import its own layer or any below it.
LAYERS = {"errors": 0, "handles": 0, "algos": 1, "models": 2, "data": 2, "rollout": 2, "training": 3, "watch": 4, "recipes": 5,
          "commands": 6, "api": 6, "demo": 7, "cli": 8, "__init__": 8}


def unit(path: pathlib.Path) -> str:
    """The layer unit of a source file: its folder under rlhf/, or its own name at the top."""
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def rlhf_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlhf":
            names = [node.module + "." + a.name for a in node.names] if node.module == "rlhf" else [node.module]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "rlhf"]
    return out


FILES = sorted(SRC.rglob("*.py"))


def test_every_file_is_in_a_known_layer():
    assert {unit(f) for f in FILES} <= set(LAYERS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    mine = LAYERS[unit(path)]
    up = []
    for lineno, name in rlhf_imports(path):
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"
        if target == "__version__":
            continue
        if LAYERS.get(target, LAYERS["__init__"]) > mine:
            up.append(f"{path.name}:{lineno} imports {name}")
    assert not up


def test_algos_import_torch_alone():
    for path in (SRC / "algos").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for root in roots:
                assert root.split(".")[0] in ("torch", "rlhf", "__future__", "math", "dataclasses", "typing",
                                              "collections"), f"{path.name} imports {root}"


def test_every_folder_says_what_it_holds():
    for folder in [p for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 8, f"{folder.name}/__init__.py needs a docstring saying what it holds"


def test_no_file_over_400_lines():
    long = [f"{f.relative_to(SRC)}: {n}" for f in FILES if (n := len(f.read_text().splitlines())) > 400]
    assert not long
