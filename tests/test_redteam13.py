"""Thirteenth red-team pass: "only a sighting of the task completed proves a result link expired" (5abab90).

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests.

* F1 (a second video bought on a clear, or with ``regenerate_expired``; else the paid video ended for good
  on a retry; fixed by ``CLOCK_SKEW_ALLOWANCE``: a refusal proves expiry only an hour past the links' 24 h,
  so a skew under an hour costs only a later purchase): the proof compares two clocks. ``completed_seen_at``
  is stamped by whichever machine saw the task completed (a worker in ``saw_completed``, or the triggerer in
  its event) and judged with another worker's clock in ``link_expired`` (``now > first_seen_completed +
  RESULT_LINK_TTL``), with no margin. A sighting stamped by a clock behind by X makes every refusal in the
  last X of the links' life "proven expired": one CDN blip there is R28/R27 (a purchase) or R26 (fail for
  good). Worker-to-worker it is unbounded (the worker's own stamp is not checked against anything);
  triggerer-to-worker ``sighting_time`` bounds it by ``created`` only, so a generation that queued longer
  than the skew lets it through.

Held (plain tests below): odd, future and pre-``created`` event stamps are ignored (the try's own read
dates the links); ``created`` in the future, absent, in milliseconds or an ISO string lets no stamp through; a
stamp equal to ``created`` is taken; a 3.3 record from before ``completed_seen_at`` is dated by this
try; an event for another task changes no record; a new generation never inherits the old task's
sighting (new id or, on a hostile answer, the same id; with a store and without); 24 h and the clocks'
hour is the boundary (a sighting 24 h 59 m old is fresh, 25 h 01 m old is expired: R26 on a retry, R28
buys once on a clear);
``output_path=None`` and ``wait_for_completion=False`` download and buy nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, RetryLaterError
from evolink_provider.ledger import CLOCK_SKEW_ALLOWANCE, RESULT_LINK_TTL
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.records import STATE_KEY, SubmissionRecord
from evolink_provider.timing import steered
from tests.test_hostile import (
    MP4,
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    send,
    task,
)
from tests.test_ledger import MemoryStore
from tests.test_redteam10 import DAY, posts, refused_for, resume_context, resumed_operator

NEW_ID = "task-unified-1767225601-ffff0000"
KEY = "evl-" + "0" * 48


def store_with(**fields: Any) -> MemoryStore:
    """A 3.3 ``task_state_store`` holding the record of TASK_ID, paid by try sequence ``seq-3``."""
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp", 0, KEY, TASK_ID, "seq-3", **fields).as_stored())
    return store


def record_of(store: MemoryStore) -> SubmissionRecord:
    record = SubmissionRecord.from_stored(store.get(STATE_KEY))
    assert record is not None
    return record


def cleared(store: MemoryStore | None) -> dict[str, Any]:
    """The context of a clear: Airflow set ``max_tries = try_number + retries`` (another generation)."""
    found = resume_context(store)
    found["ti"].max_tries = 7
    found["ti"].try_number = 4
    return found


def media_paths(server: HostileServer) -> list[str]:
    return [path for _, path in server.requests if path.startswith("/media/")]


def success(done: dict[str, Any], at: Any = None) -> dict[str, Any]:
    event = {"status": "success", "task": done, "end_time": time.time() + 600}
    if at is not None:
        event["completed_seen_at"] = at
    return event


# -- F1: a sighting stamped by a clock behind "proves" a fresh link expired ---------------------------------


def test_f1_a_worker_clock_behind_makes_a_clear_buy_for_a_fresh_link(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Try 1 runs on worker A, whose clock is 10 min behind. It polls the task processing, then completed
    (it completed within the poll interval before that read, true time t0), and the first download is
    refused once (a CDN blip): R25, retryable; the record keeps A's stamp t0 - 10 min. The run is cleared
    23 h 55 min later on worker B (true clock): the links have at least 5 min left, and one more blip is
    no proof, yet B judges them expired (24 h 05 min by its clock) and pays for a new take (R28)."""
    refused_for(hostile, 2)
    t0 = time.time()
    running = task(status="processing", progress=90, created=int(t0) - 120)
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(t0) - 120}
    reads = iter([running])
    hostile.routes[f"/v1/tasks/{TASK_ID}"] = lambda handler: send(
        handler, 200, json.dumps(next(reads, done)).encode()
    )
    hostile.json("/v1/videos/generations", {**done, "id": NEW_ID, "results": [f"{hostile.url}/media/n.mp4"]})
    store = store_with()
    kwargs: dict[str, Any] = {"deferrable": False, "poll_interval": 0.2, "max_poll_interval": 0.3}
    skew = 600.0
    with steered(clock=lambda: time.time() - skew), pytest.raises(RetryLaterError):  # worker A
        resumed_operator(tmp_path, **kwargs).execute(resume_context(store))  # type: ignore[arg-type]
    stamped = record_of(store).completed_seen_at
    assert stamped is not None and stamped < t0 - skew + 5  # A's clock: 10 min before the true sighting
    later = 24 * 3600 - 300  # 23 h 55 min after the true sighting
    with steered(clock=lambda: time.time() + later), contextlib.suppress(EvolinkError, AirflowFailException):
        resumed_operator(tmp_path, **kwargs).execute(cleared(store))  # type: ignore[arg-type]  # worker B
    assert posts(hostile) == 0, "a second video was bought for a link with 5 min of its 24 h left"


