"""What the ledger (:mod:`evolink_provider.ledger`) records per task instance, and the identities it is keyed
by: the :class:`SubmissionRecord` (with the :class:`UploadRecord` of each input uploaded) in Airflow 3.3's
``task_state_store``, the request's fingerprint and the derived ``Idempotency-Key``. A module of its own so
that what prepares a POST (:mod:`evolink_provider.submission`, :mod:`evolink_provider.uploads`) reads the
records without importing the ledger, which calls it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from evolink_provider.storage import StoredFile

STATE_KEY = "evolink_submission"
#: Files API URLs live 72 h; an upload is reused only while it has this much life left, so that EvoLink
#: can still fetch it when a queued task starts hours later.
UPLOAD_TTL = 72 * 3600.0
UPLOAD_REUSE_MARGIN = 6 * 3600.0


# -- the record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadRecord:
    """A local or storage input already uploaded through the Files API."""

    source: str
    sha256: str
    file_url: str
    expires_at: float

    @classmethod
    def from_stored(cls, value: Any) -> UploadRecord | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                str(value["source"]), str(value["sha256"]), str(value["file_url"]), float(value["expires_at"])
            )
        except (KeyError, TypeError, ValueError):
            return None

    def reusable(self, sha256: str, now: float | None = None) -> bool:
        """Same bytes, and the URL outlives the safety margin."""
        moment = time.time() if now is None else now
        return self.sha256 == sha256 and self.expires_at - UPLOAD_REUSE_MARGIN > moment


@dataclass(frozen=True)
class SubmissionRecord:
    """One submission of one task instance: ``task_id`` is ``None`` between the POST and its answer.

    ``generation`` is ``None`` in records written before it existed (treated as the current one, the
    cheaper guess). ``stored`` and ``results`` describe the files of ``task_id`` stored so far and how many
    results that task has; ``completed_seen_at`` is when this provider first saw it completed, and
    ``completed_task`` the (checked) task object it saw then, so that a later try that finds every result
    stored hands downstream the same value (links, character name, credits) without reading the task.
    A task's files stay in the folder the first of them went to (``stored_in``): a try that renders
    another ``output_path`` completes and hands over that set, so rows R08/R09 hold whatever it renders.
    ``payload`` is the JSON body sent with ``idempotency_key``: a resend sends it again, since a later
    rendering of the same request may name its images by other URLs (a cleared upload step, an upload
    near its expiry), which EvoLink refuses under that key.
    """

    fingerprint: str
    submission: int
    idempotency_key: str
    task_id: str | None = None
    generation: str | None = None
    uploads: tuple[UploadRecord, ...] = field(default=())
    completed_seen_at: float | None = None
    results: int | None = None
    stored: tuple[StoredFile, ...] = field(default=())
    #: The folder ``stored`` is in (a templated ``output_path`` can render another one on a later try).
    stored_in: str | None = None
    delivered: bool = False
    completed_task: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None

    @classmethod
    def from_stored(cls, value: Any) -> SubmissionRecord | None:
        if not isinstance(value, dict):
            return None
        try:
            seen = value.get("completed_seen_at")
            results = value.get("results")
            return cls(
                fingerprint=str(value["fingerprint"]),
                submission=int(value["submission"]),
                idempotency_key=str(value["idempotency_key"]),
                task_id=value.get("task_id") or None,
                generation=None if value.get("generation") is None else str(value["generation"]),
                uploads=_parsed(UploadRecord.from_stored, value.get("uploads")),
                completed_seen_at=None if seen is None else float(seen),
                results=None if results is None else int(results),
                stored=_parsed(StoredFile.from_stored, value.get("stored")),
                stored_in=value["stored_in"] if isinstance(value.get("stored_in"), str) else None,
                delivered=value.get("delivered") is True,
                completed_task=value["completed_task"]
                if isinstance(value.get("completed_task"), dict)
                else None,
                payload=value["payload"] if isinstance(value.get("payload"), dict) else None,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def as_stored(self) -> dict[str, Any]:
        stored = {
            k: v
            for k, v in asdict(self).items()
            if v is not None and k not in ("uploads", "stored", "delivered")
        }
        if self.uploads:
            stored["uploads"] = [asdict(upload) for upload in self.uploads]
        if self.stored:
            stored["stored"] = [asdict(item) for item in self.stored]
        if self.delivered:
            stored["delivered"] = True
        return stored


def _parsed(parse: Callable[[Any], Any], values: Any) -> tuple[Any, ...]:
    items = values if isinstance(values, list) else []
    return tuple(item for item in (parse(value) for value in items) if item is not None)


def expiry_epoch(value: Any, uploaded_at: float) -> float:
    """An upload's ``expires_at`` (epoch seconds or ISO-8601) as epoch seconds; 72 h after the upload
    when missing or unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    return uploaded_at + UPLOAD_TTL


