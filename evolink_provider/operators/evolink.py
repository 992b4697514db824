"""Operators that submit EvoLink video generations and hand their results downstream.

The flow is one-way: validate the rendered fields (no HTTP before that), reattach to or submit the EvoLink
task, wait (here, or in the triggerer when ``deferrable``), then collect the results into XCom (and into
storage when ``output_path`` is set). The retry and reattach rules are in :mod:`evolink_provider.resume`;
"what does this poll mean" is :func:`evolink_provider.polling.decide_after_poll`, shared with the trigger.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowFailException

from evolink_provider.answers import created_at
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkTaskError,
    EvolinkWaitTimeoutError,
    task_error_is_retryable,
)
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.models import field_docs, schema_for
from evolink_provider.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    FAILED_STATUSES,
    Outcome,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    expected_run_time,
    task_failure,
)
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
from evolink_provider.triggers.evolink import (
    DEFAULT_MAX_POLL_FAILURES,
    EvolinkTaskTrigger,
    task_from_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from evolink_provider.models import MediaRef

#: Default wait budget: generations take minutes to tens of minutes.
DEFAULT_TIMEOUT = 2 * 60 * 60
XCOM_TASK_ID_KEY = "evolink_task_id"
#: Seconds after a deferral before the trigger may fire, and the expected remaining run time up to which a
#: deferrable operator waits on the worker instead: Airflow 3.2-3.3's scheduler can fail a task instance
#: whose trigger fires seconds after the deferral (docs/reliability.md, "Fast triggers").
TRIGGER_MIN_DELAY = 15.0
WAIT_ON_WORKER_WINDOW = TRIGGER_MIN_DELAY


class ResultsExpiredError(EvolinkError):
    """A reused task's result links expired before its results were stored under ``output_path``."""


class PreparedRequest(NamedTuple):
    """A validated request: ``payload`` still holds local inputs as their paths, ``digests`` their
    sha256 by path, and ``fingerprint`` the identity of the whole (:func:`request_fingerprint`)."""

    model: str
    fields: dict[str, Any]
    payload: dict[str, Any]
    local_media: list[MediaRef]
    digests: dict[str, str]
    fingerprint: str


@dataclass
class Attempt:
    """The submission being prepared: counter, try sequence, and the uploads that can be reused."""

    request: PreparedRequest
    generation: str
    submission: int
    uploads: dict[str, UploadRecord]
    resending: bool = False

    def upload_records(self) -> tuple[UploadRecord, ...]:
        return tuple(self.uploads[source] for source in sorted(self.uploads))


def expected_remaining(task: dict[str, Any], elapsed: float) -> float:
    """Seconds the task is expected to run still (the polling module's estimate)."""
    expected, _trust = expected_run_time(task, max(0.0, elapsed))
    return max(0.0, expected - elapsed)


def fail_for(error: EvolinkError) -> NoReturn:
    """Raise so that Airflow retries only what a retry can fix.

    Non-retryable errors (validation, 401/402/403, rule-breaking task codes) become
    ``AirflowFailException``, which skips the remaining Airflow retries and so spends no more credits.
    """
    if error.retryable:
        raise error
    raise AirflowFailException(str(error)) from error


