"""The provider imports one way (docs/architecture.md): no module of it is in an import circle, deferred and
``TYPE_CHECKING`` imports included; inside hooks/ no module imports one after it in :data:`ORDER`."""

from __future__ import annotations

import ast
from pathlib import Path

HOOKS = Path(__file__).parent.parent / "evolink_provider" / "hooks"
ORDER = ["retry", "connection", "responses", "task_batcher", "downloads", "transport", "evolink"]


def hooks_imported_by(module: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse((HOOKS / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "evolink_provider.hooks":
            found.update(alias.name for alias in node.names if (HOOKS / f"{alias.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evolink_provider.hooks."):
            found.add(str(node.module).rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.rsplit(".", 1)[1]
                for alias in node.names
                if alias.name.startswith("evolink_provider.hooks.")
            )
    return found


def test_every_hooks_module_imports_only_the_ones_before_it() -> None:
    assert sorted(path.stem for path in HOOKS.glob("*.py") if path.stem != "__init__") == sorted(ORDER)
    assert hooks_imported_by("evolink") == {"connection", "transport", "downloads", "task_batcher"}
    for position, module in enumerate(ORDER):
        assert hooks_imported_by(module) <= set(ORDER[:position]), module


PACKAGE = HOOKS.parent


def provider_imports(path: Path) -> set[str]:
    """The provider's modules ``path`` imports (dotted names), deferred and ``TYPE_CHECKING`` ones included;
    a name imported from a package is a module when the package has a file of that name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if isinstance(node, ast.Import):
            found.update(name for name in names if name.startswith("evolink_provider."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evolink_provider"):
            module = str(node.module)
            folder = PACKAGE.parent.joinpath(*module.split("."))
            submodules = {f"{module}.{name}" for name in names if (folder / f"{name}.py").exists()}
            found.update(submodules or {module})
    return found


def test_no_module_of_the_provider_is_in_an_import_circle() -> None:
    modules = {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph = {name: provider_imports(path) & modules.keys() for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name not in done:
            for imported in sorted(graph[name]):
                visit(imported, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
