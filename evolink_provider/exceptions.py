"""The provider's errors: one small hierarchy shared by the hook, operators, sensor and trigger.

Every error knows whether repeating the same call can help (``retryable``); the hook's retry loop and the
operators' choice between ``AirflowFailException`` and a plain (Airflow-retryable) failure both read it.
Messages carry the HTTP status, EvoLink's ``error.code`` / ``error.message`` and the request id, never
the key.
"""

from __future__ import annotations

from typing import Any

#: 400 codes that mean "no upstream channel right now": EvoLink moved them from 503 to 400, but they
#: describe capacity, not a bad request, so they are retried.
TRANSIENT_BAD_REQUEST_CODES = frozenset(
    {"no_available_channel", "model_unavailable", "service_unavailable", "channel_unavailable"}
)

#: ``error.code`` of a failed task -> whether resubmitting the same request can succeed
#: (the "a retry helps?" column of EvoLink's task error table).
TASK_ERROR_RETRYABLE: dict[str, bool] = {
    "content_policy_violation": False,
    "invalid_parameters": False,
    "image_processing_error": False,
    "image_dimension_mismatch": False,
    "resource_not_found": False,
    "request_cancelled": True,
    "generation_failed_no_content": True,
    "service_error": True,
    "generation_timeout": True,
    "resource_exhausted": True,
    "quota_exceeded": True,
    "service_unavailable": True,
    "unknown_error": True,
}


def task_error_is_retryable(code: str | None) -> bool:
    """Whether a failed task with this ``error.code`` is worth resubmitting.

    Unknown codes are treated as retryable except rule codes (``invalid_*``): Airflow's own ``retries``
    bound the cost, and failed tasks are not charged. ``channel_*`` codes are upstream accounts: transient.
    """
    if not code:
        return True
    if code in TASK_ERROR_RETRYABLE:
        return TASK_ERROR_RETRYABLE[code]
    if code.startswith("channel_"):
        return True
    return not code.startswith("invalid_")


class EvolinkError(Exception):
    """Base of every error this provider raises."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EvolinkConfigurationError(EvolinkError):
    """The connection is unusable (no API key, malformed host); raised before any HTTP call."""


class EvolinkValidationError(EvolinkError, ValueError):
    """A request field breaks EvoLink's documented limits; raised before any HTTP call."""

    def __init__(self, model: str, field: str, value: Any, allowed: str) -> None:
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{model}: invalid {field}={shown}; allowed: {allowed}")
        self.model = model
        self.field = field
        self.value = value
        self.allowed = allowed


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
    ) -> None:
        parts = [f"EvoLink {method} {path} answered HTTP {status_code}".replace("  ", " ")]
        if code:
            parts.append(f"code={code}")
        parts.append(f"message={message!r}")
        if request_id:
            parts.append(f"request_id={request_id}")
        super().__init__(", ".join(parts))
        self.status_code = status_code
        self.code = code
        self.api_message = message
        self.request_id = request_id
        self.retry_after = retry_after


class EvolinkBadRequestError(EvolinkAPIError):
    """400: the request was refused. Retryable only for the "no available channel" codes."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.code in TRANSIENT_BAD_REQUEST_CODES


class EvolinkAuthenticationError(EvolinkAPIError):
    """401: the API key is missing, wrong or expired."""


class EvolinkInsufficientCreditsError(EvolinkAPIError):
    """402: balance or key quota exhausted."""


class EvolinkPermissionError(EvolinkAPIError):
    """403: the key may not use this model or see this task."""


class EvolinkNotFoundError(EvolinkAPIError):
    """404: unknown task (or a task record that has expired)."""


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

    def __init__(self, message: str, *, request_sent: bool) -> None:
        super().__init__(message)
        self.request_sent = request_sent


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
        super().__init__(
            f"EvoLink task {task_id} ended {status}"
            + (f": code={code}" if code else "")
            + (f", message={message!r}" if message else "")
        )
        self.task_id = task_id
        self.status = status
        self.code = code
        self.api_message = message
        self.retryable = task_error_is_retryable(code) if status != "cancelled" else True


class EvolinkWaitTimeoutError(EvolinkError):
    """The wait budget ran out while the EvoLink task was still running (it keeps running remotely)."""

    retryable = True


def error_for_status(
    status_code: int,
    message: str,
    *,
    code: str | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
    method: str = "",
    path: str = "",
) -> EvolinkAPIError:
    """Build the typed error for an HTTP error status (one mapping for the sync and async clients)."""
    cls: type[EvolinkAPIError]
    if status_code == 400:
        cls = EvolinkBadRequestError
    elif status_code == 401:
        cls = EvolinkAuthenticationError
    elif status_code == 402:
        cls = EvolinkInsufficientCreditsError
    elif status_code == 403:
        cls = EvolinkPermissionError
    elif status_code == 404:
        cls = EvolinkNotFoundError
    elif status_code == 429:
        cls = EvolinkRateLimitError
    elif status_code >= 500:
        cls = EvolinkServerError
    else:
        cls = EvolinkAPIError
    return cls(
        message,
        status_code=status_code,
        code=code,
        request_id=request_id,
        retry_after=retry_after,
        method=method,
        path=path,
    )


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
        super().__init__("local input", field, value, rule)
