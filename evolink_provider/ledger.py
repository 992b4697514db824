"""The ledger: the one place that decides when a credit is spent and when a paid result is given up.

EvoLink bills every generation and has no cancel call. The promise is: **a video is paid for once, and what
was paid for is delivered.** So a POST is made only on positive evidence that no paid task of this request
can still be delivered, and everything uncertain (a 404, 403, 410, 5xx or timeout on a task read or on a
fresh result link, an answer that fails a check) spends nothing: the read is repeated a few times inside the
try (:func:`reread_pauses`), then the try fails *retryably* naming the EvoLink task and what to do.

What is recorded per task instance (dag, task, run, map index; never the try number) is one
:class:`~evolink_provider.records.SubmissionRecord` in Airflow 3.3's ``task_state_store``, which survives
retries and clears: the request's fingerprint, the ``Idempotency-Key`` sent, the task id once known, the
*generation* (below), when the provider first saw the task completed, every result file stored (name, size,
sha256) with the number of results the task has, and whether the result was *delivered* (handed downstream:
written by the operator's ``post_execute``, after the user's own hook, so only Airflow's XCom push and success
report come later, and a failure there leaves a failed task instance whose clear pays again). The intent is
written before the POST and the task id right after, so a crash between the two is recovered by resending the
*same* key, which EvoLink answers with the task it created. Airflow 3.3's ``ResumableJobMixin`` persists a job
id only after the submit returns, so it leaves that submit-to-persist window open; the intent record closes
it. Airflow 3.0-3.2 have no ``task_state_store`` and nothing else is invented here: only the derived key
(request, generation, counter) lets EvoLink replay a repeated submission.

**Why this try runs** (:func:`try_reason`): a *new run* or first try (no record); an *automatic retry*
(same generation); a *clear* (another generation); a *forced* fresh take (a clear with ``regenerate``, or
``reattach="never"``, where every try is a generation of its own). The generation is ``ti.max_tries``:
Airflow sets ``max_tries = try_number + retries`` whenever a task instance is cleared
(``clear_task_instances``, and the scheduler for a running task that was cleared) and never changes it on
an automatic retry; the task runner derives the first try of a sequence as ``max_tries - retries + 1``
from the same field. A clear of *another* task of the run bumps the run's ``clear_number``, which is why
that is not used. On 3.0-3.2 the generation is folded into the key, so a clear there never resends an
earlier generation's key. A task that a user marked failed, or that Airflow's scheduler failed after its
trigger fired (the defer race, docs/reliability.md "Fast triggers"), delivered nothing: its clear is an
ordinary *clear* of an undelivered generation, which collects what was paid for.

**The table** (:func:`decide`, tested row by row by ``tests/test_ledger.py``). *store*: ``3.3`` (a
``task_state_store``), ``none`` (3.0-3.2), ``any``. *recorded*: ``nothing``; ``intent`` (key, no task id);
``task`` (an id, result not delivered); ``stored`` (an id, every result file recorded and still on disk,
not delivered); ``delivered``. *request*: whether the rendered request is the recorded one. *answer*: what
EvoLink said when asked (``-``: not asked yet). Result links are refused (403/404/410, 400/401) as
*expired* only past the first-seen-completed time + 24 h, plus an hour for machines' clocks
(:func:`link_expired`): the record's time, or on 3.0-3.2 the time this try or its trigger's poll read the
task completed. With no such sighting a refusal is never proof (R25): ``created``, or a sighting of the
task running, says only that it completed *later*.

| row | store | recorded | request | why | answer | action |
|-----|-------|----------|---------|-----|--------|--------|
| R01 | 3.3 | nothing | - | any | - | submit |
| R02 | 3.3 | intent | same | retry | - | resend |
| R03 | 3.3 | intent | same | clear | - | resend |
| R04 | 3.3 | intent | changed | retry or clear | - | fail |
| R05 | 3.3 | task | same | retry | - | read |
| R06 | 3.3 | task | same | clear | - | read |
| R07 | 3.3 | task | changed | retry | - | read |
| R08 | 3.3 | stored | same | retry or clear | - | use stored |
| R09 | 3.3 | stored | changed | retry or clear | - | use stored |
| R10 | 3.3 | delivered | any | retry | - | read |
| R11 | 3.3 | delivered | any | clear | - | submit |
| R12 | 3.3 | task | changed | clear | - | read |
| R13 | 3.3 | intent, task or stored | any | forced | - | submit |
| R14 | none | nothing | any | new run or clear | - | submit |
| R15 | none | nothing | same | retry | - | resend |
| R16 | none | nothing | changed | retry | - | submit |
| R17 | any | task | any | any | running | wait |
| R18 | any | task | any | any | completed | collect |
| R19 | any | task | any | any | failed, fixable code | submit |
| R20 | any | task | any | any | cancelled | submit |
| R21 | any | task | any | any | failed, unfixable code | fail |
| R22 | any | task | any | any | replayed failure, fixable code | submit |
| R23 | any | task | any | any | 404 on the task read | fail retryably |
| R24 | any | task | any | any | other read error | fail retryably |
| R25 | any | task | any | any | result link refused, not expired | fail retryably |
| R26 | any | task | any | new run or retry (none: regenerate_expired too) | result link expired | fail |
| R27 | 3.3 | task | any | new run or retry, regenerate_expired | result link expired | submit |
| R28 | any | task | any | clear or forced | result link expired | submit |
| R29 | any | task | any | any | failed or cancelled after being seen completed | fail retryably |

Why each row: R01, R14: nothing paid for this request. R02, R03, R15: the earlier POST may have created a
task; the same key makes EvoLink answer with it (R03: a clear of a try that never delivered picks up the
generation it paid for). R04: the recorded key cannot be resent with another body (EvoLink answers 409) and
the earlier outcome is unknown, so nothing is spent; ``regenerate`` submits the new request. R05-R07, R10,
R12: the recorded task is read first (R07, R12: a template that reads the clock renders another request on a
retry or a clear; the undelivered paid task is picked up, with a warning naming both fingerprints and saying
that ``regenerate=True`` or ``dag_run.conf`` ``{"evolink_regenerate": true}`` submits the new request; R10: a
retry after delivery delivers the same result again). R08, R09: every result is on disk as recorded; nothing
is read. R11: the user asked again for a result already delivered. R13: ``regenerate`` asked for a fresh take.
R16: the key folds in the request, so without a store a changed request is a new submission (unavoidable
there). R15 with inline local images: the retry uploads them again, EvoLink refuses the resent key with the
new URLs (``idempotency_conflict``) and the try fails naming the key, buying nothing; the upload step's URLs
stay the same for every retry. R17, R18: the paid task is waited for or collected. R19, R20, R22:
EvoLink says the task failed with a code a resubmission can fix
(:func:`~evolink_provider.exceptions.task_error_is_retryable`) or was cancelled, neither charged: a fresh
key (counter + 1), once per failure. R21: no resubmission can fix that code. R23-R25:
not evidence that the paid result is gone (a gateway blip, read-after-write lag, a CDN refusal): spend
nothing, fail the try so that a later try reads again. R26: an automatic retry never buys a new generation;
the message says that a clear, or ``regenerate_expired=True`` for unattended runs, does. R27, R28: the result
is proven expired and a new generation was asked for. R27 needs a store: without one, the new generation's
key is the first try's (EvoLink answers it with the expired task) and any other key would be lost to the
next retry, which resends the first; so on 3.0-3.2 ``regenerate_expired`` is R26, and a clear (a new
generation there) is the way. R29: this provider saw the task completed (so EvoLink
billed it; with its results or not yet); a later read saying failed or cancelled (any code,
``resource_not_found`` included), on a retry's first read, in a wait or in a trigger event, contradicts that
and is not evidence: spend nothing, fail the try so that a later read collects it.

Two limits, chosen rather than patched. On 3.0-3.2 "seen completed" lives only as long as the try: a task
read completed without its results by one try and failed with a fixable code by the next is R22 there (a
new generation, on EvoLink's word that the task failed); 3.3's record makes it R29. A wait (on the worker
or in the trigger) that ends ``cancelled`` fails the try for good, as EvoLink's own clients never retry a
cancellation; R20 (a later try or a clear reading it cancelled) submits, since a cancelled task was not
charged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from evolink_provider import timing
from evolink_provider.answers import epoch_seconds
from evolink_provider.compat import AirflowFailException, log_once
from evolink_provider.exceptions import (
    EvolinkConflictError,
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkSubmissionUnknownError,
    EvolinkValidationError,
    RetryLaterError,
    fail_for,
    task_error_is_retryable,
)
from evolink_provider.polling import FAILED_STATUSES, completed_without_output, expected_end, task_failure
from evolink_provider.records import (
    SubmissionRecord,
    SubmissionStore,
    idempotency_key,
    task_instance_identity,
    tries_in_sequence,
    try_generation,
)
from evolink_provider.results import printable
from evolink_provider.storage import StoredFile

if TYPE_CHECKING:
    import logging

    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.submission import PreparedRequest

#: EvoLink's result links are signed for 24 h from completion.
RESULT_LINK_TTL = 24 * 3600.0
#: How far the clocks of two machines may disagree (the one that saw the task completed, the one that
#: judges a refusal): a refusal proves expiry only this long past the links' 24 h. Inside it a refusal fails
#: retryably, which only delays a purchase; without it a clock behind turns a CDN blip into one.
CLOCK_SKEW_ALLOWANCE = 3600.0
#: ``reattach`` values of the operators.
REATTACH_MODES = ("auto", "never")
#: ``dag_run.conf`` key that forces a fresh take on a clear: ``true``, or a list of task ids.
REGENERATE_CONF_KEY = "evolink_regenerate"

NO_TASK_STATE_STORE = (
    "This Airflow has no task_state_store (3.3+): a retry cannot look up the earlier EvoLink task and "
    "relies on EvoLink replaying the Idempotency-Key instead (said once per process)."
)


class Recorded(Enum):
    NOTHING = "nothing"
    INTENT = "intent"
    TASK = "task"
    STORED = "stored"
    DELIVERED = "delivered"


class Why(Enum):
    NEW = "new run"
    RETRY = "retry"
    CLEAR = "clear"
    FORCED = "forced"


class Answer(Enum):
    NOT_ASKED = "-"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED_FIXABLE = "failed, fixable code"
    CANCELLED = "cancelled"
    FAILED_UNFIXABLE = "failed, unfixable code"
    REPLAYED_FIXABLE = "replayed failure, fixable code"
    READ_NOT_FOUND = "404 on the task read"
    READ_ERROR = "other read error"
    LINK_REFUSED = "result link refused, not expired"
    LINK_EXPIRED = "result link expired"
    CONTRADICTED = "failed or cancelled after being seen completed"


class Action(Enum):
    SUBMIT = "submit"
    RESEND = "resend"
    READ = "read"
    WAIT = "wait"
    COLLECT = "collect"
    USE_STORED = "use stored"
    FAIL_RETRYABLY = "fail retryably"
    FAIL = "fail"


@dataclass(frozen=True)
class Situation:
    """Everything :func:`decide` looks at."""

    durable: bool
    recorded: Recorded
    why: Why
    answer: Answer = Answer.NOT_ASKED
    same_request: bool = True
    regenerate_expired: bool = False


def decide(s: Situation) -> Action:
    """The action of the module docstring's table for ``s`` (a pure function: no I/O, no clock)."""
    if s.answer is not Answer.NOT_ASKED:
        return _after_answer(s)
    if not s.durable:  # R14-R16: only the derived key exists
        return Action.RESEND if s.why is Why.RETRY and s.same_request else Action.SUBMIT
    if s.recorded is Recorded.NOTHING:  # R01
        return Action.SUBMIT
    if s.why is Why.FORCED:  # R13
        return Action.SUBMIT
    if s.recorded is Recorded.DELIVERED:  # R10, R11
        return Action.READ if s.why is Why.RETRY else Action.SUBMIT
    if s.recorded is Recorded.INTENT:  # R02-R04
        return Action.RESEND if s.same_request else Action.FAIL
    if s.recorded is Recorded.STORED:  # R08, R09
        return Action.USE_STORED
    return Action.READ  # R05-R07, R12


