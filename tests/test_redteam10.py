"""Tenth red-team pass: the money path and the key, attacked on the paths the earlier passes left.

Findings are ``xfail(strict=True)`` (each fails once fixed); the attacks that held are plain tests.

* F1 (paid video undelivered): without ``task_state_store`` (3.0-3.2) a deferred try's ``execute_complete``
  has no record, so one refused fresh link is judged expired by the server's ``created`` (R26: fail for good).
* F2 (key leak): a result host's redirect ``Location``, ``Content-Type`` or ``Content-Encoding`` echoing the
  key reaches exceptions and logs (downloads are not scrubbed as API answers are).
* F3 (crash): ``Content-Length: ²`` on a result download is a raw ``ValueError``.
* F4 (paid video undelivered): a result link answering 421, 451, 408, 412, 206 or a 302 without
  ``Location`` ends the try with ``AirflowFailException`` (retries skipped).
* F5 (paid video undelivered): a retry whose local input image cannot be read fails for good before the
  ledger reads the paid task.
* F6 (key leak): an API answer's ``Content-Encoding`` echoing the key reaches exceptions and trigger events.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, RetryLaterError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.storage import store_results
from tests.airflow_runs import run_dag
from tests.conftest import SimulatorControl
from tests.test_deferral import TaskInstanceStub
from tests.test_hostile import (
    HOSTILE_KEY,
    MP4,
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    send,
)
from tests.test_ledger import MemoryStore

DAY = 24 * 3600


def posts(server: HostileServer) -> int:
    return sum(1 for method, path in server.requests if method == "POST" and "generations" in path)


def every_text(error: BaseException) -> str:
    texts = []
    while error is not None:
        texts += [str(error), repr(error), *(str(value) for value in vars(error).values())]
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return " ".join(texts)


# -- F1: on Airflow 3.0-3.2 a deferred try judges a refused link "expired" by the server's `created` --------


def resumed_operator(tmp_path: Path, **kwargs: Any) -> EvolinkSeedanceTextToVideoOperator:
    return EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="a paid prompt",
        duration=4,
        evolink_conn_id="evolink_hostile",
        output_path=str(tmp_path / "out"),
        retries=3,
        **{"deferrable": True, **kwargs},
    )


def refused_for(server: HostileServer, refusals: int) -> None:
    """The result host refuses ``refusals`` downloads (a CDN blip outlasting a retry delay), then serves."""
    answers = iter([403] * refusals)

    def media(handler: Any) -> None:
        status = next(answers, None)
        if status is None:
            send(handler, 200, MP4, content_type="video/mp4")
        else:
            send(handler, status, b"denied", content_type="text/plain")

    server.routes["/media/"] = media


def refused_once_then_served(server: HostileServer) -> None:
    refused_for(server, 1)
    server.json("/v1/videos/generations", {"id": "task-unified-1-second", "status": "pending"})


def resume_context(store: MemoryStore | None) -> dict[str, Any]:
    ti = TaskInstanceStub()
    ti.max_tries = 3
    ti.task = type("T", (), {"retries": 3})()  # type: ignore[attr-defined]
    found: dict[str, Any] = {"ti": ti, "outlet_events": {}, "dag_run": None}
    if store is not None:
        found["task_state_store"] = store
    return found


def test_f1_a_refused_fresh_link_after_a_deferral_without_a_store_fails_retryably(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """F1 (fixed): the trigger just saw the task completed; its `created` is two days old (a server clock
    two days behind, or a generation queued that long with a long ``timeout``). The first download of its
    fresh link is refused once (a CDN blip: R25 says fail retryably). Without a store the try failed for
    good, judged by `created`; only the trigger's sighting of the task completed (30 s ago) can date them."""
    refused_once_then_served(hostile)
    task = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 2 * DAY}
    operator = resumed_operator(tmp_path)
    # The trigger's poll read it completed 30 s ago (the event says so): it completed before that.
    event = {
        "status": "success",
        "task": task,
        "end_time": time.time() + 600,
        "completed_seen_at": time.time() - 30,
    }

    with pytest.raises(EvolinkError):  # retryable: the retry downloads it (the link answers 200 then)
        operator.execute_complete(resume_context(None), event)  # type: ignore[arg-type]


