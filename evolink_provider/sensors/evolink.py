"""EvolinkTaskSensor: wait for an EvoLink task that was submitted somewhere else."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from evolink_provider.answers import created_at
from evolink_provider.compat import conf
from evolink_provider.exceptions import EvolinkError, EvolinkTaskError, fail_for
from evolink_provider.hooks import DEFAULT_CONN_ID
from evolink_provider.polling import (
    DEFAULT_POLL_INTERVAL,
    LONGEST_WAIT,
    Outcome,
    ProgressReporter,
    decide_after_poll,
    poll_settings,
    seconds_setting,
    task_failure,
)
from evolink_provider.results import final_line, finished_value
from evolink_provider.timing import current as timing

if TYPE_CHECKING:
    from airflow.sdk import Context

    from evolink_provider.hooks.evolink import EvolinkHook


class EvolinkTaskSensor(BaseSensorOperator):
    """Wait until an EvoLink task ends; return its task object (``results``, ``result_data``, ``usage``)
    with ``result_urls``, ``character_name`` and ``credits``, as the operators do.

    Works in ``poke`` and ``reschedule`` modes and, with ``deferrable=True``, polls once and then hands
    the wait to :class:`~evolink_provider.triggers.evolink.EvolinkTaskTrigger`. A failed or cancelled task
    fails the sensor with EvoLink's error code and message.

    :param evolink_task_id: the task to wait for (templated), e.g. ``{{ ti.xcom_pull('submit')['id'] }}``.
    :param evolink_conn_id: Airflow connection holding the API key.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_poll_interval: the longest delay between polls in deferrable mode, seconds or a ``timedelta``:
        from ``poke_interval`` (the shortest, from 0.1 s) to 12 h; ``None`` is 600 s, or ``poke_interval``
        when longer. ``timeout``: at most a year.
    """

    template_fields: Sequence[str] = ("evolink_task_id", "evolink_conn_id")
    ui_color = "#e8defc"

    def __init__(
        self,
        *,
        evolink_task_id: str,
        evolink_conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_poll_interval: float | timedelta | None = None,
        poke_interval: float | timedelta = DEFAULT_POLL_INTERVAL,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        # Checked as given (in the signature, so default_args' values are too), before Airflow's own checks
        # (which take True as 1 and a zero poke_interval, and refuse infinity without naming the field), by
        # the operators' rules. timeout=None: Airflow's default ([sensors] default_timeout).
        owner = str(kwargs.get("task_id"))
        poke_interval, max_poll_interval = poll_settings(
            owner, poke_interval, max_poll_interval, shortest="poke_interval"
        )
        if timeout is not None:
            kwargs["timeout"] = seconds_setting(owner, "timeout", timeout, 0, LONGEST_WAIT)
        super().__init__(poke_interval=poke_interval, **kwargs)
        self.evolink_task_id = evolink_task_id
        self.evolink_conn_id = evolink_conn_id
        self.deferrable = deferrable
        self.max_poll_interval = max_poll_interval
        self._reporter: ProgressReporter | None = None

    @cached_property
    def hook(self) -> EvolinkHook:
        # The HTTP layer is a running task's, not a DAG file's parse.
        from evolink_provider.hooks.evolink import EvolinkHook

        return EvolinkHook(self.evolink_conn_id)

    def poke(self, context: Context) -> PokeReturnValue:
        try:
            task = self.hook.get_task(self.evolink_task_id)
        except EvolinkError as error:
            if error.retryable:  # the next poke tries again; the sensor's timeout bounds the wait
                self.log.warning("Polling EvoLink task %s failed: %s", self.evolink_task_id, error)
                return PokeReturnValue(is_done=False)
            fail_for(error)
        if self._reporter is None:
            self._reporter = ProgressReporter(self.evolink_task_id)
        if line := self._reporter.update(task):
            self.log.info(line)
        now = time.time()
        decision = decide_after_poll(task, now=now, started_at=now, deadline=None)
        if decision.outcome is Outcome.SUCCESS:
            return PokeReturnValue(is_done=True, xcom_value=self._outcome(task))
        if decision.outcome is Outcome.FAILED:
            self.log.error(decision.message)
            code, message = task_failure(task)
            fail_for(EvolinkTaskError(self.evolink_task_id, str(task.get("status")), code, message or None))
        if decision.message:
            self.log.warning(decision.message)
        return PokeReturnValue(is_done=False)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        first = self.poke(context)
        if first.is_done:
            return first.xcom_value
        from evolink_provider.triggers.evolink import EvolinkTaskTrigger

        clock = timing()
        self.defer(
            trigger=EvolinkTaskTrigger(
                evolink_task_id=self.evolink_task_id,
                evolink_conn_id=self.evolink_conn_id,
                poll_interval=self.poke_interval,
                max_poll_interval=self.max_poll_interval,
                end_time=clock.now() + self.timeout,
                # The scheduler race of fast triggers (evolink_provider.timing) hits sensors too.
                not_before=clock.now() + clock.trigger_hold,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + 2 * self.max_poll_interval + 60 + clock.trigger_hold),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger with the task object, or fail with what the event says."""
        from evolink_provider.triggers.evolink import task_from_event

        try:
            return self._outcome(task_from_event(event))
        except EvolinkError as error:
            fail_for(error)

    def _outcome(self, task: dict[str, Any]) -> dict[str, Any]:
        """Log the completed task's links and credits; the XCom value the operators return too."""
        now = time.time()
        self.log.info(final_line(task, elapsed=now - created_at(task, default=now)))
        return finished_value(task)
