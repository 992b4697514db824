"""EvolinkHook: the EvoLink calls a DAG author (and the operators, sensor and trigger) makes, each a thin
step over the modules of this package (docs/architecture.md). Nothing received is trusted (see
:mod:`evolink_provider.answers`): task objects are checked before they are returned.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from contextlib import AbstractContextManager
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote

from evolink_provider.answers import checked_task, credits_text, read_credits, task_id_to_send
from evolink_provider.compat import (
    BaseHook,
    get_async_connection,
    get_async_extra_dejson,
    hook_field_behaviour,
)
from evolink_provider.exceptions import (
    EvolinkAuthenticationError,
    EvolinkError,
    EvolinkTransportError,
    EvolinkWaitTimeoutError,
    server_text,
)
from evolink_provider.hooks import DEFAULT_CONN_ID
from evolink_provider.hooks.connection import (
    ApiRequest,
    EvolinkConnectionSettings,
    build_request,
    needs_masking,
    settings_from_connection,
    sync_session,
)
from evolink_provider.hooks.transport import PER_LOOP_STATE, Accept, MultipartBody, asend, send

if TYPE_CHECKING:
    import requests

    from evolink_provider.hooks.downloads import ResultDownloads, ResultStream
    from evolink_provider.hooks.task_batcher import TaskBatcher

T = TypeVar("T")

CREATE_VIDEO_PATH = "/v1/videos/generations"
CREDITS_PATH = "/v1/credits"
FILES_UPLOAD_PATH = "/api/v1/files/upload/stream"
FILES_QUOTA_PATH = "/api/v1/files/quota"
#: Observed, undocumented: reads up to 50 tasks in one call (used only with ``batch_polling``).
TASK_BATCH_PATH = "/v1/tasks/batch"


class EvolinkHook(BaseHook):
    """Talks to EvoLink's task gateway with the API key of an Airflow connection.

    :param evolink_conn_id: Airflow connection of type ``evolink``: the password is the API key, the host
        the base URL (empty for ``https://api.evolink.ai``; may carry scheme and port).
    """

    conn_name_attr = "evolink_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "evolink"
    hook_name = "EvoLink"

    def __init__(self, evolink_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.evolink_conn_id = evolink_conn_id
        self._async_settings: EvolinkConnectionSettings | None = None
        #: The last task read built, kept for the next poll of the same task (a trigger polls one task).
        self._task_read: tuple[EvolinkConnectionSettings, str, ApiRequest] | None = None

    def __repr__(self) -> str:
        return f"<EvolinkHook conn_id={self.evolink_conn_id!r}>"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form for Airflow 3.0 and 3.1 (3.2+ read it from the provider info instead)."""
        return hook_field_behaviour(cls.conn_type)

    # -- connection -------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> EvolinkConnectionSettings:
        """The connection, read once per hook (sync lookup: never call this on an event loop)."""
        conn = self.get_connection(self.evolink_conn_id)
        settings = settings_from_connection(conn)
        if needs_masking(settings.api_key, conn.password):
            from airflow.sdk.log import mask_secret

            mask_secret(settings.api_key.reveal())
        return settings

    async def aget_settings(self) -> EvolinkConnectionSettings:
        """The connection read without blocking the event loop (common-compat's ``get_async_connection``).

        The hooks of one event loop share a reading for :data:`ASYNC_SETTINGS_SECONDS` (a lookup goes through
        the secrets backends: docs/benchmarks.md); triggers that start together wait for one lookup, and a
        failed one is not kept.
        """
        if self._async_settings is None:
            readings = _ASYNC_SETTINGS.setdefault(asyncio.get_running_loop(), {})
            shared_until, reading = readings.get(self.evolink_conn_id, (0.0, None))
            if reading is None or shared_until < time.monotonic() or _failed(reading):
                reading = asyncio.ensure_future(self._aread_settings())
                readings[self.evolink_conn_id] = (time.monotonic() + ASYNC_SETTINGS_SECONDS, reading)
            self._async_settings = await asyncio.shield(reading)
        return self._async_settings

    async def _aread_settings(self) -> EvolinkConnectionSettings:
        conn = await get_async_connection(self.evolink_conn_id)
        settings = settings_from_connection(conn, await get_async_extra_dejson(conn) or {})
        if needs_masking(settings.api_key, conn.password):
            from evolink_provider.compat import amask_secret

            await amask_secret(settings.api_key.reveal())
        return settings

    # -- sync calls -------------------------------------------------------------------------------

    @cached_property
    def session(self) -> requests.Session:
        """One ``requests.Session`` per hook, so calls reuse keep-alive connections (its adapters retry
        nothing themselves: the tenacity loops of :mod:`~evolink_provider.hooks.transport` do)."""
        return sync_session()

    def create_video_task(
        self, payload: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a generation (``POST /v1/videos/generations``) and return the created task object.

        :param payload: the JSON body, ``model`` included (see :mod:`evolink_provider.models`).
        :param idempotency_key: 16-96 characters of ``[A-Za-z0-9._-]``; derive it from the work so that a
            repeat replays the original task. A random one is used when omitted.
        """
        key = idempotency_key or f"evl-{uuid.uuid4().hex}"  # still makes the hook's own retries safe
        request = build_request(
            self.settings, "POST", CREATE_VIDEO_PATH, json_body=payload, idempotency_key=key
        )
        return self._send(request, checked_task)

    def get_task(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """Read a task (``GET /v1/tasks/{task_id}``); the answer must be that task, well formed.

        :param deadline: epoch seconds; retries that would sleep past it give up with the last error.
        """
        request = build_request(self.settings, "GET", _task_path(task_id))
        return self._send(request, partial(checked_task, expected_id=task_id), deadline)

    def get_credits(self) -> dict[str, Any]:
        """Read the account's credits (``GET /v1/credits``; free)."""
        return self._send(build_request(self.settings, "GET", CREDITS_PATH), _as_is)

    def get_files_quota(self) -> dict[str, Any]:
        """The Files API quota (``GET /api/v1/files/quota``): ``user_group``, ``used_files``,
        ``max_files``, ``remain_files``, ``is_custom``, ``quota_reason``."""
        settings = self.settings
        request = build_request(settings, "GET", FILES_QUOTA_PATH, base_url=settings.files_base_url)
        data = self._send(request, _as_is).get("data")
        if not isinstance(data, dict):
            raise EvolinkTransportError(f"{request.where} answered without a data object", request_sent=True)
        return data

    def _send(
        self,
        request: ApiRequest,
        accept: Accept[T],
        deadline: float | None = None,
        body: MultipartBody | None = None,
    ) -> T:
        return send(self.session, request, self.settings, accept, deadline, body)

    def upload_file(
        self, stream: BinaryIO, filename: str, content_type: str, deadline: float | None = None
    ) -> dict[str, Any]:
        """Upload a file through EvoLink's Files API; returns its ``data`` (``file_url`` expires in 72 h).

        Uploads are not idempotent and are free, so only failures that cannot have stored the file are
        retried (the *upload* row of :mod:`evolink_provider.hooks.retry`).

        :param deadline: epoch seconds; no retry waits past it and no answer is read after it. Without
            one, an upload has one read timeout per attempt (``read_timeout * (max_retries + 1)``).
        """
        settings = self.settings
        if deadline is None:
            deadline = time.time() + settings.timeouts.read * settings.retry.max_attempts
        request = build_request(settings, "POST", FILES_UPLOAD_PATH, base_url=settings.files_base_url)
        answer = self._send(request, _as_is, deadline, MultipartBody(stream, filename, content_type))
        data = answer.get("data")
        if not answer.get("success", True) or not isinstance(data, dict) or not data.get("file_url"):
            raise EvolinkTransportError(
                f"EvoLink Files API did not return a file_url for {filename!r}: "
                f'"{server_text(answer.get("msg") or "")}"',
                request_sent=True,
            )
        return data

    def test_connection(self) -> tuple[bool, str]:
        """Check the key with the free ``GET /v1/credits`` and report what it can spend
        (:class:`~evolink_provider.answers.Credits`)."""
        try:
            credits = read_credits(self.get_credits())
        except EvolinkAuthenticationError as error:
            return False, f"EvoLink rejected the API key (HTTP 401: {error.api_message})."
        except EvolinkError as error:
            return False, str(error)
        quota = "no quota of its own" if credits.key is None else f"a quota of {credits_text(credits.key)}"
        return True, (
            f"Connected to EvoLink at {self.settings.base_url}; remaining credits: "
            f"{credits_text(credits.spendable)} (account balance {credits_text(credits.account)}, "
            f"the key has {quota})"
        )

    def close(self) -> None:
        """Release the sync session's connections."""
        if "session" in self.__dict__:
            self.session.close()
            del self.__dict__["session"]

    # -- results (downloads) ----------------------------------------------------------------------

    @cached_property
    def _downloads(self) -> ResultDownloads:
        from evolink_provider.hooks.downloads import ResultDownloads

        return ResultDownloads()

    def open_result(self, url: str, deadline: float | None = None) -> AbstractContextManager[ResultStream]:
        """``with hook.open_result(url) as result:``, each hop checked and retried as
        :meth:`~evolink_provider.hooks.downloads.ResultDownloads.open` says."""
        return self._downloads.open(url, self.settings, deadline)

    # -- async calls (triggers) --------------------------------------------------------------------

    async def aget_task(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """Read a task without blocking the event loop (for triggers); the answer must be that task.

        With the connection's ``batch_polling`` on, the reads of all triggers on this event loop that use
        the same key are coalesced into batch calls (see :mod:`evolink_provider.hooks.task_batcher`).

        :param deadline: epoch seconds; the read gives up with its last error rather than wait past it.
        """
        settings = await self.aget_settings()
        if not settings.batch_polling:
            return await self._aread_task(settings, task_id, deadline)
        _task_path(task_id)  # refuse a malformed id before it joins a batch
        read = self._task_batcher(settings).read(task_id, deadline)
        if deadline is None:
            return await read
        try:
            return await asyncio.wait_for(read, timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            raise EvolinkWaitTimeoutError(
                f"reading EvoLink task {task_id} in a batch did not finish before the wait's deadline"
            ) from None

    async def _aread_task(
        self, settings: EvolinkConnectionSettings, task_id: str, deadline: float | None = None
    ) -> dict[str, Any]:
        last = self._task_read
        if last is not None and last[0] is settings and last[1] == task_id:
            request = last[2]
        else:
            request = build_request(settings, "GET", _task_path(task_id))
            self._task_read = (settings, task_id, request)
        return await asend(request, settings, partial(checked_task, expected_id=task_id), deadline)

    def _task_batcher(self, settings: EvolinkConnectionSettings) -> TaskBatcher:
        from evolink_provider.hooks.task_batcher import TaskBatcher

        batchers = _TASK_BATCHERS.setdefault(asyncio.get_running_loop(), {})
        batcher = batchers.get(settings.batch_owner)
        if batcher is None:

            async def read_batch(task_ids: list[str], deadline: float | None) -> list[dict[str, Any]]:
                request = build_request(
                    settings, "POST", TASK_BATCH_PATH, json_body={"task_ids": task_ids}, read_only=True
                )
                return await asend(request, settings, _checked_batch, deadline)

            batcher = TaskBatcher(read_batch, partial(self._aread_task, settings))
            batchers[settings.batch_owner] = batcher
        return batcher


#: How long the hooks of one event loop share a connection's reading (a changed key is seen after this).
ASYNC_SETTINGS_SECONDS = 60.0
#: Per event loop and connection id: until when a reading is shared, and the reading.
_ASYNC_SETTINGS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Future[EvolinkConnectionSettings]]]
] = weakref.WeakKeyDictionary()
#: One batcher per event loop and (base URL, API key digest): a batch holds only tasks one key can see.
_TASK_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], TaskBatcher]] = (
    weakref.WeakKeyDictionary()
)
PER_LOOP_STATE.extend((_ASYNC_SETTINGS, _TASK_BATCHERS))


def _failed(future: asyncio.Future[Any]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _task_path(task_id: str) -> str:
    """The read path of a task: the id checked for safety, then URL-encoded as one path segment anyway (as
    EvoLink's CLI does), so that the path stays one segment whatever the id rule allows."""
    return f"/v1/tasks/{quote(task_id_to_send(task_id), safe='')}"


def _as_is(answer: dict[str, Any], *, received_bytes: int) -> dict[str, Any]:
    return answer


def _checked_batch(answer: dict[str, Any], *, received_bytes: int) -> list[dict[str, Any]]:
    """Every task of a batch answer checked; one malformed task makes the whole answer untrusted."""
    from evolink_provider.hooks.task_batcher import tasks_in_batch_answer

    return [checked_task(task) for task in tasks_in_batch_answer(answer)]