def test_f1_a_triggerer_clock_behind_ends_a_retry_for_good_on_a_fresh_link(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The triggerer's clock is 10 min behind the workers'; the generation queued 30 min (``created`` is
    t0 - 30 min), so the stamp t0 - 10 min passes ``sighting_time``. The first try's download is refused
    once (R25); the record keeps the triggerer's stamp. A retry 23 h 55 min after the true sighting is
    refused once more: by the worker's clock 24 h 05 min, R26, the paid video ended for good."""
    refused_for(hostile, 2)
    t0 = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(t0) - 1800}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    store = store_with()
    with pytest.raises(RetryLaterError):
        resumed_operator(tmp_path).execute_complete(resume_context(store), success(done, t0 - 600))  # type: ignore[arg-type]
    assert record_of(store).completed_seen_at == t0 - 600
    retry = resume_context(store)
    retry["ti"].try_number = 2
    with steered(clock=lambda: time.time() + 24 * 3600 - 300), pytest.raises(EvolinkError) as raised:
        resumed_operator(tmp_path, deferrable=False).execute(retry)  # type: ignore[arg-type]
    assert not isinstance(raised.value, AirflowFailException)
    assert posts(hostile) == 0


# -- held: the event's stamp, attacked -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created", "at"),
    [
        pytest.param(-2 * DAY, 3600.0, id="triggerer-ahead-of-the-worker"),
        pytest.param(-2 * DAY, float(-2 * DAY - 1), id="one-second-before-created"),
        pytest.param(+DAY, -30 * 3600.0, id="created-in-the-future"),
        pytest.param(None, -30 * 3600.0, id="created-absent"),
        pytest.param("2026-01-01T00:00:00Z", -30 * 3600.0, id="created-iso-string"),
        pytest.param(-2.5 * DAY, -30 * 3600.0, id="created-not-integral"),
        pytest.param("ms", -30 * 3600.0, id="created-in-milliseconds"),
        pytest.param(-2 * DAY, True, id="bool"),
        pytest.param(-2 * DAY, math.nan, id="nan"),
        pytest.param(-2 * DAY, -math.inf, id="minus-inf"),
        pytest.param(-2 * DAY, "-108000", id="string"),
        pytest.param(-2 * DAY, 10**30, id="huge-int"),
        pytest.param(-2 * DAY, -(10**30), id="huge-negative-int"),
    ],
)
def test_an_odd_event_stamp_on_3_3_leaves_the_try_s_own_sighting(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    created: Any,
    at: Any,
) -> None:
    """Relative numbers are offsets from now. Whatever the stamp, the record is dated by this try's own
    read, and one refusal of the link is retryable, never a purchase, with ``regenerate_expired``."""
    refused_for(hostile, 1)
    now = time.time()
    done = completed(f"{hostile.url}/media/v.mp4")
    if created is None:
        done.pop("created")
    else:
        done["created"] = int(now + created) if isinstance(created, int) else created
    if isinstance(created, float):
        done["created"] = now + created + 0.5
    if created == "ms":
        done["created"] = int(now - 2 * DAY) * 1000
    stamp = now + at if type(at) is float and math.isfinite(at) else at
    store = store_with()
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    with pytest.raises(RetryLaterError):
        operator.execute_complete(resume_context(store), success(done, stamp))  # type: ignore[arg-type]
    seen = record_of(store).completed_seen_at
    assert seen is not None and now <= seen <= time.time()
    assert posts(hostile) == 0