def _after_answer(s: Situation) -> Action:
    answer = s.answer
    if answer is Answer.RUNNING:  # R17
        return Action.WAIT
    if answer is Answer.COMPLETED:  # R18
        return Action.COLLECT
    if answer in (Answer.FAILED_FIXABLE, Answer.CANCELLED, Answer.REPLAYED_FIXABLE):  # R19, R20, R22
        return Action.SUBMIT
    if answer is Answer.FAILED_UNFIXABLE:  # R21
        return Action.FAIL
    if answer is Answer.LINK_EXPIRED:  # R26-R28
        if s.why in (Why.CLEAR, Why.FORCED) or (s.regenerate_expired and s.durable):
            return Action.SUBMIT
        return Action.FAIL
    return Action.FAIL_RETRYABLY  # R23-R25, R29


def answer_of(task: dict[str, Any], replayed: bool = False, seen_completed: bool = False) -> Answer:
    """What a task object says, in the table's words; ``seen_completed``: this provider recorded it
    completed before (row R29)."""
    status = task.get("status")
    if seen_completed and (status == "cancelled" or status in FAILED_STATUSES):
        return Answer.CONTRADICTED
    if status == "cancelled":
        return Answer.CANCELLED
    if status in FAILED_STATUSES:
        if not task_error_is_retryable(task_failure(task)[0]):
            return Answer.FAILED_UNFIXABLE
        return Answer.REPLAYED_FIXABLE if replayed else Answer.FAILED_FIXABLE
    return Answer.COMPLETED if status == "completed" else Answer.RUNNING


