"""Twelfth red-team pass: the "last seen running" sighting (``seen_unfinished_at``), attacked.

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests.

* F1 (extra credits with ``regenerate_expired``; else the paid video undelivered), fixed: on Airflow 3.0-3.2
  the sighting was a *lower* bound of when the task completed, and ``link_expired`` used it (with
  ``created``) to *prove* expiry, which needs an upper bound. A triggerer restart rebuilt it from the
  deferral's kwargs; a wait longer than 24 h whose task completed during such a gap fired ``success`` with a
  sighting more than 24 h old, and one refused download of the minutes-old link was R27 (a second video
  bought) or R26. Now only a sighting of the task *completed* dates its links: the poll that read it so
  stamps its event (``completed_seen_at``), and without one no refusal counts as expired; the
  ``seen_unfinished_at`` kwarg is gone.

Held: a retry on 3.0-3.2 stamps its own first-seen-completed time (``Ledger.saw_completed``), so it never
judges a link expired, truly or not (``regenerate_expired`` does not fire there: the safe side, a clear
buys).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, RetryLaterError
from evolink_provider.sensors.evolink import EvolinkTaskSensor
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    run_trigger,
    task,
)
from tests.test_redteam10 import DAY, posts, refused_for, resume_context, resumed_operator


def retry_context(try_number: int) -> dict[str, Any]:
    found = resume_context(None)  # Airflow 3.0-3.2: no task_state_store
    found["ti"].try_number = try_number
    return found


# -- F1: a stale sighting (the deferral's, after a triggerer restart) "proves" a fresh link expired ----------


def test_f1_a_restarted_trigger_of_a_long_wait_buys_nothing_for_a_refused_fresh_link(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_for(hostile, 1)  # one CDN blip on a link minted minutes ago
    now = time.time()
    deferred_at = now - 30 * 3600  # a 48 h timeout; the queue held the task for 30 h
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(deferred_at) - 60}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    hostile.json("/v1/videos/generations", task(status="pending", created=int(now)))
    # The trigger row as the deferral wrote it (its in-memory sightings since were lost with the triggerer
    # that restarted); the task completed while no triggerer ran it, so the first poll reads it completed.
    trigger = EvolinkTaskTrigger(
        TASK_ID,
        evolink_conn_id="evolink_hostile",
        poll_interval=0.2,
        max_poll_interval=0.3,
        end_time=deferred_at + 48 * 3600,
        started_at=deferred_at - 60,
        first_poll_at=deferred_at + 600,
        not_before=deferred_at + 5,
    )
    events = run_trigger(trigger)
    assert [event["status"] for event in events] == ["success"]
    operator = resumed_operator(tmp_path, regenerate_expired=True, timeout=48 * 3600)
    with contextlib.suppress(EvolinkError, AirflowFailException, TaskDeferred):
        operator.execute_complete(resume_context(None), events[0])  # type: ignore[arg-type]
    assert posts(hostile) == 0, "a second generation was bought for a link refused once, minutes old"


@pytest.mark.parametrize("regenerate_expired", [False, True])
def test_the_trigger_s_sighting_a_day_old_proves_a_refused_link_expired(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    regenerate_expired: bool,
) -> None:
    """F1's counterpart on 3.0-3.2: the event's ``completed_seen_at`` is the upper bound that proves expiry.
    Read completed 26 h ago (the event waited that long for a worker): a refused link is R26, the try fails
    for good naming the way out, also with ``regenerate_expired`` (R27 needs a store: red-team 14 F3)."""
    refused_for(hostile, 10)
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 30 * 3600}
    hostile.json("/v1/videos/generations", task(status="pending", created=int(now)))
    event = {
        "status": "success",
        "evolink_task_id": TASK_ID,
        "task": done,
        "end_time": now + 600,
        "completed_seen_at": now - 26 * 3600,
    }
    operator = resumed_operator(tmp_path, regenerate_expired=regenerate_expired)
    with pytest.raises(AirflowFailException, match="expired"):
        operator.execute_complete(resume_context(None), event)  # type: ignore[arg-type]
    assert posts(hostile) == 0


# -- held: a retry after a refused fresh link -------------------------------------------------------------


@pytest.mark.parametrize("regenerate_expired", [False, True])
def test_the_retry_of_a_refused_fresh_link_keeps_it_fresh_and_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    regenerate_expired: bool,
) -> None:
    """3.0-3.2: the sighting is per try, but the retry (which resends the derived key) stamps its own
    first-seen-completed time, so the same refusal is R25 again, not R26/R27 by a two-day-old ``created``."""
    refused_for(hostile, 2)  # try 1's download and try 2's download are refused; the link is fresh
    old = int(time.time()) - 2 * DAY  # a server clock two days behind, or a long queue
    running = task(status="processing", progress=10, created=old)
    hostile.json("/v1/videos/generations", running)
    hostile.json(f"/v1/tasks/{TASK_ID}", running)
    kwargs: dict[str, Any] = {"poll_interval": 0.2, "max_poll_interval": 0.5}
    kwargs["regenerate_expired"] = regenerate_expired
    with pytest.raises(TaskDeferred) as deferred:
        resumed_operator(tmp_path, **kwargs).execute(retry_context(1))  # type: ignore[arg-type]
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": old}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    events = run_trigger(deferred.value.trigger)
    with pytest.raises(RetryLaterError):
        resumed_operator(tmp_path, **kwargs).execute_complete(retry_context(1), events[0])  # type: ignore[arg-type]
    # Try 2, the automatic retry: the derived key is replayed, EvoLink answers the same (completed) task.
    hostile.json("/v1/videos/generations", done)
    with pytest.raises(RetryLaterError):
        resumed_operator(tmp_path, **kwargs).execute(retry_context(2))  # type: ignore[arg-type]
    assert posts(hostile) == 2  # the submission and its replay: no second generation
    # Try 3: the link serves; the paid video is delivered.
    delivered = resumed_operator(tmp_path, **kwargs).execute(retry_context(3))  # type: ignore[arg-type]
    assert delivered["id"] == TASK_ID and delivered["files"]
    assert posts(hostile) == 3


# -- held --------------------------------------------------------------------------------------------------


def test_the_deferrals_kwargs_and_every_event_stay_plain_json(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The trigger table stores the kwargs as JSON and a rebuilt trigger is the same; the event's sighting is
    a float when the task read completed, absent otherwise."""
    running = task(status="processing", progress=10)
    hostile.json("/v1/videos/generations", running)
    hostile.json(f"/v1/tasks/{TASK_ID}", running)
    with pytest.raises(TaskDeferred) as deferred:
        resumed_operator(tmp_path, poll_interval=0.2, max_poll_interval=0.3).execute(retry_context(1))  # type: ignore[arg-type]
    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    path, kwargs = trigger.serialize()
    assert EvolinkTaskTrigger(**json.loads(json.dumps(kwargs))).serialize() == (path, kwargs)
    hostile.json(f"/v1/tasks/{TASK_ID}", {**running, "status": "failed", "error": {"code": "x"}})
    failed = run_trigger(trigger)
    assert failed and "completed_seen_at" not in failed[0]
    hostile.json(f"/v1/tasks/{TASK_ID}", completed(f"{hostile.url}/media/v.mp4"))
    before = time.time()
    done = run_trigger(EvolinkTaskTrigger(**json.loads(json.dumps(kwargs))))
    assert isinstance(done[0]["completed_seen_at"], float) and before <= done[0]["completed_seen_at"]
    json.dumps([*failed, *done])


