"""Every stage of dvc.yaml lists, among its ``deps``, all of this repository's code it runs.

A stage's code is the import closure of the module its ``cmd`` runs (``gattn <command>`` is
mapped to a module by the command line's own parser; ``python -m M`` and ``python F.py`` run
``M`` and ``F``): every ``import`` statement of that module and, recursively, of each of this
repository's modules it reaches (the packages of ``pyproject.toml``'s
``[tool.setuptools.packages.find]``), including imports inside functions, since the stages
import lazily, and the ``__init__.py`` of every package on the way. A dep covers a file when
it is that file or a folder above it. A file the closure reaches and no dep covers is an edit
that would never rerun the stage.

Everything is derived from dvc.yaml, pyproject.toml and the code, so moving modules around
needs no change here. Not followed: ``importlib.import_module`` of a computed name (the command
line's dispatch, which is resolved separately) and imports under ``if TYPE_CHECKING:`` or
``if __name__ == "__main__":``. The command line module itself is not counted as a stage's
code: it only dispatches, and listing it would rerun every stage whenever a command is
added.
"""

from __future__ import annotations

import ast
import fnmatch
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _own_packages() -> set[str]:
    """Top-level packages of this repository (folders matching the setuptools includes)."""
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return {
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in include)
    }


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module ``name`` under ``root``, or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _not_run(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` (a stage runs as an imported
    module, never as ``__main__``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    if isinstance(test, ast.Name | ast.Attribute):
        return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` (function bodies included) except the bodies of ``if`` blocks
    that a stage does not run (:func:`_not_run`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _not_run(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, module: str) -> set[str]:
    """Dotted names ``path`` (module ``module``) imports: modules, and for ``from M import x``
    both ``M`` and ``M.x`` (kept when ``M.x`` turns out to be a module)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def import_closure(roots: list[str], root: Path = ROOT, own: set[str] | None = None) -> set[Path]:
    """Files (relative to ``root``) of the modules of packages ``own`` (default: this
    repository's) that importing ``roots`` runs: the modules, their imports recursively, and
    their packages' ``__init__``."""
    own = _own_packages() if own is None else own
    seen: set[str] = set()
    todo = list(roots)
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in own:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue  # an attribute imported with ``from M import x``, not a module
        files.add(path.relative_to(root))
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imported_names(path, name))
    return files


def command_modules(cmd: str) -> list[str]:
    """The modules one stage command runs.

    Raises:
        ValueError: ``cmd`` is none of ``<console script> ...``, ``python -m M``,
            ``python F.py``.
    """
    argv = shlex.split(cmd)
    while argv and "=" in argv[0] and argv[0].split("=")[0].isidentifier():
        argv.pop(0)  # leading VAR=value assignments (the stages put .venv/bin on PATH)
    scripts = _pyproject()["project"].get("scripts", {})
    if argv and argv[0] in scripts:
        import importlib

        cli_name = scripts[argv[0]].split(":")[0]
        cli = importlib.import_module(cli_name)
        # The module the command line dispatches to, as its own parser says (without
        # importing that module: build_parser() adds no command's own arguments).
        args, _ = cli.build_parser().parse_known_args(argv[1:])
        return [args._module]
    if argv and Path(argv[0]).name.startswith("python"):
        if argv[1:2] == ["-m"]:
            return [argv[2]]
        if argv[1:] and argv[1].endswith(".py"):
            return [".".join(Path(argv[1]).with_suffix("").parts)]
    raise ValueError(f"cannot tell which module {cmd!r} runs; teach command_modules()")


def _dep_paths(deps: list) -> list[Path]:
    out = []
    for dep in deps:
        out.extend(Path(k) for k in dep) if isinstance(dep, dict) else out.append(Path(dep))
    return [Path(*p.parts) for p in out]


def uncovered(files: set[Path], deps: list[Path]) -> list[str]:
    """Files no dep covers (a dep covers itself and everything below it)."""
    return sorted(f.as_posix() for f in files if not any(f == d or d in f.parents for d in deps))


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(stage: str) -> None:
    spec = STAGES[stage]
    cmds = spec["cmd"] if isinstance(spec["cmd"], list) else [spec["cmd"]]
    roots = [m for cmd in cmds for m in command_modules(cmd)]
    files = import_closure(roots)
    assert files, f"stage {stage}: no code found for {cmds}"
    missing = uncovered(files, _dep_paths(spec.get("deps", [])))
    assert not missing, (
        f"dvc.yaml stage {stage!r} ({'; '.join(cmds)}) imports code its deps do not cover, so "
        f"an edit there would not rerun it; add these (or a folder above them) to its deps: "
        f"{missing}"
    )


def test_closure_follows_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    """The walker itself, on a made-up package: imports inside functions, relative imports,
    ``from package import submodule`` and packages' ``__init__`` are followed; type-checking
    imports, attributes and other packages are not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/stage.py": (
            "from typing import TYPE_CHECKING\n"
            "import os\n"
            "from pkg.util import helper\n"
            "if TYPE_CHECKING:\n"
            "    from pkg import typing_only\n"
            "if __name__ == '__main__':\n"
            "    from pkg import unused\n"
            "def run():\n"
            "    from .sub import deep\n"
            "    from pkg import lazy\n"
        ),
        "pkg/util.py": "def helper(): ...\n",
        "pkg/lazy.py": "",
        "pkg/typing_only.py": "",
        "pkg/unused.py": "",
        "pkg/sub/__init__.py": "from . import inner\n",
        "pkg/sub/inner.py": "",
        "pkg/sub/deep.py": "from ..util import helper\n",
        "other/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {p.as_posix() for p in import_closure(["pkg.stage"], tmp_path, {"pkg"})}
    assert found == {
        "pkg/__init__.py",
        "pkg/stage.py",
        "pkg/util.py",
        "pkg/lazy.py",
        "pkg/sub/__init__.py",
        "pkg/sub/inner.py",
        "pkg/sub/deep.py",
    }
    deps = [Path("pkg/sub"), Path("pkg/stage.py")]
    assert uncovered({Path(f) for f in found}, deps) == [
        "pkg/__init__.py",
        "pkg/lazy.py",
        "pkg/util.py",
    ]