def reread_pauses() -> tuple[float, float]:
    """Pauses (seconds) between the reads of a recorded task that failed: a gateway blip or a
    read-after-write lag passes within seconds, and a try must not hang on a real outage."""
    pause = timing.current().reread_pause
    return pause, 3 * pause


def link_expired(first_seen_completed: float | None, now: float) -> bool:
    """Whether a refused result link is proven expired: past the first time this provider saw the task
    completed (it completed before that, so its links' 24 h ran out by then + 24 h), plus
    :data:`CLOCK_SKEW_ALLOWANCE`. Without a sighting nothing proves it: ``created`` is when the task was
    made, and its completion, which starts the links' 24 h, may come any time later (a long queue)."""
    if first_seen_completed is None:
        return False
    return now > first_seen_completed + RESULT_LINK_TTL + CLOCK_SKEW_ALLOWANCE


def sighting_time(at: Any, created: float | None, now: float) -> float:
    """When a trigger's poll read a task completed, as its event says; ``now`` (a later sighting, which
    only makes a link look fresher) unless it is a number between the task's ``created`` and ``now``."""
    if isinstance(at, bool) or not isinstance(at, (int, float)) or created is None:
        return now
    return float(at) if created <= at <= now else now


def regenerate_requested(context: Any, regenerate: Any) -> bool:
    """Whether a fresh take is forced: the operator's ``regenerate`` (a bool, or its rendered text
    ``true``/``false``), or the run's ``dag_run.conf["evolink_regenerate"]`` (``true``, or a list holding
    this task's id). Any other value is refused before any call: a ``"true"`` typed into the trigger form
    that silently did not force the take would collect the old video instead of the one asked for."""
    if isinstance(regenerate, str) and regenerate.strip().lower() in ("true", "false"):
        regenerate = regenerate.strip().lower() == "true"
    if not isinstance(regenerate, bool):
        fail_for(EvolinkValidationError("operator", "regenerate", regenerate, "True or False"))
    run = context.get("dag_run")
    conf = getattr(run, "conf", None)
    wanted = conf.get(REGENERATE_CONF_KEY) if isinstance(conf, dict) else None
    if not (
        wanted is None
        or isinstance(wanted, bool)
        or (isinstance(wanted, list) and all(isinstance(task_id, str) for task_id in wanted))
    ):
        fail_for(
            EvolinkValidationError(
                "dag_run.conf", REGENERATE_CONF_KEY, wanted, "true, false, or a list of task ids (JSON)"
            )
        )
    if regenerate or wanted is True:
        return True
    return isinstance(wanted, list) and context["ti"].task_id in wanted