def test_the_sensor_defers_and_reads_an_event_with_a_sighting(
    hostile: HostileServer,  # noqa: F811
) -> None:
    """The sensor's trigger stamps its event too; the extra key reaches no sensor path."""
    hostile.json(f"/v1/tasks/{TASK_ID}", task(status="processing", progress=10))
    sensor = EvolinkTaskSensor(
        task_id="watch",
        evolink_task_id=TASK_ID,
        evolink_conn_id="evolink_hostile",
        deferrable=True,
        poke_interval=0.2,
        timeout=60,
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({"ti": None})  # type: ignore[typeddict-item]
    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    hostile.json(f"/v1/tasks/{TASK_ID}", completed(f"{hostile.url}/media/v.mp4"))
    events = run_trigger(trigger)
    assert events[0]["status"] == "success" and events[0]["completed_seen_at"]
    assert sensor.execute_complete({}, events[0])["id"] == TASK_ID


def test_an_event_naming_another_task_with_a_fresh_sighting_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An event for another task (no record to check it against on 3.0-3.2) whose sighting is a time
    before that task's ``created``: ignored, the refusal is retryable, never a purchase."""
    refused_for(hostile, 1)
    old = int(time.time()) - 2 * DAY
    other = {**completed(f"{hostile.url}/media/v.mp4"), "id": "task-someone-else", "created": old}
    event = {
        "status": "success",
        "evolink_task_id": "task-someone-else",
        "task": other,
        "end_time": time.time() + 600,
        "completed_seen_at": float(old - 3 * DAY),
    }
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    with contextlib.suppress(EvolinkError, AirflowFailException):
        operator.execute_complete(resume_context(None), event)  # type: ignore[arg-type]
    assert posts(hostile) == 0
