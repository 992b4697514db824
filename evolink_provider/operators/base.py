"""The orchestration every EvoLink generation operator shares: validate, submit or reattach, wait, collect.

The flow is one-way: validate the rendered fields (no HTTP before that), reattach to or submit the EvoLink
task (:mod:`evolink_provider.ledger` decides every spend and every give-up), wait (here, or in the
triggerer when ``deferrable``), then collect the results into XCom (and into storage when ``output_path``
is set); ``post_execute`` then records that the result was delivered. "What does this poll mean" is
:func:`evolink_provider.polling.decide_after_poll`, shared with the trigger and the sensor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from evolink_provider.answers import created_at, epoch_time
from evolink_provider.assets import (
    RequestSummary,
    announce_assets,
    asset_events,
    summarize_request,
    with_alias,
)
from evolink_provider.compat import AirflowFailException, conf, log_once
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkTaskError,
    EvolinkWaitTimeoutError,
    RetryLaterError,
    fail_for,
)
from evolink_provider.hooks import DEFAULT_CONN_ID
from evolink_provider.hooks.retry import Verdict
from evolink_provider.lineage import operator_lineage
from evolink_provider.links import RESULT_LINKS, push_links
from evolink_provider.polling import (
    DEFAULT_POLL_INTERVAL,
    LONGEST_WAIT,
    Outcome,
    PollDecision,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    expected_run_time,
    poll_settings,
    seconds_setting,
    task_failure,
)
from evolink_provider.results import final_line, finished_value
from evolink_provider.submission import PreparedRequest, payload_for_post, prepare_request
from evolink_provider.timing import current as timing

if TYPE_CHECKING:
    from airflow.sdk import Context

    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.ledger import Ledger

#: Default wait budget: generations take minutes to tens of minutes.
DEFAULT_TIMEOUT = 2 * 60 * 60
XCOM_TASK_ID_KEY = "evolink_task_id"


#: Said once per task (and process) when ``deferrable=True`` runs with ``retries=0``.
DEFER_RACE_WARNING = (
    "%s: deferrable=True with retries=0. Airflow's scheduler can fail a task instance whose trigger fires "
    "soon after its deferral (apache/airflow#66374; the provider holds every event 15 s, which narrows the "
    "race but does not close it), and then this run has no retry. The EvoLink task is paid for either way: "
    "%s Set retries >= 1 to recover automatically."
)
#: What a clear of a task instance failed by that race does, with and without ``task_state_store``.
CLEAR_COLLECTS = "clearing the failed task instance collects that video without paying again."
CLEAR_PAYS = (
    "without task_state_store (Airflow 3.3) clearing the failed task instance pays for a new video, so "
    "only a retry (which resends the Idempotency-Key) collects it."
)


def event_deadline(event: Any) -> float | None:
    """The deadline a trigger event says the trigger waited for (its ``end_time``), if it says one as a
    finite number: the event is a stored row, and anything else counts as none (``timeout`` bounds the
    rest)."""
    end_time = event.get("end_time") if isinstance(event, dict) else None
    return epoch_time(end_time)


def expected_remaining(task: dict[str, Any], elapsed: float) -> float:
    """Seconds the task is expected to run still (the polling module's estimate)."""
    expected, _trust = expected_run_time(task, max(0.0, elapsed))
    return max(0.0, expected - elapsed)


class EvolinkBaseVideoOperator(BaseOperator):
    """Orchestration shared by every EvoLink generation operator (subclasses only name the fields).

    ``image_urls`` may also hold the entries ``EvolinkUploadImagesOperator`` hands out
    (``upload.output["images"]``): their URLs are sent, and the request's identity names each image by
    its sha256 instead, so a clear of the upload step (new URLs, same bytes) leaves a cleared or retried
    task reattaching to what it paid for (:func:`~evolink_provider.uploads.uploaded_image_urls`).

    :param evolink_conn_id: Airflow connection of type ``evolink`` (password = API key).
    :param wait_for_completion: wait for the task to end; when False, return the created task at once.
    :param deferrable: wait in the triggerer instead of holding a worker slot.
    :param poll_interval: the shortest delay between polls, seconds or a ``timedelta`` (the schedule
        adapts above it); from 0.1 s to 12 h.
    :param max_poll_interval: the longest delay between polls, seconds or a ``timedelta``: from
        ``poll_interval`` to 12 h (half a result link's life); ``None`` is 600 s, or ``poll_interval`` when
        longer.
    :param timeout: seconds (or a ``timedelta``) of waiting, from submission or reattachment, before the
        Airflow task fails (above 0, at most a year); the EvoLink task keeps running and a retry
        reattaches to it.
    :param output_path: a local directory or an ``ObjectStoragePath`` URI (``file://``, ``s3://``, ...)
        to stream the results into (their URLs expire after 24 h); the stored paths are returned under
        ``"files"``.
    :param asset_alias: name of an ``AssetAlias`` to announce every stored file on, as one asset event
        each (see :mod:`evolink_provider.assets`); any ``AssetAlias`` in ``outlets`` gets them too.
    :param announce_result_urls: without ``output_path``, announce the result URLs as assets instead
        (they expire after 24 h).
    :param reattach: ``auto`` (default): an automatic retry (a crash, a killed worker, a wait timeout, a
        triggerer restart) reattaches to the EvoLink task it paid for; a clear makes a new generation when
        the result was delivered and otherwise picks up the paid one (the table of
        :mod:`evolink_provider.ledger`). ``never``: every try submits its own generation (each one billed).
    :param regenerate: force a fresh take when the task instance is cleared, even if its paid result was
        never delivered (templated; ``dag_run.conf["evolink_regenerate"]`` = true or a list of task ids
        does the same per run).
    :param regenerate_expired: let an automatic retry pay for a new generation when the results of the
        paid one are proven expired (default off: the retry fails, saying that a clear does). Proven means
        refused 25 h (24 h, and an hour for machines' clocks) after this provider first saw the task
        completed. Needs Airflow 3.3's ``task_state_store`` (without it a retry could not find the new
        generation again): on 3.0-3.2 the retry fails, and a clear pays for a new take.
    :param min_credits: before submitting, read what the key can spend (the free ``GET /v1/credits``: the
        account's balance, and the key's own quota unless it has none) and fail without submitting when it
        is below this many credits; ``None`` (default) skips the check. Reattaching to an earlier try's
        task, or resending the key an earlier try recorded (checked when it was first sent), is not checked;
        on 3.0-3.2, where nothing records whether an earlier try sent its key, a resend below the limit fails
        the try retryably (a retry once the balance allows collects the task, if EvoLink created one).
    :param local_checks: ``refuse`` (default) or ``warn``: what a local or storage image that breaks its
        model's documented image rules (pixel size, aspect ratio, bytes; read from its header before any
        call) does. ``warn`` sends it anyway, for when EvoLink's limits move. http(s) URLs are never
        checked: that would mean fetching them, so EvoLink checks them, failing the task.
    :param prompt_policy: ``warn`` (default) or ``refuse`` a prompt longer than EvoLink advises
        (HappyHorse cuts it silently past 2,500 Chinese / 5,000 other characters; Seedance does not say
        what it does past 500 Chinese characters or 1,000 words). Scheduled pipelines may prefer
        ``refuse``: nothing is submitted.
    """

    template_fields: Sequence[str] = ("evolink_conn_id", "output_path", "regenerate")
    ui_color = "#e8defc"
    operator_extra_links = RESULT_LINKS

    def __init__(
        self,
        *,
        evolink_conn_id: str = DEFAULT_CONN_ID,
        wait_for_completion: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float | timedelta = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | timedelta | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        output_path: str | None = None,
        asset_alias: str | None = None,
        announce_result_urls: bool = False,
        reattach: str = "auto",
        min_credits: float | None = None,
        local_checks: str = "refuse",
        prompt_policy: str = "warn",
        regenerate: bool | str = False,
        regenerate_expired: bool = False,
        **kwargs: Any,
    ) -> None:
        if asset_alias:
            kwargs["outlets"] = with_alias(kwargs.get("outlets"), asset_alias)
        super().__init__(**kwargs)
        self.asset_alias = asset_alias
        self.announce_result_urls = announce_result_urls
        #: The finished task this operator handed downstream (for the lineage), once it has.
        self.finished_task: dict[str, Any] | None = None
        self.evolink_conn_id = evolink_conn_id
        self.output_path = output_path
        self.reattach = reattach
        self.min_credits = min_credits
        self.local_checks = local_checks
        self.prompt_policy = prompt_policy
        self.regenerate = regenerate
        self.regenerate_expired = regenerate_expired
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        # Checked here, at parse: a bad value would fail only after the task is paid for.
        self.poll_interval, self.max_poll_interval = poll_settings(
            self.task_id, poll_interval, max_poll_interval
        )
        self.timeout = seconds_setting(self.task_id, "timeout", timeout, 0, LONGEST_WAIT)

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
        from evolink_provider.hooks.evolink import EvolinkHook

        return EvolinkHook(self.evolink_conn_id)

    def ledger(self, context: Context) -> Ledger:
        """The ledger of this try (see :mod:`evolink_provider.ledger`), made once per try: an operator
        object can outlive a try (``dag.test()`` runs every try on the same one)."""
        from evolink_provider.ledger import Ledger

        made = self.__dict__.get("_ledger")
        if made is None or made.context is not context:
            made = self._ledger = Ledger(
                context,
                self.hook,
                self.log,
                cache(self.validated_request),
                reattach=self.reattach,
                regenerate=self.regenerate,
                regenerate_expired=self.regenerate_expired,
                min_credits=self.min_credits,
            )
        return made

    def validated_request(self) -> PreparedRequest:
        """The rendered fields checked against the model's documented limits (no HTTP before that), with
        the request's identity (see :func:`~evolink_provider.submission.prepare_request`)."""
        return prepare_request(
            self.hook,
            self.model_name(),
            self.model_fields(),
            self.log,
            prompt_policy=self.prompt_policy,
            local_checks=self.local_checks,
        )

    def validated_payload(self) -> dict[str, Any]:
        """The JSON body to POST, local inputs uploaded (a convenience for callers outside ``execute``)."""
        return payload_for_post(self.hook, self.validated_request(), {}, self.log)

    def execute(self, context: Context) -> dict[str, Any]:
        from evolink_provider.ledger import NewGeneration

        try:
            self.validated_request()  # refuse a bad field before any HTTP
        except AirflowFailException:
            if self.ledger(context).record is None:  # a paid task, recorded, is read without the inputs
                raise
        if self.deferrable and self.retries == 0:
            clear = CLEAR_COLLECTS if self.ledger(context).states.durable else CLEAR_PAYS
            log_once(self.log, DEFER_RACE_WARNING % (self.task_id, clear))
        task = self.ledger(context).start(self.output_path)
        try:
            return self._wait_and_finish(context, task)
        except NewGeneration as regenerated:
            return self._wait_and_finish(context, regenerated.task)

    def _wait_and_finish(
        self, context: Context, task: dict[str, Any], deadline: float | None = None
    ) -> dict[str, Any]:
        """Wait for ``task`` and collect it, by ``deadline`` (default: ``timeout`` from now)."""
        context["ti"].xcom_push(key=XCOM_TASK_ID_KEY, value=task["id"])
        if task.get("from_storage"):
            return self._publish(context, finished_value(task))
        if not self.wait_for_completion:
            return task  # handed downstream as a task id: post_execute records it delivered
        clock = timing()
        started_at = created_at(task, default=clock.now())
        deadline = clock.now() + self.timeout if deadline is None else deadline
        decision = self._decide(task, started_at, deadline)
        if decision.outcome is Outcome.WAIT and self.deferrable:
            # A trigger that fires seconds after the deferral can get the task instance failed by
            # Airflow 3.2-3.3's scheduler (apache/airflow#66374): a task expected to end soon is waited
            # for here, and only one still running after that window is deferred (evolink_provider.timing).
            window = clock.wait_on_worker_window
            if expected_remaining(task, clock.now() - started_at) <= window:
                task = self._wait_here(context, task, started_at, deadline, until=clock.now() + window)
                decision = self._decide(task, started_at, deadline)
            if decision.outcome is Outcome.WAIT:
                from evolink_provider.triggers.evolink import EvolinkTaskTrigger

                deferred_at = clock.now()
                self.defer(
                    trigger=EvolinkTaskTrigger(
                        evolink_task_id=task["id"],
                        evolink_conn_id=self.evolink_conn_id,
                        poll_interval=self.poll_interval,
                        max_poll_interval=self.max_poll_interval,
                        end_time=deadline,
                        started_at=started_at,
                        first_poll_at=deferred_at + decision.delay,
                        not_before=deferred_at + clock.trigger_hold,
                    ),
                    method_name="execute_complete",
                    # Only a backstop: the trigger's own timeout event, which names the task, comes first.
                    timeout=timedelta(
                        seconds=self.timeout + 2 * self.max_poll_interval + 60 + clock.trigger_hold
                    ),
                )
        if decision.outcome is Outcome.WAIT:
            task = self._wait_here(context, task, started_at, deadline)
        return self._publish(context, self._finish(context, task, deadline))

    def _decide(self, task: dict[str, Any], started_at: float, deadline: float) -> PollDecision:
        """What the task's state means now, with this operator's poll settings."""
        return decide_after_poll(
            task,
            now=timing().now(),
            started_at=started_at,
            deadline=deadline,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: check the event, then collect the results (within the same
        deadline the trigger waited for)."""
        from evolink_provider.ledger import NewGeneration
        from evolink_provider.triggers.evolink import task_from_event

        try:
            task = task_from_event(event)
        except EvolinkError as error:
            said = event if isinstance(event, dict) else {}
            kind, seen = said.get("status"), said.get("task")
            if kind == "failed" and isinstance(seen, dict) and seen.get("status") == "completed":
                task = seen  # completed without any result yet: _finish reads it again
            elif kind == "error" and not error.retryable:
                # A poll error the trigger does not repeat (a 404): the ledger's rows R23, R24, within
                # the deadline the trigger was given (a flapping 404 must not restart the wait's budget).
                task = self.ledger(context).reread(str(said.get("evolink_task_id")), error)
                return self._wait_and_finish(context, task, event_deadline(event))
            else:
                if kind == "failed":
                    ledger = self.ledger(context)
                    named = seen if isinstance(seen, dict) else {"id": said.get("evolink_task_id")}
                    ledger.check_resumed(named)
                    ledger.refuse_contradiction(named)
                fail_for(error)
        ledger = self.ledger(context)
        ledger.check_resumed(task)
        # When the trigger's poll read it completed: its links' 24 h ran out by then + 24 h.
        ledger.saw_completed(task, at=(event or {}).get("completed_seen_at"))
        deadline = event_deadline(event) or time.time() + self.timeout
        try:
            return self._publish(context, self._finish(context, task, deadline))
        except NewGeneration as regenerated:
            return self._wait_and_finish(context, regenerated.task)

    def _publish(self, context: Context, task: dict[str, Any]) -> dict[str, Any]:
        """Announce a finished task's results: its extra links, its asset events, and (kept on the
        operator) its lineage."""
        self.finished_task = task
        push_links(context, task)
        events = announce_assets(
            context,
            self.outlets,
            lambda: asset_events(task, self.request_summary(), self.announce_result_urls),
        )
        if events:
            self.log.info("Announced %d asset event(s) for EvoLink task %s.", events, task["id"])
        return task

    def post_execute(self, context: Any, result: Any = None) -> None:
        """Record the result delivered as late as an operator can: Airflow calls this after ``execute`` or
        ``execute_complete`` returned and after the user's own ``post_execute`` hook, so a failure up to
        here leaves the paid generation undelivered and a clear collects it (see the ledger's table).
        With ``wait_for_completion=False`` the task id handed downstream is what is delivered."""
        super().post_execute(context, result)
        self.ledger(context).delivered()

    def request_summary(self) -> RequestSummary:
        """The model, prompt digest, duration and media inputs of the rendered request."""
        return summarize_request(self.model_name(), self.model_fields())

    def get_openlineage_facets_on_start(self) -> Any:
        """OpenLineage inputs (called by its listener, when installed: :mod:`evolink_provider.lineage`)."""
        return operator_lineage(self.request_summary(), None)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage inputs and outputs (the stored files, or the result URLs)."""
        return operator_lineage(self.request_summary(), self.finished_task)

    def on_kill(self) -> None:
        record = self._ledger.current_task_id if "_ledger" in self.__dict__ else None
        self.log.warning(
            "EvoLink has no cancel call: task %s keeps generating and is billed when it completes. "
            "A retry, or a clear while its result is undelivered, picks it up (the ledger's table).",
            record or "(not submitted yet)",
        )

    # -- waiting and collecting -------------------------------------------------------------------

    def _wait_here(
        self,
        context: Context,
        task: dict[str, Any],
        started_at: float,
        deadline: float,
        until: float | None = None,
    ) -> dict[str, Any]:
        """Poll on the worker until the task ends (the synchronous twin of the trigger), or until
        ``until`` (epoch seconds) passes with the task still running. A poll error the poll row does not
        repeat (a 404) is the ledger's to judge (:meth:`~evolink_provider.ledger.Ledger.reread`)."""
        from evolink_provider.triggers.evolink import DEFAULT_MAX_POLL_FAILURES

        reporter = ProgressReporter(task["id"], started_at)
        failures = PollFailureBudget(DEFAULT_MAX_POLL_FAILURES, self.poll_interval, self.max_poll_interval)
        task_id = task["id"]
        while True:
            if line := reporter.update(task):
                self.log.info(line)
            decision = self._decide(task, started_at, deadline)
            if decision.outcome is Outcome.TIMEOUT:
                raise EvolinkWaitTimeoutError(decision.message)
            if decision.outcome is not Outcome.WAIT:
                return task
            if until is not None and timing().now() >= until:
                return task
            if decision.message:
                self.log.warning(decision.message)
            delay = decision.delay if until is None else max(0.0, min(decision.delay, until - timing().now()))
            for pause in reporter.pauses(delay):
                time.sleep(pause)
                if line := reporter.between_polls():
                    self.log.info(line)
            try:
                task = self.hook.get_task(task_id, deadline=deadline)
                failures.success()
            except EvolinkError as error:
                retry = failures.after_failure(error, deadline=deadline)
                if retry.verdict is Verdict.GIVE_UP:
                    if error.retryable:
                        raise error
                    task = self.ledger(context).reread(task_id, error)
                    failures.success()
                    continue
                if retry.verdict is Verdict.OUT_OF_TIME:
                    raise EvolinkWaitTimeoutError(
                        f"EvoLink task {task_id}: the wait budget ran out while polls failed: {error}"
                    ) from error
                self.log.warning(
                    "Polling EvoLink task %s failed: %s; next poll in %.1fs", task_id, error, retry.delay
                )
                time.sleep(retry.delay)

    def _finish(self, context: Context, task: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Turn a terminal task into the XCom value, or into the right Airflow failure; results are
        stored by ``deadline`` (epoch seconds), so ``timeout`` covers downloads too."""
        if task.get("status") == "completed":
            task = self.ledger(context).reread_empty(task)
        now = time.time()
        decision = decide_after_poll(task, now=now, started_at=now, deadline=None)
        if decision.outcome is Outcome.WAIT:
            raise EvolinkWaitTimeoutError(f"EvoLink task {task['id']} is still {task.get('status')}")
        if decision.outcome is not Outcome.SUCCESS:
            self.ledger(context).refuse_contradiction(task)
            code, message = task_failure(task)
            if task.get("status") == "completed":
                # Completed (and so billed) with nothing to hand downstream, also when read again: a list
                # filled late, or never; no evidence either way, so nothing is paid and a retry reads again.
                if self.reattach == "never":
                    then = "With reattach='never' a retry pays for a new generation."
                elif self.ledger(context).states.durable:
                    then = (
                        "A retry (or a plain clear) reads the same paid task again; if it stays empty, clear "
                        'the task with regenerate=True or dag_run.conf {"evolink_regenerate": true} to pay '
                        "for a new generation."
                    )
                else:
                    then = (
                        "A retry reads the same paid task again (it resends the Idempotency-Key); without "
                        "task_state_store (Airflow 3.3) a clear pays for a new generation."
                    )
                raise RetryLaterError(
                    f"{decision.message}, also when read again; nothing was submitted. {then}"
                )
            fail_for(EvolinkTaskError(task["id"], str(task.get("status")), code, message))
        ledger = self.ledger(context)
        ledger.saw_completed(task)
        if self.output_path:
            try:
                task = {**task, "files": ledger.store(task, self.output_path, deadline)}
            except EvolinkError as error:
                fail_for(error)
        self.log.info(final_line(task, elapsed=now - created_at(task, default=now)))
        return finished_value(task)