# -- identity and keys -----------------------------------------------------------------------------


def payload_fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of the request body (key order does not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def request_fingerprint(
    payload: dict[str, Any], local_digests: dict[str, str], uploaded: dict[str, str] | None = None
) -> str:
    """The identity of what the user asked for: the validated body (local inputs still as their paths or
    URIs) and the sha256 of every local input's bytes. Upload URLs play no part: an ``image_urls`` URL an
    upload step made (``uploaded``: URL -> sha256) counts as its sha256, since a re-run of that step
    gives the same bytes another URL."""
    if uploaded:
        images = payload.get("image_urls")
        if isinstance(images, list):
            named = [
                {"uploaded_sha256": uploaded[url]} if isinstance(url, str) and url in uploaded else url
                for url in images
            ]
            payload = {**payload, "image_urls": named}
    if not local_digests:
        return payload_fingerprint(payload)
    return payload_fingerprint({"payload": payload, "local_media_sha256": local_digests})


def task_instance_identity(context: Any) -> str:
    """dag / task / run / map index of the running task instance: stable across its retries."""
    ti = context["ti"]
    return "|".join(str(part) for part in (ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1)))


def try_generation(context: Any, reattach: str) -> str:
    """Which try sequence this try belongs to (the ledger's docstring): ``ti.max_tries`` with ``auto``,
    the try number with ``never`` (every try a generation of its own)."""
    ti = context["ti"]
    if reattach == "never":
        return f"try-{getattr(ti, 'try_number', 0)}"
    max_tries = getattr(ti, "max_tries", None)
    return f"seq-{max_tries}" if isinstance(max_tries, int) else "seq-unknown"


def tries_in_sequence(context: Any) -> int:
    """How many tries of the current try sequence have started, this one included (at least 1)."""
    ti = context["ti"]
    try_number = getattr(ti, "try_number", 1)
    max_tries = getattr(ti, "max_tries", None)
    retries = getattr(getattr(ti, "task", None), "retries", None)
    if not isinstance(try_number, int):
        return 1
    if isinstance(max_tries, int) and isinstance(retries, int):
        return max(1, try_number - (max_tries - retries))
    return max(1, try_number)


def idempotency_key(identity: str, fingerprint: str, submission: int, generation: str = "") -> str:
    """``evl-<48 hex>``: within EvoLink's 16-96 characters of ``[A-Za-z0-9._-]``."""
    seed = f"{identity}\n{fingerprint}\n{submission}" + (f"\n{generation}" if generation else "")
    return f"evl-{hashlib.sha256(seed.encode()).hexdigest()[:48]}"


class SubmissionStore:
    """The task instance's :class:`SubmissionRecord`, in ``task_state_store`` when Airflow has one."""

    def __init__(self, context: Any) -> None:
        try:
            self._store = context.get("task_state_store")
        except AttributeError:
            self._store = None

    @property
    def durable(self) -> bool:
        return self._store is not None

    def load(self) -> SubmissionRecord | None:
        if self._store is None:
            return None
        return SubmissionRecord.from_stored(self._store.get(STATE_KEY))

    def save(self, record: SubmissionRecord) -> None:
        if self._store is not None:
            self._store.set(STATE_KEY, record.as_stored())
