"""What lets a retried Airflow task reattach to its EvoLink task instead of paying for a second one.

Per task instance (dag, task, run, map index: no try number) the operator keeps one
:class:`SubmissionRecord` in Airflow's ``task_state_store`` (Airflow 3.3+), which survives retries while
XCom does not. It is written twice around the POST (intent, then task id), so a crash between the two is
recovered by resubmitting with the *same* ``Idempotency-Key``, which EvoLink answers with the original
task. The key also folds in a fingerprint of the payload and a submission counter: the same work repeated
replays, a deliberate resubmission after a failed task (counter + 1) gets a fresh key.

On Airflow versions without ``task_state_store`` the record is kept nowhere; the key (counter 0, then
counter + 1 past every failed replay) still makes a repeated submission replay where the gateway honours
keys, which is the best that can be done there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

STATE_KEY = "evolink_submission"


@dataclass(frozen=True)
class SubmissionRecord:
    """One submission of one task instance: ``task_id`` is ``None`` between the POST and its answer."""

    fingerprint: str
    submission: int
    idempotency_key: str
    task_id: str | None = None

    @classmethod
    def from_stored(cls, value: Any) -> SubmissionRecord | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                fingerprint=str(value["fingerprint"]),
                submission=int(value["submission"]),
                idempotency_key=str(value["idempotency_key"]),
                task_id=value.get("task_id") or None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def payload_fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of the request body (key order does not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def task_instance_identity(context: Any) -> str:
    """dag / task / run / map index of the running task instance: stable across its retries."""
    ti = context["ti"]
    return "|".join(str(part) for part in (ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1)))


def idempotency_key(identity: str, fingerprint: str, submission: int) -> str:
    """``evl-<48 hex>``: within EvoLink's 16-96 characters of ``[A-Za-z0-9._-]``."""
    digest = hashlib.sha256(f"{identity}\n{fingerprint}\n{submission}".encode()).hexdigest()
    return f"evl-{digest[:48]}"


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
            self._store.set(STATE_KEY, {k: v for k, v in asdict(record).items() if v is not None})
