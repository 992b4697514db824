"""Submit or reattach: the only code in the operators that spends credits.

EvoLink bills every generation and has no cancel call, so a POST is made only when no EvoLink task of this
try sequence can be reused. The rules (what a retry, a clear or a replayed failure does) are in
:mod:`evolink_provider.resume`, which keeps the submission record; this module applies them around the
hook's POST: it validates and fingerprints the request (:func:`prepare_request`), uploads local inputs only
when a submission is really made, and follows a replayed failed task with a fresh key once per failure.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from evolink_provider.answers import credits_text, read_credits
from evolink_provider.compat import AirflowFailException, log_once
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkNotFoundError,
    fail_for,
    task_error_is_retryable,
)
from evolink_provider.polling import FAILED_STATUSES, expected_end, task_failure
from evolink_provider.results import printable
from evolink_provider.resume import (
    REATTACH_MODES,
    SubmissionRecord,
    SubmissionStore,
    UploadRecord,
    expiry_epoch,
    idempotency_key,
    request_fingerprint,
    task_instance_identity,
    tries_in_sequence,
    try_generation,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from evolink_provider.field_rules import MediaRef
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.uploads import ImageRules


NO_TASK_STATE_STORE = (
    "This Airflow has no task_state_store (3.3+): a retry cannot look up the earlier EvoLink task and "
    "relies on EvoLink replaying the Idempotency-Key instead (said once per process)."
)


class PreparedRequest(NamedTuple):
    """A validated request: ``payload`` still holds local inputs as their paths, ``digests`` their
    sha256 by path, and ``fingerprint`` the identity of the whole (:func:`request_fingerprint`)."""

    model: str
    fields: dict[str, Any]
    payload: dict[str, Any]
    local_media: list[MediaRef]
    digests: dict[str, str]
    fingerprint: str
    #: The model's image rules the local inputs were held to (held to again when uploaded).
    image_rules: ImageRules | None = None


@dataclass
class Attempt:
    """The submission being prepared: counter, try sequence, and the uploads that can be reused."""

    request: PreparedRequest
    generation: str
    submission: int
    uploads: dict[str, UploadRecord]
    resending: bool = False

    def key(self, identity: str) -> str:
        """The ``Idempotency-Key`` of this submission of the task instance ``identity``."""
        return idempotency_key(identity, self.request.fingerprint, self.submission, self.generation)

    def record(self, key: str, task_id: str | None = None) -> SubmissionRecord:
        uploads = tuple(self.uploads[source] for source in sorted(self.uploads))
        return SubmissionRecord(
            self.request.fingerprint, self.submission, key, task_id, self.generation, uploads
        )


def prepare_request(
    hook: EvolinkHook,
    model: str,
    fields: dict[str, Any],
    log: logging.Logger | Any,
    *,
    prompt_policy: str = "warn",
    local_checks: str = "refuse",
) -> PreparedRequest:
    """Check the rendered fields (no HTTP before that) and fingerprint what the user asked for.

    Local or object-storage inputs stay as their paths here; their bytes are hashed (sha256, read through
    the upload checks and the model's image rules) into the fingerprint, so that the request's identity
    does not depend on the temporary URLs an upload returns. They are uploaded only when a submission is
    actually made.

    :param prompt_policy: ``warn`` or ``refuse`` a prompt longer than EvoLink advises.
    :param local_checks: ``refuse`` or ``warn`` about local images that break the model's image rules.
    """
    from evolink_provider.models import validate_request
    from evolink_provider.uploads import ImageRules, local_media_digests

    warnings: list[str] = []
    try:
        validated = validate_request(model, fields, allow_local_media=True, prompt_policy=prompt_policy)
        rules = ImageRules.of(model, local_checks)
        digests = local_media_digests(hook, fields, validated.local_media, rules, warnings)
    except EvolinkError as error:
        fail_for(error)
    except OSError as error:
        raise AirflowFailException(f"{model}: cannot read a local input: {error}") from error
    for warning in [*validated.warnings, *warnings]:
        log.warning("%s: %s", model, warning)
    fingerprint = request_fingerprint(validated.payload, digests)
    return PreparedRequest(
        model, fields, validated.payload, validated.local_media, digests, fingerprint, rules
    )


def payload_for_post(
    hook: EvolinkHook, request: PreparedRequest, uploads: dict[str, UploadRecord], log: logging.Logger | Any
) -> dict[str, Any]:
    """The body with every local input replaced by its Files API URL.

    ``uploads`` holds what earlier tries uploaded: an upload of the same bytes whose URL is still valid is
    reused; new uploads are added to it (the caller records them with the submission).
    """
    if not request.local_media:
        return request.payload
    from evolink_provider.models import validate_request
    from evolink_provider.uploads import upload_local_media

    known = {
        source: {"file_url": upload.file_url, "expires_at": upload.expires_at}
        for source, upload in uploads.items()
        if upload.reusable(request.digests.get(source, ""))
    }
    if known:
        log.info("Reusing %d upload(s) of an earlier try: %s", len(known), ", ".join(sorted(known)))
    fresh = dict(known)
    uploaded_at = time.time()
    try:
        fields = upload_local_media(hook, request.fields, request.local_media, fresh, request.image_rules)
        payload = validate_request(request.model, fields).payload
    except EvolinkError as error:
        fail_for(error)
    for source, data in fresh.items():
        if source not in known:
            uploads[source] = UploadRecord(
                source,
                request.digests[source],
                str(data["file_url"]),
                expiry_epoch(data.get("expires_at"), uploaded_at),
            )
    return payload


class Submitter:
    """Finds the EvoLink task of a task instance's try sequence, or submits one (once).

    :param reattach: ``auto`` or ``never`` (see the operators' docstring).
    :param output_path: where results are stored; a task whose record is gone is still reused when all its
        results are stored there.
    :param min_credits: the balance below which nothing is submitted (see :func:`check_balance`).
    """

    def __init__(
        self,
        hook: EvolinkHook,
        log: logging.Logger | Any,
        reattach: str,
        output_path: str | None,
        min_credits: float | None = None,
    ) -> None:
        self.hook = hook
        self.log = log
        self.reattach = reattach
        self.output_path = output_path
        self.min_credits = min_credits
        #: The EvoLink task this try waits for, once known (named by ``on_kill``).
        self.current_task_id: str | None = None

    def submit_or_reattach(
        self, context: Context, request: PreparedRequest, *, renew: bool = False
    ) -> dict[str, Any]:
        """Reattach to this try sequence's EvoLink task, or submit (see :mod:`evolink_provider.resume`).

        :param renew: submit anew even when the recorded task belongs to this try sequence (its results
            expired before they were stored).
        """
        if self.reattach not in REATTACH_MODES:
            raise AirflowFailException(f"reattach={self.reattach!r}: allowed values are 'auto' and 'never'")
        store = SubmissionStore(context)
        if not store.durable:
            log_once(self.log, NO_TASK_STATE_STORE)
        generation = try_generation(context, self.reattach)
        record = store.load()
        attempt = Attempt(request, generation, 0, uploads={})
        if record is None:
            return self._submit(context, store, attempt)
        attempt.uploads.update({upload.source: upload for upload in record.uploads})
        attempt.submission = record.submission + 1
        if renew:
            pass
        elif record.generation not in (None, generation):
            self.log.info(
                "This task instance was cleared (or reattach='never'): a new generation is submitted; "
                "the earlier EvoLink task %s is left alone.",
                record.task_id or "(unknown)",
            )
        elif record.fingerprint != request.fingerprint:
            self.log.warning(
                "The request changed since the earlier try; its EvoLink task %s is left alone.",
                record.task_id or "(unknown)",
            )
        elif record.task_id:
            reused = self._reuse(record.task_id)
            if reused is not None:
                return reused
        else:
            # The earlier try crashed or lost the answer after the intent was recorded: same key, so
            # EvoLink answers with the task it may already have created.
            attempt.submission = record.submission
            attempt.resending = True
        return self._submit(context, store, attempt)

    def _reuse(self, task_id: str) -> dict[str, Any] | None:
        """The recorded task when it can be reused (running, completed, or its results stored); None
        when a new submission is due (it failed with a code a resubmission can fix, or it is gone)."""
        existing = self._existing_task(task_id)
        if existing is None:
            stored = self._stored_results(task_id)
            if stored is not None:
                return stored
            self.log.info("EvoLink task %s is gone: submitting again.", task_id)
            return None
        if existing.get("status") not in FAILED_STATUSES:
            self.log.info(
                "Reattaching to EvoLink task %s (%s) from an earlier try; nothing is submitted.",
                task_id,
                existing.get("status"),
            )
            self.current_task_id = task_id
            return existing
        refuse_unfixable(existing)
        self.log.info("EvoLink task %s failed: submitting once more.", task_id)
        return None

    def _existing_task(self, task_id: str) -> dict[str, Any] | None:
        try:
            return self.hook.get_task(task_id)
        except EvolinkNotFoundError:
            return None
        except EvolinkError as error:
            fail_for(error)

    def _submit(self, context: Context, store: SubmissionStore, attempt: Attempt) -> dict[str, Any]:
        """POST the request; follow a replayed failed task with a fresh key, once per such failure.

        A failed answer is a replay of an earlier failed task when the key had been sent before: by the
        try whose intent is recorded (``resending``) or, without ``task_state_store``, by one of the
        earlier tries of this try sequence (each created at most one task, keys 0..n-2). Anything else
        is a fresh task that failed at once, handed to the operator like any failure.
        """
        identity = task_instance_identity(context)
        earlier_tries = tries_in_sequence(context) - 1
        payload: dict[str, Any] | None = None
        while True:
            key = idempotency_key(
                identity, attempt.request.fingerprint, attempt.submission, attempt.generation
            )
            if payload is None:
                check_balance(self.hook, self.min_credits, self.log)
                store.save(attempt.record(key))  # the intent, with the uploads of earlier tries
                payload = payload_for_post(self.hook, attempt.request, attempt.uploads, self.log)
            store.save(attempt.record(key))
            try:
                task = self.hook.create_video_task(payload, idempotency_key=key)
            except EvolinkError as error:
                fail_for(error)
            store.save(attempt.record(key, task["id"]))
            self.current_task_id = task["id"]
            replayed = attempt.resending or (not store.durable and attempt.submission < earlier_tries)
            if task.get("status") in FAILED_STATUSES and replayed:
                refuse_unfixable(task)
                self.log.info("EvoLink replayed failed task %s; submitting once more.", task["id"])
                attempt.submission += 1
                attempt.resending = False
                continue
            usage = task.get("usage") or {}
            self.log.info(
                "Submitted EvoLink task %s (model %s); credits reserved: %s (%s)%s",
                task["id"],
                printable(task.get("model")),
                printable(usage.get("credits_reserved")),
                printable(usage.get("billing_rule")),
                "; " + end if (end := expected_end(task, time.time())) else "",
            )
            return task

    def _stored_results(self, task_id: str) -> dict[str, Any] | None:
        """The results of ``task_id`` already stored under ``output_path``, when every one is there."""
        if not self.output_path:
            return None
        from evolink_provider.storage import stored_results

        files = stored_results(task_id, self.output_path)
        if files is None:
            return None
        self.log.info(
            "EvoLink task %s can no longer be read, but its results are stored under %s: %s",
            task_id,
            self.output_path,
            files,
        )
        return {"id": task_id, "status": "completed", "results": [], "files": files, "from_storage": True}


def refuse_unfixable(task: dict[str, Any]) -> None:
    """A failed task whose error code no resubmission can fix ends the Airflow task, clearly."""
    code, message = task_failure(task)
    if task.get("status") == "failed" and not task_error_is_retryable(code):
        raise AirflowFailException(
            f"EvoLink task {task.get('id')} failed with {code}: {message or '(no message)'}; "
            "a resubmission cannot fix that code, so nothing is submitted again."
        )


def check_balance(hook: EvolinkHook, min_credits: float | None, log: logging.Logger | Any) -> None:
    """Refuse to submit when the key can spend fewer than ``min_credits`` credits (``GET /v1/credits``,
    free; :class:`~evolink_provider.answers.Credits`); ``None`` skips the check."""
    if min_credits is None:
        return
    if (
        isinstance(min_credits, bool)
        or not isinstance(min_credits, (int, float))
        or not math.isfinite(min_credits)
        or min_credits < 0
    ):
        raise AirflowFailException(
            f"min_credits={min_credits!r}: allowed values are None or a number of credits >= 0"
        )
    try:
        balance = read_credits(hook.get_credits()).spendable
    except EvolinkError as error:
        fail_for(error)
    if balance < min_credits:
        raise AirflowFailException(
            f"EvoLink balance is {credits_text(balance)} credits, below min_credits="
            f"{credits_text(min_credits)}: nothing was submitted. Top up the account or lower min_credits."
        )
    log.info(
        "EvoLink balance: %s credits (min_credits=%s): submitting.",
        credits_text(balance),
        credits_text(min_credits),
    )