def test_a_stamp_equal_to_created_is_taken_and_proves_expiry(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The control of the test above: a poll that read the task completed two days ago (a worker outage
    held the event) is proof; ``regenerate_expired`` buys exactly one new take (R27)."""
    refused_for(hostile, 1)
    created = int(time.time()) - 2 * DAY
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": created}
    new = {**completed(f"{hostile.url}/media/n.mp4"), "id": NEW_ID}
    hostile.json("/v1/videos/generations", new)
    store = store_with()
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    delivered = operator.execute_complete(resume_context(store), success(done, float(created)))  # type: ignore[arg-type]
    assert delivered["id"] == NEW_ID and delivered["files"]
    assert posts(hostile) == 1
    assert record_of(store).task_id == NEW_ID


# -- held: records ------------------------------------------------------------------------------------------


def test_a_record_from_before_completed_seen_at_is_dated_by_this_try(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A 3.3 record written before ``completed_seen_at`` existed, a task created two days ago, a clear
    (R28 territory) and one refusal: no sighting older than this try's, so R25 (0 POSTs)."""
    refused_for(hostile, 1)
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 2 * DAY}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    hostile.json("/v1/videos/generations", {**done, "id": NEW_ID})
    store = store_with()
    before = time.time()
    with pytest.raises(RetryLaterError):
        resumed_operator(tmp_path, deferrable=False).execute(cleared(store))  # type: ignore[arg-type]
    seen = record_of(store).completed_seen_at
    assert seen is not None and seen >= before
    assert posts(hostile) == 0


#: How old a sighting must be for a refusal to prove expiry: the links' 24 h and the clocks' allowance.
PROOF = RESULT_LINK_TTL + CLOCK_SKEW_ALLOWANCE


@pytest.mark.parametrize(
    ("age", "why", "posts_after"),
    [
        pytest.param(PROOF - 60, "retry", 0, id="24h59-retry"),
        pytest.param(PROOF - 60, "clear", 0, id="24h59-clear"),
        pytest.param(PROOF + 60, "retry", 0, id="25h01-retry-R26"),
        pytest.param(PROOF + 60, "clear", 1, id="25h01-clear-R28"),
    ],
)
def test_the_boundary_is_24_h_and_the_clock_allowance_after_the_recorded_sighting(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    age: float,
    why: str,
    posts_after: int,
) -> None:
    refused_for(hostile, 1)
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 3 * DAY}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    hostile.json("/v1/videos/generations", {**done, "id": NEW_ID, "results": [f"{hostile.url}/media/n.mp4"]})
    store = store_with(completed_seen_at=time.time() - age)
    context = cleared(store) if why == "clear" else resume_context(store)
    operator = resumed_operator(tmp_path, deferrable=False)
    if posts_after:
        assert operator.execute(context)["id"] == NEW_ID  # type: ignore[arg-type]
    elif age > PROOF:
        with pytest.raises(AirflowFailException, match="expired"):
            operator.execute(context)  # type: ignore[arg-type]
    else:
        with pytest.raises(RetryLaterError):
            operator.execute(context)  # type: ignore[arg-type]
    assert posts(hostile) == posts_after


