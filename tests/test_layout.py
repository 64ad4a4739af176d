"""The house stays as it is built: imports point one way, no circles, typer only in the CLI.

The rules (README, "The house"):

    cli → workflow → tune → train → data → common → cdm_core
    workflow → evaluate → data;  cluster → common

Every import counts, also one made inside a function. The same rules are
checked independently by import-linter's contracts in pyproject.toml
(`make lint`); this test reads the code itself, with `ast`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each part of the house may import (besides itself and the standard library / third parties).
ALLOWED = {
    "cli": {"workflow", "cluster", "tune", "train", "evaluate", "data", "common", "cdm_core"},
    "workflow": {"tune", "train", "evaluate", "data", "common", "cdm_core"},
    "cluster": {"common", "cdm_core"},
    "tune": {"train", "data", "common", "cdm_core"},
    "train": {"data", "common", "cdm_core"},
    "evaluate": {"data", "common", "cdm_core"},
    "data": {"common", "cdm_core"},
    "common": {"cdm_core"},
    "cdm_core": set(),
    "pipelines": set(),  # the package's own __init__ / __main__
}
PACKAGES = ("cli", "workflow", "cluster", "tune", "train", "evaluate", "data", "common")


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of pipelines/ and cdm_core/ under `root`."""
    out = {}
    for top in ("pipelines", "cdm_core"):
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def part_of(module: str) -> str:
    """The part of the house a module belongs to: cdm_core, a package of pipelines, or pipelines itself."""
    names = module.split(".")
    if names[0] == "cdm_core":
        return "cdm_core"
    if module == "pipelines.__main__":  # `python -m pipelines` is the command line
        return "cli"
    return names[1] if len(names) > 1 and names[1] in PACKAGES else "pipelines"


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name)
                    if target:
                        found.append((target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                    if target:
                        found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    files = module_files(root)
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def wrong_way(edges: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    problems = []
    for module, targets in edges.items():
        source = part_of(module)
        for target, line, _ in targets:
            aimed = part_of(target)
            if aimed != source and target != "pipelines" and aimed not in ALLOWED[source]:
                problems.append(f"{module}:{line} imports {target} ({source} may not import {aimed})")
    return problems


def circles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in edges.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(t == v for t, _, _ in edges.get(v, [])):
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def unexplained_local_imports(root: Path) -> list[str]:
    """Imports made inside a function with no comment on their line or on the comment line(s) just above them."""
    problems = []
    for module, path in module_files(root).items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                i = node.lineno - 1
                explained = "#" in lines[i]
                j = i - 1
                while not explained and j >= 0 and lines[j].strip().startswith(("import ", "from ")):
                    explained = "#" in lines[j]
                    j -= 1
                explained = explained or (j >= 0 and lines[j].strip().startswith("#"))
                if not explained:
                    problems.append(f"{module}:{node.lineno}: {lines[i].strip()}")
    return problems


# --------------------------------------------------------------------------- the checks on this tree


def test_imports_point_one_way():
    assert wrong_way(graph(ROOT)) == []


def test_no_import_circles_counting_imports_inside_functions():
    assert circles(graph(ROOT)) == []


def test_every_import_inside_a_function_says_why():
    assert unexplained_local_imports(ROOT) == []


def test_pipelines_itself_holds_only_the_package_files():
    loose = sorted(p.name for p in (ROOT / "pipelines").iterdir() if p.is_file())
    assert loose == ["__init__.py", "__main__.py", "py.typed"]  # py.typed: PEP 561, the package is typed
    assert sorted(p.name for p in (ROOT / "pipelines").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        PACKAGES
    )


def test_only_the_cli_imports_typer():
    users = []
    for module, path in module_files(ROOT).items():
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        if any(name == "typer" or name.startswith(("typer.", "click")) for name in names):
            users.append(module)
    assert users and all(part_of(m) == "cli" for m in users), users


def test_the_stage_modules_load_no_typer():
    code = (
        "import sys, pipelines.evaluate.nll, pipelines.train.trainer, pipelines.data.readers, pipelines.tune.sweep, "
        "pipelines.workflow.runner; print(sorted(m for m in sys.modules if m == 'typer' or m.startswith('typer.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the checker finds what it looks for


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"pipelines/__init__.py": "", "cdm_core/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "importer, line",
    [
        ("pipelines/train/trainer.py", "from pipelines.tune import sweep\n"),
        ("pipelines/train/trainer.py", "def f():\n    import pipelines.tune.sweep  # late, but still upward\n"),
        ("pipelines/common/config.py", "from ..data import shards\n"),
        ("cdm_core/objective.py", "from pipelines.common import config\n"),
        ("pipelines/tune/sweep.py", "from pipelines.evaluate.nll import run\n"),
    ],
)
def test_the_checker_reports_an_import_the_wrong_way(tmp_path, importer, line):
    files = {f"pipelines/{p}/__init__.py": "" for p in PACKAGES}
    files |= {
        "pipelines/tune/sweep.py": "",
        "pipelines/data/shards.py": "",
        "pipelines/evaluate/nll.py": "",
        "pipelines/common/config.py": "",
        "pipelines/train/trainer.py": "",
        "cdm_core/objective.py": "",
    }
    files[importer] = line
    problems = wrong_way(graph(_tree(tmp_path, files)))
    assert len(problems) == 1 and importer.removesuffix(".py").replace("/", ".") in problems[0]


def test_the_checker_finds_a_circle_made_inside_a_function(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pipelines/train/__init__.py": "",
            "pipelines/train/a.py": "from pipelines.train import b\n",
            "pipelines/train/b.py": "def late():\n    from pipelines.train.a import x  # noqa\n",
            "pipelines/train/c.py": "from pipelines.train import a\n",
        },
    )
    assert circles(graph(root)) == [["pipelines.train.a", "pipelines.train.b"]]


def test_the_checker_finds_an_unexplained_import_inside_a_function(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pipelines/data/__init__.py": "",
            "pipelines/data/x.py": "def f():\n    # needed late: reason\n    import json\n    import os\n\n\ndef g():\n    import re\n",
        },
    )
    assert unexplained_local_imports(root) == ["pipelines.data.x:8: import re"]
