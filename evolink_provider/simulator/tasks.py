"""Tasks: the clock, the store, the lifecycle and the task objects the simulator answers with."""

from __future__ import annotations

import random
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from evolink_provider.simulator.validation import Accepted

#: Seconds a result link lives (EvoLink: 24 h).
RESULT_TTL = 24 * 3600.0
_MARKER = re.compile(r"\[sim:([a-z_]+)=([^\]]+)\]")
#: Credits per generated second (a made-up price: the simulator only needs one to bill and refund).
CREDITS_PER_SECOND = {"480p": 0.6, "720p": 1.0, "1080p": 2.0, "4k": 4.0}
CHARACTER_PRICE = 5.0

# Pixel sizes. Seedance's 480p/720p tables are documented; 1080p/4k and all of HappyHorse's are not, so
# they are the 720p shapes scaled (even numbers, as encoders need).
SEEDANCE_SIZES = {
    "480p": {
        "16:9": (864, 496),
        "4:3": (752, 560),
        "1:1": (640, 640),
        "3:4": (560, 752),
        "9:16": (496, 864),
        "21:9": (992, 432),
    },
    "720p": {
        "16:9": (1280, 720),
        "4:3": (1112, 834),
        "1:1": (960, 960),
        "3:4": (834, 1112),
        "9:16": (720, 1280),
        "21:9": (1470, 630),
    },
}
_EXTRA_RATIOS = {"4:5": (864, 1080), "5:4": (1080, 864), "9:21": (630, 1470)}


def pixel_size(quality: str, aspect_ratio: str) -> tuple[int, int]:
    ratio = "16:9" if aspect_ratio == "adaptive" else aspect_ratio
    table = {**SEEDANCE_SIZES["720p"], **_EXTRA_RATIOS}
    if quality == "480p":
        table = {**table, **SEEDANCE_SIZES["480p"]}
    width, height = table.get(ratio, (1280, 720))
    if quality in ("480p", "720p"):
        return width, height
    scale = {"1080p": 1.5, "4k": 3.0}.get(quality, 1.0)
    return int(width * scale) // 2 * 2, int(height * scale) // 2 * 2


class Clock(Protocol):
    def now(self) -> float: ...


class RealClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told: simulates 40-minute tasks in milliseconds."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when


def _random_suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def markers(text: str) -> dict[str, str]:
    """``[sim:name=value]`` test markers in a prompt (or a sora video URL)."""
    return dict(_MARKER.findall(text or ""))


def split_limit(value: str) -> tuple[str, int | None]:
    """``code:N`` -> (code, N): the marker acts on the first N uses only; codes may hold colons."""
    head, _, tail = value.rpartition(":")
    return (head, int(tail)) if head and tail.isdigit() else (value, None)


@dataclass
class SimTask:
    id: str
    owner: str
    accepted: Accepted
    created: float
    seconds: float
    estimate: int
    credits: float
    fail_code: str | None = None
    #: How the task ends when it does not complete: "failed" or "cancelled" (``fail_code`` may be None).
    ends: str | None = None
    #: Where a completed video is listed: "results" (default), "result_data_list", "result_data_object",
    #: or "none" (a completed task without output).
    output: str = "results"
    #: How many videos a completed task lists (``[sim:results=N]``).
    result_count: int = 1
    stay: str | None = None
    character_name: str = ""
    status_override: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def state(self, now: float) -> tuple[str, int]:
        elapsed = max(0.0, now - self.created)
        if self.stay:
            return self.stay, 50 if self.stay == "processing" else 0
        if self.ends and elapsed >= self.seconds / 2:
            return self.ends, 50
        if elapsed >= self.seconds:
            return "completed", 100
        if elapsed < self.seconds * 0.1:
            return "pending", 0
        return "processing", min(99, int(100 * elapsed / self.seconds))

    def completed_at(self) -> float:
        return self.created + self.seconds


