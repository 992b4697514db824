"""What an answer from the base URL must look like before anything else reads it.

Trust boundary: the Airflow connection is trusted (an operator of the deployment wrote it); every answer
that comes back is not. A compromised proxy, a wrong base URL or a hostile server must not be able to pick
file names, crash the triggerer or fill XCom. So every JSON answer is decoded strictly
(:func:`loads_strict`: no NaN/Infinity, bounded nesting) after being read with a size cap
(:data:`MAX_ANSWER_BYTES`, enforced by the hook's readers), and every task object passes
:func:`checked_task` (a safe id, the id asked for, field types, bounded results) in the hook,
for submissions, single reads and batch reads alike. A failed check is an
:class:`~evolink_provider.exceptions.EvolinkBadAnswerError`: a failed poll, never another exception.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any, NamedTuple, NoReturn

from evolink_provider.exceptions import EvolinkBadAnswerError, EvolinkConfigurationError, shown_value

#: A task id is untrusted input checked for *safety*, never for a guessed format: EvoLink documents only a
#: prefix (``task-unified-``), its own examples vary (``...-abc123``, ``...-seedream5prolayerize``) and
#: HappyHorse answered ``task-happyhorse-<19 digits>-<mixed case>-<model>`` until 2026-04, so a paid POST
#: answered with any safe id is accepted. Safe: 1-128 characters of ``[A-Za-z0-9._-]`` (nothing that needs
#: escaping in a URL path segment or a file name: no ``/``, ``%``, ``?``, ``:``, whitespace), not starting
#: with a dot (no ``.``/``..`` segment, no hidden file) or a hyphen (a stored file name never reads as a
#: command-line option). The id becomes a URL path segment (URL-encoded all the same, by the hook) and the
#: stem of stored file names (:data:`evolink_provider.storage.STORED_NAME`).
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
TASK_ID_RULE = "1-128 characters of A-Za-z0-9._- not starting with '.' or '-'"
#: The most bytes read of one JSON answer (a task object is about 1 KB; a batch of 50 about 50 KB).
MAX_ANSWER_BYTES = 1 << 20
#: The deepest nesting accepted in a JSON answer (a task object nests 3 levels).
MAX_NESTING_DEPTH = 32
#: The most result URLs one task may hand over (every model documents one video; sora-character adds a
#: picture).
MAX_RESULTS_PER_TASK = 16
#: Where ``result_data`` (an object, or a list of them) names results; its entries obey the same cap.
RESULT_DATA_URLS = ("video_url", "profile_picture_url")
MAX_URL_LENGTH = 8192
#: Unix seconds beyond the year 5138 are no timestamp (``created``, a trigger's times).
MAX_EPOCH_SECONDS = 10**11
MAX_STATUS_LENGTH = 64
#: ``created`` is trusted for the poll schedule only within these bounds of the local clock: at most a
#: minute ahead, at most a day behind (a task older than that is reattached, its ``created`` long past).
CREATED_SKEW_MAX = 60.0
MAX_GENERATION_AGE = 24 * 60 * 60.0
#: ``model``, ``object`` and ``type`` are names, not texts.
MAX_NAME_LENGTH = 256
#: A whole task object: about a kilobyte in practice; it becomes an XCom value and a trigger event.
MAX_TASK_BYTES = 64 * 1024
#: The most characters of compact JSON one received byte can become when re-serialized: DEL (0x7f), one
#: byte, becomes the six characters ``\u007f``; a two-byte UTF-8 character a six-character escape (3 per
#: byte); the four bytes ``9e15`` become ``9000000000000000.0`` (4.5 per byte). An answer under
#: ``MAX_TASK_BYTES`` / this is not re-serialized.
JSON_GROWTH_PER_BYTE = 6
#: Integers in an answer are timestamps, counts and credits: 20 digits is plenty, and keeps every one
#: convertible to a float.
MAX_INT_DIGITS = 20


def is_task_id(value: object) -> bool:
    """Whether ``value`` is a safe task id (:data:`TASK_ID_PATTERN`)."""
    return isinstance(value, str) and TASK_ID_PATTERN.fullmatch(value) is not None


def task_id_to_send(task_id: object) -> str:
    """``task_id`` if it may be put in a request path; refuses (before any HTTP) ids with ``/``, ``?``,
    ``%``, CR/LF, a leading dot or anything else outside :data:`TASK_ID_PATTERN`."""
    if not is_task_id(task_id):
        raise EvolinkConfigurationError(
            f"{shown_value(task_id, 80)} is not a safe EvoLink task id ({TASK_ID_RULE})"
        )
    return str(task_id)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a JSON integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the JSON number {text[:20]} overflows a float")
    return value


def loads_strict(content: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity``, numbers no float can hold and nesting deeper than
    :data:`MAX_NESTING_DEPTH`; every refusal (deep recursion included) is a ``ValueError``. Bytes must be
    UTF-8 (RFC 8259): ``json.loads`` would also take UTF-16 and UTF-32, whose copy of the API key no byte
    search for it finds (``hooks.responses.without_key``)."""
    text = content.decode("utf-8") if isinstance(content, bytes) else content
    try:
        decoded = json.loads(
            text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # Fewer brackets than the limit cannot nest deeper (the count, in C, spares most answers the walk).
    brackets = text.count("{") + text.count("[")
    if brackets > MAX_NESTING_DEPTH and _depth_exceeds(decoded, MAX_NESTING_DEPTH):
        raise ValueError(f"JSON nested deeper than {MAX_NESTING_DEPTH} levels")
    return decoded


def _depth_exceeds(value: Any, limit: int) -> bool:
    if not isinstance(value, (dict, list)):
        return False
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        if depth > limit:
            return True
        children = current.values() if isinstance(current, dict) else current
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def finite_number(value: object) -> float | None:
    """``value`` as a float when it is a finite real number, else None: not a bool (JSON's ``true`` counts
    nothing), NaN, an infinity or an int too large for a float. The one test of a number, for the answers
    and for the settings a DAG author gives (which may be a numpy or ``Fraction`` number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def epoch_time(value: object) -> float | None:
    """``value`` as a wall-clock time in Unix seconds (a :func:`finite_number` from 0 to before
    :data:`MAX_EPOCH_SECONDS`), else None."""
    seconds = finite_number(value)
    return seconds if seconds is not None and 0 <= seconds < MAX_EPOCH_SECONDS else None


def epoch_seconds(value: object) -> float | None:
    """``created`` as Unix seconds when it is int-like (an int, an integral float or a digit string)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    seconds = epoch_time(value) if isinstance(value, (int, float)) else None
    return seconds if seconds is not None and seconds.is_integer() else None


def created_at(task: dict[str, Any], default: float) -> float:
    """When ``task`` was created (Unix seconds), or ``default`` when it does not say or says something
    far from ``default`` (a skewed server clock would otherwise stretch the adaptive poll schedule to
    its 10-minute ceiling, or poll a fresh task as if it were overdue)."""
    seconds = epoch_seconds(task.get("created"))
    if seconds is None or not -CREATED_SKEW_MAX <= default - seconds <= MAX_GENERATION_AGE:
        return default
    return seconds


def checked_task(
    answer: Any, expected_id: str | None = None, *, received_bytes: int | None = None
) -> dict[str, Any]:
    """``answer`` if it is a task object as documented (and the one asked for); else
    :class:`~evolink_provider.exceptions.EvolinkBadAnswerError` saying which field breaks which rule.

    ``received_bytes``: the length of the body ``answer`` was decoded from (a single task's answer), which
    bounds its size as JSON; without it (a task inside a batch) the task is re-serialized to measure it."""
    about = f"for {expected_id} " if expected_id else ""

    def refuse(problem: str) -> NoReturn:
        raise EvolinkBadAnswerError(f"EvoLink's answer {about}is not a valid task object: {problem}")

    if not isinstance(answer, dict):
        refuse(f"a JSON {type(answer).__name__}, not an object")
    task_id = answer.get("id")
    if not is_task_id(task_id):
        refuse(f"id={shown_value(task_id, 80)} is not a safe task id ({TASK_ID_RULE})")
    if expected_id is not None and task_id != expected_id:
        refuse(f"it is task {task_id}, not the task asked for")
    status = answer.get("status")
    if not isinstance(status, str) or not 0 < len(status) <= MAX_STATUS_LENGTH:
        refuse(f"status={shown_value(status, 80)} is not a short string")
    progress = answer.get("progress")
    percent = finite_number(progress)
    if progress is not None and (percent is None or not 0 <= percent <= 100):
        refuse(f"progress={shown_value(progress, 80)} is not a number from 0 to 100")
    created = answer.get("created")
    if created is not None and epoch_seconds(created) is None:
        refuse(f"created={shown_value(created, 80)} is not Unix seconds")
    results = answer.get("results")
    if results is not None:
        if not isinstance(results, list) or len(results) > MAX_RESULTS_PER_TASK:
            refuse(f"results is not a list of at most {MAX_RESULTS_PER_TASK} URLs")
        if not all(isinstance(url, str) and len(url) <= MAX_URL_LENGTH for url in results):
            refuse(f"results holds something other than URLs of at most {MAX_URL_LENGTH} characters")
    result_data = answer.get("result_data")
    if not isinstance(result_data, (dict, list, type(None))):
        refuse(f"result_data={shown_value(result_data, 80)} is neither an object nor a list")
    entries = result_data if isinstance(result_data, list) else [result_data]
    if len(entries) > MAX_RESULTS_PER_TASK:
        # Each entry may name a result: each result becomes a download, an asset event, a lineage dataset.
        refuse(
            f"result_data lists {len(entries)} entries, more than the {MAX_RESULTS_PER_TASK} results allowed"
        )
    for entry in entries:
        for name in RESULT_DATA_URLS:
            url = entry.get(name) if isinstance(entry, dict) else None
            if url is not None and not (isinstance(url, str) and len(url) <= MAX_URL_LENGTH):
                refuse(f"result_data {name} is not a URL of at most {MAX_URL_LENGTH} characters")
    for name in ("error", "task_info", "usage"):
        if not isinstance(answer.get(name), (dict, type(None))):
            refuse(f"{name}={shown_value(answer.get(name), 80)} is not an object")
    for name in ("model", "object", "type"):
        value = answer.get(name)
        if not (value is None or (isinstance(value, str) and len(value) <= MAX_NAME_LENGTH)):
            refuse(f"{name}={shown_value(value, 80)} is not a string of at most {MAX_NAME_LENGTH} characters")
    error = answer.get("error") or {}
    if not isinstance(error.get("code"), (str, type(None))) or len(str(error.get("code") or "")) > 128:
        # A code decides whether a resubmission may help: "['a']" or 123 must not read as an unknown code.
        refuse(f"error.code={shown_value(error.get('code'), 80)} is not a short string")
    if received_bytes is not None and received_bytes * JSON_GROWTH_PER_BYTE <= MAX_TASK_BYTES:
        return answer
    size = len(json.dumps(answer, separators=(",", ":")))
    if size > MAX_TASK_BYTES:
        # It becomes an XCom value (and a trigger event): a task object is about a kilobyte.
        refuse(f"{size} bytes of JSON, more than the {MAX_TASK_BYTES} a task object may take")
    return answer


class Credits(NamedTuple):
    """What a ``GET /v1/credits`` answer says the connection's key can spend.

    ``account`` is ``data.user.remaining_credits``, the account's balance; ``key`` is
    ``data.token.remaining_credits``, the key's own quota, or ``None`` when ``data.token.unlimited_credits``
    (the key has no quota of its own; ``unlimited_credits`` belongs to the key's ``token``, never to the
    account). The account's balance always applies, so nothing is ever "unlimited" to spend.
    """

    account: float
    key: float | None

    @property
    def spendable(self) -> float:
        """What the key can still spend: the account's balance, and the key's quota when it has one."""
        return self.account if self.key is None else min(self.account, self.key)


def read_credits(answer: Any) -> Credits:
    """:class:`Credits` of a ``GET /v1/credits`` answer; any other shape is an
    :class:`~evolink_provider.exceptions.EvolinkBadAnswerError` (a pre-spend check fails closed)."""
    data = answer.get("data") if isinstance(answer, dict) else None

    def number(section: str) -> float:
        part = data.get(section) if isinstance(data, dict) else None
        if not isinstance(part, dict):
            raise EvolinkBadAnswerError(f"EvoLink's credits answer has no data.{section} object")
        remaining = part.get("remaining_credits")
        if (number := finite_number(remaining)) is not None:
            return number
        raise EvolinkBadAnswerError(
            f"EvoLink's credits answer: data.{section}.remaining_credits={shown_value(remaining, 80)} "
            "is not a number"
        )

    account = number("user")
    token = data.get("token") if isinstance(data, dict) else None
    if isinstance(token, dict) and token.get("unlimited_credits") is True:
        return Credits(account, None)
    return Credits(account, number("token"))


def credits_text(value: float) -> str:
    """A credit amount for a log line: ``1234567``, ``12.5`` (never ``1.23e+06``)."""
    return f"{value:.4f}".rstrip("0").rstrip(".")
