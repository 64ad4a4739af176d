"""Which code computed a stage: a fingerprint of the Python code each kind of stage runs.

A stage kind's code is its runner in `pipelines/workflow/stages.py` (`RUNNERS[kind]`), the
functions and values of that module it names (transitively), and every module of `pipelines`
and `cdm_core` in the static import closure of the modules they name: every `import` and
`from … import` anywhere in a module (deferred ones included), packages' `__init__` too.
Each part counts by its syntax tree with docstrings removed (`ast.unparse`), so a comment, a
docstring or a reformatting changes nothing, and a changed function in `cdm_core/likelihood.py`
changes the fingerprints of exactly the kinds whose code imports that module.

Not seen: code loaded by name at run time (`importlib`), other packages (torch, Ray), data files.
The cdm version goes into a record for reading only: a release that leaves a kind's code alone
leaves its stages fresh.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

PACKAGES = ("pipelines", "cdm_core")
RUNNERS_MODULE = "pipelines.workflow.stages"
# The folder holding the packages; tests point it at an edited copy.
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Code:
    """One stage kind's code: a digest of its parts, and each part's own (to say which part changed)."""

    fingerprint: str
    parts: dict[str, str]  # module, or `pipelines.workflow.stages:name` for a runner's own code -> digest

    def as_record(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "parts": self.parts, "cdm": _cdm_version()}


def current(kind: str) -> Code:
    """The code a stage of `kind` runs now (computed once per process for all kinds)."""
    return kinds(ROOT)[kind]


def changed_parts(recorded: dict[str, Any], now: Code, most: int = 3) -> str:
    """The parts that differ, in a few words: `cdm_core.likelihood, pipelines.evaluate.nll and 2 more`."""
    before = recorded.get("parts") or {}
    names = sorted(n for n in set(before) | set(now.parts) if before.get(n) != now.parts.get(n))
    if not names:
        return ""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@functools.cache
def kinds(root: Path) -> dict[str, Code]:
    sources = _Sources(root)
    runners = sources.runners()
    out = {}
    for kind, function in runners.items():
        own, modules = sources.runner_code(function)
        parts = {f"{RUNNERS_MODULE}:{name}": digest for name, digest in own.items()}
        parts.update({m: sources.digest(m) for m in sources.closure(modules)})
        out[kind] = Code(_hash(sorted(parts.items())), parts)
    return out


def _hash(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def _cdm_version() -> str:
    try:
        return version("cdm")
    except PackageNotFoundError:
        return "unknown"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


class _Sources:
    """The project's modules under `root`, parsed on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._trees: dict[str, ast.Module] = {}
        self._digests: dict[str, str] = {}
        self._imports: dict[str, set[str]] = {}

    def file(self, module: str) -> Optional[Path]:
        if module.split(".")[0] not in PACKAGES:
            return None
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.file(module)
            assert path is not None, module
            self._trees[module] = _strip_docstrings(ast.parse(path.read_text(), str(path)))
        return self._trees[module]

    def digest(self, module: str) -> str:
        if module not in self._digests:
            self._digests[module] = _hash(ast.unparse(self.tree(module)))
        return self._digests[module]

    def is_package(self, module: str) -> bool:
        path = self.file(module)
        return path is not None and path.name == "__init__.py"

    def resolve(self, module: str, level: int, here: str) -> str:
        """The absolute name of `from <level dots><module> import …` written in module `here`."""
        if not level:
            return module
        base = here.split(".")
        base = base if self.is_package(here) else base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def imported(self, module: str) -> set[str]:
        """The project modules `module` imports (a name imported from a package may be its submodule)."""
        if module in self._imports:
            return self._imports[module]
        found: set[str] = set()
        for node in ast.walk(self.tree(module)):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = self.resolve(node.module or "", node.level, module)
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in node.names)
        self._imports[module] = {m for m in found if self.file(m) is not None}
        return self._imports[module]

    def closure(self, modules: set[str]) -> set[str]:
        """`modules`, what they import, transitively, and the packages above each (Python runs their `__init__`)."""
        seen: set[str] = set()
        todo = list(modules)
        while todo:
            module = todo.pop()
            if module in seen or self.file(module) is None:
                continue
            seen.add(module)
            parts = module.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
            todo.extend(self.imported(module))
        return seen

    def runners(self) -> dict[str, str]:
        """`RUNNERS` of the stages module, read from its source: kind -> the runner function's name."""
        for node in self.tree(RUNNERS_MODULE).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(target, ast.Name) and target.id == "RUNNERS" and isinstance(node.value, ast.Dict):
                return {
                    k.value: v.id
                    for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Name)
                }
        raise RuntimeError(f"{RUNNERS_MODULE} has no RUNNERS = {{kind: function}} table to fingerprint")

    def runner_code(self, function: str) -> tuple[dict[str, str], set[str]]:
        """(digest of each definition of the stages module the runner reaches, the project modules they name).

        Annotations are left out: a type named in a signature is not code the stage runs.
        """
        tree = self.tree(RUNNERS_MODULE)
        defined: dict[str, ast.AST] = {}
        imported: dict[str, str] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update({t.id: node for t in targets if isinstance(t, ast.Name) and t.id != "RUNNERS"})
            elif isinstance(node, ast.Import):
                imported.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names if not a.asname})
                imported.update({a.asname: a.name for a in node.names if a.asname})
            elif isinstance(node, ast.ImportFrom):
                source = self.resolve(node.module or "", node.level, RUNNERS_MODULE)
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    imported[a.asname or a.name] = sub if self.file(sub) is not None else source
        own: dict[str, str] = {}
        modules: set[str] = set()
        todo = [function]
        while todo:
            name = todo.pop()
            if name in own:
                continue
            node = defined[name]
            own[name] = _hash(ast.unparse(node))
            for used in _names(node):
                if used in defined:
                    todo.append(used)
                elif used in imported and self.file(imported[used]) is not None:
                    modules.add(imported[used])
        return own, modules


def _names(node: ast.AST) -> set[str]:
    """The names `node` reads, outside annotations."""
    skip: set[int] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg) and n.annotation is not None:
            skip.update(id(x) for x in ast.walk(n.annotation))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is not None:
            skip.update(id(x) for x in ast.walk(n.returns))
        if isinstance(n, ast.AnnAssign):
            skip.update(id(x) for x in ast.walk(n.annotation))
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}