def test_with_a_store_the_same_refused_link_fails_retryably_and_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Held on 3.3: the record's first-seen-completed time, not `created`, starts the links' 24 h."""
    from evolink_provider.records import STATE_KEY, SubmissionRecord

    refused_once_then_served(hostile)
    task = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(time.time()) - 2 * DAY}
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp", 0, "evl-" + "0" * 48, TASK_ID, "seq-3").as_stored())
    operator = resumed_operator(tmp_path, regenerate_expired=True)
    event = {"status": "success", "task": task, "end_time": time.time() + 600}

    with pytest.raises(RetryLaterError):
        operator.execute_complete(resume_context(store), event)  # type: ignore[arg-type]
    assert posts(hostile) == 0


# -- F2: the key, echoed by the server on a result download, reaches exceptions and logs -------------------


@pytest.mark.parametrize("echo", ["location-404", "location-scheme", "content-type", "content-encoding"])
def test_f2_a_key_echoed_on_a_result_download_reaches_no_exception_or_log(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    echo: str,
) -> None:
    def media(handler: Any) -> None:
        if echo == "location-404":
            send(handler, 302, b"", content_type="text/plain", headers={"Location": f"/gone/{HOSTILE_KEY}"})
        elif echo == "location-scheme":
            send(handler, 302, b"", content_type="text/plain", headers={"Location": f"ftp://x/{HOSTILE_KEY}"})
        elif echo == "content-type":
            send(handler, 200, b"<html>x</html>", content_type=f"x-{HOSTILE_KEY}")
        else:
            send(handler, 200, MP4, content_type="video/mp4", headers={"Content-Encoding": HOSTILE_KEY})

    hostile.routes["/media/"] = media
    hostile.routes["/gone/"] = lambda handler: send(handler, 404, b"gone", content_type="text/plain")
    with caplog.at_level(logging.DEBUG), pytest.raises(EvolinkError) as raised:
        store_results(EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert HOSTILE_KEY not in every_text(raised.value)
    assert HOSTILE_KEY not in caplog.text


# -- F3: a Content-Length of Unicode digits is a raw ValueError ---------------------------------------------


def test_f3_a_content_length_of_superscript_digits_is_an_evolink_error(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    def media(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.send_header("Content-Length", "\u00b2")
        handler.send_header("Connection", "close")
        handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(MP4)

    hostile.routes["/media/"] = media
    with contextlib.suppress(EvolinkError):  # refused as a bad answer: fine; a ValueError is not
        store_results(EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))


# -- F4: a result link answering a status outside the "refused" list ends the paid video's retries -----------


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("status", [421, 451])
def test_f4_a_one_off_odd_status_on_a_fresh_link_fails_the_try_retryably(
    sim: SimulatorControl, tmp_path: Path, status: int
) -> None:
    """421 Misdirected Request (HTTP/2 connection reuse across CDN names) or 451 (a CDN's regional block),
    once: no evidence about the paid result (row R25's reasoning), so the retry must download it."""
    sim.add_faults(
        {"kind": "status", "status": status, "method": "GET", "path_prefix": "/media/", "count": 1}
    )

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 2)), tasks


# -- F5: a local input that cannot be read on a retry strands the video the first try paid for ---------------


HERO_PNG = Path(__file__).resolve().parent.parent / "example_dags" / "assets" / "hero.png"


