"""The provider imports one way (docs/architecture.md): no module of it is in an import circle, deferred and
``TYPE_CHECKING`` imports included; inside hooks/ no module imports one after it in :data:`ORDER`."""

from __future__ import annotations

import ast
from pathlib import Path

HOOKS = Path(__file__).parent.parent / "evolink_provider" / "hooks"
ORDER = ["retry", "connection", "responses", "task_batcher", "downloads", "transport", "evolink"]


def hooks_imported_by(module: str) -> set[str]:
    """The modules of hooks/ that ``module`` of hooks/ imports, by short name."""
    prefix = "evolink_provider.hooks."
    imported = provider_imports(prefix + module)
    return {name.removeprefix(prefix) for name in imported if name.startswith(prefix)}


def test_every_hooks_module_imports_only_the_ones_before_it() -> None:
    assert sorted(path.stem for path in HOOKS.glob("*.py") if path.stem != "__init__") == sorted(ORDER)
    assert hooks_imported_by("evolink") == {"connection", "transport", "downloads", "task_batcher"}
    for position, module in enumerate(ORDER):
        assert hooks_imported_by(module) <= set(ORDER[:position]), module


PACKAGE = HOOKS.parent
#: Every module of the provider by dotted name; a package by its own name (its ``__init__.py``).
MODULES = {
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
    for path in PACKAGE.rglob("*.py")
}


def provider_imports(importer: str, source: str | None = None) -> set[str]:
    """The provider's modules that importing ``importer`` runs, deferred and ``TYPE_CHECKING`` imports
    included: each one it names (absolute or relative; a name imported from a package counts as the module
    or subpackage of that name when there is one) and the packages above it, whose ``__init__.py`` runs
    first (but not ``importer``'s own, which have run before it). ``source``: instead of its file's."""
    path = MODULES[importer]
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if source is None else source)):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = str(node.module or "")
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            named.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            )
    own_parents = {".".join(importer.split(".")[:end]) for end in range(1, importer.count(".") + 1)}
    runs = {".".join(name.split(".")[:end]) for name in named for end in range(1, name.count(".") + 2)}
    return (runs - own_parents - {importer}) & MODULES.keys()


def test_no_module_of_the_provider_is_in_an_import_circle() -> None:
    graph = {name: provider_imports(name) for name in MODULES}
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


def test_the_circle_check_sees_relative_package_and_parent_imports() -> None:
    """What the check above must count, on sources written for it: relative imports, a subpackage or module
    named from its parent, a ``TYPE_CHECKING`` import, and the parent packages a module's import runs."""
    records = "evolink_provider.records"
    assert "evolink_provider.ledger" in provider_imports(records, "from .ledger import Ledger")
    assert "evolink_provider.ledger" in provider_imports(records, "from . import ledger")
    assert "evolink_provider.ledger" in provider_imports(
        records, "if TYPE_CHECKING:\n    from evolink_provider.ledger import Ledger"
    )
    tasks = provider_imports(records, "from evolink_provider.simulator import tasks")
    assert {"evolink_provider.simulator", "evolink_provider.simulator.tasks"} <= tasks
    # hooks/__init__.py runs before any module of hooks/ is imported from outside it.
    assert "evolink_provider.hooks" in provider_imports(records, "import evolink_provider.hooks.retry")
    inside = provider_imports(
        "evolink_provider.hooks.connection", "from evolink_provider.hooks.retry import Kind"
    )
    assert inside == {"evolink_provider.hooks.retry"}
