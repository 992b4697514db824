"""The provider's errors: one small hierarchy shared by the hook, operators, sensor and trigger.

Every error knows whether repeating the same call can help (``retryable``); the hook's retry loop and the
operators' choice between ``AirflowFailException`` and a plain (Airflow-retryable) failure both read it.
Messages carry the HTTP status, EvoLink's ``error.code`` / ``error.message`` and the request id, never
the key. Every text a server supplied (``message``, ``code``, ``request_id``, a task's ``status``) passes
:func:`server_text` before it is part of an error or a log line; the hook has already replaced the
connection's own key by ``***`` in everything the server answered
(:func:`evolink_provider.hooks.responses.parse_response`).
"""

from __future__ import annotations

import unicodedata
from typing import Any, NoReturn

#: The most characters of a server's ``message`` shown in an error or a log line.
MAX_SERVER_MESSAGE = 500
#: The most characters of a server's ``code``, ``request_id`` or task ``status`` shown.
MAX_SERVER_NAME = 128

#: 400 codes that mean "no upstream channel right now": EvoLink moved them from 503 to 400, but they
#: describe capacity, not a bad request, so they are retried (as are all channel codes, see
#: :func:`is_channel_code`).
TRANSIENT_BAD_REQUEST_CODES = frozenset({"no_available_channel", "model_unavailable", "service_unavailable"})
#: 402 codes of a quota that resets (daily): waiting seconds cannot help, a later Airflow retry can.
RESETTING_QUOTA_CODES = frozenset({"token_daily_quota_exceeded"})
#: 409 on a submission: the gateway does not know yet whether the paid request went through. Only a
#: repeat with the *same* ``Idempotency-Key`` is safe (EvoLink's clients retry it later that way).
PAID_OUTCOME_UNKNOWN = "paid_outcome_unknown"

#: ``error.code`` of a failed task -> whether resubmitting the same request can succeed
#: (the "a retry helps?" column of EvoLink's task error table).
TASK_ERROR_RETRYABLE: dict[str, bool] = {
    "content_policy_violation": False,
    "invalid_parameters": False,
    "image_processing_error": False,
    "image_dimension_mismatch": False,
    "resource_not_found": False,
    # EvoLink's clients never retry a cancellation; the docs leave resubmitting to the user.
    "request_cancelled": False,
    "generation_failed_no_content": True,
    "service_error": True,
    "generation_timeout": True,
    "resource_exhausted": True,
    "quota_exceeded": True,
    "service_unavailable": True,
    "unknown_error": True,
}


#: Unicode categories escaped in server text: control and format characters (newlines, ANSI escapes, bidi
#: overrides), line and paragraph separators (``str.splitlines`` breaks on them) and lone surrogates (no
#: UTF-8 log stream can write them: the whole line would be lost).
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: object) -> str:
    """``text`` for a log line, :data:`ESCAPED_CATEGORIES` escaped, so that a string from EvoLink's answer
    cannot forge log lines, recolour the console or lose the line."""
    text = str(text)
    if text.isprintable():  # none of those categories (the usual case, checked in C)
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ESCAPED_CATEGORIES
        else char
        for char in text
    )


