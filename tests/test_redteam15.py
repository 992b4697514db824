"""Fifteenth red-team pass: red-team 14's fixes (02e99c8) attacked first, then what they missed.

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests. Fixes: F1 a
new key after a replayed failure goes with the request as rendered now, not the recorded body; F2 the
completed-empty message says what a clear does where it runs (3.0-3.2: it pays).

* F1 (a fresh creation with a stale body; the try ended for good): a resend of the recorded key sends the
  recorded body (red-team 14's F1), and when EvoLink answers it with a replayed failure that a resubmission
  can fix (R22), ``Ledger._submit`` loops with counter + 1 *keeping that body*: a brand-new key, so EvoLink
  creates a task from the recorded image URLs, not from the request as rendered now (a cleared upload
  step's fresh URLs) nor from uploads held to ``UPLOAD_REUSE_MARGIN``. A clear days later sends Files API
  URLs past their 72 h: EvoLink fails the new task ``image_processing_error``, an unfixable code, so the
  try ends with ``AirflowFailException`` and every later clear is R21.
* F2 (a second video, by the advice): on Airflow 3.0-3.2 a task read completed without results now fails
  retryably saying "A retry (or a plain clear) reads the same paid task again"; there a plain clear is
  another generation, another derived key (R14): it buys a second video and never reads the first.

Held: R04 with a recorded body still fails, nothing POSTed; R13 forced sends the new request's body under a
new key; an older record without a body, or with a body that is not an object, resends the key with a body
built now; the recorded body of a replayed key reaches EvoLink as recorded; a completed-empty task fails
retryably and buys nothing on 3.3 (retry, plain clear) and on 3.0-3.2 (a retry resends the same key); the
sensor treats it as retryable; 3.0-3.2 ``regenerate_expired`` with ``reattach="never"`` fails naming the
store and POSTs nothing; 3.0-3.2 ``regenerate=True`` on an automatic retry resends the first key; HTML,
JSON, SVG and script served as ``binary/octet-stream`` or ``application/mp4`` are refused by their bytes,
retryably, leaving nothing in the folder.
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
from evolink_provider.records import (
    STATE_KEY,
    SubmissionRecord,
    idempotency_key,
    task_instance_identity,
    try_generation,
)
from evolink_provider.timing import steered
from tests.test_hostile import (
    HTML,
    MP4,
    TASK_ID,
    HostileServer,
    completed,
    files_under,
    hostile,  # noqa: F401 - the fixture
    send,
    task,
)
from tests.test_ledger import MemoryStore
from tests.test_redteam10 import posts, resume_context, resumed_operator
from tests.test_redteam12 import retry_context
from tests.test_redteam13 import NEW_ID, cleared, record_of, success
from tests.test_redteam14 import KEY, image_operator, posted_keys

OLD_URL = "https://files.evolink.ai/u/old.png"
NEW_URL = "https://files.evolink.ai/u/new.png"


def post_bodies(server: HostileServer) -> list[dict[str, Any]]:
    return [
        json.loads(body)
        for (method, path), body in zip(server.requests, server.bodies, strict=True)
        if method == "POST" and "generations" in path
    ]


def intent_store(fingerprint: str, payload: Any, generation: str = "seq-3") -> MemoryStore:
    """3.3: only the intent of an earlier try recorded (its POST's answer lost), with ``payload``."""
    store = MemoryStore()
    value = SubmissionRecord(fingerprint, 0, KEY, None, generation).as_stored()
    if payload is not None:
        value["payload"] = payload
    store.set(STATE_KEY, value)
    return store


# -- F1: a replayed fixable failure is followed by a NEW key carrying the recorded (stale) body -------------


def test_held_a_replay_of_the_recorded_key_goes_with_the_recorded_body(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Red-team 14's F1 fix, on a plain retry (R02): the recorded key goes with the body recorded with it."""
    hostile.file("/media/", MP4, "video/mp4")
    hostile.json("/v1/videos/generations", completed(f"{hostile.url}/media/v.mp4"))
    old = image_operator(tmp_path, OLD_URL)
    store = intent_store(old.validated_request().fingerprint, old.validated_payload())
    ctx = resume_context(store)
    ctx["ti"].try_number = 2
    result = image_operator(tmp_path, NEW_URL).execute(ctx)  # type: ignore[arg-type]
    assert result["id"] == TASK_ID and posted_keys(hostile) == [KEY]
    assert post_bodies(hostile)[0]["image_urls"] == [OLD_URL]


def test_f1_the_new_key_after_a_replayed_failure_carries_the_request_as_rendered_now(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """3.3. Try 1 (day 0) POSTed key K0 with the upload step's URL ``old``; the answer was lost, only the
    intent (with its body) is recorded; EvoLink's task A later failed ``service_error`` (fixable). Days
    later the run is cleared, upload step included: same bytes, URL ``new`` (``old`` is past its 72 h).
    R03 resends K0 with the recorded body (right: a replay must match) and EvoLink replays A's failure:
    R22, a fresh key K1. K1 is a creation, yet ``_submit`` keeps ``payload`` across its ``continue`` and
    POSTs the recorded body: EvoLink fetches ``old``, fails the new task ``image_processing_error``
    (unfixable), and the clear ends with ``AirflowFailException``; every later clear is R21. The request
    as rendered now (``new``) would have been delivered."""
    failed_a = task(status="failed", error={"code": "service_error", "message": "upstream"})
    fresh = task(id=NEW_ID, status="processing", created=int(time.time()))
    bodies: list[dict[str, Any]] = []

    def post(handler: Any) -> None:
        body = json.loads(hostile.bodies[-1])
        if handler.headers.get("Idempotency-Key") == KEY:  # a replay does not fetch anything
            send(handler, 200, json.dumps(failed_a).encode())
            return
        bodies.append(body)
        send(handler, 200, json.dumps(fresh).encode())

    def read_new(handler: Any) -> None:  # EvoLink fetches the images of the task it created
        if bodies and bodies[-1].get("image_urls") == [OLD_URL]:
            error = {"code": "image_processing_error", "message": "x"}
            answer = {**fresh, "status": "failed", "error": error}
        else:
            answer = {**completed(f"{hostile.url}/media/n.mp4", task_id=NEW_ID), "created": fresh["created"]}
        send(handler, 200, json.dumps(answer).encode())

    hostile.routes["/v1/videos/generations"] = post
    hostile.routes[f"/v1/tasks/{NEW_ID}"] = read_new
    hostile.file("/media/", MP4, "video/mp4")
    old = image_operator(tmp_path, OLD_URL, poll_interval=0.1, max_poll_interval=0.2)
    store = intent_store(old.validated_request().fingerprint, old.validated_payload())
    again = image_operator(tmp_path, NEW_URL, poll_interval=0.1, max_poll_interval=0.2)
    try:
        result = again.execute(cleared(store))  # type: ignore[arg-type]
    except AirflowFailException as error:
        pytest.fail(f"the clear ended for good after sending the stale body under a new key: {error}")
    assert [body["image_urls"] for body in bodies] == [[NEW_URL]]
    assert result["id"] == NEW_ID


def test_held_r04_with_a_recorded_body_still_fails_and_posts_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    old = resumed_operator(tmp_path, deferrable=False)
    store = intent_store(old.validated_request().fingerprint, old.validated_payload())
    changed = resumed_operator(tmp_path, deferrable=False)
    changed.prompt = "another prompt"  # type: ignore[attr-defined]
    assert changed.validated_request().fingerprint != old.validated_request().fingerprint
    for ctx in (resume_context(store), cleared(store)):
        with pytest.raises(AirflowFailException, match="outcome is unknown"):
            changed.execute(ctx)  # type: ignore[arg-type]
    assert posts(hostile) == 0


def test_held_r13_forced_sends_the_new_request_not_the_recorded_body(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.file("/media/", MP4, "video/mp4")
    hostile.json("/v1/videos/generations", completed(f"{hostile.url}/media/v.mp4", task_id=NEW_ID))
    old = resumed_operator(tmp_path, deferrable=False)
    store = intent_store(old.validated_request().fingerprint, old.validated_payload())
    forced = resumed_operator(tmp_path, deferrable=False, regenerate=True)
    forced.prompt = "the new prompt"  # type: ignore[attr-defined]
    result = forced.execute(cleared(store))  # type: ignore[arg-type]
    assert result["id"] == NEW_ID and posts(hostile) == 1
    assert post_bodies(hostile)[0]["prompt"] == "the new prompt"
    assert posted_keys(hostile) != [KEY]
    assert record_of(store).payload == post_bodies(hostile)[0]


@pytest.mark.parametrize("recorded", [None, "not-a-dict", ["a", "list"], 7])
def test_held_a_record_without_a_usable_body_resends_the_key_with_a_body_built_now(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    recorded: Any,
) -> None:
    hostile.file("/media/", MP4, "video/mp4")
    hostile.json("/v1/videos/generations", completed(f"{hostile.url}/media/v.mp4"))
    operator = resumed_operator(tmp_path, deferrable=False)
    store = intent_store(operator.validated_request().fingerprint, recorded)
    ctx = resume_context(store)
    ctx["ti"].try_number = 2
    result = operator.execute(ctx)  # type: ignore[arg-type]
    assert result["id"] == TASK_ID and posted_keys(hostile) == [KEY]
    assert post_bodies(hostile) == [operator.validated_payload()]


# -- F2: completed with no results: retryable, buys nothing; the advice on 3.0-3.2 -------------------------


def empty_task() -> dict[str, Any]:
    return {**completed(), "results": [], "created": int(time.time())}


def test_held_completed_empty_with_a_store_fails_retryably_on_retries_and_plain_clears(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.json(f"/v1/tasks/{TASK_ID}", empty_task())
    hostile.json("/v1/videos/generations", task(id=NEW_ID, status="processing"))
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp", 0, KEY, TASK_ID, "seq-3").as_stored())
    with steered(reread_pause=0.01):
        for ctx in (resume_context(store), cleared(store), cleared(store)):
            with pytest.raises(RetryLaterError):
                resumed_operator(tmp_path, deferrable=False).execute(ctx)  # type: ignore[arg-type]
    assert posts(hostile) == 0 and record_of(store).completed_seen_at is not None


def test_held_completed_empty_without_a_store_retry_resends_the_same_key(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.json("/v1/videos/generations", empty_task())
    hostile.json(f"/v1/tasks/{TASK_ID}", empty_task())
    with steered(reread_pause=0.01):
        for try_number in (1, 2, 3):
            with pytest.raises(RetryLaterError):
                resumed_operator(tmp_path, deferrable=False).execute(retry_context(try_number))  # type: ignore[arg-type]
    keys = posted_keys(hostile)
    assert len(keys) == 3 and len(set(keys)) == 1  # one key: EvoLink replays, nothing more is bought


def test_held_the_sensor_treats_completed_empty_as_retryable(
    hostile: HostileServer,  # noqa: F811
) -> None:
    from evolink_provider.sensors.evolink import EvolinkTaskSensor

    hostile.json(f"/v1/tasks/{TASK_ID}", empty_task())
    sensor = EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, evolink_conn_id="evolink_hostile")
    with pytest.raises(EvolinkError) as raised:
        sensor.poke({})  # type: ignore[arg-type]
    assert raised.value.retryable and not isinstance(raised.value, AirflowFailException)


def test_f2_the_completed_empty_advice_matches_what_a_clear_does_without_a_store(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Airflow 3.0-3.2: the paid task reads completed with no results through the re-reads (a list filled
    late). The try fails retryably saying a plain clear reads the same paid task again. The user clears
    (say after the retries ran out): another generation, another derived key: a second video is bought
    and the first, filled in meanwhile, is never read."""
    hostile.json("/v1/videos/generations", empty_task())
    hostile.json(f"/v1/tasks/{TASK_ID}", empty_task())
    with steered(reread_pause=0.01), pytest.raises(RetryLaterError) as raised:
        resumed_operator(tmp_path, deferrable=False).execute(retry_context(1))  # type: ignore[arg-type]
    advice = str(raised.value)
    hostile.json("/v1/videos/generations", task(id=NEW_ID, status="processing"))
    first = posted_keys(hostile)
    with steered(reread_pause=0.01), pytest.raises(EvolinkError):
        resumed_operator(tmp_path, deferrable=False, timeout=0.5, poll_interval=0.1).execute(cleared(None))  # type: ignore[arg-type]
    clear_bought = posted_keys(hostile)[len(first) :] != first
    assert not ("plain clear) reads the same paid task" in advice and clear_bought), advice


# -- F3: 3.0-3.2, regenerate_expired / reattach="never" / regenerate ---------------------------------------


def test_held_no_store_reattach_never_on_expiry_buys_one_forced_take(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.routes["/media/"] = lambda handler: send(handler, 410, b"gone", content_type="text/plain")
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 30 * 3600}
    hostile.json("/v1/videos/generations", task(id=NEW_ID, status="processing"))
    operator = resumed_operator(tmp_path, regenerate_expired=True, reattach="never")
    ctx = retry_context(2)
    # reattach="never": every try is a forced take of its own (red-team 17's F2), as on 3.3, so proven
    # expiry is R28: one new take, whatever regenerate_expired says; never more than one.
    with contextlib.suppress(EvolinkError, AirflowFailException, TaskDeferred):
        operator.execute_complete(ctx, {**success(done, now - 26 * 3600), "evolink_task_id": TASK_ID})  # type: ignore[arg-type]
    assert posts(hostile) == 1


def test_held_no_store_regenerate_on_an_automatic_retry_resends_the_first_key(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.file("/media/", MP4, "video/mp4")
    hostile.json("/v1/videos/generations", completed(f"{hostile.url}/media/v.mp4"))
    operator = resumed_operator(tmp_path, deferrable=False, regenerate=True)
    ctx = retry_context(2)
    k0 = idempotency_key(
        task_instance_identity(ctx), operator.validated_request().fingerprint, 0, try_generation(ctx, "auto")
    )
    result = operator.execute(ctx)  # type: ignore[arg-type]
    assert result["id"] == TASK_ID and posted_keys(hostile) == [k0]


# -- F5: generic types are accepted; hostile bytes under them are refused by the bytes ---------------------


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>' * 2
JSON_BODY = json.dumps({"error": {"code": "denied", "message": "x" * 80}}).encode()
SCRIPT = b"#!/bin/sh\nrm -rf / # " + b"a" * 80


@pytest.mark.parametrize("served_as", ["binary/octet-stream", "application/mp4", "Application/MP4; x=1"])
@pytest.mark.parametrize(
    "body", [HTML, SVG, JSON_BODY, SCRIPT, b""], ids=["html", "svg", "json", "sh", "empty"]
)
def test_held_hostile_bytes_under_a_generic_type_are_refused_and_nothing_is_left(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    served_as: str,
    body: bytes,
) -> None:
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.storage import EvolinkServedContentError, store_results

    hostile.file("/media/", body, served_as)
    folder = tmp_path / "out"
    with pytest.raises(EvolinkServedContentError) as raised:
        store_results(EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(folder))
    assert raised.value.retryable
    assert files_under(folder) == [] and files_under(tmp_path) in ([], ["out"])