class TaskStore:
    """All tasks, the idempotency record, credits and marker counters, behind one lock."""

    def __init__(
        self,
        clock: Clock,
        task_seconds: float,
        credits: float,
        time_scale: float = 1.0,
        task_estimate: float | None = None,
    ) -> None:
        self.clock = clock
        self.task_seconds = task_seconds
        #: The ``estimated_time`` of a task with neither marker (None: its run time). EvoLink's estimates
        #: are rough; a test suite sets one above the wait-on-worker window so that short tasks defer.
        self.task_estimate = task_estimate
        #: Multiplies every run time, marked or default, and the estimates that go with it (see
        #: EvolinkSimulator): the same scenarios, faster.
        self.time_scale = time_scale
        self.initial_credits = credits
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.tasks: dict[str, SimTask] = {}
            self.by_key: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
            self.marker_uses: dict[str, int] = {}
            self.key_failures: dict[str, str] = {}
            #: Ids the next created tasks take, in order (a test control), instead of generated ones.
            self.next_ids: list[str] = []
            self.remaining = self.initial_credits
            self.used = 0.0
            #: The keys' own quota (``token.remaining_credits``); None: ``token.unlimited_credits``. One
            #: quota serves every key of the simulator (a test sets one key's limit at a time).
            self.key_remaining: float | None = None
            self.key_used = 0.0

    def set_balance(
        self, remaining: Any = None, key_remaining: Any = None, key_unlimited: Any = None
    ) -> None:
        """Set what ``GET /v1/credits`` reports and what a submission may spend (a test control): the
        account's balance (``remaining``), the key's own quota (``key_remaining``), or no key quota
        (``key_unlimited``); what is not given stays."""
        for name, value in (("remaining", remaining), ("key_remaining", key_remaining)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(f"{name} must be a number >= 0")
        if key_unlimited not in (None, True, False) or (key_unlimited and key_remaining is not None):
            raise ValueError("key_unlimited must be true or false, and not given with key_remaining")
        with self.lock:
            if remaining is not None:
                self.remaining = float(remaining)
            if key_remaining is not None:
                self.key_remaining = float(key_remaining)
            if key_unlimited:
                self.key_remaining = None

    def refusal_for(self, cost: float) -> str | None:
        """Why a submission costing ``cost`` may not be made (None: it may): the account's balance always
        applies, the key's quota when it has one (EvoLink: what a key can spend)."""
        if self.remaining < cost:
            return "insufficient credits for this request"
        if self.key_remaining is not None and self.key_remaining < cost:
            return "this API key's credit quota is used up"
        return None

    def _spend(self, amount: float) -> None:
        self.remaining -= amount
        self.used += amount
        if self.key_remaining is not None:
            self.key_remaining -= amount
        self.key_used += amount

    def issue_ids(self, ids: Any) -> None:
        """Make the next created tasks take ``ids`` (a test control): the shapes EvoLink's docs show
        (``task-unified-1774857405-abc123``) or answered (``task-happyhorse-...``). An id already in use is
        refused, as are ids no server could put in a URL path (empty, ``/``, whitespace)."""
        if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
            raise TypeError("ids must be a list of strings")
        with self.lock:
            for item in ids:
                if not item or item in self.tasks or any(c == "/" or c.isspace() for c in item):
                    raise ValueError(f"cannot issue task id {item!r}")
            self.next_ids.extend(ids)

    def take_marker(self, found: dict[str, str], name: str) -> str | None:
        """The value of marker ``name`` (``value`` or ``value:N``, acting on its first N uses), counting
        this use; None when absent or used up."""
        if name not in found:
            return None
        value, limit = split_limit(found[name])
        with self.lock:
            counter = f"{name}={found[name]}"
            uses = self.marker_uses.get(counter, 0)
            self.marker_uses[counter] = uses + 1
        return value if limit is None or uses < limit else None

    def cost(self, accepted: Accepted) -> float:
        if accepted.kind == "character":
            return CHARACTER_PRICE
        return CREDITS_PER_SECOND.get(accepted.quality, 1.0) * accepted.duration

    def replay(self, owner: str, key: str, body: dict[str, Any]) -> SimTask | bool | None:
        """The task of an earlier request with this key; False when the body differs (a conflict)."""
        with self.lock:
            entry = self.by_key.get((owner, key))
            if entry is None:
                return None
            task_id, original = entry
            return self.tasks[task_id] if original == body else False

    def create(self, owner: str, accepted: Accepted, key: str | None, media_failure: str | None) -> SimTask:
        text = accepted.body.get("prompt") or accepted.body.get("video_url") or ""
        found = markers(text)
        now = self.clock.now()
        with self.lock:
            cost = self.cost(accepted)
            self._spend(cost)
            fail = self.take_marker(found, "fail") or media_failure or self.key_failures.get(owner)
            cancel = self.take_marker(found, "cancel")
            ends = "cancelled" if cancel else "failed" if fail else None
            code = cancel or fail
            seconds = float(found.get("seconds", self.task_seconds)) * self.time_scale
            if "estimate" in found:
                estimate = float(found["estimate"]) * self.time_scale
            elif "seconds" not in found and self.task_estimate is not None:
                estimate = self.task_estimate * self.time_scale
            else:
                estimate = seconds
            task = SimTask(
                id=self.next_ids.pop(0) if self.next_ids else f"task-unified-{int(now)}-{_random_suffix()}",
                owner=owner,
                accepted=accepted,
                created=now,
                seconds=seconds,
                estimate=max(1, round(estimate)),
                credits=cost,
                fail_code=None if code == "none" else code,
                ends=ends,
                output=found.get("output", "results"),
                result_count=max(1, min(4, int(found.get("results", "1")))),
                stay=found.get("stay"),
                character_name="chr_"
                + "".join(random.choices(string.ascii_letters + string.digits, k=8))
                + "#",
            )
            self.tasks[task.id] = task
            if key:
                self.by_key[(owner, key)] = (task.id, accepted.body)
            return task

    def refund_if_failed(self, task: SimTask) -> None:
        with self.lock:
            ended = task.state(self.clock.now())[0] in ("failed", "cancelled")
            if ended and not task.extra.get("refunded"):
                task.extra["refunded"] = True
                self._spend(-task.credits)

    def task_object(self, task: SimTask, base_url: str) -> dict[str, Any]:
        """The task object exactly as EvoLink documents it."""
        status, progress = task.state(self.clock.now())
        accepted = task.accepted
        body: dict[str, Any] = {
            "id": task.id,
            "created": int(task.created),
            "model": accepted.model,
            "object": "video.generation.task",
            "status": status,
            "progress": progress,
            "type": "video",
            "task_info": {
                "can_cancel": False,
                "estimated_time": task.estimate,
                "video_duration": accepted.duration,
            },
            "usage": {
                "billing_rule": "per_call" if accepted.kind == "character" else "per_second",
                "credits_reserved": task.credits,
                "user_group": "default",
            },
        }
        if status == "completed":
            if accepted.kind == "character":
                body["results"] = []
                body["result_data"] = {
                    "character_name": task.character_name,
                    "profile_picture_url": f"{base_url}/media/{task.id}/profile.png",
                }
            else:
                video = f"{base_url}/media/{task.id}/video.mp4"
                more = [f"{base_url}/media/{task.id}/video-{n}.mp4" for n in range(1, task.result_count)]
                body["results"] = [video, *more] if task.output == "results" else []
                if task.output == "result_data_list":
                    body["result_data"] = [{"video_url": video}]
                elif task.output == "result_data_object":
                    body["result_data"] = {"video_url": video}
        elif status in ("failed", "cancelled"):
            self.refund_if_failed(task)
            if task.fail_code:
                body["error"] = {
                    "code": task.fail_code,
                    "message": f"simulated {status}: {task.fail_code}\nsee EvoLink's task error table",
                    "type": "task_error",
                }
        return body
