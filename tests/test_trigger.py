"""EvolinkTaskTrigger: serialization, and real polling of the simulator on an event loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.conftest import TEST_API_KEY, SimulatorControl
from tests.test_polling import FakeClock, task

SEEDANCE = {"model": "seedance-2.0-fast-text-to-video", "prompt": "waves", "duration": 4}


def run_trigger(trigger: EvolinkTaskTrigger) -> list[dict[str, Any]]:
    """Run the trigger to its end on a debug-mode loop (asyncio then refuses calls from other threads)."""

    async def collect() -> list[dict[str, Any]]:
        try:
            return [event.payload async for event in trigger.run()]
        finally:
            await aclose_async_clients()

    return asyncio.run(collect(), debug=True)


def submit(prompt: str = "waves") -> str:
    return str(EvolinkHook().create_video_task({**SEEDANCE, "prompt": prompt})["id"])


def test_serialize_round_trip_is_json_safe_and_secret_free() -> None:
    trigger = EvolinkTaskTrigger(
        evolink_task_id="task-unified-1700000000-abcdefgh", poll_interval=2, end_time=1e10, started_at=1.5e9
    )
    classpath, kwargs = trigger.serialize()

    rebuilt = EvolinkTaskTrigger(**json.loads(json.dumps(kwargs)))

    assert classpath == "evolink_provider.triggers.evolink.EvolinkTaskTrigger"
    assert rebuilt.serialize() == (classpath, kwargs)
    assert TEST_API_KEY not in json.dumps(kwargs)
    assert TEST_API_KEY not in repr(trigger)


def blocking_calls_in(run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``run()`` (which runs an event loop on this thread) and the blocking waits it made on this thread,
    seen by a profile hook on every call however the callee was named (``from time import sleep`` too):
    sleeps, ``select``, waits on threads, conditions, processes or unfinished futures, DNS lookups, sync
    HTTP, and socket calls on a blocking socket. The loop's own selector wait is not among them. Not seen
    (no call tells them from the loop's own): a lock acquired with a timeout, another selector's wait,
    ``os.read`` on a pipe, TLS reads on a blocking socket; the CPU bound below and the review cover those."""
    import _socket
    import concurrent.futures
    import http.client
    import os
    import select
    import subprocess
    import sys
    import threading
    import urllib.request

    import requests

    c_waits = {time.sleep, select.select, os.waitpid, os.wait, os.system, _socket.getaddrinfo}
    c_waits |= {_socket.gethostbyname, _socket.gethostbyname_ex, _socket.gethostbyaddr}
    socket_calls = {"connect", "recv", "recv_into", "recvfrom", "send", "sendall", "sendto", "accept"}
    python_waits = {
        function.__code__: name
        for name, function in {
            "Event.wait": threading.Event.wait,
            "Condition.wait": threading.Condition.wait,
            "Thread.join": threading.Thread.join,
            "Popen.wait": subprocess.Popen.wait,
            "Popen.communicate": subprocess.Popen.communicate,
            "requests": requests.Session.send,
            "urlopen": urllib.request.urlopen,
            "http.client": http.client.HTTPConnection.getresponse,
        }.items()
    }
    future_result = concurrent.futures.Future.result.__code__
    # Asyncio's own thread handling: a new executor thread is waited for until it has started, and
    # asyncio.run joins the executor's shutdown thread once it has ended.
    machinery = {threading.Thread.start.__code__, asyncio.BaseEventLoop.shutdown_default_executor.__code__}
    seen: list[str] = []

    def not_waiting(frame: Any) -> bool:
        """A wait that cannot block (a timeout of 0), or asyncio's thread handling (above)."""
        if frame.f_locals.get("timeout", None) == 0:
            return True
        for _ in range(3):
            frame = frame.f_back
            if frame is None or frame.f_code in machinery:
                return frame is not None
        return False

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            if arg in c_waits or (type(owner) is select.poll and arg.__name__ == "poll"):
                seen.append(arg.__name__)
            elif isinstance(owner, _socket.socket) and arg.__name__ in socket_calls and owner.getblocking():
                seen.append(f"socket.{arg.__name__}")
        elif event == "call":
            if frame.f_code in python_waits and not not_waiting(frame):
                seen.append(python_waits[frame.f_code])
            elif frame.f_code is future_result and not frame.f_locals["self"].done():
                seen.append("Future.result")

    sys.setprofile(profile)
    try:
        return run(), seen
    finally:
        sys.setprofile(None)


