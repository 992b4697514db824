"""What lets a retried Airflow task reattach to its EvoLink task instead of paying for a second one.

Per task instance (dag, task, run, map index: no try number) the operator keeps one
:class:`SubmissionRecord` in Airflow's ``task_state_store`` (Airflow 3.3+), which survives retries while
XCom does not. It is written twice around the POST (intent, then task id), so a crash between the two is
recovered by resubmitting with the *same* ``Idempotency-Key``, which EvoLink answers with the original
task. The key folds in the request's fingerprint, the *generation* and a submission counter: the same
work repeated replays; a deliberate resubmission after a failed task (counter + 1) or a clear (a new
generation) gets a fresh key.

The request's identity is what the user asked for: the validated fields and, for local or storage
inputs, their source and a sha256 of their bytes, never the temporary URLs an upload returned. The
uploads made are kept in the record and reused by a later try while their URLs are valid.

A *generation* tells a retry from a clear: Airflow sets ``max_tries = try_number + retries`` whenever a
task instance is cleared (``clear_task_instances``, and the scheduler for a running task that was
cleared), and never changes it on an automatic retry. So ``ti.max_tries`` is the same for every try of one
try sequence and changes with each clear, on Airflow 3.1, 3.2 and 3.3 alike.

On Airflow versions without ``task_state_store`` the record is kept nowhere; the key (generation, counter
0, then counter + 1 past every failed replay) still makes a repeated submission replay where the gateway
honours keys, which is the best that can be done there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

STATE_KEY = "evolink_submission"
UPLOAD_TTL = 72 * 3600.0
#: Files API URLs live 72 h; an upload is reused only while it has this much life left, so that EvoLink
#: can still fetch it when a queued task starts hours later.
UPLOAD_REUSE_MARGIN = 6 * 3600.0
#: ``reattach`` values of the operators.
REATTACH_MODES = ("auto", "never")


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
                source=str(value["source"]),
                sha256=str(value["sha256"]),
                file_url=str(value["file_url"]),
                expires_at=float(value["expires_at"]),
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

    ``generation`` is the try sequence the submission belongs to (see the module docstring); ``None`` in
    records written before it existed, which are treated as the current generation (the cheaper guess).
    """

    fingerprint: str
    submission: int
    idempotency_key: str
    task_id: str | None = None
    generation: str | None = None
    uploads: tuple[UploadRecord, ...] = field(default=())

    @classmethod
    def from_stored(cls, value: Any) -> SubmissionRecord | None:
        if not isinstance(value, dict):
            return None
        try:
            uploads = value.get("uploads") or []
            return cls(
                fingerprint=str(value["fingerprint"]),
                submission=int(value["submission"]),
                idempotency_key=str(value["idempotency_key"]),
                task_id=value.get("task_id") or None,
                generation=None if value.get("generation") is None else str(value["generation"]),
                uploads=tuple(
                    upload
                    for upload in (UploadRecord.from_stored(item) for item in uploads)
                    if upload is not None
                ),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def as_stored(self) -> dict[str, Any]:
        stored = {k: v for k, v in asdict(self).items() if v is not None and k != "uploads"}
        if self.uploads:
            stored["uploads"] = [asdict(upload) for upload in self.uploads]
        return stored


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


def payload_fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of the request body (key order does not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def request_fingerprint(payload: dict[str, Any], local_digests: dict[str, str]) -> str:
    """The identity of what the user asked for: the validated body (local inputs still as their paths or
    URIs) and the sha256 of every local input's bytes. Upload URLs play no part."""
    if not local_digests:
        return payload_fingerprint(payload)
    return payload_fingerprint({"payload": payload, "local_media_sha256": local_digests})


def task_instance_identity(context: Any) -> str:
    """dag / task / run / map index of the running task instance: stable across its retries."""
    ti = context["ti"]
    return "|".join(str(part) for part in (ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1)))


def try_generation(context: Any, reattach: str) -> str:
    """Which try sequence this try belongs to: the same for an automatic retry, new after a clear.

    ``auto``: ``ti.max_tries``, which Airflow raises on every clear and never on a retry. ``never``: the
    try number, so every try is a generation of its own.
    """
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
