"""Eleventh red-team pass: the changes of red-team 10's fixes, attacked.

Its findings, F1-F1d, failed as ``xfail(strict=True)`` until fixed (the sighting now reaches the trigger as a
kwarg, rides on every event, and the worker's own wait records it); the attacks that held are plain tests.

* F1 (paid video undelivered): without ``task_state_store`` (3.0-3.2), a deferred task whose trigger's
  first poll already reads it completed (the poll schedule aims that poll at the expected end; a triggerer
  restart starts the sightings over) fires ``seen_unfinished_at: None``, although the operator deferred it
  *because* it had just read it running. ``execute_complete`` then judges one refused fresh link by the
  server's ``created`` (a clock behind, or a long queue): R26, the try fails for good.
* F1b (paid video undelivered): the same when the trigger saw the task running and then read it completed
  without results yet: its ``failed`` event carries no ``seen_unfinished_at`` at all.
* F1c (extra credits): F1 with ``regenerate_expired=True`` is R27: a new generation is POSTed for a video
  whose link was refused once and is still deliverable.
* F1d (paid video undelivered): after an ``error`` event (a poll 404) ``execute_complete`` re-reads the task
  and waits on the worker; ``_wait_here`` records no sighting, so the same R26.

One root: on 3.0-3.2 a sighting of the task running reaches ``link_expired`` only from the trigger's own
polls of one triggerer run, and only on its ``success`` event. Red-team 12 showed that such a sighting can
never prove expiry (it is a lower bound of completion): since its fix the events carry when a poll read the
task *completed* (``completed_seen_at``), and without a sighting of it completed no link counts as expired.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    run_trigger,
    task,
)
from tests.test_redteam10 import DAY, posts, refused_once_then_served, resume_context, resumed_operator

# -- F1: the operator's own sighting of the running task is not handed to its trigger ------------------------


def test_f1_a_deferral_whose_first_poll_reads_completed_fails_a_refused_fresh_link_retryably(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_once_then_served(hostile)
    old = int(time.time()) - 2 * DAY  # a server clock two days behind, or a generation queued that long
    running = task(status="processing", progress=10, created=old)
    hostile.json("/v1/videos/generations", running)
    hostile.json(f"/v1/tasks/{TASK_ID}", running)
    operator = resumed_operator(tmp_path, poll_interval=0.2, max_poll_interval=0.5)

    with pytest.raises(TaskDeferred) as deferred:  # the operator read the task running, then deferred
        operator.execute(resume_context(None))  # type: ignore[arg-type]
    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    # It completes before the trigger's first poll (aimed at the expected end) reads it.
    hostile.json(f"/v1/tasks/{TASK_ID}", {**completed(f"{hostile.url}/media/v.mp4"), "created": old})
    events = run_trigger(trigger)
    assert [event["status"] for event in events] == ["success"]

    resumed = resumed_operator(tmp_path, poll_interval=0.2, max_poll_interval=0.5)  # a new worker process
    try:
        resumed.execute_complete(resume_context(None), events[0])  # type: ignore[arg-type]
    except AirflowFailException:
        raise
    except EvolinkError:
        pass  # retryable: the retry downloads it (the link answers 200 then)
    assert posts(hostile) == 1


def answers_in_turn(server: HostileServer, path: str, *bodies: dict[str, Any]) -> None:
    """``path`` answers each body in turn, then the last one for good."""
    from tests.test_hostile import send

    queue = list(bodies)

    def respond(handler: Any) -> None:
        body = queue.pop(0) if len(queue) > 1 else queue[0]
        send(handler, 200, json.dumps(body).encode())

    server.routes[path] = respond


def test_f1b_a_completed_empty_event_after_running_polls_fails_a_refused_fresh_link_retryably(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_once_then_served(hostile)
    old = int(time.time()) - 2 * DAY
    full = {**completed(f"{hostile.url}/media/v.mp4"), "created": old}
    empty = {**full, "results": []}
    running = task(status="processing", progress=50, created=old)
    answers_in_turn(hostile, f"/v1/tasks/{TASK_ID}", running, running, empty, full)
    trigger = EvolinkTaskTrigger(
        TASK_ID,
        evolink_conn_id="evolink_hostile",
        poll_interval=0.2,
        max_poll_interval=0.3,
        end_time=time.time() + 600,
        started_at=time.time() - 30,
    )
    events = run_trigger(trigger)
    assert [(event["status"], event["task"]["status"]) for event in events] == [("failed", "completed")]

    operator = resumed_operator(tmp_path)
    try:
        operator.execute_complete(resume_context(None), events[0])  # type: ignore[arg-type]
    except AirflowFailException:
        raise
    except EvolinkError:
        pass  # retryable
    assert posts(hostile) == 0


def test_f1c_with_regenerate_expired_a_refused_fresh_link_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_once_then_served(hostile)
    old = int(time.time()) - 2 * DAY
    running = task(status="processing", progress=10, created=old)
    hostile.json("/v1/videos/generations", running)
    hostile.json(f"/v1/tasks/{TASK_ID}", running)
    kwargs: dict[str, Any] = {"poll_interval": 0.2, "max_poll_interval": 0.5, "regenerate_expired": True}
    with pytest.raises(TaskDeferred) as deferred:
        resumed_operator(tmp_path, **kwargs).execute(resume_context(None))  # type: ignore[arg-type]
    hostile.json(f"/v1/tasks/{TASK_ID}", {**completed(f"{hostile.url}/media/v.mp4"), "created": old})
    events = run_trigger(deferred.value.trigger)  # type: ignore[arg-type]
    assert posts(hostile) == 1

    resumed = resumed_operator(tmp_path, **kwargs)
    # Retryable is right; the new generation's own wait may also end the try.
    with contextlib.suppress(EvolinkError, AirflowFailException, TaskDeferred):
        resumed.execute_complete(resume_context(None), events[0])  # type: ignore[arg-type]
    assert posts(hostile) == 1, "a second generation was bought for a link refused once"


def test_f1d_a_wait_on_the_worker_after_an_error_event_fails_a_refused_fresh_link_retryably(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_once_then_served(hostile)
    old = int(time.time()) - 2 * DAY
    full = {**completed(f"{hostile.url}/media/v.mp4"), "created": old}
    running = task(status="processing", progress=50, created=old)
    answers_in_turn(hostile, f"/v1/tasks/{TASK_ID}", running, running, full)
    event = {
        "status": "error",
        "message": "EvoLink GET /v1/tasks/... answered HTTP 404",
        "retryable": False,
        "evolink_task_id": TASK_ID,
        "end_time": time.time() + 600,
    }
    operator = resumed_operator(tmp_path, deferrable=False, poll_interval=0.2, max_poll_interval=0.3)
    try:
        operator.execute_complete(resume_context(None), event)  # type: ignore[arg-type]
    except AirflowFailException:
        raise
    except EvolinkError:
        pass  # retryable
    assert posts(hostile) == 0


# -- held: a retry whose local input is gone never submits without, or around, the input's refusal -----------


@pytest.mark.parametrize("forced", [{"reattach": "never"}, {"regenerate": True}])
def test_a_forced_take_whose_local_image_is_gone_buys_and_uploads_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forced: dict[str, Any],
) -> None:
    """A clear with regenerate, or reattach="never" (R13), submits, and a submission needs the request:
    the input's refusal stands (no POST, no upload)."""
    from evolink_provider.operators.evolink import EvolinkHappyHorseReferenceToVideoOperator
    from evolink_provider.records import STATE_KEY, SubmissionRecord
    from tests.test_hostile import set_connection
    from tests.test_ledger import MemoryStore
    from tests.test_redteam10 import HERO_PNG

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = inputs / "hero.png"
    image.write_bytes(HERO_PNG.read_bytes())
    set_connection(monkeypatch, "evolink_hostile", hostile.url, upload_allowed_dirs=[str(inputs)])
    hostile.json(f"/v1/tasks/{TASK_ID}", completed(f"{hostile.url}/media/v.mp4"))
    hostile.json("/v1/videos/generations", {"id": "task-unified-1-second", "status": "pending"})
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-try-1", 0, "evl-" + "0" * 48, TASK_ID, "seq-3").as_stored())
    operator = EvolinkHappyHorseReferenceToVideoOperator(
        task_id="generate",
        prompt="character1 waves",
        duration=3,
        image_urls=[str(image)],
        evolink_conn_id="evolink_hostile",
        retries=3,
        **forced,
    )
    image.unlink()
    ctx = resume_context(store)
    ctx["ti"].try_number, ctx["ti"].max_tries = 5, 7  # a clear (another generation): regenerate forces it

    with pytest.raises(AirflowFailException):
        operator.execute(ctx)  # type: ignore[arg-type]
    assert posts(hostile) == 0
    assert not any("/files/" in path or "/media/" in path for _, path in hostile.requests)