def retry_with_a_local_image(
    server: HostileServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    input_gone: bool,
    recorded_task: dict[str, Any] | None = None,
    delivered_before_a_clear: bool = False,
) -> dict[str, Any]:
    """Try 1 paid for TASK_ID with a local image, then failed (a wait timeout); its retry runs now."""
    from evolink_provider.operators.evolink import EvolinkHappyHorseReferenceToVideoOperator
    from evolink_provider.records import STATE_KEY, SubmissionRecord
    from tests.test_hostile import set_connection

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = inputs / "hero.png"
    image.write_bytes(HERO_PNG.read_bytes())
    set_connection(monkeypatch, "evolink_hostile", server.url, upload_allowed_dirs=[str(inputs)])
    server.json(f"/v1/tasks/{TASK_ID}", recorded_task or completed(f"{server.url}/media/v.mp4"))
    server.file("/media/", MP4, "video/mp4")
    server.json("/v1/videos/generations", {"id": "task-unified-1-second", "status": "pending"})
    store = MemoryStore()
    if delivered_before_a_clear:  # an earlier try sequence (seq-1) delivered; this is a user's clear
        record = SubmissionRecord("fp-try-1", 0, "evl-" + "0" * 48, TASK_ID, "seq-1", delivered=True)
    else:
        record = SubmissionRecord("fp-try-1", 0, "evl-" + "0" * 48, TASK_ID, "seq-3")
    store.set(STATE_KEY, record.as_stored())
    operator = EvolinkHappyHorseReferenceToVideoOperator(
        task_id="generate",
        prompt="character1 waves",
        duration=3,
        image_urls=[str(image)],
        evolink_conn_id="evolink_hostile",
        retries=3,
    )
    if input_gone:  # another worker, a cleaned folder, a network mount not answering (any OSError)
        image.unlink()
    ctx = resume_context(store)
    ctx["ti"].try_number = 2
    return operator.execute(ctx)  # type: ignore[arg-type]