def test_blocking_calls_in_sees_the_waits_it_names(sim: SimulatorControl) -> None:
    """The check below can fail: each kind of wait, made however it is named, is seen."""
    import concurrent.futures
    import select
    import socket
    import subprocess
    import threading
    from time import sleep

    import requests

    def waits() -> None:
        sleep(0.001)
        threading.Event().wait(0.001)
        subprocess.run(["true"], check=True)
        select.select([], [], [], 0.001)
        socket.getaddrinfo("localhost", 80)
        with socket.create_connection(("127.0.0.1", int(sim.base_url.rsplit(":", 1)[1])), timeout=5):
            pass
        requests.get(f"{sim.base_url}/_simulator/stats", timeout=5)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(sleep, 0.05).result()

    _, seen = blocking_calls_in(waits)
    expected = {"sleep", "Event.wait", "Popen.communicate", "select", "getaddrinfo", "socket.connect"}
    assert expected | {"requests", "Future.result"} <= set(seen), seen


def test_fires_success_with_the_task_object(sim: SimulatorControl) -> None:
    """The trigger polls without blocking its loop, checked so that a loaded machine can neither hide nor
    fake it: no blocking wait runs on the loop's thread (:func:`blocking_calls_in`, on each call), and the
    whole run costs that thread under half a second of CPU (CPU, not wall time: a busy machine delays a
    run, it does not make it compute; the test process's heap is frozen out of the garbage collector's
    full passes, which are the test suite's, not the trigger's)."""
    import gc

    # A first run imports the client (once per process, not a blocked poll).
    run_trigger(EvolinkTaskTrigger(submit("warm-up"), poll_interval=0.2, end_time=time.time() + 60))

    trigger = EvolinkTaskTrigger(submit(), poll_interval=0.2, end_time=time.time() + 60)
    events, blocking = blocking_calls_in(lambda: run_trigger(trigger))
    assert blocking == []
    assert [event["task"]["status"] for event in events if event["status"] == "success"] == ["completed"]

    task_id = submit()
    gc.freeze()
    try:
        cpu_before = time.thread_time()
        events = run_trigger(EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 60))
        cpu_seconds = time.thread_time() - cpu_before
    finally:
        gc.unfreeze()

    assert len(events) == 1
    assert events[0]["status"] == "success"
    assert events[0]["task"]["status"] == "completed"
    assert events[0]["task"]["results"]
    assert cpu_seconds < 0.5, f"the trigger's run took {cpu_seconds:.2f} s of its loop's CPU"


def test_an_event_of_a_completed_task_says_when_the_poll_read_it(sim: SimulatorControl) -> None:
    """The operator's proof of when the result links' 24 h run out (``ledger.link_expired``): the task
    completed before the poll that read it so; a task that ended otherwise carries no such time."""
    started = time.time()
    events = run_trigger(
        EvolinkTaskTrigger(submit("waves [sim:seconds=0.6]"), poll_interval=0.2, end_time=started + 60)
    )
    assert events[0]["status"] == "success"
    assert started + 0.6 <= events[0]["completed_seen_at"] <= time.time()
    failed = run_trigger(
        EvolinkTaskTrigger(submit("waves [sim:fail=content_policy_violation]"), poll_interval=0.2)
    )
    assert failed[0]["status"] == "failed" and "completed_seen_at" not in failed[0]


