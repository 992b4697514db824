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
* ``POST /_simulator/task_ids`` ``{"ids": [...]}``: the next created tasks take these ids, in order (the
  shapes EvoLink's docs show, ``task-unified-1774857405-abc123``, or answered, ``task-happyhorse-...``).
* ``POST /_simulator/key_failures`` ``{"api_key", "code"}``: every task of that key fails with ``code``.
* ``POST /_simulator/files_quota`` ``{"max_files": 3}``: the Files API quota (default 100) until reset.
* ``POST /_simulator/clock`` ``{"advance": s}``: move a :class:`ManualClock`.
* ``POST /_simulator/credits`` ``{"remaining": 12.5, "key_remaining": 3, "key_unlimited": false}``: the
  account's balance, the keys' own quota (``token.remaining_credits``) or none (``token.unlimited_credits``),
  each optional, reported by ``GET /v1/credits`` and enforced (402) from now on; ``reset`` restores
  ``--credits`` and keys without a quota.

Prompt markers (for sora-character, in the ``video_url`` instead):

* ``[sim:seconds=12]``: the task takes 12 s; ``[sim:estimate=165]``: ``task_info.estimated_time`` says 165.
* ``[sim:fail=content_policy_violation]``: the task fails with that code; ``[sim:fail=service_error:1]``
  fails only the first task created with that marker.
* ``[sim:stay=processing]``: the task never ends.
* ``[sim:fail=none]``: the task fails without an ``error`` object. ``[sim:cancel=request_cancelled]`` /
  ``[sim:cancel=none]``: the task ends ``cancelled`` with that error code / without an error.
* ``[sim:results=3]``: a completed video task lists 3 results (``video.mp4``, ``video-1.mp4``, ...).
* ``[sim:output=result_data_list]`` / ``result_data_object`` / ``none``: the completed task lists its
  video in ``result_data[].video_url`` / ``result_data.video_url`` (``results`` empty), or nowhere.
* ``[sim:reject=CODE]`` (``CODE:N``: the first N submissions only): the submission is refused with that
  gateway code and its status: ``invalid_token`` (an OAuth-shaped 401), ``token_daily_quota_exceeded`` /
  ``insufficient_quota`` (402), ``paid_outcome_unknown`` (409, after the task *was* created: only the
  same Idempotency-Key finds it), ``channel_selection_failed`` and other channel codes (400), ...

Marker counts (``:N``) live until ``reset``. Fault rules take ``code`` too, and a ``refused`` kind
answers HTTP 200 ``{"success": false, "code", "msg"}`` as the credits and Files API endpoints do.

``time_scale`` (``--time-scale``) multiplies every task's run time, the default and the marked ones, and
the ``estimated_time`` that goes with it (at least 1 s), so that a test suite runs the same scenarios
faster (``0.5``: a ``[sim:seconds=12]`` task takes 6 s and says so). ``task_estimate`` is the
``estimated_time`` of a task with neither marker (default: its run time): EvoLink's estimates are rough,
and a test suite gives its short default task a longer one so that a deferrable operator defers it.

With ``tls=True`` (``--tls``) it serves HTTPS with a throwaway self-signed certificate, so that the cost of
new connections can be measured as clients of the real, HTTPS-only API pay it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from evolink_provider.simulator.server import SimulatorServer, SimulatorState
from evolink_provider.simulator.tasks import RESULT_TTL, Clock, ManualClock, RealClock
from evolink_provider.simulator.tls import server_context, write_self_signed_certificate

__all__ = ["EvolinkSimulator", "ManualClock", "RealClock"]

DEFAULT_API_KEY = "sk-sim-local-demo-key"

log = logging.getLogger(__name__)


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
        tls: bool = False,
        time_scale: float = 1.0,
        task_estimate: float | None = None,
    ) -> None:
        media = Path(media_dir) if media_dir else Path(tempfile.gettempdir()) / "evolink-simulator-media"
        self.clock = clock or RealClock()
        self.state = SimulatorState(
            {api_key, *(extra_api_keys or [])},
            self.clock,
            task_seconds,
            credits,
            media,
            result_ttl_seconds,
            time_scale,
            task_estimate,
        )
        #: With ``tls``, the self-signed certificate clients must trust (``REQUESTS_CA_BUNDLE``).
        self.certificate: Path | None = None
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        context = None
        if tls:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="evolink-simulator-tls-")
            self.certificate, key = write_self_signed_certificate(Path(self._tls_dir.name), host)
            context = server_context(self.certificate, key)
        self.server = SimulatorServer((host, port), self.state, context)
        self.base_url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self.state.base_url = self.base_url
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> EvolinkSimulator:
        log.info("EvoLink simulator on %s: %s", self.base_url, self.state.media.describe())
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="evolink-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

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