# -- held: a hostile or stale completed_seen_at neither crashes nor makes a fresh link look expired ---------


@pytest.mark.parametrize(
    "value", ["1700000000", True, math.nan, math.inf, -math.inf, -1e18, -1e308, [1.0], {"at": 1.0}, None]
)
def test_a_garbage_completed_seen_at_is_ignored(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    value: Any,
) -> None:
    """Junk, or a time before the task's ``created`` (another task's, a forged row), stands for nothing:
    the refusal of a minute-old link is retryable, never a purchase, even with ``regenerate_expired``."""
    refused_once_then_served(hostile)
    task_now = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 60}
    event = {"status": "success", "task": task_now, "end_time": time.time() + 600, "completed_seen_at": value}
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    with pytest.raises(EvolinkError) as raised:
        operator.execute_complete(resume_context(None), event)  # type: ignore[arg-type]
    assert not isinstance(raised.value, AirflowFailException) and posts(hostile) == 0


# -- held: the result host's odd answers end the try retryably, bounded, and buy nothing --------------------


def test_a_redirect_loop_on_the_result_host_ends_retryably_after_bounded_hops(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.storage import store_results
    from tests.test_hostile import send

    hostile.routes["/media/"] = lambda handler: send(
        handler, 302, b"", content_type="text/plain", headers={"Location": "/media/v.mp4?again=1"}
    )
    with pytest.raises(EvolinkError) as raised:
        store_results(
            EvolinkHook("evolink_hostile"),
            completed(f"{hostile.url}/media/v.mp4"),
            str(tmp_path),
            time.time() + 30,
        )
    assert raised.value.retryable and not isinstance(raised.value, AirflowFailException)
    gets = [path for method, path in hostile.requests if method == "GET" and path.startswith("/media/")]
    assert 6 <= len(gets) <= 12, len(gets)
    assert posts(hostile) == 0


@pytest.mark.parametrize("retry_after", ["100000", "inf", "nan", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_result_host_retry_after_never_outlasts_the_deadline(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    retry_after: str,
) -> None:
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.storage import store_results
    from tests.test_hostile import send, set_connection

    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=5)
    hostile.routes["/media/"] = lambda handler: send(
        handler, 429, b"slow down", content_type="text/plain", headers={"Retry-After": retry_after}
    )
    began = time.monotonic()
    with pytest.raises(EvolinkError) as raised:
        store_results(
            EvolinkHook("evolink_hostile"),
            completed(f"{hostile.url}/media/v.mp4"),
            str(tmp_path),
            time.time() + 2,
        )
    assert raised.value.retryable and time.monotonic() - began < 4
