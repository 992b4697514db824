"""What a finished EvoLink task hands downstream, read once from its answer.

The XCom value, the final log line, the asset events and the extra links all describe the same finished
task; they read it here so that they cannot disagree. The answer was checked by
:mod:`evolink_provider.answers` already (types and sizes); this module only picks fields.

Credits: ``usage.credits_reserved`` is documented (the docs' examples use inconsistent units, so the number
is passed on as EvoLink gives it); ``usage.credits_used`` is only observed. A failed task returns its
reserved credits, so "used" falls back to "reserved" only for a completed task.
"""

from __future__ import annotations

import math
from typing import Any

from evolink_provider.storage import result_urls

__all__ = ["character_name", "credits_of", "result_urls"]


def _credit_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if value >= 0 else None


def credits_of(task: dict[str, Any]) -> dict[str, float | None]:
    """``{"reserved": ..., "used": ...}`` of a task (``None`` where EvoLink did not say)."""
    usage = task.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    reserved = _credit_number(usage.get("credits_reserved"))
    used = _credit_number(usage.get("credits_used"))
    if used is None and task.get("status") == "completed":
        used = reserved
    return {"reserved": reserved, "used": used}


def character_name(task: dict[str, Any]) -> str | None:
    """The sora-character name (``result_data.character_name``), if the task made one."""
    data = task.get("result_data")
    name = data.get("character_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None
