"""The one retry policy: for every kind of request, whether an error may be repeated and after how long.

The call retries (the sync and async send loops and the upload in :mod:`evolink_provider.hooks.transport`,
result downloads in :mod:`evolink_provider.hooks.downloads`) run in ``tenacity`` loops that
:meth:`RetryPolicy.retrying` builds from this table; the waits of the operator and the trigger count their
failed polls and ask :meth:`RetryPolicy.decide` (through :class:`evolink_provider.polling.PollFailureBudget`).

==========  ===========================================  ====================================  =============
kind        repeated                                     never repeated                        after
==========  ===========================================  ====================================  =============
read        GET and the batch-read POST: connection      other 4xx; 402                        backoff
            refused or timed out; reset, read timeout,   token_daily_quota_exceeded (a later
            garbled, truncated or malformed answer;      Airflow retry can, seconds cannot);
            429; 5xx; 400 no_available_channel,          HTTP 200 success: false (but a
            model_unavailable, service_unavailable,      Files API one whose code is 429 or
            channel_*                                    5xx counts as that status)

submission  POST with an Idempotency-Key: as read, plus  as read, and 409                      backoff
            409 paid_outcome_unknown; always with the    idempotency_conflict; still unknown
            same key (EvoLink replays the original       after the last attempt:
            task)                                        EvolinkSubmissionUnknownError naming
                                                         the key

upload      Files API POST, only what cannot have        a reset, timeout or garbled answer    backoff
            stored the file: connection refused or       after sending (uploads are not
            connect timeout (nothing sent), 429, 503     idempotent); other statuses

download    result GET: transport errors, 429, 5xx       400, 401, 403, 404, 410 (the link     backoff
                                                         was refused: the caller decides);
                                                         other statuses

poll        a wait's failed poll, after the read's own   a non-retryable error (401, 403,      doubling
            retries: any retryable error (transport,     404, ...); the max_poll_failures-th
            malformed answer, 429, 5xx)                  failure in a row (8)
==========  ===========================================  ====================================  =============

*backoff*: attempt ``n`` (from 1) waits a random time between half and all of
``min(backoff_max, backoff_base * 2**(n-1))`` (full jitter, so that many callers do not retry in step);
a ``Retry-After`` (seconds or an HTTP date) replaces it, capped at ``retry_after_max``, plus up to a tenth
of the backoff. At most ``max_attempts`` attempts (``max_retries + 1``, connection extras).

*doubling*: the ``n``-th consecutive failed poll waits ``min(max_poll_interval,
poll_interval * 2**(n-1))`` (no jitter: each poll's read already jittered its own retries, and the adaptive
schedule jitters the next poll); the ``max_poll_failures``-th in a row (8 by default) ends the wait; one
successful poll starts the count again.

*Deadlines*: a caller that knows its deadline (the operator's ``timeout``, the trigger's ``end_time``)
passes it (an upload without one has one read timeout per attempt), and no wait ends past it: the send,
upload and download loops raise the last error instead, a wait ends as timed out. A submission whose
outcome is still unknown when its attempts run out (sent, then a reset, timeout, malformed answer, 5xx or
409 ``paid_outcome_unknown``) becomes
:class:`~evolink_provider.exceptions.EvolinkSubmissionUnknownError` naming the key, which the Airflow
retry sends again. A *failed task* is not an error of a request: whether it is resubmitted is
:func:`evolink_provider.exceptions.task_error_is_retryable` (EvoLink's task error table).
"""

from __future__ import annotations

import enum
import logging
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, NamedTuple

from evolink_provider.exceptions import (
    PAID_OUTCOME_UNKNOWN,
    EvolinkAPIError,
    EvolinkError,
    EvolinkRateLimitError,
    EvolinkServerError,
    EvolinkTransportError,
)

if TYPE_CHECKING:
    import tenacity


class Kind(str, enum.Enum):
    """What is being repeated: each kind is one row of the module docstring's table."""

    READ = "read"
    SUBMISSION = "submission"
    UPLOAD = "upload"
    DOWNLOAD = "download"
    POLL = "poll"


class Verdict(enum.Enum):
    """The answer to "may I try again?"."""

    REPEAT = "repeat"
    #: Not repeatable, or the attempts are spent: the caller raises the error.
    GIVE_UP = "give up"
    #: Repeatable, but the wait would end past the caller's deadline.
    OUT_OF_TIME = "out of time"


