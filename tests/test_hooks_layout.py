"""hooks/ imports one way (docs/architecture.md): no module imports one after it in :data:`ORDER`,
deferred and ``TYPE_CHECKING`` imports included, so there is no import circle."""

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