def test_a_trigger_read_to_its_end_leaves_no_generator_for_asyncio_to_close(sim: SimulatorControl) -> None:
    """The triggerer reads a trigger to its end; nothing of it may be left for asyncio's finalizer hook,
    which closes each leftover generator with a task and a write to the loop's self-pipe (per trigger, at
    thousands of triggers: docs/benchmarks.md)."""
    import gc
    import sys

    finalized: list[str] = []

    async def read_to_the_end(trigger: EvolinkTaskTrigger) -> list[dict[str, Any]]:
        firstiter, finalizer = sys.get_asyncgen_hooks()  # the loop's own

        def counted(generator: Any) -> None:
            finalized.append(generator.__qualname__)
            assert finalizer is not None
            finalizer(generator)

        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=counted)
        try:
            events = [event.payload async for event in trigger.run()]
            gc.collect()
            await asyncio.sleep(0)
            return events
        finally:
            await aclose_async_clients()

    trigger = EvolinkTaskTrigger(
        submit("waves [sim:seconds=0.3]"), poll_interval=0.1, end_time=time.time() + 60
    )
    events = asyncio.run(read_to_the_end(trigger))
    assert [event["status"] for event in events] == ["success"]
    assert finalized == []


def test_no_event_fires_before_not_before(sim: SimulatorControl) -> None:
    """The task ends after 0.5 s; the trigger sees it and still holds the event until ``not_before``."""
    task_id = submit("waves [sim:seconds=0.5]")
    not_before = time.time() + 2.0
    events = run_trigger(
        EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 60, not_before=not_before)
    )
    fired = time.time()

    assert events[0]["status"] == "success"
    assert fired >= not_before
    polls = sim.stats()["poll_times_by_task"][task_id]
    assert min(polls) < not_before - 1.0, "the end was seen well before the hold ran out"


def test_fires_failed_with_code_and_message(sim: SimulatorControl) -> None:
    task_id = submit("waves [sim:fail=content_policy_violation]")
    events = run_trigger(EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 60))
    assert events[0]["status"] == "failed"
    assert events[0]["code"] == "content_policy_violation"


def test_fires_timeout_when_the_task_outlives_the_budget(sim: SimulatorControl) -> None:
    task_id = submit("waves [sim:stay=processing]")
    started = time.monotonic()
    events = run_trigger(EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 1.5))
    assert events[0]["status"] == "timeout"
    assert task_id in events[0]["evolink_task_id"]
    assert time.monotonic() - started < 5


def test_rides_out_thirty_percent_faulty_polls(sim: SimulatorControl) -> None:
    task_id = submit()
    sim.add_faults(
        {"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 503, "share": 0.3},
        {"method": "GET", "path_prefix": "/v1/tasks/", "kind": "reset", "share": 0.1},
    )
    events = run_trigger(EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 60))
    assert events[0]["status"] == "success"


