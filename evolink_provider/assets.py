"""Stored results as Airflow asset events, so that a DAG can be scheduled on new videos.

Which files a generation writes is known only when it ends, so the operators announce them through an
``AssetAlias`` (Airflow's run-time outlets): with ``asset_alias="evolink_videos"`` (or any ``AssetAlias``
in ``outlets``) each file stored under ``output_path`` becomes one asset event on one ``Asset`` whose URI
is the file's location in its storage's scheme (``file:///...``, ``s3://bucket/...``). A DAG with
``schedule=AssetAlias("evolink_videos")`` runs on them. Without ``output_path`` nothing is announced,
unless ``announce_result_urls=True``: then each result URL is the asset (EvoLink deletes it after 24 h).

Every event's ``extra`` (:func:`asset_extra`):

=================  ==========================================================================
``evolink_task_id``  the EvoLink task that made the file
``model``            the EvoLink model
``prompt_sha256``    sha256 of the prompt (hex), ``None`` without one. Never the prompt itself:
                     asset events are shown to everyone who may read assets, across DAGs, and a
                     prompt can hold what only the DAG's owners should see
``duration``         the requested video length in seconds (``None``: the model's default)
``size_bytes``       the stored file's size (``None`` for a result URL or an unreadable size)
``credits_reserved`` ``credits_used``: as :func:`evolink_provider.results.credits_of` reads them
                     (flat numbers: Airflow 3.0 hashes each ``extra`` value, a nested dict fails the task)
``result_index``     the position of the file among the task's results
``expires_in_hours`` ``24``, on result URLs only: the URL stops working then
=================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from evolink_provider.exceptions import EvolinkError
from evolink_provider.links import has_unsafe_characters, safe_link
from evolink_provider.results import credits_of, result_urls

if TYPE_CHECKING:
    from airflow.sdk import Context

#: An asset URI must fit Airflow's 1500-character limit.
MAX_ASSET_URI_LENGTH = 1500
RESULT_URL_LIFETIME_HOURS = 24


class RequestSummary(NamedTuple):
    """What the asset events and the lineage say about the request that made the results."""

    model: str
    prompt_sha256: str | None
    duration: int | None
    payload: dict[str, Any]


def summarize_request(model: str, fields: dict[str, Any]) -> RequestSummary:
    """The model, the prompt's digest and the duration, from the fields as the operator validates them
    (local inputs stay as their paths); the raw fields if they do not validate."""
    from evolink_provider.models import validate_request

    try:
        payload = validate_request(model, fields, allow_local_media=True).payload
    except EvolinkError:
        payload = {name: value for name, value in fields.items() if value is not None}
    prompt = payload.get("prompt")
    duration = payload.get("duration")
    return RequestSummary(
        model,
        hashlib.sha256(prompt.encode()).hexdigest() if isinstance(prompt, str) else None,
        duration if isinstance(duration, int) and not isinstance(duration, bool) else None,
        payload,
    )


def asset_uri(location: str) -> str:
    """A stored location as an asset URI: plain paths become ``file://`` URIs, URIs stay as they are."""
    if "://" in location:
        return location
    return Path(location).resolve().as_uri()


def stored_size(location: str) -> int | None:
    """The size in bytes of a stored result, or ``None`` if it cannot be read."""
    try:
        if "://" not in location or location.startswith("file://"):
            return os.path.getsize(Path(location.removeprefix("file://")))
        from evolink_provider.storage import as_storage_path

        return int(as_storage_path(location).stat().st_size)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def asset_extra(
    task: dict[str, Any], request: RequestSummary, index: int, size: int | None
) -> dict[str, Any]:
    """The ``extra`` of one asset event (the table in the module docstring)."""
    return {
        "evolink_task_id": task.get("id"),
        "model": request.model,
        "prompt_sha256": request.prompt_sha256,
        "duration": request.duration,
        "size_bytes": size,
        **{f"credits_{name}": spent for name, spent in credits_of(task).items()},
        "result_index": index,
    }


def asset_events(
    task: dict[str, Any], request: RequestSummary, announce_result_urls: bool
) -> list[tuple[str, dict[str, Any]]]:
    """``(asset URI, extra)`` per stored file of a finished task; per result URL when nothing was stored
    and ``announce_result_urls`` is set. URLs that are not http(s), URIs too long for an asset or holding
    a control or format character (:func:`~evolink_provider.links.has_unsafe_characters`) are left out."""
    files = [str(location) for location in task.get("files") or []]
    if files:
        return [
            (uri, asset_extra(task, request, index, stored_size(location)))
            for index, location in enumerate(files)
            if len(uri := asset_uri(location)) <= MAX_ASSET_URI_LENGTH and not has_unsafe_characters(uri)
        ]
    if not announce_result_urls:
        return []
    return [
        (url, {**asset_extra(task, request, index, None), "expires_in_hours": RESULT_URL_LIFETIME_HOURS})
        for index, candidate in enumerate(result_urls(task))
        if (url := safe_link(candidate)) and len(url) <= MAX_ASSET_URI_LENGTH
    ]


def with_alias(outlets: Any, alias_name: str | None) -> list[Any]:
    """``outlets`` (one outlet, a list of them or ``None``) plus ``AssetAlias(alias_name)`` when named."""
    from airflow.sdk import AssetAlias

    given = [] if outlets is None else list(outlets) if isinstance(outlets, (list, tuple)) else [outlets]
    return given if not alias_name else [*given, AssetAlias(alias_name)]


def announce_assets(
    context: Context, outlets: Iterable[Any], events: Callable[[], list[tuple[str, dict[str, Any]]]]
) -> int:
    """Add one event per ``(uri, extra)`` to every ``AssetAlias`` among ``outlets``; ``events`` is only
    called when there is one. Returns the number of events added."""
    from airflow.sdk import Asset, AssetAlias

    aliases = [outlet for outlet in outlets if isinstance(outlet, AssetAlias)]
    if not aliases:
        return 0
    found = events()
    for alias in aliases:
        for uri, extra in found:
            context["outlet_events"][alias].add(Asset(uri), extra=extra)
    return len(found) * len(aliases)