def test_an_event_for_another_task_with_an_old_stamp_changes_no_record(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_for(hostile, 1)
    created = int(time.time()) - 3 * DAY
    other = {**completed(f"{hostile.url}/media/v.mp4"), "id": NEW_ID, "created": created}
    store = store_with()
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    with pytest.raises(RetryLaterError, match="recorded"):
        operator.execute_complete(resume_context(store), success(other, float(created + 60)))  # type: ignore[arg-type]
    assert record_of(store).completed_seen_at is None and record_of(store).task_id == TASK_ID
    assert posts(hostile) == 0 and media_paths(hostile) == []


# -- held: a new generation does not inherit the old task's sighting -----------------------------------------


@pytest.mark.parametrize("durable", [True, False], ids=["3.3", "3.0-3.2"])
@pytest.mark.parametrize("new_id", [NEW_ID, TASK_ID], ids=["new-id", "same-id"])
def test_a_new_generation_does_not_inherit_the_expired_sighting(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    durable: bool,
    new_id: str,
) -> None:
    """A truly expired take (its poll read it completed 30 h ago; the event waited out a worker outage) is
    regenerated once (R27). The new take's link is refused once too: that is R25, not a third purchase,
    also when EvoLink answers the POST with the old id. On 3.0-3.2 nothing is regenerated (R27 needs a
    store since red-team 14's F3: the try fails for good naming the clear)."""
    refused_for(hostile, 2)
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 2 * DAY}
    new = {**completed(f"{hostile.url}/media/n.mp4"), "id": new_id, "created": int(now)}
    hostile.json("/v1/videos/generations", new)
    hostile.json(f"/v1/tasks/{new_id}", new)
    store = store_with() if durable else None
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    with pytest.raises(RetryLaterError if durable else AirflowFailException):
        operator.execute_complete(resume_context(store), success(done, now - 30 * 3600))  # type: ignore[arg-type]
    assert posts(hostile) == (1 if durable else 0)
    if store is not None:
        record = record_of(store)
        assert record.task_id == new_id and record.completed_seen_at is not None
        assert record.completed_seen_at >= now


# -- held: paths that download nothing buy nothing ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["no-output-path", "no-wait"])
def test_paths_without_downloads_buy_nothing_for_an_old_sighting(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    refused_for(hostile, 5)
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 3 * DAY}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    hostile.json("/v1/videos/generations", {**done, "id": NEW_ID})
    store = store_with(completed_seen_at=time.time() - 2 * DAY)
    kwargs: dict[str, Any] = {"regenerate_expired": True, "deferrable": False, "retries": 3}
    if mode == "no-output-path":
        kwargs["output_path"] = None
    else:
        kwargs["output_path"] = str(tmp_path / "out")
        kwargs["wait_for_completion"] = False
    operator = EvolinkSeedanceTextToVideoOperator(
        task_id="generate", prompt="a paid prompt", duration=4, evolink_conn_id="evolink_hostile", **kwargs
    )
    assert operator.execute(cleared(store))["id"] == TASK_ID  # type: ignore[arg-type]
    assert posts(hostile) == 0 and media_paths(hostile) == []


def test_the_served_mp4_is_what_is_stored(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Sanity of the harness: after one refusal the same link serves, and the retry stores the bytes."""
    refused_for(hostile, 1)
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 3 * DAY}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    store = store_with()
    with pytest.raises(RetryLaterError):
        resumed_operator(tmp_path, deferrable=False).execute(resume_context(store))  # type: ignore[arg-type]
    delivered = resumed_operator(tmp_path, deferrable=False).execute(resume_context(store))  # type: ignore[arg-type]
    assert [Path(name).read_bytes() for name in delivered["files"]] == [MP4]
    assert posts(hostile) == 0
