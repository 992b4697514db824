"""A local EvoLink-compatible server for the demo, the tests and the benchmarks.

It follows EvoLink's documented contract as strictly as the real service: the field limits of every known
model, the documented error bodies and status codes, ``Idempotency-Key`` replay (observed behaviour), the
``pending -> processing -> completed`` lifecycle with rising progress, real MP4 results of the requested
duration and pixel size, ``result_data`` for sora-character, the Files API and ``GET /v1/credits``.

Test controls (no authentication; the server binds loopback only):

* ``GET /_simulator/stats``: request counts, tasks created, replays, POSTs and tasks by Idempotency-Key,
  polls per task (and their clock times), faults injected, TCP connections opened.
* ``POST /_simulator/reset``: forget tasks, faults and counts.
* ``POST /_simulator/faults`` ``{"rules": [...]}`` / ``DELETE /_simulator/faults``: see
  :mod:`evolink_provider.simulator.faults` for the kinds (status, reset, timeout, slow, garbled,
  truncated, unknown_status, redirect, content_length_lie, not_found, wrong_content_type) and the fields
  (``method``, ``path_prefix``, ``share``, ``count``, ``status``, ``retry_after``, ``delay``, ``location``,
  ``after_processing``).
* ``POST /_simulator/key_failures`` ``{"api_key", "code"}``: every task of that key fails with ``code``.
* ``POST /_simulator/clock`` ``{"advance": s}``: move a :class:`ManualClock`.

Prompt markers (for sora-character, in the ``video_url`` instead):

* ``[sim:seconds=12]``: the task takes 12 s; ``[sim:estimate=165]``: ``task_info.estimated_time`` says 165.
* ``[sim:fail=content_policy_violation]``: the task fails with that code; ``[sim:fail=service_error:1]``
  fails only the first task created with that marker.
* ``[sim:stay=processing]``: the task never ends.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from types import TracebackType

from evolink_provider.simulator.server import SimulatorServer, SimulatorState
from evolink_provider.simulator.tasks import RESULT_TTL, Clock, ManualClock, RealClock

__all__ = ["EvolinkSimulator", "ManualClock", "RealClock"]

DEFAULT_API_KEY = "sk-sim-local-demo-key"


class EvolinkSimulator:
    """The simulator in a background thread: ``with EvolinkSimulator(...) as sim: sim.base_url``."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        task_seconds: float = 3.0,
        media_dir: str | Path | None = None,
        credits: float = 100000.0,
        clock: Clock | None = None,
        extra_api_keys: list[str] | None = None,
        result_ttl_seconds: float = RESULT_TTL,
    ) -> None:
        media = Path(media_dir) if media_dir else Path(tempfile.gettempdir()) / "evolink-simulator-media"
        self.clock = clock or RealClock()
        self.state = SimulatorState(
            {api_key, *(extra_api_keys or [])}, self.clock, task_seconds, credits, media, result_ttl_seconds
        )
        self.server = SimulatorServer((host, port), self.state)
        self.base_url = f"http://{host}:{self.port}"
        self.state.base_url = self.base_url
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> EvolinkSimulator:
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="evolink-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def stats(self) -> dict[str, object]:
        return self.state.stats()

    def reset(self) -> None:
        self.state.reset()

    def __enter__(self) -> EvolinkSimulator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