class RetryDecision(NamedTuple):
    """The policy's answer, and the wait before the next attempt (also set when out of time)."""

    verdict: Verdict
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is repeated, and which errors may be (the table above)."""

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    jitter: bool = True

    @classmethod
    def for_polls(cls, max_failures: int, poll_interval: float, max_poll_interval: float) -> RetryPolicy:
        """The policy of a wait's failed polls (the *poll* row)."""
        return cls(
            max_attempts=max(1, max_failures),
            backoff_base=poll_interval,
            backoff_max=max_poll_interval,
            jitter=False,
        )

    @staticmethod
    def may_repeat(kind: Kind, error: EvolinkError) -> bool:
        """The "repeated" column of the table."""
        if kind is Kind.POLL:
            return error.retryable
        if kind is Kind.UPLOAD:
            if isinstance(error, EvolinkTransportError):
                return not error.request_sent
            return isinstance(error, EvolinkAPIError) and error.status_code in (429, 503)
        if kind is Kind.DOWNLOAD:
            return isinstance(error, (EvolinkTransportError, EvolinkRateLimitError, EvolinkServerError))
        # READ and SUBMISSION: a submission is only ever repeated with its own Idempotency-Key.
        return error.retryable and error.retry_now

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        if not self.jitter:
            return ceiling
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max) + random.uniform(0, ceiling / 10)
        return random.uniform(ceiling / 2, ceiling)

    def decide(
        self, kind: Kind, attempt: int, error: EvolinkError, deadline: float | None = None
    ) -> RetryDecision:
        """Whether attempt ``attempt`` (from 1; for polls the count of failures in a row), which failed
        with ``error``, may be repeated, and after how long; never past ``deadline`` (epoch seconds)."""
        if attempt >= self.max_attempts or not self.may_repeat(kind, error):
            return RetryDecision(Verdict.GIVE_UP)
        # A poll's read already waited out the server's Retry-After within its own attempts.
        retry_after = None if kind is Kind.POLL else getattr(error, "retry_after", None)
        delay = self.delay(attempt, retry_after)
        if deadline is not None and time.time() + delay >= deadline:
            return RetryDecision(Verdict.OUT_OF_TIME, delay)
        return RetryDecision(Verdict.REPEAT, delay)

    def retrying(
        self,
        kind: Kind,
        deadline: float | None,
        log: logging.Logger,
        level: int,
        *,
        asynchronous: bool = False,
    ) -> tenacity.BaseRetrying:
        """A ``tenacity`` loop for a call of ``kind``: it repeats what :meth:`may_repeat` allows, waits
        :meth:`delay` (``Retry-After`` first), stops after ``max_attempts`` attempts or before a wait that
        would end past ``deadline``, and raises the last error as it is."""
        import tenacity

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.max_attempts:
                return True
            if deadline is None or time.time() + state.upcoming_sleep < deadline:
                return False
            log.log(level, "%s; no time left to retry", _error(state))
            return True

        def wait(state: tenacity.RetryCallState) -> float:
            return self.delay(state.attempt_number, getattr(_error(state), "retry_after", None))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.log(
                level,
                "%s; attempt %d of %d in %.1fs",
                _error(state),
                state.attempt_number + 1,
                self.max_attempts,
                state.upcoming_sleep,
            )

        loop = tenacity.AsyncRetrying if asynchronous else tenacity.Retrying
        return loop(
            retry=tenacity.retry_if_exception(
                lambda error: isinstance(error, EvolinkError) and self.may_repeat(kind, error)
            ),
            wait=wait,
            stop=stop,
            before_sleep=before_sleep,
            reraise=True,
        )


def _error(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def outcome_unknown(error: EvolinkError) -> bool:
    """Whether a submission that failed with ``error`` may still have created (and billed) a task."""
    if isinstance(error, EvolinkTransportError):
        return error.request_sent
    if isinstance(error, EvolinkAPIError) and error.code == PAID_OUTCOME_UNKNOWN:
        return True  # the gateway itself does not know yet whether it billed
    return isinstance(error, EvolinkAPIError) and error.status_code >= 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; ``None`` when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
