"""The HTTP side of the simulator: routing, authentication, the documented error bodies, faults, statistics.

Stdlib ``http.server`` (HTTP/1.1, keep-alive, one thread per connection) rather than an ASGI stack, because
fault injection needs the raw socket: a reset (RST), a body shorter than its Content-Length, a stall.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from evolink_provider.simulator.faults import FaultPlan, FaultRule
from evolink_provider.simulator.media import MediaCache, image_size
from evolink_provider.simulator.tasks import (
    RESULT_TTL,
    Clock,
    ManualClock,
    SimTask,
    TaskStore,
    markers,
    pixel_size,
)
from evolink_provider.simulator.validation import (
    Accepted,
    RequestRejected,
    image_failure,
    request_media_failure,
    validate_generation,
)

# (default code, error type). Documented types: 402 insufficient_quota, 403/404 invalid_request_error,
# 503 service_unavailable_error, and 429 on task reads evo_api_error (TASK_READ_429_TYPE); the others are
# not documented and keep the conventional names.
ERROR_BODIES = {
    400: ("invalid_request", "invalid_request_error"),
    401: ("unauthorized", "authentication_error"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("permission_denied", "invalid_request_error"),
    404: ("task_not_found", "invalid_request_error"),
    409: ("idempotency_conflict", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    500: ("internal_error", "api_error"),
    502: ("bad_gateway", "api_error"),
    503: ("service_unavailable", "service_unavailable_error"),
    504: ("gateway_timeout", "api_error"),
}
TASK_READ_429_TYPE = "evo_api_error"
#: The status each ``[sim:reject=CODE]`` marker answers with (EvoLink's gateway codes).
REJECT_STATUS = {
    "invalid_token": 401,
    "insufficient_quota": 402,
    "token_daily_quota_exceeded": 402,
    "model_access_denied": 403,
    "paid_outcome_unknown": 409,
    "idempotency_conflict": 409,
    "rate_limit_exceeded": 429,
    "service_unavailable": 503,
}
CREDITS_PATH = "/v1/credits"
IDEMPOTENCY_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
#: The Files API's documented types: images only.
UPLOAD_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
UPLOAD_QUOTA = 100
CHUNK = 1 << 20
UPLOAD_TTL = 72 * 3600.0
#: One line per request at DEBUG (``-v`` on the command line); unexpected errors at ERROR.
log = logging.getLogger("evolink_provider.simulator")


PAID_OUTCOME_UNKNOWN = "paid_outcome_unknown"


def reject_status(code: str) -> int:
    """The HTTP status of a gateway code; channel codes (and unknown ones) are 400s."""
    return REJECT_STATUS.get(code, 400)


class _Dropped(Exception):
    """The connection was closed on purpose (a fault); nothing more is written."""


class SimulatorState:
    """Everything the request threads share."""

    def __init__(
        self,
        api_keys: set[str],
        clock: Clock,
        task_seconds: float,
        credits: float,
        media_dir: Path,
        result_ttl: float = RESULT_TTL,
        time_scale: float = 1.0,
        task_estimate: float | None = None,
    ) -> None:
        self.api_keys = api_keys
        self.clock = clock
        self.store = TaskStore(clock, task_seconds, credits, time_scale, task_estimate)
        self.faults = FaultPlan()
        self.media = MediaCache(media_dir)
        self.result_ttl = result_ttl
        self.base_url = ""
        self.lock = threading.Lock()
        self.connections_opened = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        with self.lock:
            self.requests: Counter[str] = Counter()
            self.tasks_created = 0
            self.idempotent_replays = 0
            self.prompts_truncated = 0
            self.posts_by_key: Counter[str] = Counter()
            self.tasks_by_key: dict[str, list[str]] = defaultdict(list)
            self.polls_by_task: Counter[str] = Counter()
            self.poll_times: dict[str, list[float]] = defaultdict(list)
            self.uploads: dict[str, tuple[str, str, bytes, float]] = {}
            self.tasks_by_prompt: Counter[str] = Counter()
            #: How many files the Files API keeps for the account (``POST /_simulator/files_quota``).
            self.files_quota = UPLOAD_QUOTA

    def reset(self) -> None:
        self.store.reset()
        self.faults.clear()
        self.reset_stats()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": dict(self.requests),
                "tasks_created": self.tasks_created,
                "idempotent_replays": self.idempotent_replays,
                "prompts_truncated": self.prompts_truncated,
                "posts_by_idempotency_key": dict(self.posts_by_key),
                "tasks_by_idempotency_key": {k: list(v) for k, v in self.tasks_by_key.items()},
                "polls_by_task": dict(self.polls_by_task),
                "poll_times_by_task": {k: list(v) for k, v in self.poll_times.items()},
                "faults_injected": self.faults.injected,
                "connections_opened": self.connections_opened,
                "tasks_by_prompt": dict(self.tasks_by_prompt),
                "credits": {
                    "remaining": self.store.remaining,
                    "used": self.store.used,
                    "key_remaining": self.store.key_remaining,
                },
            }


def request_label(method: str, path: str) -> str:
    """Counting key: task reads are one bucket, media one bucket, everything else by path."""
    if path.startswith("/v1/tasks/") and path != "/v1/tasks/batch":
        return f"{method} /v1/tasks"
    if path.startswith("/media/"):
        return f"{method} /media"
    return f"{method} {path}"


class _Response:
    def __init__(
        self,
        status: int,
        body: bytes | Path | int = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}

    def length(self) -> int:
        if isinstance(self.body, Path):
            return self.body.stat().st_size
        if isinstance(self.body, int):
            return self.body
        return len(self.body)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), headers=headers)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:16]}"


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    *,
    path: str = "",
    method: str = "",
) -> _Response:
    """The error body EvoLink's clients see for ``path``, its request id in the body and the header.

    ``GET /v1/credits`` carries an integer ``code``; a 401 ``invalid_token`` comes OAuth-shaped.
    """
    request_id = new_request_id()
    headers = {"X-Request-Id": request_id}
    default_code, kind = ERROR_BODIES.get(status, ("internal_error", "api_error"))
    if status == 401 and code == "invalid_token":
        body: dict[str, Any] = {"error": "invalid_token", "error_description": message}
        return json_response(status, body, headers)
    if status == 429 and method == "GET" and path.startswith("/v1/tasks/"):
        kind = TASK_READ_429_TYPE
    error: dict[str, Any] = {"code": code or default_code, "message": message, "type": kind}
    if path == CREDITS_PATH:
        error["code"] = status
    if param:
        error["param"] = param
    error["request_id"] = request_id
    return json_response(status, {"error": error}, headers)


def refusal_response(code: int, message: str) -> _Response:
    """The Files API's and credits' refusal: HTTP 200 with ``success: false``."""
    return json_response(200, {"success": False, "code": code, "msg": message, "data": None})


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class SimulatorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the client's
    # delayed ACK add ~40 ms to every answer on a kept-alive connection.
    disable_nagle_algorithm = True
    server: SimulatorServer
    #: When the current request's line was read, and the status it was answered with (for the log line).
    _started: float | None = None
    _status = "no answer"

    @property
    def state(self) -> SimulatorState:
        return self.server.state

    def setup(self) -> None:
        with self.state.lock:
            self.state.connections_opened += 1  # TCP connections, whether or not a TLS handshake succeeds
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (_Dropped, ConnectionError, TimeoutError, ValueError, OSError):
            self.close_connection = True

    def parse_request(self) -> bool:
        self._started = time.monotonic()
        self._status = "no answer"
        return super().parse_request()

    def handle_one_request(self) -> None:
        self._started = None
        try:
            super().handle_one_request()
        finally:
            if self._started is not None and log.isEnabledFor(logging.DEBUG):
                elapsed = (time.monotonic() - self._started) * 1000
                log.debug("%s %s %s %.1f ms", self.command, self.path, self._status, elapsed)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Keep the status for the one line that :meth:`handle_one_request` logs when the answer is out."""
        self._status = str(int(code)) if isinstance(code, int) else str(code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------------

    def _drop(self) -> None:
        """Close with RST: SO_LINGER on with a zero timeout makes close() abort the connection."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        raise _Dropped

    def _send(
        self, response: _Response, *, promise_extra: int = 0, head: bool = False, chunked: bool = False
    ) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(response.length() + promise_extra))
        if "X-Request-Id" not in response.headers:
            self.send_header("X-Request-Id", new_request_id())
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        if chunked:
            body = response.body.read_bytes() if isinstance(response.body, Path) else response.body
            data = body if isinstance(body, bytes) else bytes(range(256)) * (body // 256 + 1)
            data = data[: response.length()]
            for start in range(0, len(data), CHUNK):
                piece = data[start : start + CHUNK]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if isinstance(response.body, Path):
            with response.body.open("rb") as stream:
                while chunk := stream.read(CHUNK):
                    self.wfile.write(chunk)
        elif isinstance(response.body, int):
            block = bytes(range(256)) * (CHUNK // 256)
            remaining = response.body
            while remaining > 0:
                self.wfile.write(block[: min(remaining, CHUNK)])
                remaining -= CHUNK
        else:
            self.wfile.write(response.body)
        if promise_extra:
            self.wfile.flush()
            self._drop()

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path.startswith("/_simulator/"):
            self._send(self._control(method, path, raw))
            return
        with self.state.lock:
            self.state.requests[request_label(method, path)] += 1
            key = self.headers.get("Idempotency-Key")
            if key is not None and method == "POST" and path == "/v1/videos/generations":
                self.state.posts_by_key[key] += 1
        rule = self.state.faults.pick(method, path)
        if rule is not None and not rule.after_processing:
            early = self._fault_before(rule, method, path)
            if early is not None:
                self._send(early)
                return
        response = self._route(method, path, raw)
        if rule is not None:
            response = self._fault_after(rule, response, method, path)
        chunked = rule is not None and rule.kind == "chunked" and response.status == 200
        self._send(response, head=method == "HEAD", chunked=chunked)

    def _fault_before(self, rule: FaultRule, method: str, path: str) -> _Response | None:
        """Faults that replace the answer; None lets the request through (possibly slowed)."""
        if rule.kind in ("status", "refused"):
            return self._fault_answer(rule, method, path)
        if rule.kind == "reset":
            self._drop()
        if rule.kind in ("timeout", "slow"):
            time.sleep(rule.delay)
        if rule.kind == "garbled":
            return _Response(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        if rule.kind == "redirect":
            return _Response(302, b"", "text/plain", {"Location": rule.location})
        if rule.kind == "not_found":
            return error_response(404, "simulated: not found", "not_found")
        return None

    def _fault_answer(self, rule: FaultRule, method: str, path: str) -> _Response:
        """The answer of a ``status`` fault (with its ``code``) or a ``refused`` one (200, success false)."""
        if rule.kind == "refused":
            return refusal_response(rule.status, f"simulated refusal {rule.status}")
        response = error_response(
            rule.status, f"simulated HTTP {rule.status}", rule.code, path=path, method=method
        )
        if rule.retry_after is not None:
            response.headers["Retry-After"] = rule.retry_after
        return response

    def _fault_after(self, rule: FaultRule, response: _Response, method: str, path: str) -> _Response:
        """Faults that act on a processed request (the task now exists, the answer is lost or spoilt)."""
        if rule.after_processing and rule.kind in ("status", "refused"):
            return self._fault_answer(rule, method, path)
        if rule.after_processing and rule.kind == "reset":
            self._drop()
        if rule.after_processing and rule.kind in ("timeout", "slow"):
            time.sleep(rule.delay)
        if rule.kind in ("truncated", "content_length_lie"):
            self._send(response, promise_extra=max(100, response.length() // 2))
        if rule.kind == "unknown_status" and isinstance(response.body, bytes):
            payload = json.loads(response.body)
            if isinstance(payload, dict) and "status" in payload:
                payload["status"] = "queued_for_review"
                response.body = json.dumps(payload).encode()
        if rule.kind == "wrong_content_type":
            response.content_type = "text/html"
        return response

    # -- routes -----------------------------------------------------------------------------------

    def _owner(self) -> str | None:
        header = self.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key.strip() in self.state.api_keys:
            return key.strip()
        return None

    def _route(self, method: str, path: str, raw: bytes) -> _Response:
        if path.startswith("/media/") and method in ("GET", "HEAD"):
            return self._media(path)
        found_owner = self._owner()
        if found_owner is None:
            return error_response(401, "missing or invalid API key", path=path, method=method)
        owner = found_owner
        if method == "POST" and path == "/v1/videos/generations":
            return self._create(owner, raw)
        if method == "POST" and path == "/v1/tasks/batch":
            return self._batch(owner, raw)
        if method == "GET" and path.startswith("/v1/tasks/"):
            return self._task(owner, unquote(path.removeprefix("/v1/tasks/")))
        if method == "GET" and path == CREDITS_PATH:
            store = self.state.store
            return json_response(
                200,
                {
                    "data": {
                        # EvoLink's shape (corrected 2026-12-03): unlimited_credits is the key's.
                        "user": {
                            "remaining_credits": round(store.remaining, 4),
                            "used_credits": round(store.used, 4),
                        },
                        "token": {
                            "remaining_credits": round(store.key_remaining or 0.0, 4),
                            "used_credits": round(store.key_used, 4),
                            "unlimited_credits": store.key_remaining is None,
                        },
                    },
                    "message": "success",
                },
            )
        if method == "POST" and path == "/api/v1/files/upload/stream":
            return self._upload(raw)
        if method == "GET" and path == "/api/v1/files/quota":
            with self.state.lock:
                used, quota = len(self.state.uploads), self.state.files_quota
            return json_response(
                200,
                {
                    "success": True,
                    "code": 200,
                    "msg": "ok",
                    "data": {
                        "user_group": "default",
                        "used_files": used,
                        "max_files": quota,
                        "remain_files": max(0, quota - used),
                        "is_custom": False,
                        "quota_reason": "default quota",
                    },
                },
            )
        return error_response(404, f"no route for {method} {path}", "not_found")

    def _create(self, owner: str, raw: bytes) -> _Response:
        try:
            body = json.loads(raw or b"null")
            accepted = validate_generation(body)
        except ValueError:
            return error_response(400, "the body is not valid JSON")
        except RequestRejected as rejected:
            return error_response(rejected.status, rejected.message, rejected.code, rejected.param)
        key = self.headers.get("Idempotency-Key")
        if key is not None and not (16 <= len(key) <= 96 and set(key) <= IDEMPOTENCY_KEY_CHARS):
            return error_response(
                400, "Idempotency-Key must be 16-96 characters of [A-Za-z0-9._-]", param="Idempotency-Key"
            )
        store = self.state.store
        reject = store.take_marker(markers(str(body.get("prompt") or body.get("video_url") or "")), "reject")
        if reject is not None and reject != PAID_OUTCOME_UNKNOWN:
            return error_response(reject_status(reject), f"simulated: {reject}", reject)
        with store.lock:
            if key is not None:
                earlier = store.replay(owner, key, body)
                if earlier is False:
                    # Observed behaviour; the HTTP status is not documented, 409 is the conventional one.
                    return error_response(409, "this Idempotency-Key was used with a different body")
                if isinstance(earlier, SimTask) and reject is None:
                    with self.state.lock:
                        self.state.idempotent_replays += 1
                    return json_response(
                        200, store.task_object(earlier, self.state.base_url), {"Idempotency-Replayed": "true"}
                    )
                if isinstance(earlier, SimTask):  # still paid_outcome_unknown for this key
                    return error_response(409, "the outcome of this paid request is not known yet", reject)
            refusal = store.refusal_for(store.cost(accepted))
            if refusal is not None:
                return error_response(402, refusal)
            task = store.create(owner, accepted, key, self._media_failure(accepted))
        if reject == PAID_OUTCOME_UNKNOWN:
            # The paid request went through, but the gateway cannot tell yet: only the same key finds it.
            self._count_created(key, body, accepted, task)
            return error_response(
                409, "the outcome of this paid request is not known yet; retry later", reject
            )
        self._count_created(key, body, accepted, task)
        return json_response(200, store.task_object(task, self.state.base_url))

    def _count_created(
        self, key: str | None, body: dict[str, Any], accepted: Accepted, task: SimTask
    ) -> None:
        with self.state.lock:
            self.state.tasks_created += 1
            self.state.prompts_truncated += int(accepted.prompt_truncated)
            self.state.tasks_by_prompt[str(body.get("prompt") or body.get("video_url") or "")] += 1
            if key is not None:
                self.state.tasks_by_key[key].append(task.id)

    def _media_failure(self, accepted: Accepted) -> str | None:
        """What the real service would fail the task with after fetching its inputs (None: all fine)."""
        own = urlsplit(self.state.base_url)
        seen_bytes = 0
        for url in accepted.media_urls:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if (host, parts.port) == (own.hostname, own.port):
                failure = self._own_media_failure(parts.path, accepted)
                if failure:
                    return failure
                seen_bytes += self._own_media_bytes(parts.path)
                failure = request_media_failure(accepted.model, seen_bytes)
                if failure:
                    return failure
            elif (
                host in ("localhost",)
                or host.startswith(("127.", "10.", "192.168.", "169.254."))
                or any(host.startswith(f"172.{n}.") for n in range(16, 32))
            ):
                return "image_processing_error"  # EvoLink cannot reach private hosts
        return None

    def _own_media_failure(self, path: str, accepted: Accepted) -> str | None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["media", "uploads"] and len(parts) >= 3:
            upload = self.state.uploads.get(parts[2])
            if upload is None:
                return "image_processing_error"
            data = upload[2]
            size = image_size(data)
            if size is not None and size[0] != "image/gif":
                return image_failure(accepted.model, size[1], size[2], len(data))
            return None
        if len(parts) == 3 and parts[0] == "media" and parts[1] in self.state.store.tasks:
            return None
        return "image_processing_error"

    def _own_media_bytes(self, path: str) -> int:
        """The size of an uploaded file this server serves (0 for anything else)."""
        parts = path.strip("/").split("/")
        if parts[:2] != ["media", "uploads"] or len(parts) < 3:
            return 0
        upload = self.state.uploads.get(parts[2])
        return len(upload[2]) if upload else 0

    def _visible_task(self, owner: str, task_id: str) -> SimTask | _Response:
        """The task ``owner``'s key may read, or EvoLink's documented refusal: 403 for another key's task,
        404 for an unknown one, and 400 ``invalid_task_id`` for an unknown id without the documented
        ``task-unified-`` prefix. A task this server issued is readable whatever its id's shape: EvoLink
        answered ``task-happyhorse-...`` ids until 2026-04 and its task query read them (the create-then-
        query flow it documents), so the prefix rule describes today's ids, not a refusal of its own."""
        task = self.state.store.tasks.get(task_id)
        if task is None and not task_id.startswith("task-unified-"):
            message = f"invalid task id {task_id}: must start with 'task-unified-'"
            return error_response(400, message, "invalid_task_id")
        if task is None:
            return error_response(404, f"task {task_id} not found", "task_not_found")
        if task.owner != owner:
            return error_response(403, "this key may not read this task", "permission_denied")
        return task

    def _task(self, owner: str, task_id: str) -> _Response:
        found = self._visible_task(owner, task_id)
        if isinstance(found, _Response):
            return found
        with self.state.lock:
            self.state.polls_by_task[task_id] += 1
            self.state.poll_times[task_id].append(self.state.clock.now())
        return json_response(200, self.state.store.task_object(found, self.state.base_url))

    def _batch(self, owner: str, raw: bytes) -> _Response:
        """Observed, undocumented ``POST /v1/tasks/batch``: up to 50 ids, the caller's tasks in one answer."""
        try:
            ids = json.loads(raw or b"{}").get("task_ids")
        except (ValueError, AttributeError):
            ids = None
        if not isinstance(ids, list) or not 1 <= len(ids) <= 50 or not all(isinstance(i, str) for i in ids):
            return error_response(400, "task_ids must be a list of 1-50 task ids", param="task_ids")
        tasks = []
        for task_id in ids:
            found = self._visible_task(owner, task_id)
            if isinstance(found, SimTask):
                tasks.append(self.state.store.task_object(found, self.state.base_url))
                with self.state.lock:
                    self.state.polls_by_task[task_id] += 1
                    self.state.poll_times[task_id].append(self.state.clock.now())
        return json_response(200, {"data": tasks})

    def _media(self, path: str) -> _Response:
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[1] == "blob" and parts[2].endswith(".mp4") and parts[2][:-4].isdigit():
            return _Response(200, int(parts[2][:-4]), "video/mp4")
        if len(parts) >= 4 and parts[1] == "uploads":
            upload = self.state.uploads.get(parts[2])
            if upload is None or self.state.clock.now() > upload[3]:
                return error_response(404, "file not found or expired", "not_found")
            return _Response(200, upload[2], upload[1])
        task = self.state.store.tasks.get(parts[1]) if len(parts) == 3 else None
        if task is None or task.state(self.state.clock.now())[0] != "completed":
            return error_response(404, "no such result", "not_found")
        if self.state.clock.now() > task.completed_at() + self.state.result_ttl:
            return error_response(404, "this result link has expired", "not_found")  # 24 h signed links
        accepted = task.accepted
        if parts[2] == "profile.png" and accepted.kind == "character":
            return _Response(200, self.state.media.picture(), "image/png")
        take = parts[2][len("video-") : -len(".mp4")] if parts[2].startswith("video-") else ""
        other_take = take.isdigit() and 0 < int(take) < task.result_count
        if (parts[2] == "video.mp4" or other_take) and accepted.kind == "video":
            width, height = pixel_size(accepted.quality, accepted.aspect_ratio)
            return _Response(
                200, self.state.media.video(width, height, accepted.duration, accepted.audio), "video/mp4"
            )
        return error_response(404, "no such result", "not_found")

    def _upload(self, raw: bytes) -> _Response:
        content_type = self.headers.get("Content-Type", "")
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        part = None
        if message.is_multipart():
            for candidate in message.iter_parts():
                if candidate.get_param("name", header="content-disposition") == "file":
                    part = candidate
        if part is None:
            return json_response(
                400, {"success": False, "code": 400, "msg": "multipart field 'file' is required"}
            )
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        name = part.get_filename() or "upload"
        found = image_size(data)
        mime = found[0] if found else None
        if mime not in UPLOAD_TYPES:
            # A refusal, as the Files API answers it: HTTP 200 with success false.
            return refusal_response(400, "unsupported file type: only JPEG, PNG, GIF and WEBP images")
        with self.state.lock:
            if len(self.state.uploads) >= self.state.files_quota:
                return refusal_response(429, "file quota reached")
            file_id = f"file_{uuid.uuid4().hex[:20]}"
            now = self.state.clock.now()
            self.state.uploads[file_id] = (name, mime, data, now + UPLOAD_TTL)
        upload_path = f"uploads/{file_id}/{name}"
        url = f"{self.state.base_url}/media/{upload_path}"
        return json_response(
            200,
            {
                "success": True,
                "code": 200,
                "msg": "uploaded",
                "data": {
                    "file_id": file_id,
                    "file_url": url,
                    "download_url": url,
                    "file_size": len(data),
                    "mime_type": mime,
                    "original_name": name,
                    "upload_path": upload_path,
                    "upload_time": iso_time(now),
                    "expires_at": iso_time(now + UPLOAD_TTL),
                },
            },
        )

    # -- control ----------------------------------------------------------------------------------

    def _control(self, method: str, path: str, raw: bytes) -> _Response:
        state = self.state
        payload = json.loads(raw) if raw else {}
        action = path.removeprefix("/_simulator/")
        if action == "stats" and method == "GET":
            return json_response(200, state.stats())
        if action == "reset" and method == "POST":
            state.reset()
            return json_response(200, {"ok": True})
        if action == "faults" and method == "POST":
            try:
                state.faults.add(list(payload.get("rules", [])))
            except (TypeError, ValueError) as error:
                return error_response(400, str(error))
            return json_response(200, {"ok": True})
        if action == "faults" and method == "DELETE":
            state.faults.clear()
            return json_response(200, {"ok": True})
        if action == "task_ids" and method == "POST":
            try:
                state.store.issue_ids(payload.get("ids"))
            except (TypeError, ValueError) as error:
                return error_response(400, str(error))
            return json_response(200, {"ok": True})
        if action == "key_failures" and method == "POST":
            state.store.key_failures[str(payload["api_key"])] = str(payload["code"])
            return json_response(200, {"ok": True})
        if action == "credits" and method == "POST":
            unknown = sorted(set(payload) - {"remaining", "key_remaining", "key_unlimited"})
            if unknown:  # e.g. the "unlimited" of an older simulator: ignoring it would test something else
                known = "remaining, key_remaining, key_unlimited"
                return error_response(400, f"unknown fields {unknown}: {known}")
            try:
                state.store.set_balance(
                    payload.get("remaining"), payload.get("key_remaining"), payload.get("key_unlimited")
                )
            except (TypeError, ValueError) as error:
                return error_response(400, str(error))
            return json_response(200, {"ok": True})
        if action == "files_quota" and method == "POST":
            with state.lock:
                state.files_quota = int(payload.get("max_files", UPLOAD_QUOTA))
            return json_response(200, {"ok": True})
        if action == "clock" and method == "POST":
            if not isinstance(state.clock, ManualClock):
                return error_response(400, "the simulator runs on the real clock")
            state.clock.advance(float(payload.get("advance", 0)))
            return json_response(200, {"now": state.clock.now()})
        return error_response(404, f"no control {method} {path}", "not_found")


class SimulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self, address: tuple[str, int], state: SimulatorState, tls: ssl.SSLContext | None = None
    ) -> None:
        self.state = state
        self.tls = tls
        super().__init__(address, SimulatorHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """With TLS, the handshake runs in the connection's own thread, not in the accepting one."""
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Closed sockets are expected (faults close them on purpose); anything else is a simulator bug."""
        error = sys.exc_info()[1]
        if not isinstance(error, (OSError, _Dropped)):
            log.error("The simulator failed while answering %s", client_address[0], exc_info=error)