class EvolinkBaseVideoOperator(BaseOperator):
    """Orchestration shared by every EvoLink generation operator (subclasses only name the fields).

    :param evolink_conn_id: Airflow connection of type ``evolink`` (password = API key).
    :param wait_for_completion: wait for the task to end; when False, return the created task at once.
    :param deferrable: wait in the triggerer instead of holding a worker slot.
    :param poll_interval: the shortest delay between polls, seconds (the schedule adapts above it).
    :param max_poll_interval: the longest delay between polls, seconds.
    :param timeout: seconds of waiting (from submission or reattachment) before the Airflow task fails;
        the EvoLink task keeps running and a retry reattaches to it.
    :param output_path: a local directory or an ``ObjectStoragePath`` URI (``file://``, ``s3://``, ...)
        to stream the results into (their URLs expire after 24 h); the stored paths are returned under
        ``"files"``.
    :param reattach: ``auto`` (default): an automatic retry of the same try sequence (a crash, a killed
        worker, a wait timeout, a triggerer restart) reattaches to the EvoLink task it submitted, while a
        cleared task instance or a new DAG run submits a new generation. ``never``: every try submits its
        own generation (each one is billed).
    """

    template_fields: Sequence[str] = ("evolink_conn_id", "output_path")
    ui_color = "#e8defc"

    def __init__(
        self,
        *,
        evolink_conn_id: str = EvolinkHook.default_conn_name,
        wait_for_completion: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        output_path: str | None = None,
        reattach: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.evolink_conn_id = evolink_conn_id
        self.output_path = output_path
        self.reattach = reattach
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = timeout

    # -- what subclasses provide ------------------------------------------------------------------

    def model_name(self) -> str:
        """The EvoLink model to run (after template rendering)."""
        raise NotImplementedError

    def model_fields(self) -> dict[str, Any]:
        """The model's fields as the user set them (after rendering); ``None`` means "API default"."""
        raise NotImplementedError

    # -- orchestration ----------------------------------------------------------------------------

    @cached_property
    def hook(self) -> EvolinkHook:
        return EvolinkHook(self.evolink_conn_id)

    def validated_request(self) -> PreparedRequest:
        """Check the rendered fields (no HTTP before that) and fingerprint what the user asked for.

        Local or object-storage inputs stay as their paths here; their bytes are hashed (sha256) into the
        fingerprint, so that the request's identity does not depend on the temporary URLs an upload
        returns. They are uploaded only when a submission is actually made (:meth:`_payload_for_post`).
        """
        from evolink_provider.models import validate_request
        from evolink_provider.uploads import local_media_digests

        model = self.model_name()
        fields = self.model_fields()
        try:
            validated = validate_request(model, fields, allow_local_media=True)
            digests = local_media_digests(self.hook, fields, validated.local_media)
        except EvolinkError as error:
            fail_for(error)
        except OSError as error:
            raise AirflowFailException(f"{model}: cannot read a local input: {error}") from error
        for warning in validated.warnings:
            self.log.warning("%s: %s", model, warning)
        return PreparedRequest(
            model,
            fields,
            validated.payload,
            validated.local_media,
            digests,
            request_fingerprint(validated.payload, digests),
        )

    def validated_payload(self) -> dict[str, Any]:
        """The JSON body to POST, local inputs uploaded (a convenience for callers outside ``execute``)."""
        return self._payload_for_post(self.validated_request(), {})

    def _payload_for_post(self, request: PreparedRequest, uploads: dict[str, UploadRecord]) -> dict[str, Any]:
        """The body with every local input replaced by its Files API URL.

        ``uploads`` holds what earlier tries uploaded: an upload of the same bytes whose URL is still valid
        is reused; new uploads are added to it (the caller records them with the submission).
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
            self.log.info("Reusing %d upload(s) of an earlier try: %s", len(known), ", ".join(sorted(known)))
        fresh = dict(known)
        uploaded_at = time.time()
        try:
            fields = upload_local_media(self.hook, request.fields, request.local_media, fresh)
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

    def execute(self, context: Context) -> dict[str, Any]:
        request = self.validated_request()
        task = self._submit_or_reattach(context, request)
        try:
            return self._wait_and_finish(context, task)
        except ResultsExpiredError as expired:
            return self._renew(context, request, expired)

    def _renew(self, context: Context, request: PreparedRequest | None, expired: ResultsExpiredError) -> Any:
        """The reused task's results expired before they were stored: say so, and generate anew."""
        self.log.warning("%s; submitting a new generation instead of failing.", expired)
        task = self._submit_or_reattach(context, request or self.validated_request(), renew=True)
        return self._wait_and_finish(context, task)

    def _wait_and_finish(self, context: Context, task: dict[str, Any]) -> dict[str, Any]:
        context["ti"].xcom_push(key=XCOM_TASK_ID_KEY, value=task["id"])
        if not self.wait_for_completion or task.get("from_storage"):
            return task
        started_at = created_at(task, default=time.time())
        deadline = time.time() + float(self.timeout)
        decision = decide_after_poll(
            task,
            now=time.time(),
            started_at=started_at,
            deadline=deadline,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
        )
        if decision.outcome is Outcome.WAIT and self.deferrable:
            # A trigger that fires seconds after the deferral can get the task instance failed by
            # Airflow 3.2-3.3's scheduler (apache/airflow#66374): a task expected to end soon is waited
            # for here, and only one still running after that window is deferred.
            if expected_remaining(task, time.time() - started_at) <= WAIT_ON_WORKER_WINDOW:
                task = self._wait_here(task, started_at, deadline, until=time.time() + WAIT_ON_WORKER_WINDOW)
                decision = decide_after_poll(
                    task,
                    now=time.time(),
                    started_at=started_at,
                    deadline=deadline,
                    poll_interval=self.poll_interval,
                    max_poll_interval=self.max_poll_interval,
                )
            if decision.outcome is Outcome.WAIT:
                deferred_at = time.time()
                self.defer(
                    trigger=EvolinkTaskTrigger(
                        evolink_task_id=task["id"],
                        evolink_conn_id=self.evolink_conn_id,
                        poll_interval=self.poll_interval,
                        max_poll_interval=self.max_poll_interval,
                        end_time=deadline,
                        started_at=started_at,
                        first_poll_at=deferred_at + decision.delay,
                        not_before=deferred_at + TRIGGER_MIN_DELAY,
                    ),
                    method_name="execute_complete",
                    # Only a backstop: the trigger's own timeout event, which names the task, comes first.
                    timeout=timedelta(
                        seconds=float(self.timeout) + 2 * self.max_poll_interval + 60 + TRIGGER_MIN_DELAY
                    ),
                )
        if decision.outcome is Outcome.WAIT:
            task = self._wait_here(task, started_at, deadline)
        return self._finish(context, task, deadline)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: check the event, then collect the results (within the same
        deadline the trigger waited for)."""
        try:
            task = task_from_event(event)
        except EvolinkError as error:
            fail_for(error)
        end_time = event.get("end_time") if isinstance(event, dict) else None
        deadline = float(end_time) if isinstance(end_time, (int, float)) else time.time() + self.timeout
        try:
            return self._finish(context, task, deadline)
        except ResultsExpiredError as expired:
            return self._renew(context, None, expired)

    def on_kill(self) -> None:
        record = getattr(self, "_current_task_id", None)
        self.log.warning(
            "EvoLink has no cancel call: task %s keeps generating and is billed when it completes. "
            "A retry of this Airflow task reattaches to it instead of submitting again.",
            record or "(not submitted yet)",
        )

    # -- submission and reattachment --------------------------------------------------------------

    def _submit_or_reattach(
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
            self.log.warning(
                "This Airflow has no task_state_store (3.3+): a retry cannot look up the earlier EvoLink "
                "task and relies on EvoLink replaying the Idempotency-Key instead."
            )
        generation = try_generation(context, self.reattach)
        record = store.load()
        attempt = Attempt(request, generation, 0, uploads={})
        if record is None:
            return self._submit(context, store, attempt)
        attempt.uploads.update({upload.source: upload for upload in record.uploads})
        same_generation = record.generation in (None, generation)
        if renew:
            attempt.submission = record.submission + 1
        elif not same_generation:
            self.log.info(
                "This task instance was cleared (or reattach='never'): a new generation is submitted; "
                "the earlier EvoLink task %s is left alone.",
                record.task_id or "(unknown)",
            )
            attempt.submission = record.submission + 1
        elif record.fingerprint != request.fingerprint:
            self.log.warning(
                "The request changed since the earlier try; its EvoLink task %s is left alone.",
                record.task_id or "(unknown)",
            )
            attempt.submission = record.submission + 1
        elif record.task_id:
            existing = self._existing_task(record.task_id)
            if existing is None:
                stored = self._stored_results(record.task_id)
                if stored is not None:
                    return stored
                self.log.info("EvoLink task %s is gone: submitting again.", record.task_id)
            elif existing.get("status") not in FAILED_STATUSES:
                self.log.info(
                    "Reattaching to EvoLink task %s (%s) from an earlier try; nothing is submitted.",
                    record.task_id,
                    existing.get("status"),
                )
                self._current_task_id = record.task_id
                return existing
            else:
                self._refuse_unfixable(existing)
                self.log.info("EvoLink task %s failed: submitting once more.", record.task_id)
            attempt.submission = record.submission + 1
        else:
            # The earlier try crashed or lost the answer after the intent was recorded: same key, so
            # EvoLink answers with the task it may already have created.
            attempt.submission = record.submission
            attempt.resending = True
        return self._submit(context, store, attempt)

    def _existing_task(self, task_id: str) -> dict[str, Any] | None:
        try:
            return self.hook.get_task(task_id)
        except EvolinkNotFoundError:
            return None
        except EvolinkError as error:
            fail_for(error)

    @staticmethod
    def _refuse_unfixable(task: dict[str, Any]) -> None:
        """A failed task whose error code no resubmission can fix ends the Airflow task, clearly."""
        code, message = task_failure(task)
        if task.get("status") == "failed" and not task_error_is_retryable(code):
            raise AirflowFailException(
                f"EvoLink task {task.get('id')} failed with {code}: {message or '(no message)'}; "
                "a resubmission cannot fix that code, so nothing is submitted again."
            )

    def _submit(self, context: Context, store: SubmissionStore, attempt: Attempt) -> dict[str, Any]:
        """POST the request; follow a replayed failed task with a fresh key, once per such failure.

        A failed answer is a replay of an earlier failed task when the key had been sent before: by the
        try whose intent is recorded (``resending``) or, without ``task_state_store``, by one of the
        earlier tries of this try sequence (each created at most one task, keys 0..n-2). Anything else
        is a fresh task that failed at once, handed to :meth:`_finish` like any failure.
        """
        identity = task_instance_identity(context)
        earlier_tries = tries_in_sequence(context) - 1
        payload: dict[str, Any] | None = None
        fingerprint = attempt.request.fingerprint
        while True:
            key = idempotency_key(identity, fingerprint, attempt.submission, attempt.generation)
            record = SubmissionRecord(
                fingerprint, attempt.submission, key, None, attempt.generation, attempt.upload_records()
            )
            if payload is None:
                store.save(record)  # the intent, with the uploads of earlier tries
                payload = self._payload_for_post(attempt.request, attempt.uploads)
                record = SubmissionRecord(
                    fingerprint, attempt.submission, key, None, attempt.generation, attempt.upload_records()
                )
            store.save(record)
            try:
                task = self.hook.create_video_task(payload, idempotency_key=key)
            except EvolinkError as error:
                fail_for(error)
            store.save(
                SubmissionRecord(
                    fingerprint,
                    attempt.submission,
                    key,
                    task["id"],
                    attempt.generation,
                    attempt.upload_records(),
                )
            )
            self._current_task_id = task["id"]
            replayed = attempt.resending or (not store.durable and attempt.submission < earlier_tries)
            if task.get("status") in FAILED_STATUSES and replayed:
                self._refuse_unfixable(task)
                self.log.info("EvoLink replayed failed task %s; submitting once more.", task["id"])
                attempt.submission += 1
                attempt.resending = False
                continue
            usage = task.get("usage") or {}
            self.log.info(
                "Submitted EvoLink task %s (model %s); credits reserved: %s (%s)",
                task["id"],
                task.get("model"),
                usage.get("credits_reserved"),
                usage.get("billing_rule"),
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

    # -- waiting and collecting -------------------------------------------------------------------

    def _wait_here(
        self, task: dict[str, Any], started_at: float, deadline: float, until: float | None = None
    ) -> dict[str, Any]:
        """Poll on the worker until the task ends (the synchronous twin of the trigger), or until
        ``until`` (epoch seconds) passes with the task still running."""
        reporter = ProgressReporter()
        failures = PollFailureBudget(DEFAULT_MAX_POLL_FAILURES)
        task_id = task["id"]
        while True:
            if line := reporter.update(task):
                self.log.info(line)
            decision = decide_after_poll(
                task,
                now=time.time(),
                started_at=started_at,
                deadline=deadline,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
            )
            if decision.outcome is Outcome.TIMEOUT:
                raise EvolinkWaitTimeoutError(decision.message)
            if decision.outcome is not Outcome.WAIT:
                return task
            if until is not None and time.time() >= until:
                return task
            if decision.message:
                self.log.warning(decision.message)
            time.sleep(
                decision.delay if until is None else max(0.0, min(decision.delay, until - time.time()))
            )
            try:
                task = self.hook.get_task(task_id, deadline=deadline)
                failures.success()
            except EvolinkError as error:
                if not error.retryable or not failures.failure():
                    fail_for(error)
                delay = failures.backoff(self.poll_interval, self.max_poll_interval)
                if time.time() + delay >= deadline:
                    raise EvolinkWaitTimeoutError(
                        f"EvoLink task {task_id}: the wait budget ran out while polls failed: {error}"
                    ) from error
                self.log.warning(
                    "Polling EvoLink task %s failed: %s; next poll in %.1fs", task_id, error, delay
                )
                time.sleep(delay)

    def _finish(self, context: Context, task: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Turn a terminal task into the XCom value, or into the right Airflow failure; results are
        stored by ``deadline`` (epoch seconds), so ``timeout`` covers downloads too."""
        now = time.time()
        decision = decide_after_poll(task, now=now, started_at=now, deadline=None)
        if decision.outcome is Outcome.WAIT:
            raise EvolinkWaitTimeoutError(f"EvoLink task {task['id']} is still {task.get('status')}")
        if decision.outcome is not Outcome.SUCCESS:
            code, message = task_failure(task)
            if task.get("status") == "completed":
                # Completed (and so billed) with nothing to hand downstream: end it once. A retry would
                # only reattach to the same empty task, and a resubmission would pay again for what may
                # come back empty again; clearing the task asks for a new generation deliberately.
                raise AirflowFailException(
                    f"{decision.message}; nothing to hand downstream, and a retry would reattach to the "
                    "same empty task. Clear the task to generate anew."
                )
            fail_for(EvolinkTaskError(task["id"], str(task.get("status")), code, message))
        if self.output_path:
            from evolink_provider.storage import result_urls, store_results, stored_results

            try:
                task = {**task, "files": store_results(self.hook, task, self.output_path, deadline)}
            except EvolinkNotFoundError as error:
                files = stored_results(task["id"], self.output_path, len(result_urls(task)))
                if files is None:
                    raise ResultsExpiredError(
                        f"The results of EvoLink task {task['id']} expired ({error.status_code}) before "
                        f"all were stored under {self.output_path}"
                    ) from error
                self.log.info(
                    "The results of EvoLink task %s expired; they are stored: %s", task["id"], files
                )
                task = {**task, "files": files}
            except EvolinkError as error:
                fail_for(error)
        usage = task.get("usage") or {}
        self.log.info(
            "EvoLink task %s completed; usage: %s",
            task["id"],
            {k: v for k, v in usage.items() if k != "user_group"} or "(not reported)",
        )
        return task


class EvolinkVideoGenerationOperator(EvolinkBaseVideoOperator):
    """Run any EvoLink video model.

    Fields are validated against the model's schema when the model is known
    (:data:`evolink_provider.models.KNOWN_MODELS`) and passed through otherwise, so new models work the day
    they ship. Model fields go either as keyword arguments (``duration=5``) or in ``request_fields``
    (which ``.partial(...).expand(...)`` can map over).

    :param model: the EvoLink model name, e.g. ``seedance-2.0-text-to-video``.
    :param prompt: the text prompt, when the model takes one.
    :param request_fields: further model fields, e.g. ``{"duration": 8, "quality": "1080p"}``.
    """

    template_fields: Sequence[str] = ("evolink_conn_id", "output_path", "model", "prompt", "request_fields")
    template_fields_renderers = {"request_fields": "json"}

    def __init__(
        self,
        *,
        model: str,
        prompt: str | None = None,
        request_fields: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        operator_kwargs = {k: v for k, v in kwargs.items() if k in _operator_argument_names()}
        extra_fields = {k: v for k, v in kwargs.items() if k not in operator_kwargs}
        super().__init__(**operator_kwargs)
        self.model = model
        self.prompt = prompt
        self.request_fields = {**(request_fields or {}), **extra_fields}

    def model_name(self) -> str:
        return self.model

    def model_fields(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **(self.request_fields or {})}


@cache
def _operator_argument_names() -> frozenset[str]:
    """Names BaseOperator and the shared base accept: everything else given to the generic operator is a
    model field."""
    names: set[str] = set()
    for klass in (BaseOperator, EvolinkBaseVideoOperator):
        names.update(inspect.signature(klass.__init__).parameters)
    return frozenset(names - {"self", "kwargs", "args"})


class EvolinkModelOperator(EvolinkBaseVideoOperator):
    """Base of the operators dedicated to a model, whose fields come from the model's schema.

    A subclass names its models in ``evolink_models`` (the default first) and writes a typed, keyword-only
    ``__init__`` whose parameters are exactly the models' fields, plus ``model`` when there is a choice,
    and whose body is ``super().__init__(**kwargs)`` then ``self.keep_model_fields(locals())``. From the
    schema in :mod:`evolink_provider.models` the class then gets its ``template_fields``, its payload
    (:meth:`model_fields`) and the ``:param:`` lines of its docstring; a signature that differs from the
    schema fails when the class is defined, so the two cannot drift apart.
    """

    #: The models this operator runs; the first is the default of its ``model`` argument.
    evolink_models: tuple[str, ...] = ()
    #: The model fields, in the order of the signature (set from it when the class is defined).
    evolink_field_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.evolink_models:
            return
        docs: dict[str, str] = {}
        for model in reversed(cls.evolink_models):  # the default model's wording wins
            docs.update(field_docs(model))
        names = _checked_field_names(cls, docs)
        switch = ("model",) if len(cls.evolink_models) > 1 else ()
        cls.evolink_field_names = names
        cls.template_fields = (*EvolinkBaseVideoOperator.template_fields, *switch, *names)
        lines = [f":param {name}: {docs[name]}" for name in names]
        if switch:
            lines.append(f":param model: {_spoken_list(cls.evolink_models)}.")
        cls.__doc__ = "\n\n".join([inspect.cleandoc(cls.__doc__ or ""), "\n".join(lines)])

    def keep_model_fields(self, arguments: dict[str, Any]) -> None:
        """Store the ``__init__`` arguments (its ``locals()``) that are model fields, or the model."""
        for name in (*self.evolink_field_names, "model"):
            if name in arguments:
                setattr(self, name, arguments[name])

    def model_name(self) -> str:
        return str(getattr(self, "model", self.evolink_models[0]))

    def model_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.evolink_field_names}


def _checked_field_names(cls: type[EvolinkModelOperator], docs: dict[str, str]) -> tuple[str, ...]:
    """The model fields of ``cls.__init__``, which must be the schemas' fields: required ones without a
    default, the others defaulting to ``None``, and ``model`` defaulting to the first model."""
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    model = parameters.pop("model", None)
    default = cls.evolink_models[0]
    schema = schema_for(default)
    required = schema.required if schema else frozenset()
    problems = [f"no parameter {name}" for name in docs if name not in parameters]
    problems += [
        f"{name} is not a field of {' or '.join(cls.evolink_models)}"
        for name in parameters
        if name not in docs
    ]
    problems += [
        f"{name} must {'have no default' if name in required else 'default to None'}"
        for name, parameter in parameters.items()
        if (parameter.default is inspect.Parameter.empty) != (name in required)
        or (name not in required and parameter.default is not None)
    ]
    if (model is None) != (len(cls.evolink_models) == 1) or (model and model.default != default):
        problems.append(
            f"model must be a parameter (defaulting to {default!r}) if and only if there is a choice"
        )
    if problems:
        raise TypeError(f"{cls.__name__}.__init__ does not match the schema: {'; '.join(problems)}")
    return tuple(parameters)


def _spoken_list(models: Sequence[str]) -> str:
    names = [f"``{model}``" for model in models]
    names[0] += " (default)"
    return ", ".join(names[:-1]) + " or " + names[-1]


class EvolinkHappyHorseReferenceToVideoOperator(EvolinkModelOperator):
    """Generate a video from 1-9 reference images with HappyHorse (``happyhorse-1.0-reference-to-video``).

    The prompt names the images ``character1``, ``character2``, ... in list order.
    """

    evolink_models = ("happyhorse-1.0-reference-to-video", "happyhorse-1.1-reference-to-video")

    def __init__(
        self,
        *,
        prompt: str,
        image_urls: list[str] | str,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        duration: int | str | None = None,
        seed: int | str | None = None,
        callback_url: str | None = None,
        model: str = "happyhorse-1.0-reference-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkHappyHorseTextToVideoOperator(EvolinkModelOperator):
    """Generate a video from text with HappyHorse (``happyhorse-1.0-text-to-video``)."""

    evolink_models = ("happyhorse-1.0-text-to-video", "happyhorse-1.1-text-to-video")

    def __init__(
        self,
        *,
        prompt: str,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        duration: int | str | None = None,
        seed: int | str | None = None,
        callback_url: str | None = None,
        model: str = "happyhorse-1.0-text-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkSeedanceTextToVideoOperator(EvolinkModelOperator):
    """Generate a video from text with Seedance 2.0 (``seedance-2.0-fast-text-to-video`` by default)."""

    evolink_models = (
        "seedance-2.0-fast-text-to-video",
        "seedance-2.0-text-to-video",
        "seedance-2.0-mini-text-to-video",
    )
    template_fields_renderers = {"model_params": "json"}

    def __init__(
        self,
        *,
        prompt: str,
        duration: int | str | None = None,
        quality: str | None = None,
        aspect_ratio: str | None = None,
        generate_audio: bool | str | None = None,
        content_filter: bool | str | None = None,
        model_params: dict[str, Any] | str | None = None,
        callback_url: str | None = None,
        model: str = "seedance-2.0-fast-text-to-video",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())


class EvolinkSoraCharacterOperator(EvolinkModelOperator):
    """Extract a reusable character from a video with ``sora-character``.

    Returns the task object; ``result_data["character_name"]`` (e.g. ``chr_Axtjik3O#``) and
    ``result_data["profile_picture_url"]`` (an image, valid 24 h) go downstream.

    Availability depends on the EvoLink account: the model's page left EvoLink's public docs in 2026-05
    with the Sora-2 beta models, and a key without access gets HTTP 403 ``model_access_denied``.
    """

    evolink_models = ("sora-character",)

    def __init__(self, *, video_url: str, timestamps: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_model_fields(locals())
