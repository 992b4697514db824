"""OpenLineage for the generation operators: media in, videos out.

When ``apache-airflow-providers-openlineage`` is installed and configured (the ``openlineage`` extra),
its listener calls the operators' ``get_openlineage_facets_on_start`` (inputs) and
``..._on_complete`` (inputs and outputs). Inputs are the media a request names (reference images,
videos and audio, the sora-character source video), outputs the stored files, or the result URLs when
nothing was stored. Imports of OpenLineage happen only here, when it calls, so the provider works
without it.

Dataset names follow OpenLineage's naming and Airflow's own asset converters: a local file is namespace
``file`` and its absolute path; ``s3://bucket/key`` is namespace ``s3://bucket`` and name ``key`` (likewise
for other object stores); an http(s) URL is namespace ``https://host[:port]`` and its path. A URL's query
and fragment are dropped: they can carry signatures, and they do not name the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from evolink_provider.assets import RequestSummary
from evolink_provider.links import safe_link
from evolink_provider.models import MEDIA_FIELDS
from evolink_provider.results import result_urls

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


def dataset_name(location: str) -> tuple[str, str] | None:
    """``(namespace, name)`` of a file, storage URI or URL; ``None`` for what names no data."""
    if "://" not in location:
        return ("file", str(Path(location).expanduser().resolve())) if location else None
    scheme = location.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        from evolink_provider.storage import object_uri

        location = object_uri(location)  # s3://conn_id@bucket/key is the object s3://bucket/key
    try:
        parts = urlsplit(location)
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return ("file", parts.path) if parts.path else None
    if not scheme or not parts.netloc or "@" in parts.netloc:
        return None
    if scheme in ("http", "https"):
        return f"{scheme}://{parts.netloc.lower()}", parts.path or "/"
    return f"{scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"


def input_locations(payload: dict[str, Any]) -> list[str]:
    """Every media input of a request, in field order (URLs, or local paths not yet uploaded)."""
    found: list[str] = []
    for name in sorted(MEDIA_FIELDS & payload.keys()):
        value = payload[name]
        found += [str(item) for item in (value if isinstance(value, list) else [value]) if item]
    return found


def output_locations(task: dict[str, Any] | None) -> list[str]:
    """The stored files of a finished task, or its result URLs when nothing was stored: only plain
    http(s) ones (:func:`~evolink_provider.links.safe_link`), since the answer is untrusted and anything
    else (``javascript:``, ``data:``, ``s3://someone-else``) would be named as a local file or a bucket."""
    if not task:
        return []
    stored = [str(location) for location in task.get("files") or []]
    return stored or [link for url in result_urls(task) if (link := safe_link(url))]


def operator_lineage(request: RequestSummary | None, task: dict[str, Any] | None) -> OperatorLineage:
    """The lineage of one generation; ``task`` is the finished task (``None`` before it ends)."""
    from airflow.providers.common.compat.openlineage.facet import Dataset
    from airflow.providers.openlineage.extractors import OperatorLineage

    def datasets(locations: list[str]) -> list[Dataset]:
        names = dict.fromkeys(name for location in locations if (name := dataset_name(location)))
        return [Dataset(namespace=namespace, name=name) for namespace, name in names]

    inputs = input_locations(request.payload) if request else []
    return OperatorLineage(inputs=datasets(inputs), outputs=datasets(output_locations(task)))