def test_a_retry_with_a_local_image_and_another_fingerprint_reattaches(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Held (R07 with local inputs): nothing uploaded, nothing bought, the paid task collected."""
    result = retry_with_a_local_image(hostile, tmp_path, monkeypatch, input_gone=False)
    assert result["id"] == TASK_ID and posts(hostile) == 0
    assert not any("/files/" in path for _, path in hostile.requests)


def test_f5_a_retry_whose_local_image_is_gone_collects_the_paid_task(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        result = retry_with_a_local_image(hostile, tmp_path, monkeypatch, input_gone=True)
    except AirflowFailException:
        assert posts(hostile) == 0
        raise
    assert result["id"] == TASK_ID and posts(hostile) == 0


# -- held: the object-storage branch of the stored-set check (fsspec's memory filesystem) --------------------


@pytest.fixture
def memory_scheme(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """``memory://`` reachable as an ObjectStoragePath; a folder of its own for this test."""
    import airflow.sdk.io.fs as airflow_fs
    import fsspec

    registered = dict(airflow_fs._register_filesystems())
    registered["memory"] = lambda conn_id, options=None: fsspec.filesystem("memory")
    monkeypatch.setattr(airflow_fs, "_register_filesystems", lambda: registered)
    return f"memory://rt10-{tmp_path.name}/out"


def memory_try(store: MemoryStore, folder: str, expired: bool, max_tries: int, try_number: int) -> Any:
    from tests.test_redteam6 import DownloadHook, one_try

    hook = DownloadHook(expired=expired)
    return hook, one_try(hook, store, folder, max_tries=max_tries, try_number=try_number)


def paid_record(store: MemoryStore) -> None:
    from evolink_provider.records import STATE_KEY, SubmissionRecord
    from tests.test_redteam6 import TASK

    record = SubmissionRecord(
        "fp-1", 0, "evl-" + "0" * 48, TASK, "seq-2", completed_seen_at=time.time() - 2 * DAY
    )
    store.set(STATE_KEY, record.as_stored())


def test_an_object_storage_set_is_handed_over_on_a_clear_with_expired_links(memory_scheme: str) -> None:
    store = MemoryStore()
    paid_record(store)
    first, stored = memory_try(store, memory_scheme, expired=False, max_tries=2, try_number=1)
    assert first.keys == [] and len(stored["files"]) == 1  # stored, then the try failed before delivery

    cleared, handed = memory_try(store, memory_scheme, expired=True, max_tries=5, try_number=2)

    assert handed["from_storage"] is True and handed["files"] == stored["files"]
    assert cleared.keys == [] and cleared.downloads == [] and cleared.read_ids == []


@pytest.mark.parametrize("tamper", ["other size", "removed"])
def test_an_object_that_contradicts_its_record_is_downloaded_again_not_paid(
    memory_scheme: str, tamper: str
) -> None:
    import fsspec

    store = MemoryStore()
    paid_record(store)
    _, stored = memory_try(store, memory_scheme, expired=False, max_tries=2, try_number=1)
    fs, path = fsspec.filesystem("memory"), stored["files"][0].removeprefix("memory://")
    if tamper == "other size":
        fs.pipe_file(path, b"\x00\x00\x00\x18ftypisom-other")
    else:
        fs.rm(path)

    retry, again = memory_try(store, memory_scheme, expired=False, max_tries=2, try_number=2)

    assert "from_storage" not in again and retry.keys == [] and len(retry.downloads) == 1
    assert fs.cat_file(path) == __import__("tests.test_redteam6", fromlist=["VIDEO"]).VIDEO


# -- F6: the key, echoed in an API answer's Content-Encoding, reaches exceptions and the trigger event --


def test_f6_a_key_echoed_in_the_content_encoding_of_an_answer_reaches_no_exception_or_event(
    hostile: HostileServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    from evolink_provider.triggers.evolink import EvolinkTaskTrigger
    from tests.test_hostile import _both_modes, run_trigger, task

    hostile.json("/v1/tasks/", task(), headers={"Content-Encoding": f"br, {HOSTILE_KEY}"})
    with caplog.at_level(logging.DEBUG):
        errors = _both_modes(EvolinkHook("evolink_hostile"))
        events = run_trigger(
            EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 3)
        )
    leaks: list[Any] = [error for error in errors if HOSTILE_KEY in every_text(error)]
    leaks += [event for event in events if HOSTILE_KEY in repr(event)]  # a trigger event is a DB row
    assert leaks == []
    assert HOSTILE_KEY not in caplog.text


@pytest.mark.parametrize("status", [206, 302, 408, 412])
def test_f4_odd_result_link_statuses_are_retryable_or_a_refused_link(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    status: int,
) -> None:
    from evolink_provider.exceptions import EvolinkNotFoundError

    hostile.routes["/media/"] = lambda handler: send(handler, status, b"", content_type="text/plain")
    with pytest.raises(EvolinkError) as raised:
        store_results(EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert raised.value.retryable or isinstance(raised.value, EvolinkNotFoundError), type(raised.value)


def test_a_retry_whose_local_image_is_gone_does_not_resubmit_a_failed_task(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F5's fix, the other side: the recorded task failed with a code a resubmission could fix, but the
    request cannot be rebuilt without its input: the input's refusal ends the try, nothing is bought."""
    from tests.test_hostile import task

    failed = task(status="failed", progress=0, error={"code": "service_error", "message": "busy"})
    with pytest.raises(AirflowFailException):
        retry_with_a_local_image(hostile, tmp_path, monkeypatch, input_gone=True, recorded_task=failed)
    assert posts(hostile) == 0


def test_a_clear_of_a_delivered_task_whose_local_image_is_gone_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clear after delivery buys a new generation, which needs the request: the input's refusal."""
    with pytest.raises(AirflowFailException):
        retry_with_a_local_image(
            hostile, tmp_path, monkeypatch, input_gone=True, delivered_before_a_clear=True
        )
    assert posts(hostile) == 0


def test_f1_sync_a_refused_fresh_link_of_a_task_seen_running_fails_retryably(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """F1 did not reach the worker's own wait (no deferral, no store): the try's ledger keeps its record in
    memory and so its first sighting of the task completed."""
    from tests.test_hostile import task

    refused_once_then_served(hostile)
    old = int(time.time()) - 2 * DAY
    hostile.json("/v1/videos/generations", task(status="pending", progress=0, created=old))
    hostile.json(f"/v1/tasks/{TASK_ID}", {**completed(f"{hostile.url}/media/v.mp4"), "created": old})
    operator = resumed_operator(tmp_path, deferrable=False, poll_interval=0.2, max_poll_interval=1.0)
    context = resume_context(None)
    context["ti"].try_number = 2  # a retry (EvoLink replays the key): an expired link would end it for good

    with pytest.raises(EvolinkError):  # retryable: the retry downloads it (the link answers 200 then)
        operator.execute(context)  # type: ignore[arg-type]
    assert posts(hostile) == 1