def test_a_sustained_outage_ends_the_wait_with_an_error(sim: SimulatorControl) -> None:
    task_id = submit()
    sim.add_faults({"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 503})
    events = run_trigger(
        EvolinkTaskTrigger(task_id, poll_interval=0.05, max_poll_failures=2, end_time=time.time() + 60)
    )
    assert events[0]["status"] == "error"
    assert "503" in events[0]["message"]
    assert events[0]["retryable"] is True


def test_an_unknown_task_ends_the_wait_at_once(sim: SimulatorControl) -> None:
    events = run_trigger(EvolinkTaskTrigger("task-unified-1700000000-zzzzzzzz", poll_interval=0.05))
    assert events[0]["status"] == "error"
    assert events[0]["retryable"] is False
    assert sim.stats()["requests"]["GET /v1/tasks"] == 1


def test_on_kill_says_the_generation_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    trigger = EvolinkTaskTrigger("task-unified-1700000000-abcdefgh")
    asyncio.run(trigger.on_kill())
    logged = "".join(capsys.readouterr())  # Airflow's structlog writes task logs to stdout here
    assert "no cancel call" in logged
    assert "task-unified-1700000000-abcdefgh" in logged


def test_progress_lines_reach_the_log(sim: SimulatorControl, capsys: pytest.CaptureFixture[str]) -> None:
    task_id = submit()
    events = run_trigger(EvolinkTaskTrigger(task_id, poll_interval=0.2, end_time=time.time() + 60))

    assert events[0]["status"] == "success"
    logged = "".join(capsys.readouterr())
    assert f"EvoLink task {task_id}: pending 0%, " in logged or f"{task_id}: processing" in logged
    assert " elapsed, about " in logged and " left (from " in logged


def run_on_fake_clock(
    monkeypatch: pytest.MonkeyPatch,
    answers: list[Any],
    make_trigger: Callable[[FakeClock], EvolinkTaskTrigger],
) -> tuple[list[dict[str, Any]], list[tuple[str, float]]]:
    """Run a trigger whose reads return ``answers`` in turn (an exception is raised) and whose sleeps
    advance a fake clock. Returns its events and steps: ``("read", clock time)``, ``("sleep", seconds)``."""
    import evolink_provider.triggers.evolink as trigger_module
    from evolink_provider.polling import ProgressReporter
    from evolink_provider.timing import steered

    clock = FakeClock()
    steps: list[tuple[str, float]] = []

    async def read(self: EvolinkHook, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        steps.append(("read", clock.now))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    async def fake_sleep(seconds: float) -> None:
        steps.append(("sleep", seconds))
        clock.sleep(seconds)

    async def fake_turn(at: float, *, early: bool = True) -> None:  # a turn: to its time on the fake clock
        await fake_sleep(at - clock.now)

    monkeypatch.setattr(EvolinkHook, "aget_task", read)
    monkeypatch.setattr(trigger_module, "poll_turn", fake_turn)
    monkeypatch.setattr(
        trigger_module, "ProgressReporter", lambda *args: ProgressReporter(*args, clock=clock)
    )
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    trigger = make_trigger(clock)
    with steered(clock=clock):
        events = run_trigger(trigger)
    monkeypatch.undo()
    return events, steps


def test_the_first_poll_waits_for_first_poll_at_to_the_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short wait is slept whole, however short: the first poll comes at ``first_poll_at``, not before."""
    first_poll_at: list[float] = []

    def make_trigger(clock: FakeClock) -> EvolinkTaskTrigger:
        first_poll_at.append(clock.now + 0.5)
        return EvolinkTaskTrigger("task-unified-1-abcdefgh", first_poll_at=first_poll_at[0])

    answers = [task("completed", 100, results=["https://x/v.mp4"])]
    events, steps = run_on_fake_clock(monkeypatch, answers, make_trigger)

    assert [event["status"] for event in events] == ["success"]
    assert steps == [("sleep", pytest.approx(0.5)), ("read", pytest.approx(first_poll_at[0]))]


def test_after_a_failed_poll_the_next_comes_after_the_failure_pause_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running, then a failed poll, then completed: between the failed poll and the next one the trigger
    sleeps the failure's pause only (not the running task's schedule again)."""
    from evolink_provider.exceptions import EvolinkTransportError

    answers: list[Any] = [
        task("processing", 10, estimate=600),
        EvolinkTransportError("connection reset", request_sent=True),
        task("completed", 100, results=["https://x/v.mp4"]),
    ]
    events, steps = run_on_fake_clock(
        monkeypatch,
        answers,
        lambda clock: EvolinkTaskTrigger("task-unified-1-abcdefgh", started_at=clock.now - 60),
    )

    assert [event["status"] for event in events] == ["success"] and not answers
    kinds = [kind for kind, _ in steps]
    failed_read = [index for index, kind in enumerate(kinds) if kind == "read"][1]
    assert kinds[failed_read:] == ["read", "sleep", "read"], steps


def test_a_long_pause_between_polls_is_not_silent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trigger's sleep until its next poll logs where the task stands every PROGRESS_MAX_GAP."""
    from evolink_provider.polling import PROGRESS_MAX_GAP

    answers = [task("processing", 10, estimate=600), task("completed", 100, results=["https://x/v.mp4"])]
    # Ten minutes in at 10 %: the schedule's next poll is minutes away.
    events, steps = run_on_fake_clock(
        monkeypatch,
        answers,
        lambda clock: EvolinkTaskTrigger("task-unified-1-abcdefgh", started_at=clock.now - 600),
    )
    slept = [seconds for kind, seconds in steps if kind == "sleep"]

    assert [event["status"] for event in events] == ["success"] and not answers
    assert len(slept) >= 3, slept  # the pause to the second poll spans several line gaps
    assert slept[:-1] == [PROGRESS_MAX_GAP] * (len(slept) - 1) and 0 < slept[-1] <= PROGRESS_MAX_GAP
    logged = "".join(capsys.readouterr())
    lines = logged.count("EvoLink task task-unified-1-abcdefgh: processing 10% (as of the poll")
    # A line after each pause but the last: that one ends at the poll, whose own line says where it stands.
    assert lines == len(slept) - 1, logged


def test_a_task_still_running_at_the_end_time_ends_the_wait_as_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poll at ``end_time`` reads the task still running: the wait ends with a ``timeout`` event (the
    poll decision's), having slept only up to the end time."""

    def make_trigger(clock: FakeClock) -> EvolinkTaskTrigger:
        return EvolinkTaskTrigger("task-unified-1-abcdefgh", end_time=clock.now + 3)

    events, steps = run_on_fake_clock(
        monkeypatch, [task("processing", 10), task("processing", 20)], make_trigger
    )

    assert [event["status"] for event in events] == ["timeout"]
    assert "still processing after the wait budget" in events[0]["message"]
    assert [kind for kind, _ in steps] == ["read", "sleep", "read"]
    assert steps[1][1] == pytest.approx(3)


def test_the_event_waits_for_not_before_and_no_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Completed on the first read, a quarter second before ``not_before``: the event waits that quarter
    second, not more."""

    def make_trigger(clock: FakeClock) -> EvolinkTaskTrigger:
        return EvolinkTaskTrigger("task-unified-1-abcdefgh", not_before=clock.now + 0.25)

    answers = [task("completed", 100, results=["https://x/v.mp4"])]
    events, steps = run_on_fake_clock(monkeypatch, answers, make_trigger)

    assert [event["status"] for event in events] == ["success"]
    assert [kind for kind, _ in steps] == ["read", "sleep"]
    assert steps[1][1] == pytest.approx(0.25)


def test_a_trigger_polls_at_its_turn_and_its_last_poll_before_the_deadline_is_not_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a real event loop: each poll after a wait goes through ``poll_turn`` (early allowed), except the
    one due within a tick of ``end_time``, which is not early (it would read the task still running)."""
    import evolink_provider.triggers.evolink as trigger_module
    from evolink_provider import polling

    turns: list[tuple[float, bool]] = []
    reads: list[float] = []

    def spy(at: float, *, early: bool = True) -> asyncio.Future[None]:
        turns.append((at, early))
        return polling.poll_turn(at, early=early)

    async def read(self: EvolinkHook, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        reads.append(time.time())
        return task("processing", 10)

    monkeypatch.setattr(EvolinkHook, "aget_task", read)
    monkeypatch.setattr(trigger_module, "poll_turn", spy)
    start = time.time()
    trigger = EvolinkTaskTrigger(
        "task-unified-1-abcdefgh", poll_interval=0.3, first_poll_at=start + 0.2, end_time=start + 0.7
    )
    events = run_trigger(trigger)

    assert [event["status"] for event in events] == ["timeout"]
    assert turns[0] == (pytest.approx(start + 0.2), True)
    assert reads[0] >= start + 0.2 - polling.POLL_TICK / 2 - 0.01
    assert turns[-1] == (pytest.approx(start + 0.7, abs=0.02), False)  # the poll at the deadline
    assert reads[-1] >= start + 0.7
