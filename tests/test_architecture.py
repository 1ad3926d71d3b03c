"""The architecture, enforced: which way imports point, and how big a module may grow.

docs/architecture.md draws the layers; this test keeps the code to the drawing::

    dckpt (facade: __init__, _api)
      -> cli -> interop -> engine (dckpt/_*.py) -> storage -> _errors, _faults

- ``dckpt.storage`` imports from dckpt only ``_errors``, ``_faults`` and itself;
- engine modules never import ``interop``, ``cli`` or ``integrations``;
- ``interop`` never imports ``cli`` or ``integrations``; ``cli`` never ``integrations``;
- ``import dckpt`` imports no integration and no trainer;
- a module is at most 450 lines, a function at most 50 besides its docstring (linear
  validators excepted);
- a function-local import says why it is local (a cycle, or an optional or heavy
  dependency), in a comment on its line or the line above.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dckpt"
# The manager is a client of the public save and load, format detection included.
FACADE = {"dckpt", "dckpt.__main__", "dckpt._api", "dckpt._manager"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50
# Linear validators: one check after another, clearer whole than split.
LONG_FUNCTIONS_ALLOWED = {
    "dckpt._format._tensor_from_json",
    "dckpt._format.manifest_from_json",
    "dckpt._format._manifest_from_json",
    "dckpt.interop._dcp_meta._check_metadata",
}
LOCAL_IMPORT_REASONS = ("cycle", "optional", "heavy", "lazy", "light")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(name: str) -> str:
    if name in FACADE:
        return "facade"
    for sub in ("storage", "interop", "cli", "integrations", "tiers"):
        if name == f"dckpt.{sub}" or name.startswith(f"dckpt.{sub}."):
            return sub
    if name in ("dckpt._errors", "dckpt._faults"):
        return "base"
    return "engine"


ALLOWED = {
    "base": {"base"},
    "storage": {"base", "storage"},
    "engine": {"base", "storage", "engine"},
    "tiers": {"base", "storage", "engine", "tiers"},  # tiered checkpoints (issue #13)
    "interop": {"base", "storage", "engine", "interop"},
    "cli": {"base", "storage", "engine", "interop", "cli", "facade"},
    "integrations": {"base", "storage", "engine", "interop", "facade", "integrations"},
    "facade": {"base", "storage", "engine", "interop", "cli", "facade", "tiers"},
}


def _imports(path: Path, name: str, nodes: list[ast.AST] | None = None) -> list[tuple[int, str]]:
    """(line, module) of every dckpt import among ``nodes`` (default: the whole module,
    function-local imports included)."""
    if nodes is None:
        nodes = list(ast.walk(ast.parse(path.read_text(), str(path))))
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dckpt"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] != "dckpt":
                continue
            for a in node.names:  # "from dckpt import _faults" imports a module
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if full in MODULES else base))
    return out


def test_imports_point_one_way() -> None:
    wrong = []
    for name, path in MODULES.items():
        layer = _layer(name)
        for line, target in _imports(path, name):
            if target not in MODULES:
                continue
            if _layer(target) not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line}: {layer} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_import_dckpt_stays_light() -> None:
    code = (
        "import sys, dckpt\n"  # (torch itself imports tqdm)
        "bad = [m for m in sys.modules if m.startswith(('dckpt.integrations', 'lightning', "
        "'transformers', 'torchtitan', 'accelerate', 's3fs', 'safetensors', 'click'))]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it by concern"


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Documentation does not count against a function's length."""
    first = node.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if is_doc and isinstance(first.value.value, str) and first.end_lineno is not None:
        return first.end_lineno - first.lineno + 1
    return 0


def test_functions_stay_short() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if length > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "functions over 50 lines:\n" + "\n".join(sorted(long))


def test_function_local_imports_say_why() -> None:
    silent = []
    for path in MODULES.values():
        source = path.read_text().splitlines()
        tree = ast.parse("\n".join(source))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    near = " ".join(source[max(0, node.lineno - 2) : node.lineno]).lower()
                    if "#" not in near or not any(w in near for w in LOCAL_IMPORT_REASONS):
                        silent.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not silent, "function-local imports without a reason:\n" + "\n".join(sorted(set(silent)))


def _dckpt_imports(path: Path, name: str) -> set[str]:
    """dckpt modules this one imports anywhere: a function-local import that only hides a
    cycle is still a cycle. Imports under ``if TYPE_CHECKING:`` do not run and count not."""
    tree = ast.parse(path.read_text())
    hidden = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    nodes = [n for n in ast.walk(tree) if id(n) not in hidden]
    return {m for _, m in _imports(path, name, nodes) if m in MODULES} - {name}


def test_no_import_cycles() -> None:
    """The cycles this layout removed (``_dcp <-> _load <-> _reader``, ``_async <-> _save``,
    ``_fsspec <-> _s3write <-> storage``) and any new one."""
    graph = {name: _dckpt_imports(path, name) for name, path in MODULES.items()}
    # A package imports its own modules to re-export them; that is not a cycle of concerns.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".") and m != name}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