def try_reason(
    record: SubmissionRecord | None, generation: str, forced: bool, context: Any, every_try_new: bool = False
) -> Why:
    """Why this try runs (module docstring), from the record (3.3) or the try numbers (3.0-3.2, where
    ``every_try_new``, ``reattach="never"``, makes a retry a generation of its own, so *forced*)."""
    if record is None:
        if tries_in_sequence(context) == 1:
            return Why.NEW
        return Why.FORCED if every_try_new else Why.RETRY
    if record.generation in (None, generation):
        return Why.RETRY
    return Why.FORCED if forced else Why.CLEAR


# -- applying the decisions ------------------------------------------------------------------------


class NewGeneration(Exception):
    """Raised by :meth:`Ledger.store` when the results expired and a new generation was submitted."""

    def __init__(self, task: dict[str, Any]) -> None:
        super().__init__(task.get("id"))
        self.task = task


@dataclass
class Ledger:
    """Applies :func:`decide` for one try of one task instance: the only code that POSTs a generation.

    :param request: the validated request, built on demand (``execute_complete`` needs it only to
        regenerate).
    :param reattach: ``auto`` or ``never`` (see the operators).
    :param regenerate: force a fresh take on a clear (see :func:`regenerate_requested`).
    :param regenerate_expired: let an automatic retry buy a new generation when the results expired.
    :param min_credits: see :func:`~evolink_provider.submission.check_balance`.
    """

    context: Any
    hook: EvolinkHook
    log: logging.Logger | Any
    request: Callable[[], PreparedRequest]
    reattach: str = "auto"
    regenerate: Any = False
    regenerate_expired: bool = False
    min_credits: float | None = None
    sleep: Callable[[float], None] = time.sleep
    #: The EvoLink task this try waits for, once known (named by ``on_kill``).
    current_task_id: str | None = None

    def __post_init__(self) -> None:
        if self.reattach not in REATTACH_MODES:
            raise AirflowFailException(f"reattach={self.reattach!r}: allowed values are 'auto' and 'never'")
        self.states = SubmissionStore(self.context)
        self.output_path: str | None = None
        #: The folder this try's downloads go to (:meth:`_folder_of`).
        self.storing_in: str | None = None
        self.told_folder = False
        #: When this try (its operator or its trigger) first saw each task completed, record or not.
        self.completed_seen: dict[str, float] = {}
        self.record = self.states.load()
        self.generation = try_generation(self.context, self.reattach)
        forced = self.reattach == "never" or regenerate_requested(self.context, self.regenerate)
        self.why = try_reason(
            self.record, self.generation, forced, self.context, every_try_new=self.reattach == "never"
        )

    def _situation(self, answer: Answer = Answer.NOT_ASKED, same_request: bool = True) -> Situation:
        return Situation(
            self.states.durable,
            self._recorded(),
            self.why,
            answer,
            same_request,
            bool(self.regenerate_expired),
        )

    def _recorded(self) -> Recorded:
        record = self.record
        if record is None:
            return Recorded.NOTHING
        if record.task_id is None:
            return Recorded.INTENT
        if record.delivered:
            return Recorded.DELIVERED
        if self.why is Why.FORCED:  # R13 submits whatever is stored: the old files are not looked at
            return Recorded.TASK
        return Recorded.STORED if self.stored_files() is not None else Recorded.TASK

    def _save(self, record: SubmissionRecord) -> None:
        self.record = record
        self.states.save(record)

    # -- start: submit, resend, read, reattach --------------------------------------------------

    def start(self, output_path: str | None) -> dict[str, Any]:
        """The task this try waits for or collects (``from_storage`` when its files are all stored)."""
        self.output_path = output_path
        if not self.states.durable:
            log_once(self.log, NO_TASK_STATE_STORE)
        record = self.record
        try:
            request: PreparedRequest | None = self.request()
        except AirflowFailException:
            # An input gone or changed since the paid try (a cleaned folder, another worker): the recorded
            # task needs no input bytes, so this is a changed request (R07); a submission asks again.
            if record is None or record.task_id is None:
                raise
            request = None
        same = record is None or (request is not None and record.fingerprint == request.fingerprint)
        action = decide(self._situation(same_request=same))
        if record is not None and not same and action in (Action.READ, Action.USE_STORED):
            self.log.warning(
                "The rendered request differs from the one recorded for EvoLink task %s (a template "
                "that reads the clock?): recorded fingerprint %s is what an earlier try paid for, %s is "
                "what this try rendered. The paid task is picked up; regenerate=True or dag_run.conf "
                '{"%s": true} on a clear submits the new request.',
                record.task_id or "(unknown)",
                record.fingerprint,
                request.fingerprint if request is not None else "(an input could not be read)",
                REGENERATE_CONF_KEY,
            )
        if action is Action.FAIL:
            raise AirflowFailException(
                f"An earlier try sent Idempotency-Key {record.idempotency_key if record else '?'} and its "
                "outcome is unknown, but the rendered request changed since: nothing is submitted. Look the "
                "key up at EvoLink, or clear the task instance with regenerate=True or dag_run.conf "
                f'{{"{REGENERATE_CONF_KEY}": true}} to submit the new request.'
            )
        if action is Action.USE_STORED:
            return self._from_storage()
        if action is Action.READ:
            return self._read_recorded()
        if request is None:  # a submission needs the request: its refusal stands
            request = self.request()
        if action is Action.RESEND:
            return self._submit(request, resend=True)
        if self.why in (Why.CLEAR, Why.FORCED) and record is not None:
            self.log.info(
                "A clear (%s): a new generation is submitted; the earlier EvoLink task %s is left alone.",
                "a fresh take was asked for"
                if self.why is Why.FORCED
                else "its result was delivered or the request changed",
                record.task_id or "(unknown)",
            )
        return self._submit(request)

    def _read_recorded(self) -> dict[str, Any]:
        record = self.record
        assert record is not None and record.task_id is not None
        task_id = record.task_id
        task = self._read(task_id)
        if record.generation != self.generation:
            # A clear picks up the generation already paid for: from now on its retries are retries.
            self._save(replace(record, generation=self.generation))
        self.refuse_contradiction(task)
        action = decide(self._situation(answer_of(task)))
        if action is Action.FAIL:
            refuse_unfixable(task)
        if action is Action.SUBMIT:
            self.log.info("EvoLink task %s ended %s: submitting once more.", task_id, task.get("status"))
            return self._submit(self.request())
        self.log.info(
            "Reattaching to EvoLink task %s (%s) from an earlier try; nothing is submitted.",
            task_id,
            task.get("status"),
        )
        self.current_task_id = task_id
        return task

    def later_try(self, does: str) -> str:
        """What the next try does with the paid task: ``does`` it, or with ``reattach="never"`` (every try a
        take of its own) pays for a new generation and leaves it alone."""
        if self.reattach == "never":
            return "With reattach='never' a later try pays for a new generation instead and leaves this task"
        return f"A later try {does}"

    def refuse_contradiction(self, task: dict[str, Any]) -> None:
        """Row R29, wherever a read of the recorded task ends (a retry's first read, the wait, a trigger
        event): failed or cancelled after this provider saw it completed fails the try retryably."""
        record = self.record
        ours = record is not None and record.task_id == task.get("id")
        seen = ours and record is not None and record.completed_seen_at is not None
        answer = answer_of(task, seen_completed=seen)
        if answer is Answer.CONTRADICTED and decide(self._situation(answer)) is Action.FAIL_RETRYABLY:
            code, message = task_failure(task)
            raise RetryLaterError(
                f"EvoLink task {printable(task.get('id'))} was seen completed (and so billed) by an earlier "
                f"try, but now reads {printable(task.get('status'))} ({printable(code)}: "
                f"{printable(message)}): a contradiction, not evidence that the paid result is gone, so "
                f"nothing was submitted. {self.later_try('reads it again')}; if EvoLink keeps saying so, "
                f"clear the task instance with dag_run.conf {REGENERATE_CONF_KEY}=true (or regenerate=True) "
                "to pay for a new one."
            )

    def reread(self, task_id: str, error: EvolinkError) -> dict[str, Any]:
        """The wait's poll of the paid task failed with an error the poll row does not repeat (a 404 right
        after the POST: read-after-write lag, a gateway blip): rows R23 and R24, no evidence that the task
        is gone. It is read again (the recorded id, when there is one); a try that still cannot read it
        fails retryably, so the automatic retry, not a clear, picks the paid task up."""
        record = self.record
        recorded = record.task_id if record is not None and record.task_id else task_id
        self.log.warning(
            "Polling EvoLink task %s failed: %s; no evidence that the paid task is gone: reading it again.",
            recorded,
            error,
        )
        return self._read(recorded)

    def reread_empty(self, task: dict[str, Any]) -> dict[str, Any]:
        """A task read ``completed`` without any result: its list may be filled in a moment after the
        status (read-after-write lag), so within the try it is read again (:func:`reread_pauses`) before
        the operator gives the paid task up. It was read completed, so billed: a re-read (or a later try's
        read) saying failed or cancelled is the contradiction of row R29, never a task to resubmit."""
        for delay in reread_pauses():
            if task.get("status") != "completed" or not completed_without_output(task):
                return task
            self.saw_completed(task)
            self.log.warning(
                "EvoLink task %s reads completed without any result; reading it again in %.0fs",
                task.get("id"),
                delay,
            )
            self.sleep(delay)
            task = self._read(str(task["id"]))
        return task

    def _read(self, task_id: str) -> dict[str, Any]:
        """The recorded task, read up to three times (each read has the hook's own retries); then the try
        fails retryably."""
        error: EvolinkError | None = None
        for delay in (*reread_pauses(), None):
            try:
                return self.hook.get_task(task_id)
            except EvolinkError as failed:
                error = failed
            if delay is not None:
                self.log.warning(
                    "Reading EvoLink task %s failed: %s; reading again in %.0fs", task_id, error, delay
                )
                self.sleep(delay)
        answer = Answer.READ_NOT_FOUND if isinstance(error, EvolinkNotFoundError) else Answer.READ_ERROR
        assert decide(self._situation(answer)) is Action.FAIL_RETRYABLY
        raise RetryLaterError(
            f"EvoLink task {task_id}, paid for by an earlier try, could not be read ({error}); nothing "
            f"was submitted. {self.later_try('reads it again')}; if EvoLink really lost it, clear the task "
            f"instance with dag_run.conf {REGENERATE_CONF_KEY}=true (or regenerate=True) to pay for a new "
            "one."
        ) from error

    def _submit(self, request: PreparedRequest, *, resend: bool = False) -> dict[str, Any]:
        """POST the request; follow a replayed failed task with a fresh key, once per such failure.

        A failed answer is a replay of an earlier failed task when the key had been sent before: by the
        try whose intent is recorded (``resend``) or, without ``task_state_store``, by one of the
        earlier tries of this try sequence (each created at most one task, keys 0..n-2). Anything else
        is a fresh task that failed at once, handed to the operator like any failure.
        """
        from evolink_provider.submission import check_balance, payload_for_post

        identity = task_instance_identity(self.context)
        record = self.record
        uploads = {upload.source: upload for upload in record.uploads} if record else {}
        if resend and record is not None:
            submission, key = record.submission, record.idempotency_key
            generation = record.generation or self.generation
        else:
            submission = 0 if record is None else record.submission + 1
            generation = self.generation
            key = idempotency_key(identity, request.fingerprint, submission, generation)
        earlier_tries = tries_in_sequence(self.context) - 1
        # A resent key goes with the body it was first sent with (SubmissionRecord.payload), and only it: a
        # new key goes with the request as rendered now (the recorded URLs may have expired since).
        payload: dict[str, Any] | None = record.payload if resend and record is not None else None
        recorded_body = payload is not None
        while True:
            new = SubmissionRecord(
                request.fingerprint,
                submission,
                key,
                None,
                generation,
                tuple(uploads[source] for source in sorted(uploads)),
            )
            # The key was sent before: by the try whose intent is recorded, or (3.0-3.2) maybe by an earlier
            # try of this sequence (each sent at most keys 0..n-2; nothing records whether it got that far).
            maybe_sent = not self.states.durable and self.why is Why.RETRY and submission < earlier_tries
            replayed = (resend and record is not None) or maybe_sent
            # A recorded key with its body was checked by the try that sent it: EvoLink answers it with the
            # task it created, whose own cost may have taken the balance below min_credits. Without its body
            # it never left (the body is recorded right before the POST), unless the record predates bodies.
            resending_sent = resend and record is not None and record.payload is not None
            if not resending_sent:
                unknown = maybe_sent or (resend and record is not None)
                check_balance(self.hook, self.min_credits, self.log, maybe_sent_key=key if unknown else None)
            if payload is None:
                self._save(new)  # the intent, with the uploads of earlier tries
                payload = payload_for_post(self.hook, request, uploads, self.log)
                new = replace(new, uploads=tuple(uploads[source] for source in sorted(uploads)))
            new = replace(new, payload=payload)
            self._save(new)
            try:
                task = self.hook.create_video_task(payload, idempotency_key=key)
            except EvolinkError as error:
                if not replayed and not isinstance(error, EvolinkSubmissionUnknownError):
                    # EvoLink created nothing for this key (refused, rate-limited, never reached): the body
                    # leaves the record, so that the next POST of the key is checked by min_credits again.
                    self._save(replace(new, payload=None))
                if replayed and request.local_media and isinstance(error, EvolinkConflictError):
                    raise AirflowFailException(
                        f"EvoLink refused Idempotency-Key {key} ({error.code}): an earlier try sent it "
                        "with other Files API URLs for the same local images, so the task it paid for "
                        "cannot be reached from here, and nothing new was submitted. Find it in the EvoLink "
                        "dashboard by that key. A try cannot reuse an earlier try's uploads without "
                        "task_state_store (Airflow 3.3), nor once they near their 72 h expiry: upload local "
                        "images with "
                        "EvolinkUploadImagesOperator (its URLs stay the same for every retry); a clear "
                        "pays for a new take."
                    ) from error
                fail_for(error)
            self._save(replace(new, task_id=task["id"]))
            self.current_task_id = task["id"]
            action = decide(self._situation(answer_of(task, replayed)))
            if action is Action.FAIL and replayed:
                refuse_unfixable(task)
            if action is Action.SUBMIT and replayed:
                self.log.info("EvoLink replayed failed task %s; submitting once more.", task["id"])
                submission += 1
                key = idempotency_key(identity, request.fingerprint, submission, self.generation)
                generation = self.generation
                resend = False
                if recorded_body:
                    payload, recorded_body = None, False
                continue
            usage = task.get("usage") or {}
            self.log.info(
                "%s EvoLink task %s (model %s); credits reserved: %s (%s)%s",
                # A resent key is answered with the task the lost answer named, if EvoLink created one.
                "Resent the recorded Idempotency-Key: EvoLink answered with" if replayed else "Submitted",
                task["id"],
                printable(task.get("model")),
                printable(usage.get("credits_reserved")),
                printable(usage.get("billing_rule")),
                "; " + end if (end := expected_end(task, time.time())) else "",
            )
            return task

    # -- collect: stored files, expiry, delivery --------------------------------------------------

    def check_resumed(self, task: dict[str, Any]) -> None:
        """A trigger event (``success``, or ``failed``) must name the task this task instance recorded: an
        event for another task (a forged or stale event row) spends nothing, stores nothing and ends
        nothing (a ``failed`` one with an unfixable code would skip every retry); the try fails retryably."""
        record = self.record
        if record is not None and record.task_id is not None and task.get("id") != record.task_id:
            raise RetryLaterError(
                f"The trigger event names EvoLink task {printable(task.get('id'))}, but this task instance "
                f"recorded {record.task_id}: nothing was stored or submitted. "
                f"{self.later_try('reads the recorded task')}."
            )

    def saw_completed(self, task: dict[str, Any], at: Any = None) -> None:
        """Record when this provider first saw its task completed (``at``: when the trigger's poll did;
        the links' 24 h ran out by then + 24 h), and the task object it saw with its results (what a try
        that finds every result stored hands downstream)."""
        seen_at = sighting_time(at, epoch_seconds(task.get("created")), timing.current().now())
        task_id = str(task.get("id"))
        self.completed_seen[task_id] = min(seen_at, self.completed_seen.get(task_id, seen_at))
        record = self.record
        if record is None or record.task_id != task.get("id"):
            return
        if record.completed_seen_at is None or seen_at < record.completed_seen_at:
            record = replace(record, completed_seen_at=seen_at)
        if record.completed_task is None and not completed_without_output(task):
            seen = {key: value for key, value in task.items() if key not in ("files", "from_storage")}
            record = replace(record, completed_task=seen)
        if record != self.record:
            self._save(record)

    def stored_files(self) -> list[str] | None:
        """The recorded files of the recorded task, when the set is complete and each is still on disk at
        its recorded size; else None."""
        record = self.record
        if record is None or not record.results:
            return None
        folder = self._folder_of(record.task_id, self.output_path)
        if not folder:
            return None
        from evolink_provider.storage import verify_stored

        return verify_stored(record.task_id or "", folder, record.stored, record.results)

    def _folder_of(self, task_id: str | None, output_path: str | None) -> str | None:
        """Where the files of ``task_id`` are and go: the folder its recorded files are in while at least
        one of them is still there (a later try may render another ``output_path``, or none), else
        ``output_path``."""
        record = self.record
        rendered = str(output_path) if output_path else None
        if record is None or record.task_id != task_id or not record.stored or not record.stored_in:
            return rendered
        if record.stored_in == rendered:
            return rendered
        from evolink_provider.storage import holds_any

        if not holds_any(task_id or "", record.stored_in, record.stored):
            return rendered  # nothing left to keep together there: the set starts again where asked
        if not self.told_folder:
            self.told_folder = True
            self.log.warning(
                "The files of EvoLink task %s are in %s, where an earlier try stored them; this try's "
                "output_path renders %s. The set stays where it is: nothing is downloaded or paid for again.",
                task_id,
                record.stored_in,
                rendered or "nothing",
            )
        return record.stored_in

    def _from_storage(self) -> dict[str, Any]:
        assert self.record is not None
        if self.record.generation != self.generation:
            # As in _read_recorded: a clear picks up what it paid for, and its retries are retries.
            self._save(replace(self.record, generation=self.generation))
        files = self.stored_files()
        if files is None:  # changed since this try found them complete
            raise RetryLaterError(
                f"The stored files of EvoLink task {self.record.task_id} changed while this try checked "
                f"them: nothing was read or submitted. {self.later_try('checks them again')}."
            )
        self.log.info("Every result of EvoLink task %s is stored as recorded: %s", self.record.task_id, files)
        self.current_task_id = self.record.task_id
        seen = self.record.completed_task
        if seen is None or seen.get("id") != self.record.task_id:  # a record written before it was kept
            seen = {"id": self.record.task_id, "status": "completed", "results": []}
        return {**seen, "files": files, "from_storage": True}

    def store(self, task: dict[str, Any], output_path: str, deadline: float | None) -> list[str]:
        """Stream the task's results into ``output_path``, recording each file as it lands; a refused
        result link is decided by the table (rows R25-R28)."""
        from evolink_provider.storage import store_results

        self.output_path = output_path
        self.saw_completed(task)
        record = self.record
        known = record.stored if record is not None and record.task_id == task.get("id") else ()
        self.storing_in = folder = self._folder_of(task.get("id"), output_path) or output_path
        try:
            return store_results(self.hook, task, folder, deadline, known=known, on_stored=self._stored)
        except EvolinkNotFoundError as error:
            # The earliest sighting (saw_completed above): the record's, or without one this try's.
            seen = self.completed_seen.get(str(task.get("id")))
            if record is not None and record.task_id == task.get("id") and record.completed_seen_at:
                seen = record.completed_seen_at
            expired = link_expired(seen, timing.current().now())
            answer = Answer.LINK_EXPIRED if expired else Answer.LINK_REFUSED
            action = decide(self._situation(answer))
            if action is Action.FAIL_RETRYABLY:
                raise RetryLaterError(
                    f"A result link of EvoLink task {task['id']} was refused ({error.status_code}), and "
                    "nothing proves that its results expired (this provider first saw the task completed "
                    f"less than 24 h ago): nothing was submitted. {self.later_try('downloads it again')}; "
                    "to pay for a new generation instead, clear the task instance with regenerate=True or "
                    f'dag_run.conf {{"{REGENERATE_CONF_KEY}": true}}.'
                ) from error
            if action is Action.FAIL:
                opt_in = (
                    " (or set regenerate_expired=True)"
                    if self.states.durable
                    else " (regenerate_expired needs Airflow 3.3's task_state_store)"
                )
                raise AirflowFailException(
                    f"The results of EvoLink task {task['id']} expired ({error.status_code}) before all "
                    f"were stored under {output_path}. An automatic retry never pays again: clear the task "
                    f"instance{opt_in} to buy a new generation."
                ) from error
            self.log.warning(
                "The results of EvoLink task %s expired (%s): submitting a new generation.",
                task["id"],
                error.status_code,
            )
            raise NewGeneration(self._submit(self.request())) from error

    def _stored(self, item: StoredFile, results: int) -> None:
        record = self.record
        if record is None or record.task_id is None:
            return
        kept = tuple(known for known in record.stored if known.index != item.index)
        stored = tuple(sorted((*kept, item), key=lambda f: f.index))
        self._save(replace(record, stored=stored, results=results, stored_in=self.storing_in))

    def delivered(self) -> None:
        """The result was handed downstream: a clear from now on asks for a new generation."""
        record = self.record
        if record is not None and record.task_id is not None and not record.delivered:
            self._save(replace(record, delivered=True, generation=self.generation))


def refuse_unfixable(task: dict[str, Any]) -> None:
    """A failed task whose error code no resubmission can fix ends the Airflow task, clearly."""
    code, message = task_failure(task)
    if task.get("status") == "failed" and not task_error_is_retryable(code):
        raise AirflowFailException(
            f"EvoLink task {task.get('id')} failed with {code}: {message or '(no message)'}; "
            "a resubmission cannot fix that code, so nothing is submitted again."
        )