def server_text(text: object, limit: int = MAX_SERVER_MESSAGE) -> str:
    """The one rule for server-supplied text shown in an error or a log line: :func:`printable`, and at
    most ``limit`` characters (a hostile server may send a megabyte of message, or escape sequences in a
    ``code`` or ``request_id``)."""
    shown = printable(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"


def is_channel_code(code: str | None) -> bool:
    """Gateway codes saying the model has no upstream channel right now (``channel_selection_failed``,
    ``channel_*``, ``channel:...``): every EvoLink client retries them, as an HTTP 400 or a task code."""
    return bool(code) and str(code).startswith(("channel_", "channel:"))


def task_error_is_retryable(code: str | None) -> bool:
    """Whether a failed task with this ``error.code`` is worth resubmitting.

    Where EvoLink's own clients disagree, this provider resubmits (the Airflow task's ``retries`` bound
    how often, and failed tasks are not charged, so a wrong guess costs a wait, never credits):

    * ``generation_failed_no_content`` ("sometimes" helps) and ``unknown_error`` ("once"): retried,
      because a second generation of the same request often succeeds; a user who wants exactly one
      more attempt sets ``retries=1``.
    * ``failed`` with no ``error`` object (``code`` is None): retried. Every rule refusal the docs list
      carries a code, so a bare failure is an upstream fault far more often than a bad request.

    Other unknown codes are retried except rule codes (``invalid_*``). Channel codes are transient.
    """
    if not code:
        return True
    if code in TASK_ERROR_RETRYABLE:
        return TASK_ERROR_RETRYABLE[code]
    if is_channel_code(code):
        return True
    return not code.startswith("invalid_")


class EvolinkError(Exception):
    """Base of every error this provider raises.

    ``retryable``: a later attempt (the hook's own retry or an Airflow retry) can succeed.
    ``retry_now``: repeating within seconds can help, so the hook's retry loop may spend attempts on it
    (False for a daily quota: only a later Airflow retry can succeed).
    """

    retryable: bool = False
    retry_now: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EvolinkConfigurationError(EvolinkError):
    """The connection is unusable (no API key, malformed host); raised before any HTTP call."""


def shown_value(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for an error naming a value it refuses (an int of
    thousands of digits has no ``repr``: its type is named instead)."""
    try:
        shown = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too long to show>"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class EvolinkValidationError(EvolinkError, ValueError):
    """A request field breaks EvoLink's documented limits; raised before any HTTP call."""

    def __init__(self, model: str, field: str, value: Any, allowed: str) -> None:
        super().__init__(f"{model}: invalid {field}={shown_value(value)}; allowed: {allowed}")
        self.model = model
        self.field = field
        self.value = value
        self.allowed = allowed


class EvolinkTriggerArgumentError(EvolinkValidationError, TypeError):
    """A trigger kwarg the trigger cannot follow. A ``TypeError`` too: Airflow's triggerer (3.0-3.3) fails
    the one trigger whose construction raises that, and its task with it; any other error stops every
    trigger the triggerer runs, and again after each restart."""


class EvolinkAPIError(EvolinkError):
    """EvoLink answered with an HTTP error status."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        method: str = "",
        path: str = "",
        connection: str = "",
    ) -> None:
        where = f"{connection}: {method} {path}" if connection else f"EvoLink {method} {path}"
        message = server_text(message)
        code = server_text(code, MAX_SERVER_NAME) if code else None
        request_id = server_text(request_id, MAX_SERVER_NAME) if request_id else None
        self.detail = ", ".join(
            [f"HTTP {status_code}"]
            + ([f"code={code}"] if code else [])
            + [f'message="{message}"']
            + ([f"request_id={request_id}"] if request_id else [])
        )
        super().__init__(f"{where.replace('  ', ' ').rstrip()} answered {self.detail}")
        self.status_code = status_code
        self.code = code
        self.api_message = message
        self.request_id = request_id
        self.retry_after = retry_after


class EvolinkBadRequestError(EvolinkAPIError):
    """400: the request was refused. Retryable only for the "no available channel" and channel codes."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.code in TRANSIENT_BAD_REQUEST_CODES or is_channel_code(self.code)


class EvolinkAuthenticationError(EvolinkAPIError):
    """401: the API key is missing, wrong or expired."""


class EvolinkInsufficientCreditsError(EvolinkAPIError):
    """402: balance or key quota exhausted (final), or a daily key quota that resets.

    ``token_daily_quota_exceeded`` is retryable by a later Airflow retry (``retryable``) but not by the
    hook's retry within seconds (``retry_now`` is False); ``insufficient_quota`` cannot succeed later.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.code in RESETTING_QUOTA_CODES
        self.retry_now = False


class EvolinkPermissionError(EvolinkAPIError):
    """403: the key may not use this model or see this task."""


class EvolinkNotFoundError(EvolinkAPIError):
    """404: unknown task (or a task record that has expired)."""


class EvolinkConflictError(EvolinkAPIError):
    """409 on a submission. ``paid_outcome_unknown`` is retryable with the same ``Idempotency-Key``
    (the hook keeps the key; when its attempts run out it raises EvolinkSubmissionUnknownError so the
    Airflow retry reuses it); ``idempotency_conflict`` (the key was used with another body) is final."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.code == PAID_OUTCOME_UNKNOWN


class EvolinkRefusedError(EvolinkAPIError):
    """HTTP 200 with ``"success": false`` (credits, Files API): a refusal with EvoLink's ``code`` and
    ``msg``, not a transient fault, so it is not retried."""


class EvolinkRateLimitError(EvolinkAPIError):
    """429: slow down; ``retry_after`` holds the server's hint in seconds when it gave one."""

    retryable = True


class EvolinkServerError(EvolinkAPIError):
    """5xx from EvoLink or its edge."""

    retryable = True


class EvolinkTransportError(EvolinkError):
    """No usable HTTP answer: connection refused or reset, timeout, or a body that is not the JSON promised.

    ``request_sent`` tells whether the request may have reached the server (a read timeout, a reset after
    sending, a garbled answer): for a POST that means a task may exist although we never saw its id.
    """

    retryable = True

    def __init__(self, message: str, *, request_sent: bool, detail: str | None = None) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        #: What went wrong without saying where (``connection refused``), for messages that say where.
        self.detail = detail or message


class EvolinkSubmissionUnknownError(EvolinkError):
    """A submission's outcome stays unknown after every allowed retry.

    EvoLink may have created (and will bill) a task whose id we never received. The message names the
    ``Idempotency-Key`` to look the task up by; repeating the submission with the same key is safe
    where the gateway replays keys, which is why an Airflow retry reuses it.
    """

    retryable = True

    def __init__(self, message: str, *, idempotency_key: str) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key


class EvolinkTaskError(EvolinkError):
    """The EvoLink task ended ``failed`` or ``cancelled`` (or timed out waiting)."""

    def __init__(self, task_id: str, status: str, code: str | None, message: str | None) -> None:
        status = server_text(status, MAX_SERVER_NAME)
        code = server_text(code, MAX_SERVER_NAME) if code else None
        message = server_text(message) if message else None
        super().__init__(
            f"EvoLink task {task_id} ended {status}"
            + (f": code={code}" if code else "")
            + (f', message="{message}"' if message else "")
        )
        self.task_id = task_id
        self.status = status
        self.code = code
        self.api_message = message
        # A cancelled task is never resubmitted (no EvoLink client does; the user decides), with or
        # without an error code.
        self.retryable = status != "cancelled" and task_error_is_retryable(code)


class EvolinkWaitTimeoutError(EvolinkError):
    """The wait budget ran out while the EvoLink task was still running (it keeps running remotely)."""

    retryable = True


class RetryLaterError(EvolinkError):
    """Nothing proves a paid result gone (:mod:`evolink_provider.ledger`): this try fails (retryably) and
    spends nothing."""

    retryable = True


#: The typed error of each HTTP status EvoLink documents; other 5xx are server errors, the rest plain.
_ERROR_FOR_STATUS: dict[int, type[EvolinkAPIError]] = {
    400: EvolinkBadRequestError,
    401: EvolinkAuthenticationError,
    402: EvolinkInsufficientCreditsError,
    403: EvolinkPermissionError,
    404: EvolinkNotFoundError,
    409: EvolinkConflictError,
    429: EvolinkRateLimitError,
}


def error_for_status(status_code: int, message: str, **details: Any) -> EvolinkAPIError:
    """Build the typed error for an HTTP error status (one mapping for the sync and async clients);
    ``details`` are :class:`EvolinkAPIError`'s keyword arguments (code, request id, connection, ...)."""
    default = EvolinkServerError if status_code >= 500 else EvolinkAPIError
    return _ERROR_FOR_STATUS.get(status_code, default)(message, status_code=status_code, **details)


class EvolinkBadAnswerError(EvolinkTransportError):
    """EvoLink (or whatever answers at the base URL) sent a 2xx answer outside the documented contract:
    an id of the wrong format or for another task, a field of the wrong type, NaN, deep nesting, too many
    results, too many bytes.

    It is a transport fault, not a verdict on the task: the answer cannot be trusted, so a poll counts it as
    a failed poll (retried within the wait's budget) and a submission repeats with the same
    ``Idempotency-Key`` and ends as an unknown outcome if it never gets a valid answer.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=True)


class EvolinkInputRefusedError(EvolinkValidationError):
    """A local or storage input that must not be uploaded (outside the allowed folders, not a regular
    file, not an allowed image, too large); raised before any HTTP call."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        source = "storage input" if isinstance(value, str) and "://" in value else "local input"
        super().__init__(source, field, value, rule)


def fail_for(error: EvolinkError) -> NoReturn:
    """Raise ``error`` so that Airflow retries only what a retry can fix.

    Non-retryable errors (validation, 401/402/403, rule-breaking task codes) become
    ``AirflowFailException``, which skips the remaining Airflow retries and so spends no more credits.
    """
    if error.retryable:
        raise error
    from evolink_provider.compat import AirflowFailException

    raise AirflowFailException(str(error)) from error
