"""Decide after each poll: keep waiting (and for how long), succeed, fail or time out.

One function, :func:`decide_after_poll`, serves the operators' synchronous wait, the sensor and the
deferrable trigger, so the modes cannot drift apart.

Adaptive schedule (why a 40-minute job is not polled every few seconds, yet completion is noticed soon):

* The expected total run time comes from the task's ``progress`` once it is between 0 and 100 (elapsed
  x 100 / progress: the best estimate, trusted at 85 %), else from ``task_info.estimated_time`` (trusted at
  50 %, because it is a model-wide figure), else from a 60 s guess.
* ``estimated_time`` has two readings (EvoLink's CLI shows it as time left, its older MCP server as
  seconds remaining; the docs say neither): time left from now, or total run time since submission. The
  schedule takes the *earlier* end of the two, which is always the total reading (submission <= now),
  so a poll is never late under either reading. Under the time-left reading the total reading runs out
  halfway; from then on the task counts as overdue and is polled at the tolerance below, which costs
  about twenty polls in all (measured in the tests) and still notices completion within the tolerance.
* The next poll comes after ``trust x remaining`` seconds, so polls close in on the expected end
  geometrically, but never sooner than the *tolerance* ``max(poll_interval, 4 % of the expected run
  time)``: the delay between completion and its detection stays within that tolerance, i.e. within
  max(5 s, 5 % of the run time) with the default 5 s floor.
* No delay exceeds ``max_poll_interval`` (default 600 s) nor the time left before the deadline.
* Delays carry up to 10 % of downward jitter so that many tasks submitted together do not poll in step.
* A trigger's poll waits for its *turn* (:func:`poll_turn`): the polls of one event loop due within the same
  :data:`POLL_TICK` go together, released one per loop iteration. A triggerer with many waits otherwise
  wakes up cold for every poll, which costs several times a poll made right after another
  (docs/benchmarks.md, eighth pass); one release per iteration keeps the loop's other work from waiting
  longer than before. A poll goes at the tick nearest its time (the last one before a deadline: not before
  its time), or the next one if that has passed: at most half a tick early and, behind the polls of its
  tick, one tick late. A tick with more polls than the loop releases before the next tick runs into it
  (two releases per iteration then, and its last polls later). Completion is noticed within the tolerance
  above plus that.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
import random
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from evolink_provider.answers import created_at, finite_number
from evolink_provider.exceptions import MAX_SERVER_NAME, EvolinkError, EvolinkValidationError, server_text
from evolink_provider.hooks.retry import Kind, RetryDecision, RetryPolicy
from evolink_provider.results import duration_phrase, printable, result_urls

RUNNING_STATUSES = frozenset({"pending", "processing"})
FAILED_STATUSES = frozenset({"failed", "cancelled"})
COMPLETED_STATUS = "completed"

DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_MAX_POLL_INTERVAL = 600.0
#: The grid of :func:`poll_turn` (seconds, wall clock): 2 % of the default poll interval.
POLL_TICK = 0.1
#: The shortest pause between polls (seconds): a trigger's polls go in turns of :data:`POLL_TICK` anyway,
#: and a shorter pause would poll EvoLink back to back after failures (they double from it).
SHORTEST_POLL_INTERVAL = POLL_TICK
#: The longest pause between polls (seconds): half the 24 h a result link lives, so that a task read
#: completed late still leaves half its links' life to store them.
LONGEST_POLL_INTERVAL = 43_200.0
#: The longest wait for one task (a year, seconds): a policy, far past any generation (the date arithmetic of
#: deadlines and deferral timeouts would overflow only near 2.5e11 s).
LONGEST_WAIT = 365 * 86_400.0
#: Without any estimate from the API, assume a minute-long generation.
FALLBACK_ESTIMATE = 60.0
TRUST_PROGRESS = 0.85
TRUST_ESTIMATED_TIME = 0.5
TOLERANCE_SHARE = 0.04


def seconds_setting(owner: str, field: str, value: Any, least: float, most: float) -> float:
    """``value`` (a number of seconds, or a ``timedelta`` as Airflow's sensors take) as a float, checked to
    lie above 0, from ``least`` and up to ``most``. Anything else is refused where it is given, naming the
    field and what it allows: text, NaN or infinity would fail only once the task is paid for (comparing
    text with a number, or in the deferral's date arithmetic), and zero or NaN would poll back to back."""
    seconds = finite_number(value.total_seconds() if isinstance(value, timedelta) else value)
    if seconds is not None and seconds > 0 and least <= seconds <= most:
        return seconds
    bounds = f"above 0 and at most {most:,.0f}" if least <= 0 else f"from {least:g} to {most:,.0f}"
    raise EvolinkValidationError(owner, field, value, f"a number of seconds (or a timedelta) {bounds}")


def poll_settings(
    owner: str, poll_interval: Any, max_poll_interval: Any | None, shortest: str = "poll_interval"
) -> tuple[float, float]:
    """The shortest and the longest pause between polls as a DAG author gives them (``shortest`` names the
    first: a sensor's is ``poke_interval``), each a :func:`seconds_setting` from
    :data:`SHORTEST_POLL_INTERVAL` to :data:`LONGEST_POLL_INTERVAL`. A longest given shorter than the
    shortest is refused; none given is :data:`DEFAULT_MAX_POLL_INTERVAL`, or the shortest when longer."""
    bounds = (SHORTEST_POLL_INTERVAL, LONGEST_POLL_INTERVAL)
    low = seconds_setting(owner, shortest, poll_interval, *bounds)
    if max_poll_interval is None:
        return low, max(low, DEFAULT_MAX_POLL_INTERVAL)
    high = seconds_setting(owner, "max_poll_interval", max_poll_interval, *bounds)
    if high < low:
        raise EvolinkValidationError(
            owner, "max_poll_interval", max_poll_interval, f"at least {shortest} ({low:g})"
        )
    return low, high


def followed_poll_settings(poll_interval: float, max_poll_interval: float) -> tuple[float, float]:
    """The pauses a trigger follows, from numbers an earlier version may have stored unchecked (a sensor's
    ``poke_interval`` of 0, a longest shorter than the shortest): each brought within
    :data:`SHORTEST_POLL_INTERVAL` and :data:`LONGEST_POLL_INTERVAL`, the longest no shorter than the
    shortest, as :func:`poll_settings` would have them."""
    low = min(max(poll_interval, SHORTEST_POLL_INTERVAL), LONGEST_POLL_INTERVAL)
    return low, min(max(max_poll_interval, low), LONGEST_POLL_INTERVAL)


class Outcome(str, enum.Enum):
    """What a poll means for the wait."""

    WAIT = "wait"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class PollDecision:
    """The verdict of one poll; ``delay`` is meaningful only for :attr:`Outcome.WAIT`."""

    outcome: Outcome
    delay: float = 0.0
    message: str = ""


def expected_run_time(task: dict[str, Any], elapsed: float) -> tuple[float, float]:
    """The expected total run time of ``task`` and how much to trust it (see the module docstring)."""
    progress = finite_number(task.get("progress"))
    if task.get("status") == "processing" and progress is not None and 0 < progress < 100 and elapsed > 0:
        return elapsed * 100.0 / progress, TRUST_PROGRESS
    if estimate := _estimated_time(task):
        return estimate, TRUST_ESTIMATED_TIME
    return FALLBACK_ESTIMATE, TRUST_ESTIMATED_TIME


def next_poll_delay(
    task: dict[str, Any],
    *,
    elapsed: float,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
    jitter: bool = True,
) -> float:
    """Seconds until the next poll of a running task ``elapsed`` seconds after it was submitted."""
    elapsed = max(0.0, elapsed)
    expected, trust = expected_run_time(task, elapsed)
    tolerance = max(poll_interval, TOLERANCE_SHARE * max(expected, elapsed))
    delay = max(tolerance, trust * max(0.0, expected - elapsed))
    if jitter:
        delay *= random.uniform(0.9, 1.0)
    return max(poll_interval, min(delay, max_poll_interval))


def task_failure(task: dict[str, Any]) -> tuple[str | None, str]:
    """``(error.code, error.message)`` of a failed or cancelled task (EvoLink's message may be empty)."""
    error = task.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return (
            server_text(code, MAX_SERVER_NAME) if code else None,
            server_text(error.get("message") or ""),
        )
    return None, ""


def completed_without_output(task: dict[str, Any]) -> bool:
    """A ``completed`` task with no result URL (``results``, ``result_data[].video_url``,
    ``result_data.video_url``, a profile picture) and no sora ``character_name`` has nothing to hand
    downstream: an error, not a success."""
    data = task.get("result_data")
    character = isinstance(data, dict) and isinstance(data.get("character_name"), str)
    return not result_urls(task) and not character


def decide_after_poll(
    task: dict[str, Any],
    *,
    now: float,
    started_at: float,
    deadline: float | None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
) -> PollDecision:
    """Turn one task object into the next step of the wait.

    :param now: current wall-clock time (epoch seconds).
    :param started_at: when the task was submitted (epoch seconds); drives the adaptive schedule.
    :param deadline: epoch seconds after which a still-running task ends the wait with TIMEOUT.
    """
    status = task.get("status")
    task_id = task.get("id", "?")
    shown = server_text(status, MAX_SERVER_NAME)
    if status == COMPLETED_STATUS:
        if completed_without_output(task):
            return PollDecision(
                Outcome.FAILED,
                message=f"EvoLink task {task_id} is completed but returned no results and no result_data",
            )
        return PollDecision(Outcome.SUCCESS, message=f"EvoLink task {task_id} completed")
    if status in FAILED_STATUSES:
        code, message = task_failure(task)
        return PollDecision(
            Outcome.FAILED,
            message=f"EvoLink task {task_id} ended {shown}"
            + (f": code={code}" if code else "")
            + (f', message="{message}"' if message else ""),
        )
    if deadline is not None and now >= deadline:
        return PollDecision(
            Outcome.TIMEOUT,
            message=f"EvoLink task {task_id} is still {shown} after the wait budget; it keeps running "
            "remotely (EvoLink has no cancel call) and a retry of this Airflow task reattaches to it",
        )
    delay = next_poll_delay(
        task, elapsed=now - started_at, poll_interval=poll_interval, max_poll_interval=max_poll_interval
    )
    if deadline is not None:
        delay = max(0.0, min(delay, deadline - now))
    note = "" if status in RUNNING_STATUSES else f'unknown status "{shown}" treated as still running'
    return PollDecision(Outcome.WAIT, delay=delay, message=note)


class _Tick:
    """The polls of one event loop waiting for one tick, in the order they asked. Only the loop's timer
    and its chain of releases hold it, so it goes with them (and with the loop)."""

    __slots__ = ("__weakref__", "waiting")

    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()


#: Keyed by the loop and the tick's index (an int: two float roads to one tick could name it twice).
_TICKS: weakref.WeakValueDictionary[tuple[int, int], _Tick] = weakref.WeakValueDictionary()


def poll_turn(at: float, *, early: bool = True) -> asyncio.Future[None]:
    """Wait until the turn of a poll due at ``at`` (epoch seconds): its tick of :data:`POLL_TICK`
    (:func:`turn_tick`), then one poll of that tick per loop iteration (module docstring). ``early=False``:
    not before ``at`` (a wait's last poll before its deadline). A future, not a coroutine: a waiting trigger
    holds nothing more than asyncio.sleep's would."""
    loop = asyncio.get_running_loop()
    now = time.time()
    tick = turn_tick(at, now, early=early)
    turn = loop.create_future()
    if tick is None:  # beyond any tick: waits for ever, as asyncio.sleep(inf) would
        return turn
    waiting_for_tick = _TICKS.get((id(loop), tick))
    if waiting_for_tick is None:
        waiting_for_tick = _TICKS[(id(loop), tick)] = _Tick()
        loop.call_later(tick * POLL_TICK - now, _release_next, loop, waiting_for_tick)
    waiting_for_tick.waiting.append(turn)
    return turn


def turn_tick(at: float, now: float, *, early: bool = True) -> int | None:
    """The index of the tick (``index * POLL_TICK`` epoch seconds) of a poll due at ``at``: the nearest one
    (``early``) or the first at or after ``at``, and if that one is before ``now``, the next. None for an
    ``at`` beyond any tick (trigger kwargs are read back from the database); one of no number or before
    ``now`` is due now."""
    if math.isnan(at) or at < now:
        at = now
    scaled = at / POLL_TICK
    if math.isinf(scaled):
        return None
    tick = round(scaled) if early else math.ceil(scaled)
    return tick if tick * POLL_TICK >= now else tick + 1


def _release_next(loop: asyncio.AbstractEventLoop, waiting_for_tick: _Tick) -> None:
    """Give the first poll still waiting its turn, and the next one the next loop iteration (a poll
    cancelled meanwhile is skipped)."""
    waiting = waiting_for_tick.waiting
    while waiting:
        turn = waiting.popleft()
        if not turn.done():
            turn.set_result(None)
            if waiting:
                loop.call_soon(_release_next, loop, waiting_for_tick)
            return


#: Progress lines (:class:`ProgressReporter`): a status change is logged at once, a moving percentage at most
#: once per PROGRESS_MIN_GAP seconds, and a running task gets a line at least once per PROGRESS_MAX_GAP
#: seconds, between polls too (the adaptive schedule can leave minutes between two polls).
PROGRESS_MIN_GAP = 20.0
PROGRESS_MAX_GAP = 60.0


def _estimate(task: dict[str, Any], elapsed: float) -> tuple[float, str] | None:
    """The expected total run time and what it comes from (``progress`` or ``estimated_time``); None
    when the API gave neither (the schedule's 60 s guess is not worth showing to a person)."""
    expected, trust = expected_run_time(task, elapsed)
    if trust == TRUST_PROGRESS:
        return expected, "progress"
    return (expected, "estimated_time") if _estimated_time(task) else None


def expected_end(task: dict[str, Any], now: float) -> str:
    """A phrase for the submission line: when a task just created is expected to end, from
    ``task_info.estimated_time`` (at submission its two readings, time left and total run time, agree);
    empty when EvoLink gives no estimate."""
    estimate = _estimated_time(task)
    if estimate is None:
        return ""
    try:
        end = datetime.fromtimestamp(now + estimate, timezone.utc).strftime("%H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # an estimate past any calendar: an untrusted answer
        return ""
    return f"expected to end around {end}, in about {duration_phrase(estimate)} (task_info.estimated_time)"


class ProgressReporter:
    """Turns polls into progress lines a person can follow: status, percentage, elapsed and estimated
    remaining time, at the rhythm of :data:`PROGRESS_MIN_GAP` and :data:`PROGRESS_MAX_GAP`.

    After each poll the waiting loop calls :meth:`update`; it sleeps through :meth:`pauses` and calls
    :meth:`between_polls` after each pause, which says where the task stands when no poll is due.

    :param task_id: the EvoLink task reported on.
    :param started_at: when the task was submitted (epoch seconds); ``None`` takes the first task's
        ``created`` (a sensor waits for a task submitted elsewhere).
    :param clock: epoch seconds now (tests pass a fake one).
    """

    def __init__(
        self, task_id: str, started_at: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.task_id = task_id
        self.started_at = started_at
        self.clock = clock
        self._task: dict[str, Any] = {}
        self._polled_at = 0.0
        #: The waiting loop starts right after a line (the submission, the deferral).
        self._last_line_at = clock()

    def update(self, task: dict[str, Any]) -> str | None:
        """A line after a poll: at once when the status changed, after PROGRESS_MIN_GAP when the
        percentage or the API's estimate moved, after PROGRESS_MAX_GAP anyway; else None."""
        now = self.clock()
        if self.started_at is None:
            self.started_at = created_at(task, default=now)
        # Only what the lines read: a waiting trigger holds this through its sleep, which the answer and
        # all that hangs from it need not outlive (docs/benchmarks.md, fourth pass).
        task = {
            "status": task.get("status"),
            "progress": task.get("progress") if finite_number(task.get("progress")) is not None else None,
            "task_info": {"estimated_time": _estimated_time(task)},
        }
        previous, self._task, self._polled_at = self._task, task, now
        if not previous or previous.get("status") != task.get("status"):
            return self._line(now)
        quiet = now - self._last_line_at
        moved = (previous.get("progress"), _estimated_time(previous)) != (
            task.get("progress"),
            _estimated_time(task),
        )
        return self._line(now) if quiet >= PROGRESS_MAX_GAP or (moved and quiet >= PROGRESS_MIN_GAP) else None

    def pauses(self, delay: float) -> Iterator[float]:
        """Split a sleep of ``delay`` seconds at the moments a line between polls falls due."""
        end = self.clock() + max(0.0, delay)
        while (pause := self.next_pause(end)) > 0:
            yield pause

    def next_pause(self, end: float) -> float:
        """The next pause of a sleep until ``end`` (epoch seconds): up to the next line between polls, or
        to ``end``; zero or less once ``end`` has come."""
        left = end - self.clock()
        due = self._until_due()
        return min(left, due) if due > 0 else left

    def between_polls(self) -> str | None:
        """A line when a running task (or one not polled yet) has gone PROGRESS_MAX_GAP without one: its
        state as of the last poll, the times as of now; else None."""
        return self._line(self.clock()) if self._until_due() <= 0 else None

    def _until_due(self) -> float:
        if self._task and self._task.get("status") not in RUNNING_STATUSES:
            return float("inf")
        return self._last_line_at + PROGRESS_MAX_GAP - self.clock()

    def _line(self, now: float) -> str:
        self._last_line_at = now
        task = self._task
        started_at = now if self.started_at is None else self.started_at
        elapsed = max(0.0, now - started_at)
        if not task:
            return f"EvoLink task {self.task_id}: not polled yet, {duration_phrase(elapsed)} elapsed"
        line = f"EvoLink task {self.task_id}: {printable(task.get('status'))}"
        if task.get("progress") is not None:
            line += f" {task['progress']}%"
        if now - self._polled_at >= PROGRESS_MIN_GAP / 2:
            line += f" (as of the poll {duration_phrase(now - self._polled_at)} ago)"
        line += f", {duration_phrase(elapsed)} elapsed"
        if task.get("status") not in RUNNING_STATUSES:
            return line
        estimate = _estimate(task, max(0.0, self._polled_at - started_at))
        if estimate is None:
            return line + ", no estimate from EvoLink yet"
        expected, basis = estimate
        if expected > elapsed:
            return line + f", about {duration_phrase(expected - elapsed)} left (from {basis})"
        return line + f", past its estimate of {duration_phrase(expected)} (from {basis})"


def _estimated_time(task: dict[str, Any]) -> float | None:
    """``task_info.estimated_time`` when it is a positive number, else None."""
    info = task.get("task_info")
    estimate = finite_number(info.get("estimated_time")) if isinstance(info, dict) else None
    return estimate if estimate is not None and estimate > 0 else None


class PollFailureBudget:
    """Counts a wait's consecutive failed polls (one success resets it, so only a sustained outage ends
    a wait) and asks the retry policy's *poll* row whether, and when, to poll again."""

    def __init__(
        self,
        limit: int,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
    ) -> None:
        self.policy = RetryPolicy.for_polls(limit, poll_interval, max_poll_interval)
        self.consecutive = 0

    @property
    def limit(self) -> int:
        return self.policy.max_attempts

    def success(self) -> None:
        self.consecutive = 0

    def after_failure(self, error: EvolinkError, deadline: float | None = None) -> RetryDecision:
        """Record a failed poll: poll again after ``delay`` (:attr:`Verdict.REPEAT`), end the wait with
        ``error`` (:attr:`Verdict.GIVE_UP`), or time out (:attr:`Verdict.OUT_OF_TIME`, by ``deadline``)."""
        self.consecutive += 1
        return self.policy.decide(Kind.POLL, self.consecutive, error, deadline)
