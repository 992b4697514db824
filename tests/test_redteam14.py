"""Fourteenth red-team pass: sequences of tries on the money path (f540fcb).

Findings failed as ``xfail(strict=True)`` until fixed (each fix named after its finding); the attacks that
held are plain tests. Fixes: F1 the intent records the body sent and a resend sends it again; F2 the try
fails retryably; F3 without a store ``regenerate_expired`` is R26 (fail, naming the clear); F4 the warning
says what a clear does where it runs; F5 the generic types are accepted and the bytes decide.

* F1 (paid video ended for good): 3.3, only the intent recorded (the POST's answer lost), then the run
  cleared with its upload step: same bytes, new URL, same fingerprint; R03 resends the recorded key with
  the new body, EvoLink answers 409 ``idempotency_conflict``, ``fail_for`` makes it ``AirflowFailException``
  (the local-image twin of this case has its own message; this one has none). The intent records the key,
  not the body it was sent with.
* F2 (paid video ended for good): a task read ``completed`` with ``results: []`` through the in-try
  re-reads (about 4 s) ends with ``AirflowFailException`` in ``_finish``, though ``reread_empty`` calls that
  read-after-write lag no evidence and the next read has the video.
* F3 (opt-in purchase never made, no money lost): on 3.0-3.2 ``regenerate_expired`` after a deferral (R27)
  derives counter 0 again: the expired task's own key, so EvoLink replays it; the try and every retry fail
  retryably with nothing delivered.
* F4 (a second video): ``DEFER_RACE_WARNING`` tells every Airflow version that clearing collects the paid
  video without paying again; on 3.2 (the race is there, no ``task_state_store``) a clear is R14 and pays.
* F5 (paid video never delivered): an MP4 served as ``binary/octet-stream`` or ``application/mp4`` is
  refused by its type before its bytes are read, on every try and clear, until the links expire.

Held: one try buys at most one (R19 answered by an old, refused task: R25); a clear's R28 new take is
recorded alone (no old files, sighting or delivery) and its retry hands it over from storage (R08);
``reattach="never"`` resumed after a deferral buys nothing; a ``dag_run.conf`` list forces one take per
cleared map index and none on retries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError
from evolink_provider.operators.evolink import (
    EvolinkSeedanceTextToVideoOperator,
    EvolinkVideoGenerationOperator,
)
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
from tests.test_redteam10 import posts, refused_for, resume_context, resumed_operator
from tests.test_redteam11 import answers_in_turn
from tests.test_redteam13 import NEW_ID, cleared, record_of, store_with, success


def retry_of(store: MemoryStore | None, try_number: int = 2) -> dict[str, Any]:
    """An automatic retry of the try sequence ``seq-3`` (``store_with``'s record)."""
    found = resume_context(store)
    found["ti"].try_number = try_number
    return found


KEY = "evl-" + "7" * 48
SHA = "ab" * 32


def replaying_posts(server: HostileServer, answer: dict[str, Any], seen: dict[str, Any]) -> None:
    """EvoLink's Idempotency-Key: a key seen before with the same body replays ``answer``; with another
    body it is refused (409 ``idempotency_conflict``), as the simulator and EvoLink do."""

    def post(handler: Any) -> None:
        key = handler.headers.get("Idempotency-Key")
        body = json.loads(server.bodies[-1])
        if key in seen and seen[key] != body:
            raw = {"error": {"code": "idempotency_conflict", "message": "key used with another body"}}
            send(handler, 409, json.dumps(raw).encode())
            return
        seen.setdefault(key, body)
        send(handler, 200, json.dumps(answer).encode())

    server.routes["/v1/videos/generations"] = post


def image_operator(tmp_path: Path, url: str, **kwargs: Any) -> EvolinkVideoGenerationOperator:
    return EvolinkVideoGenerationOperator(
        task_id="generate",
        model="happyhorse-1.0-image-to-video",
        prompt="a paid prompt",
        image_urls=[{"file_url": url, "sha256": SHA, "source": "/dags/hero.png"}],
        evolink_conn_id="evolink_hostile",
        output_path=str(tmp_path / "out"),
        retries=3,
        deferrable=False,
        **kwargs,
    )


# -- F1: an intent resent after the upload step was cleared: 409, the paid task ended for good ------------


def test_f1_a_clear_of_the_upload_step_and_generation_after_a_lost_post_answer(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Try 1 (3.3) POSTed with the upload step's URL ``old``; EvoLink created TASK_ID and billed it, but the
    answer was lost (the hook's retries too): only the intent is recorded. The run is cleared, upload step
    included: same bytes, new URL (the operator's docstring promises that a clear of the upload step still
    reattaches). The clear resends the recorded key (R03) with the new URL: EvoLink refuses it (409
    ``idempotency_conflict``) and the try ends for good; the paid video is never delivered. Fixed: the intent
    records the body sent (``SubmissionRecord.payload``) and a resend sends that body again."""
    old, new = "https://files.evolink.ai/u/old.png", "https://files.evolink.ai/u/new.png"
    done = completed(f"{hostile.url}/media/v.mp4")
    hostile.file("/media/", MP4, "video/mp4")
    first = image_operator(tmp_path, old)
    seen = {KEY: first.validated_payload()}  # what EvoLink keeps of the lost POST
    replaying_posts(hostile, done, seen)
    store = MemoryStore()
    fingerprint = first.validated_request().fingerprint
    # Try 1's intent, as the ledger writes it before the POST: the key and the body sent with it.
    intent = SubmissionRecord(fingerprint, 0, KEY, None, "seq-3", payload=seen[KEY])
    store.set(STATE_KEY, intent.as_stored())
    again = image_operator(tmp_path, new)
    assert again.validated_request().fingerprint == fingerprint  # the same request, by the bytes' sha256
    try:
        result = again.execute(cleared(store))  # type: ignore[arg-type]
    except AirflowFailException as error:
        pytest.fail(f"the paid task was ended for good: {error}")
    except Exception:
        return
    assert result["id"] == TASK_ID and posts(hostile) == 1


# -- F2: a results list filled a few seconds after the status ends the paid task for good ----------------


def test_f2_results_filled_after_the_in_try_rereads_are_collected_by_the_retry(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A retry (3.3) reads its recorded task ``completed`` with ``results: []`` (EvoLink fills the list a
    moment after the status: the read-after-write lag ``Ledger.reread_empty`` names); the two re-reads
    inside the try (1 s, then 3 s by default) still see it empty, the next read would have the video.
    ``_finish`` raises ``AirflowFailException``: the billed task is ended for good on a lag of a few
    seconds, although its own docstring calls that lag no evidence and a retry would collect it. Fixed: the
    try fails retryably."""
    full = completed(f"{hostile.url}/media/v.mp4")
    empty = {**full, "results": []}
    answers_in_turn(hostile, f"/v1/tasks/{TASK_ID}", empty, empty, empty, full)
    hostile.file("/media/", MP4, "video/mp4")
    store = store_with()
    operator = resumed_operator(tmp_path, deferrable=False)
    with steered(reread_pause=0.01):
        try:
            operator.execute(retry_of(store))  # type: ignore[arg-type]
        except AirflowFailException as error:
            pytest.fail(f"the billed task was ended for good after a lag of seconds: {error}")
        except EvolinkError:
            pass  # retryable: the retry below collects it
        result = resumed_operator(tmp_path, deferrable=False).execute(retry_of(store))  # type: ignore[arg-type]
    assert result["id"] == TASK_ID and posts(hostile) == 0


# -- F3: on 3.0-3.2, regenerate_expired resends the expired task's own key ---------------------------------


def posted_keys(server: HostileServer) -> list[str]:
    return [
        headers.get("Idempotency-Key", "")
        for (method, path), headers in zip(server.requests, server.headers, strict=True)
        if method == "POST" and "generations" in path
    ]


def test_f3_regenerate_expired_without_a_store_buys_nothing_and_names_the_clear(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Airflow 3.0-3.2, deferrable, ``regenerate_expired=True``: try 1 POSTed the derived key K0 (request,
    generation, counter 0) and got TASK_ID; the trigger's event is processed 26 h after its poll read the
    task completed (a worker outage) and a link is refused: R27, the user opted in to a new generation.
    ``Ledger._submit`` has no record, so it derives counter 0 again: K0, which EvoLink answers with the
    expired TASK_ID, now recorded in memory as freshly seen: the refusal is R25 and the try fails
    retryably; every later retry resends K0 too (R15). The opted-in new take is never made, and the task
    instance runs out of retries with nothing delivered. (Red-team 12's test of this row answers every POST
    with a new task and never looks at the key.) Fixed: without a store R27 is R26 (any other key would be
    lost to the next retry, which resends K0): the try fails for good naming the clear, nothing POSTed."""
    from evolink_provider.records import idempotency_key, task_instance_identity, try_generation

    refused_for(hostile, 10)
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 30 * 3600}
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    ctx = resume_context(None)
    k0 = idempotency_key(
        task_instance_identity(ctx), operator.validated_request().fingerprint, 0, try_generation(ctx, "auto")
    )
    fresh = {**task(status="pending", created=int(now)), "id": NEW_ID}

    def post(handler: Any) -> None:  # EvoLink: a known key replays its task, a new one creates a task
        key = handler.headers.get("Idempotency-Key")
        send(handler, 200, json.dumps(done if key == k0 else fresh).encode())

    hostile.routes["/v1/videos/generations"] = post
    event = {**success(done, now - 26 * 3600), "evolink_task_id": TASK_ID}
    with pytest.raises(AirflowFailException, match="task_state_store"):
        operator.execute_complete(ctx, event)  # type: ignore[arg-type]
    assert posted_keys(hostile) == []


# -- F4: on 3.0-3.2 the defer-race warning tells a user to clear, and the clear pays again ---------------


def test_f4_the_defer_race_advice_says_what_a_clear_does_on_this_airflow(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """F4 (fixed): ``deferrable=True, retries=0`` logged on every Airflow version that clearing a task failed
    by the defer race "collects that video without paying again". The race is Airflow 3.2's too, and 3.2
    has no ``task_state_store``: the clear is another generation, another derived key (R14), a second
    video. The warning now says what a clear does where it runs (3.0-3.2: it pays; only a retry collects)."""
    from evolink_provider.operators.base import CLEAR_COLLECTS, CLEAR_PAYS

    hostile.json("/v1/videos/generations", task(status="processing", created=int(time.time())))
    hostile.json(f"/v1/tasks/{TASK_ID}", task(status="processing", created=int(time.time())))
    for store, said, unsaid in (
        (None, CLEAR_PAYS, CLEAR_COLLECTS),
        (MemoryStore(), CLEAR_COLLECTS, CLEAR_PAYS),
    ):
        capfd.readouterr()
        operator = EvolinkSeedanceTextToVideoOperator(
            task_id=f"generate_{'store' if store is not None else 'none'}",
            prompt="a paid prompt",
            duration=4,
            evolink_conn_id="evolink_hostile",
            output_path=str(tmp_path / "out"),
            retries=0,
            deferrable=True,
        )
        first = resume_context(store)
        first["ti"].max_tries, first["ti"].task = 0, type("T", (), {"retries": 0})()
        with pytest.raises(TaskDeferred):
            operator.execute(first)  # type: ignore[arg-type]
        text = " ".join(capfd.readouterr())
        assert said in text and unsaid not in text


# -- held ---------------------------------------------------------------------------------------------------


def test_one_try_buys_at_most_one_a_resubmission_whose_answer_is_old_and_refused(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """3.3 retry: the recorded task failed with a fixable code (R19, one purchase); EvoLink answers the POST
    with a task already completed, ``created`` two days back, and its link is refused. The new task's
    sighting is this try's read (R25): no second purchase in the same try."""
    old = int(time.time()) - 2 * 86400
    failed = task(status="failed", error={"code": "service_error", "message": "m"})
    hostile.json(f"/v1/tasks/{TASK_ID}", failed)
    fresh = {**completed(f"{hostile.url}/media/b.mp4", task_id=NEW_ID), "created": old}
    hostile.json("/v1/videos/generations", fresh)
    hostile.json(f"/v1/tasks/{NEW_ID}", fresh)
    refused_for(hostile, 10)
    store = store_with()
    with pytest.raises(EvolinkError, match="nothing proves"):
        resumed_operator(tmp_path, deferrable=False).execute(retry_of(store))  # type: ignore[arg-type]
    assert posts(hostile) == 1 and record_of(store).task_id == NEW_ID


def test_a_clear_s_new_take_is_recorded_alone_and_its_retry_hands_it_over(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """3.3: a clear finds the paid task's links expired (sighting two days old): R28 buys one new take,
    which is stored and recorded without any of the old task's bookkeeping (its stored files, sighting,
    delivery); the clear fails before delivery; its retry hands the new take over from storage (R08)."""
    now = time.time()
    expired = {**completed(f"{hostile.url}/media/a.mp4"), "created": int(now) - 3 * 86400}
    hostile.json(f"/v1/tasks/{TASK_ID}", expired)
    hostile.json("/v1/videos/generations", task(id=NEW_ID, status="processing", created=int(now)))
    take = {**completed(f"{hostile.url}/media/b.mp4", task_id=NEW_ID), "created": int(now)}
    hostile.json(f"/v1/tasks/{NEW_ID}", take)
    hostile.routes["/media/a.mp4"] = lambda handler: send(handler, 410, b"gone", content_type="text/plain")
    hostile.file("/media/b.mp4", MP4, "video/mp4")
    store = store_with(completed_seen_at=now - 2 * 86400)
    clear = cleared(store)
    result = resumed_operator(tmp_path, deferrable=False, poll_interval=0.1).execute(clear)  # type: ignore[arg-type]
    record = record_of(store)
    assert result["id"] == NEW_ID and posts(hostile) == 1
    assert (record.task_id, record.generation, record.delivered) == (NEW_ID, "seq-7", False)
    assert [item.name for item in record.stored] == [f"{NEW_ID}-0.mp4"] and record.results == 1
    assert record.completed_seen_at is not None and record.completed_seen_at >= now - 5
    retry = cleared(store)
    retry["ti"].try_number = 5
    again = resumed_operator(tmp_path, deferrable=False).execute(retry)  # type: ignore[arg-type]
    assert again["id"] == NEW_ID and again.get("files") and posts(hostile) == 1


def test_reattach_never_resumed_after_its_deferral_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``reattach="never"``: every try is its own generation (``try-<n>``), but the resumption of a deferred
    try is the same try: its event is collected, nothing submitted."""
    hostile.file("/media/", MP4, "video/mp4")
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp", 0, KEY, TASK_ID, "try-2").as_stored())
    done = completed(f"{hostile.url}/media/v.mp4")
    result = resumed_operator(tmp_path, reattach="never").execute_complete(  # type: ignore[arg-type]
        retry_of(store), {**success(done, time.time() - 5), "evolink_task_id": TASK_ID}
    )
    assert result["id"] == TASK_ID and posts(hostile) == 0


def test_a_conf_list_forces_one_take_per_cleared_map_index_and_none_on_retries() -> None:
    """``dag_run.conf {"evolink_regenerate": ["t"]}``: an automatic retry of a map index reads its paid
    task; a clear of map index 1 buys one take; that clear's retry reattaches to it; map index 0, not
    cleared, is untouched."""
    from types import SimpleNamespace

    from tests.test_ledger import FakeHook, make

    def ctx(store: MemoryStore, map_index: int, max_tries: int, try_number: int) -> dict[str, Any]:
        ti = SimpleNamespace(
            dag_id="d", task_id="t", run_id="r", map_index=map_index, try_number=try_number,
            max_tries=max_tries, task=SimpleNamespace(retries=2),
        )  # fmt: skip
        return {
            "ti": ti,
            "dag_run": SimpleNamespace(conf={"evolink_regenerate": ["t"]}),
            "task_state_store": store,
        }

    stores = {index: MemoryStore() for index in (0, 1)}
    for store in stores.values():
        store.set(STATE_KEY, SubmissionRecord("fp-1", 0, KEY, TASK_ID, "seq-2").as_stored())
    hook = FakeHook()
    make(hook, ctx(stores[1], 1, 2, 2)).start(None)  # a retry
    assert hook.keys == []
    make(hook, ctx(stores[1], 1, 5, 3)).start(None)  # the clear of index 1
    assert len(hook.keys) == 1
    make(hook, ctx(stores[1], 1, 5, 4)).start(None)  # that clear's retry
    assert len(hook.keys) == 1 and record_of(stores[1]).task_id != TASK_ID
    assert record_of(stores[0]).task_id == TASK_ID


# -- F5: a valid MP4 served under a benign generic type is never stored -----------------------------------


@pytest.mark.parametrize("served_as", ["binary/octet-stream", "application/mp4"])
def test_f5_a_valid_mp4_served_as_a_generic_type_is_delivered(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    served_as: str,
) -> None:
    """F5 (fixed: those types are accepted, the bytes decide). The result is a valid MP4 by its bytes
    (``result_extension`` reads them, and names the file by them), served as S3's default type for an
    object stored without one (``binary/octet-stream``) or as RFC 4337's ``application/mp4``.
    ``_store_one`` refuses any type but ``video/*``, ``image/*`` and ``application/octet-stream`` before
    looking at the bytes: ``EvolinkServedContentError``, retryable, so every retry and every clear reads
    the paid task and refuses it again, and after 24 h the links expire: the paid video is never
    delivered, though nothing about it is wrong."""
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.storage import store_results

    hostile.file("/media/", MP4, served_as)
    stored = store_results(
        EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v"), str(tmp_path / "out")
    )
    assert [Path(path).name for path in stored] == [f"{TASK_ID}-0.mp4"]
