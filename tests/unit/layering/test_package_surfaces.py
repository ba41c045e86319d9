"""Every package of dwcp_agent states its public surface, and ACP's layers point one way.

`__all__` in each `__init__` names what other packages may use; a name in it that no longer exists
(a module moved away, a class renamed) is caught here rather than by the first `import *`. ACP's
pure layers (the shared modules, raft/, pbft/) never reach into the asyncio runtime, and the agent
never imports the test support in acp/testing/. Checked with `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_import_cycles import PACKAGE, import_graph


def _packages() -> list[Path]:
    """Every directory of Python sources (a directory without __init__ would be a namespace package)."""
    return sorted(d for d in [PACKAGE, *PACKAGE.rglob("*")] if d.is_dir() and d.name != "__pycache__"
                  and (any(d.glob("*.py")) or any(d.glob("*.pyi"))))


def _declared_all(init: Path) -> list[str] | None:
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def _bound_names(init: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _is_submodule(package: Path, name: str) -> bool:
    return ((package / f"{name}.py").exists() or (package / f"{name}.pyi").exists()
            or (package / name / "__init__.py").exists())


def test_every_package_has_an_init_with_all_naming_things_that_exist() -> None:
    packages = _packages()
    assert PACKAGE / "acp" / "raft" in packages
    problems = []
    for package in packages:
        init = package / "__init__.py"
        if not init.exists():
            problems.append(f"{package.relative_to(PACKAGE.parent)}: no __init__.py")
            continue
        declared = _declared_all(init)
        if declared is None:
            problems.append(f"{init.relative_to(PACKAGE.parent)}: no __all__")
            continue
        bound = _bound_names(init)
        problems += [f"{init.relative_to(PACKAGE.parent)}: __all__ names {name!r}, which is neither defined there "
                     "nor a submodule" for name in declared if name not in bound and not _is_submodule(package, name)]
    assert not problems, "\n".join(problems)


def test_pure_acp_layers_do_not_import_the_runtime_and_the_agent_never_imports_test_support() -> None:
    graph = import_graph()
    runtime, testing = "dwcp_agent.acp.runtime", "dwcp_agent.acp.testing"
    pure = [m for m in graph if m.startswith("dwcp_agent.acp.")
            and not m.startswith((runtime, testing, "dwcp_agent.acp.cli"))]
    assert "dwcp_agent.acp.raft.raft" in pure and "dwcp_agent.acp.adaptive" in pure
    wrong = [f"{m} -> {d}" for m in pure for d in sorted(graph[m]) if d.startswith(runtime)]
    wrong += [f"{m} -> {d}" for m in graph if not m.startswith(testing)
              for d in sorted(graph[m]) if d.startswith(testing)]
    assert not wrong, "\n".join(wrong)
