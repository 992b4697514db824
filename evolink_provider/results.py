"""What a finished EvoLink task hands downstream, read once from its answer.

The XCom value, the final log line, the asset events and the extra links all describe the same finished
task; they read it here so that they cannot disagree. The answer was checked by
:mod:`evolink_provider.answers` already (types and sizes); this module only picks fields.

Credits: ``usage.credits_reserved`` is documented (the docs' examples use inconsistent units, so the number
is passed on as EvoLink gives it); ``usage.credits_used`` is only observed. A failed task returns its
reserved credits, so "used" falls back to "reserved" only for a completed task.
"""

from __future__ import annotations

from typing import Any

from evolink_provider.answers import RESULT_DATA_URLS, credits_text, finite_number
from evolink_provider.exceptions import printable

__all__ = ["character_name", "credits_of", "final_line", "finished_value", "printable", "result_urls"]


def _credit_number(value: Any) -> float | None:
    number = finite_number(value)
    return number if number is not None and number >= 0 else None


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


def finished_value(task: dict[str, Any]) -> dict[str, Any]:
    """The XCom value of a finished task: the task object as EvoLink returned it (plus ``files`` when
    stored), with ``result_urls``, ``character_name`` and ``credits`` read once on top, so a downstream
    step (or a run's credit total) does not need to know where each model puts them."""
    return {
        **task,
        "result_urls": result_urls(task),
        "character_name": character_name(task),
        "credits": credits_of(task),
    }


def _credits_phrase(value: float | None) -> str:
    return "not reported" if value is None else credits_text(value)


def final_line(task: dict[str, Any], elapsed: float | None = None) -> str:
    """The one log line a person reads to find a finished task's video, character and cost."""
    line = f"EvoLink task {task.get('id', '?')} completed"
    if elapsed is not None:
        line += f", {duration_phrase(elapsed)} after submission"
    urls = result_urls(task)
    line += ": " + (", ".join(printable(url) for url in urls) if urls else "no result URL")
    if task.get("files"):
        line += f"; stored: {', '.join(printable(path) for path in task['files'])}"
    if name := character_name(task):
        line += f"; character: {printable(name)}"
    spent = credits_of(task)
    return line + (
        f"; credits reserved: {_credits_phrase(spent['reserved'])}, used: {_credits_phrase(spent['used'])}"
    )


def duration_phrase(seconds: float) -> str:
    """``45s``, ``3m 05s`` or ``1h 02m``: readable in a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def result_urls(task: dict[str, Any]) -> list[str]:
    """Every file a completed task hands over, in order and without repeats.

    Most tasks list videos in ``results``; some put them in ``result_data[].video_url`` or
    ``result_data.video_url`` with ``results`` empty (seen by EvoLink's own clients); sora-character
    gives a ``result_data.profile_picture_url``. All are collected.
    """
    found = [url for url in task.get("results") or [] if isinstance(url, str)]
    data = task.get("result_data")
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        if isinstance(entry, dict):
            found += [entry[name] for name in RESULT_DATA_URLS if isinstance(entry.get(name), str)]
    return list(dict.fromkeys(url for url in found if url.strip()))
