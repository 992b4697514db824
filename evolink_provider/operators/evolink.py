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
from datetime import timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator

from evolink_provider.compat import AirflowFailException, conf, log_once
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkTaskError,
    EvolinkWaitTimeoutError,
)
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    FAILED_STATUSES,
    Outcome,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    task_failure,
)
from evolink_provider.resume import (
    SubmissionRecord,
    SubmissionStore,
    idempotency_key,
    payload_fingerprint,
    task_instance_identity,
)
from evolink_provider.triggers.evolink import (
    DEFAULT_MAX_POLL_FAILURES,
    EvolinkTaskTrigger,
    task_from_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Default wait budget: generations take minutes to tens of minutes.
DEFAULT_TIMEOUT = 2 * 60 * 60
#: Past this many failed replays in a row something is wrong with the keys; stop rather than loop.
MAX_RESUBMISSIONS = 20
XCOM_TASK_ID_KEY = "evolink_task_id"
NO_TASK_STATE_STORE = (
    "This Airflow has no task_state_store (3.3+): a retry cannot look up the earlier EvoLink task and "
    "relies on EvoLink replaying the Idempotency-Key instead (said once per process)."
)


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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.evolink_conn_id = evolink_conn_id
        self.output_path = output_path
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

    def validated_payload(self) -> dict[str, Any]:
        """The JSON body to submit, checked against the model's documented limits.

        Every field is checked before the first HTTP call; local or object-storage inputs are then
        uploaded through EvoLink's Files API and the body is checked again with their URLs.
        """
        from evolink_provider.models import validate_request

        model = self.model_name()
        fields = self.model_fields()
        try:
            validated = validate_request(model, fields, allow_local_media=True)
            if validated.local_media:
                from evolink_provider.storage import upload_local_media

                fields = upload_local_media(self.hook, fields, validated.local_media)
                validated = validate_request(model, fields)
        except EvolinkError as error:
            fail_for(error)
        for warning in validated.warnings:
            self.log.warning("%s: %s", model, warning)
        return validated.payload

    def execute(self, context: Context) -> dict[str, Any]:
        payload = self.validated_payload()
        task = self._submit_or_reattach(context, payload)
        context["ti"].xcom_push(key=XCOM_TASK_ID_KEY, value=task["id"])
        if not self.wait_for_completion:
            return task
        started_at = float(task.get("created") or time.time())
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
            self.defer(
                trigger=EvolinkTaskTrigger(
                    evolink_task_id=task["id"],
                    evolink_conn_id=self.evolink_conn_id,
                    poll_interval=self.poll_interval,
                    max_poll_interval=self.max_poll_interval,
                    end_time=deadline,
                    started_at=started_at,
                    first_poll_at=time.time() + decision.delay,
                ),
                method_name="execute_complete",
                # Only a backstop: the trigger's own timeout event, which names the task, comes first.
                timeout=timedelta(seconds=float(self.timeout) + 2 * self.max_poll_interval + 60),
            )
        if decision.outcome is Outcome.WAIT:
            task = self._wait_here(task, started_at, deadline)
        return self._finish(context, task)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: check the event, then collect the results."""
        try:
            task = task_from_event(event)
        except EvolinkError as error:
            fail_for(error)
        return self._finish(context, task)

    def on_kill(self) -> None:
        record = getattr(self, "_current_task_id", None)
        self.log.warning(
            "EvoLink has no cancel call: task %s keeps generating and is billed when it completes. "
            "A retry of this Airflow task reattaches to it instead of submitting again.",
            record or "(not submitted yet)",
        )

    # -- submission and reattachment --------------------------------------------------------------

    def _submit_or_reattach(self, context: Context, payload: dict[str, Any]) -> dict[str, Any]:
        store = SubmissionStore(context)
        if not store.durable:
            log_once(self.log, NO_TASK_STATE_STORE)
        fingerprint = payload_fingerprint(payload)
        submission = 0
        record = store.load()
        if record is not None and record.fingerprint != fingerprint:
            self.log.warning(
                "The request changed since the earlier try; its EvoLink task %s is left alone.",
                record.task_id or "(unknown)",
            )
        elif record is not None and record.task_id:
            existing = self._existing_task(record.task_id)
            if existing is not None and existing.get("status") not in FAILED_STATUSES:
                self.log.info(
                    "Reattaching to EvoLink task %s (%s) from an earlier try; nothing is submitted.",
                    record.task_id,
                    existing.get("status"),
                )
                self._current_task_id = record.task_id
                return existing
            submission = record.submission + 1
            self.log.info("EvoLink task %s failed or is gone: submitting again.", record.task_id)
        elif record is not None:
            # The earlier try crashed or lost the answer after the intent was recorded: same key, so
            # EvoLink answers with the task it may already have created.
            submission = record.submission
        return self._submit(context, store, payload, fingerprint, submission)

    def _existing_task(self, task_id: str) -> dict[str, Any] | None:
        try:
            return self.hook.get_task(task_id)
        except EvolinkNotFoundError:
            return None
        except EvolinkError as error:
            fail_for(error)

    def _submit(
        self,
        context: Context,
        store: SubmissionStore,
        payload: dict[str, Any],
        fingerprint: str,
        submission: int,
    ) -> dict[str, Any]:
        identity = task_instance_identity(context)
        for _ in range(MAX_RESUBMISSIONS):
            key = idempotency_key(identity, fingerprint, submission)
            store.save(SubmissionRecord(fingerprint, submission, key))
            try:
                task = self.hook.create_video_task(payload, idempotency_key=key)
            except EvolinkError as error:
                fail_for(error)
            store.save(SubmissionRecord(fingerprint, submission, key, task["id"]))
            self._current_task_id = task["id"]
            if task.get("status") in FAILED_STATUSES:
                # A replay of an earlier submission that has since failed: the next key is a fresh one.
                self.log.info("EvoLink replayed failed task %s; submitting anew.", task["id"])
                submission += 1
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
        raise AirflowFailException(
            f"EvoLink answered {MAX_RESUBMISSIONS} submissions in a row with failed tasks; giving up."
        )

    # -- waiting and collecting -------------------------------------------------------------------

    def _wait_here(self, task: dict[str, Any], started_at: float, deadline: float) -> dict[str, Any]:
        """Poll on the worker until the task ends (the synchronous twin of the trigger)."""
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
            if decision.message:
                self.log.warning(decision.message)
            time.sleep(decision.delay)
            try:
                task = self.hook.get_task(task_id)
                failures.success()
            except EvolinkError as error:
                if not error.retryable or not failures.failure():
                    fail_for(error)
                delay = failures.backoff(self.poll_interval, self.max_poll_interval)
                self.log.warning(
                    "Polling EvoLink task %s failed: %s; next poll in %.1fs", task_id, error, delay
                )
                time.sleep(delay)

    def _finish(self, context: Context, task: dict[str, Any]) -> dict[str, Any]:
        """Turn a terminal task into the XCom value, or into the right Airflow failure."""
        now = time.time()
        decision = decide_after_poll(task, now=now, started_at=now, deadline=None)
        if decision.outcome is Outcome.WAIT:
            raise EvolinkWaitTimeoutError(f"EvoLink task {task['id']} is still {task.get('status')}")
        if decision.outcome is not Outcome.SUCCESS:
            code, message = task_failure(task)
            if task.get("status") == "completed":  # completed, but nothing to hand downstream
                raise EvolinkTaskError(task["id"], "completed without output", code, decision.message)
            fail_for(EvolinkTaskError(task["id"], str(task.get("status")), code, message))
        if self.output_path:
            from evolink_provider.storage import store_results

            try:
                task = {**task, "files": store_results(self.hook, task, self.output_path)}
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


class EvolinkHappyHorseReferenceToVideoOperator(EvolinkBaseVideoOperator):
    """Generate a video from 1-9 reference images with HappyHorse (``happyhorse-1.0-reference-to-video``).

    The prompt names the images ``character1``, ``character2``, ... in list order.

    :param prompt: up to 5,000 characters (2,500 with Chinese); EvoLink silently cuts longer prompts, so a
        warning is logged.
    :param image_urls: 1-9 public http(s) URLs of JPEG/PNG/WEBP images, short side at least 400 px.
    :param quality: ``720p`` (default) or ``1080p``.
    :param aspect_ratio: ``16:9`` (default), ``9:16``, ``1:1``, ``4:3``, ``3:4``, ``4:5``, ``5:4``, ``9:21``,
        ``21:9``.
    :param duration: seconds, 3-15 (default 5).
    :param seed: 1-2147483647 for reproducible output (default random).
    :param callback_url: https URL EvoLink calls when the task ends (public hosts only).
    :param model: ``happyhorse-1.0-reference-to-video`` or ``happyhorse-1.1-reference-to-video``.
    """

    template_fields: Sequence[str] = (
        "evolink_conn_id",
        "output_path",
        "model",
        "prompt",
        "image_urls",
        "quality",
        "aspect_ratio",
        "duration",
        "seed",
        "callback_url",
    )

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
        self.prompt = prompt
        self.image_urls = image_urls
        self.quality = quality
        self.aspect_ratio = aspect_ratio
        self.duration = duration
        self.seed = seed
        self.callback_url = callback_url
        self.model = model

    def model_name(self) -> str:
        return self.model

    def model_fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "image_urls": self.image_urls,
            "quality": self.quality,
            "aspect_ratio": self.aspect_ratio,
            "duration": self.duration,
            "seed": self.seed,
            "callback_url": self.callback_url,
        }


class EvolinkSeedanceTextToVideoOperator(EvolinkBaseVideoOperator):
    """Generate a video from text with Seedance 2.0 (``seedance-2.0-fast-text-to-video`` by default).

    :param prompt: up to 10,000 tokens (EvoLink advises at most 500 Chinese characters or 1,000 words).
    :param duration: seconds, 4-15 (default 5).
    :param quality: ``480p`` or ``720p`` (default); the standard tier also ``1080p`` and ``4k``.
    :param aspect_ratio: ``adaptive`` (default since 2026-08), ``16:9``, ``9:16``, ``1:1``, ``4:3``, ``3:4``,
        ``21:9``.
    :param generate_audio: synchronised sound at no extra cost (default true).
    :param content_filter: false relaxes moderation and costs x1.1 (default true).
    :param model_params: e.g. ``{"web_search": true}`` (billed only when used).
    :param callback_url: https URL EvoLink calls when the task ends (public hosts only).
    :param model: ``seedance-2.0-fast-text-to-video``, ``seedance-2.0-text-to-video`` or
        ``seedance-2.0-mini-text-to-video``.
    """

    template_fields: Sequence[str] = (
        "evolink_conn_id",
        "output_path",
        "model",
        "prompt",
        "duration",
        "quality",
        "aspect_ratio",
        "generate_audio",
        "content_filter",
        "model_params",
        "callback_url",
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
        self.prompt = prompt
        self.duration = duration
        self.quality = quality
        self.aspect_ratio = aspect_ratio
        self.generate_audio = generate_audio
        self.content_filter = content_filter
        self.model_params = model_params
        self.callback_url = callback_url
        self.model = model

    def model_name(self) -> str:
        return self.model

    def model_fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "duration": self.duration,
            "quality": self.quality,
            "aspect_ratio": self.aspect_ratio,
            "generate_audio": self.generate_audio,
            "content_filter": self.content_filter,
            "model_params": self.model_params,
            "callback_url": self.callback_url,
        }


class EvolinkSoraCharacterOperator(EvolinkBaseVideoOperator):
    """Extract a reusable character from a video with ``sora-character``.

    Returns the task object; ``result_data["character_name"]`` (e.g. ``chr_Axtjik3O#``) and
    ``result_data["profile_picture_url"]`` (an image, valid 24 h) go downstream.

    Availability depends on the EvoLink account: the model's page left EvoLink's public docs in 2026-05
    with the Sora-2 beta models, and a key without access gets HTTP 403 ``model_access_denied``.

    :param video_url: public http(s) URL of an ``.mp4``, ``.mov`` or ``.webm`` video.
    :param timestamps: ``"a,b"`` seconds, at most 2 s apart (default ``"0,2"``).
    """

    template_fields: Sequence[str] = ("evolink_conn_id", "output_path", "video_url", "timestamps")

    def __init__(self, *, video_url: str, timestamps: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.video_url = video_url
        self.timestamps = timestamps

    def model_name(self) -> str:
        return "sora-character"

    def model_fields(self) -> dict[str, Any]:
        return {"video_url": self.video_url, "timestamps": self.timestamps}
