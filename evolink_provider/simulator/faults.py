"""Fault rules: which requests get a 429, a reset, a timeout, a garbled body, ... and how often."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any

KINDS = frozenset(
    {
        "status",  # answer `status` with the documented error body and `code` (429 may carry `retry_after`)
        "refused",  # HTTP 200 {"success": false, "code": `status`, "msg"} (credits, Files API refusals)
        "reset",  # close the TCP connection with RST, before or (after_processing) after handling
        "timeout",  # wait `delay` seconds (longer than the client's read timeout), then answer
        "slow",  # wait `delay` seconds, then answer
        "garbled",  # 200 with a body that is not JSON
        "truncated",  # 200 whose Content-Length promises more than is sent, then close
        "unknown_status",  # a task object whose status is not a documented one
        "redirect",  # 302 to `location`
        "content_length_lie",  # media: announce more bytes than are sent, then close
        "not_found",  # 404 with the documented body
        "wrong_content_type",  # media: served as text/html
        "chunked",  # answer with Transfer-Encoding: chunked and no Content-Length (as many CDNs do)
    }
)


@dataclass
class FaultRule:
    kind: str
    method: str = "*"
    path_prefix: str = "/"
    #: Matches only paths ending so (the n-th result of any task: ``/video-1.mp4``).
    path_suffix: str = ""
    share: float = 1.0
    count: int | None = None
    status: int = 500
    #: The error body's ``code`` (default: the status's usual one); ``invalid_token`` on a 401 gives
    #: the OAuth-shaped body.
    code: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    location: str = ""
    after_processing: bool = False
    applied: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultRule:
        if data.get("kind") not in KINDS:
            raise ValueError(f"unknown fault kind {data.get('kind')!r}; one of {sorted(KINDS)}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "applied"}
        return cls(**known)

    def matches(self, method: str, path: str) -> bool:
        return (
            self.method in ("*", method)
            and path.startswith(self.path_prefix)
            and path.endswith(self.path_suffix)
        )


class FaultPlan:
    """The active rules; a seeded RNG decides shares so that runs are reproducible."""

    def __init__(self, seed: int = 20261124) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._seed = seed
        self.rules: list[FaultRule] = []
        self.injected = 0

    def add(self, rules: list[dict[str, Any]]) -> None:
        parsed = [FaultRule.from_json(rule) for rule in rules]
        with self._lock:
            self.rules.extend(parsed)

    def clear(self) -> None:
        with self._lock:
            self.rules = []
            self._random = random.Random(self._seed)

    def pick(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                if rule.count is not None and rule.applied >= rule.count:
                    continue
                if rule.share < 1.0 and self._random.random() >= rule.share:
                    continue
                rule.applied += 1
                self.injected += 1
                return rule
        return None
