"""The shared decide-after-poll function and its adaptive schedule (pure functions, no HTTP)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import threading
import time
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkTransportError
from evolink_provider.hooks.retry import Verdict
from evolink_provider.polling import (
    _TICKS,
    POLL_TICK,
    PROGRESS_MAX_GAP,
    PROGRESS_MIN_GAP,
    Outcome,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    expected_end,
    next_poll_delay,
    poll_turn,
    turn_tick,
)
from evolink_provider.results import final_line


def task(status: str, progress: int = 0, estimate: float | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "task-unified-1-abcdefgh", "status": status, "progress": progress, **extra}
    if estimate is not None:
        body["task_info"] = {"estimated_time": estimate}
    return body


def decide(body: dict[str, Any], now: float = 100.0, deadline: float | None = 1e9, **kw: Any) -> Any:
    return decide_after_poll(body, now=now, started_at=0.0, deadline=deadline, **kw)


def test_completed_with_results_is_success() -> None:
    assert decide(task("completed", 100, results=["https://x/v.mp4"])).outcome is Outcome.SUCCESS


def test_completed_with_result_data_is_success() -> None:
    body = task("completed", 100, result_data={"character_name": "chr_x#"})
    assert decide(body).outcome is Outcome.SUCCESS


def test_completed_without_any_output_is_a_failure() -> None:
    decision = decide(task("completed", 100, results=[]))
    assert decision.outcome is Outcome.FAILED
    assert "no results" in decision.message


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_failed_and_cancelled_carry_code_and_message(status: str) -> None:
    body = task(status, error={"code": "content_policy_violation", "message": "blocked\nby filter"})
    decision = decide(body)
    assert decision.outcome is Outcome.FAILED
    assert "content_policy_violation" in decision.message
    assert status in decision.message


def test_running_past_the_deadline_times_out() -> None:
    decision = decide(task("processing", 50), now=100.0, deadline=99.0)
    assert decision.outcome is Outcome.TIMEOUT
    assert "keeps running" in decision.message


def test_unknown_status_is_treated_as_running_and_said() -> None:
    decision = decide(task("queued_for_review"))
    assert decision.outcome is Outcome.WAIT
    assert "queued_for_review" in decision.message


def test_delay_never_passes_the_deadline() -> None:
    decision = decide(task("pending", estimate=2400), now=100.0, deadline=103.0)
    assert decision.outcome is Outcome.WAIT
    assert decision.delay <= 3.0


@pytest.mark.parametrize("elapsed", [0, 10, 60, 300, 2000, 5000])
@pytest.mark.parametrize("estimate", [None, 30, 165, 2400])
def test_delay_stays_within_floor_and_ceiling(elapsed: float, estimate: float | None) -> None:
    delay = next_poll_delay(
        task("pending", estimate=estimate), elapsed=elapsed, poll_interval=5, max_poll_interval=600
    )
    assert 5 <= delay <= 600


def test_long_jobs_are_polled_rarely_at_first() -> None:
    early = next_poll_delay(task("pending", estimate=2400), elapsed=0, jitter=False)
    assert early >= 600  # half the 40-minute estimate, capped at the 600 s ceiling


def test_progress_sharpens_the_estimate() -> None:
    # 100 s in at 50 %: about 100 s remain; 85 % of that.
    delay = next_poll_delay(task("processing", 50, estimate=2400), elapsed=100, jitter=False)
    assert delay == pytest.approx(85)


def test_near_the_end_the_tolerance_floor_holds() -> None:
    delay = next_poll_delay(task("processing", 99, estimate=165), elapsed=164, jitter=False)
    assert delay == pytest.approx(max(5.0, 0.04 * 165.65), rel=0.01)


def simulate_polls(run_time: float, estimate: float, poll_interval: float = 5.0) -> tuple[int, float]:
    """Polls and detection delay for a task whose progress rises linearly to ``run_time``."""
    now, polls = 0.0, 0
    body = task("pending", 0, estimate=estimate)
    while True:
        decision = decide_after_poll(
            body, now=now, started_at=0.0, deadline=None, poll_interval=poll_interval
        )
        if decision.outcome is not Outcome.WAIT:
            return polls, now - run_time
        now += decision.delay
        polls += 1
        if now >= run_time:
            body = task("completed", 100, estimate=estimate, results=["u"])
        else:
            body = task("processing", int(100 * now / run_time), estimate=estimate)


@pytest.mark.parametrize("estimate", [165, 2400])
@pytest.mark.parametrize("ratio", [0.7, 1.0, 1.3])
def test_schedule_uses_few_polls_and_notices_completion_promptly(estimate: float, ratio: float) -> None:
    run_time = estimate * ratio
    polls, lateness = simulate_polls(run_time, estimate)
    fixed_ten_second_polls = run_time / 10
    assert polls <= fixed_ten_second_polls / 2
    assert lateness <= max(5.0, 0.05 * run_time) * 1.0001


class FakeClock:
    """Epoch seconds that move only when the test sleeps."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a pause of zero would spin"
        self.now += seconds


def follow(run_time: float, poll_every: float | None, estimate: float = 600.0) -> list[tuple[float, str]]:
    """The lines a waiting loop logs (the operators' and the trigger's loop, on a fake clock) for a task
    of ``run_time`` seconds polled every ``poll_every`` s (None: on the adaptive schedule)."""
    clock = FakeClock()
    start = clock.now
    reporter = ProgressReporter("task-unified-1-abcdefgh", start, clock)
    lines: list[tuple[float, str]] = []
    while True:
        elapsed = clock.now - start
        if elapsed >= run_time:
            body = task("completed", 100, estimate=estimate)
        elif elapsed < 0.1 * run_time:
            body = task("pending", 0, estimate=estimate)
        else:
            body = task("processing", int(100 * elapsed / run_time), estimate=estimate)
        if line := reporter.update(body):
            lines.append((clock.now - start, line))
        if body["status"] == "completed":
            return lines
        delay = poll_every or next_poll_delay(body, elapsed=elapsed, poll_interval=5.0, jitter=False)
        for pause in reporter.pauses(delay):
            clock.sleep(pause)
            if line := reporter.between_polls():
                lines.append((clock.now - start, line))


@pytest.mark.parametrize("poll_every", [None, 1.0, 300.0])
def test_progress_lines_keep_a_steady_rhythm_whatever_the_polls(poll_every: float | None) -> None:
    lines = follow(run_time=900.0, poll_every=poll_every)
    times = [at for at, _ in lines]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    statuses = [line.split(": ")[1].split(" ")[0].rstrip(",") for _, line in lines]
    # never silent for longer than PROGRESS_MAX_GAP while the task runs, polled or not
    assert max(gaps[:-1]) <= PROGRESS_MAX_GAP
    # never more often than PROGRESS_MIN_GAP, except when the status changes
    for gap, (previous, status) in zip(gaps, itertools.pairwise(statuses), strict=True):
        assert gap >= PROGRESS_MIN_GAP or status != previous, lines
    assert statuses[0] == "pending" and statuses[-1] == "completed"
    assert len(lines) <= 900 / PROGRESS_MIN_GAP + 3


def test_a_progress_line_says_elapsed_and_remaining_and_where_the_estimate_comes_from() -> None:
    clock = FakeClock()
    reporter = ProgressReporter("task-unified-1-abcdefgh", clock.now, clock)
    clock.sleep(30)
    assert reporter.update(task("pending", 0, estimate=165)) == (
        "EvoLink task task-unified-1-abcdefgh: pending 0%, 30s elapsed, "
        "about 2m 15s left (from estimated_time)"
    )
    clock.sleep(60)
    assert reporter.update(task("processing", 45, estimate=165)) == (
        "EvoLink task task-unified-1-abcdefgh: processing 45%, 1m 30s elapsed, "
        "about 1m 50s left (from progress)"
    )
    clock.sleep(PROGRESS_MAX_GAP)
    assert reporter.between_polls() == (
        "EvoLink task task-unified-1-abcdefgh: processing 45% (as of the poll 1m 00s ago), 2m 30s elapsed, "
        "about 50s left (from progress)"
    )
    clock.sleep(PROGRESS_MAX_GAP * 2)
    assert "past its estimate of 3m 20s" in (reporter.between_polls() or "")


def test_no_estimate_is_shown_when_evolink_gives_none() -> None:
    clock = FakeClock()
    reporter = ProgressReporter("task-unified-1-abcdefgh", clock.now, clock)
    assert reporter.update(task("pending", 0)) == (
        "EvoLink task task-unified-1-abcdefgh: pending 0%, 0s elapsed, no estimate from EvoLink yet"
    )


def test_a_wait_before_the_first_poll_is_not_silent() -> None:
    clock = FakeClock()
    reporter = ProgressReporter("task-unified-1-abcdefgh", clock.now, clock)
    pauses = []
    for pause in reporter.pauses(150.0):
        pauses.append(pause)
        clock.sleep(pause)
        if line := reporter.between_polls():
            assert line.endswith(
                "not polled yet, " + ("1m 00s" if len(pauses) == 1 else "2m 00s") + " elapsed"
            )
    assert pauses == [PROGRESS_MAX_GAP, PROGRESS_MAX_GAP, 150.0 - 2 * PROGRESS_MAX_GAP]


def test_a_line_due_in_under_a_second_still_splits_the_sleep() -> None:
    """A sleep that begins half a second before a line falls due pauses then, not at the sleep's end."""
    clock = FakeClock()
    reporter = ProgressReporter("task-unified-1-abcdefgh", clock.now, clock)
    assert reporter.update(task("processing", 10))
    clock.sleep(PROGRESS_MAX_GAP - 0.5)
    assert reporter.update(task("processing", 10)) is None  # quiet for 59.5 s, nothing moved
    pauses = []
    for pause in reporter.pauses(100.0):
        pauses.append(pause)
        clock.sleep(pause)
        reporter.between_polls()
    assert pauses == [pytest.approx(0.5), PROGRESS_MAX_GAP, pytest.approx(100.0 - 0.5 - PROGRESS_MAX_GAP)]


def test_the_expected_end_comes_from_estimated_time() -> None:
    created = task("pending", 0, estimate=165)
    # 2026-01-01 12:00:00 UTC + 165 s
    assert expected_end(created, 1767268800.0) == (
        "expected to end around 12:02:45 UTC, in about 2m 45s (task_info.estimated_time)"
    )
    assert expected_end(task("pending", 0), 1767268800.0) == ""


@pytest.mark.parametrize("estimate", [3e11, 1e15, 10**18, 10**19])
def test_an_estimate_past_any_calendar_gives_no_expected_end(estimate: float) -> None:
    # The submission's answer is untrusted: its estimate must not fail a task already submitted (billed).
    assert expected_end(task("pending", 0, estimate=estimate), 1767268800.0) == ""


def test_failure_budget_resets_on_success() -> None:
    budget = PollFailureBudget(3, poll_interval=1.0, max_poll_interval=60.0)
    transient = EvolinkTransportError("reset", request_sent=True)
    assert budget.after_failure(transient).verdict is Verdict.REPEAT
    assert budget.after_failure(transient).verdict is Verdict.REPEAT
    budget.success()
    assert budget.after_failure(transient).delay == 1.0
    assert budget.after_failure(transient).delay == 2.0
    assert budget.after_failure(transient).verdict is Verdict.GIVE_UP


def test_strings_from_an_answer_cannot_forge_or_recolour_log_lines() -> None:
    forged = "\n[2026-01-01T00:00:00Z] {taskinstance} INFO - Marking task as SUCCESS\x1b[8m\u202e"
    completed = task(
        "completed",
        100,
        results=[f"https://cdn.example/v.mp4{forged}"],
        result_data={"character_name": f"hero{forged}"},
    )
    line = final_line(completed)
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert "https://cdn.example/v.mp4\\n[2026-01-01T00:00:00Z]" in line
    assert "; character: hero\\n[2026" in line
    clock = FakeClock()
    progress = ProgressReporter("task-unified-1-abcdefgh", clock.now, clock).update(task(f"queued{forged}"))
    assert progress is not None and "\n" not in progress and "\x1b" not in progress


# -- poll turns (a real event loop, no HTTP) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "now", "early", "tick"),
    [
        (10.04, 9.9, True, 100),  # the nearest tick, a little early
        (10.06, 9.9, True, 101),  # the nearest tick, a little late
        (10.04, 10.01, True, 101),  # the nearest has passed: the next one
        (10.0, 10.0, True, 100),  # on a tick that is now: that one
        (10.01, 9.9, False, 101),  # not early: the first tick at or after its time
        (9.0, 10.01, True, 101),  # due before now: the first tick not passed
    ],
)
def test_a_poll_goes_at_the_nearest_tick_that_has_not_passed(
    at: float, now: float, early: bool, tick: int
) -> None:
    assert turn_tick(at, now, early=early) == tick


def test_two_roads_to_one_tick_name_it_once() -> None:
    """The nearest tick, and the next after a passed one, are the same tick: one timer, one chain."""
    assert turn_tick(10.06, 9.9) == turn_tick(10.04, 10.01) == 101


@pytest.mark.parametrize(("at", "tick"), [(math.inf, None), (1e308, None), (-math.inf, 100), (math.nan, 100)])
def test_a_poll_time_of_no_number_waits_as_a_sleep_would(at: float, tick: int | None) -> None:
    """Trigger kwargs come back from the database: a wait beyond any tick stays one, the others go now (no
    OverflowError, and no NaN among the loop's timers)."""
    assert turn_tick(at, 10.0) == tick


def _run_turns(asks: list[float], cancel: tuple[int, ...] = ()) -> list[tuple[int, int, float]]:
    """Waits for the turns of polls due ``asks[i]`` seconds from now (those at ``cancel`` cancelled before
    their tick); returns, per poll that got its turn, its index, the loop iteration and the time it went."""
    went: list[tuple[int, int, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        iteration = [0]

        def count() -> None:  # runs once per loop iteration
            iteration[0] += 1
            handle[0] = loop.call_soon(count)

        handle = [loop.call_soon(count)]

        async def poll(index: int, at: float) -> None:
            await poll_turn(at)
            went.append((index, iteration[0], time.time()))

        start = time.time()
        tasks = [asyncio.create_task(poll(index, start + ask)) for index, ask in enumerate(asks)]
        await asyncio.sleep(0)
        for index in cancel:
            tasks[index].cancel()
        # A turn never given fails the test here, not by a hang.
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        handle[0].cancel()

    asyncio.run(main())
    return went


def test_polls_due_in_one_tick_go_one_per_loop_iteration_in_the_order_they_asked() -> None:
    """Many polls share one wake-up, but no loop iteration runs more than one of them (the loop's other
    work waits no longer than behind one poll)."""
    went = _run_turns([0.25] * 6)

    assert [index for index, _, _ in went] == list(range(6))
    iterations = [iteration for _, iteration, _ in went]
    assert iterations == list(range(iterations[0], iterations[0] + 6)), iterations
    assert max(at for _, _, at in went) - min(at for _, _, at in went) < 0.05


def test_a_poll_goes_no_more_than_half_a_tick_early_nor_a_tick_late() -> None:
    asks = [0.13, 0.17, 0.31, 0.38]
    start = time.time()
    went = _run_turns(asks)

    assert sorted(index for index, _, _ in went) == [0, 1, 2, 3]
    for index, _, at in went:
        due = start + asks[index]
        assert due - POLL_TICK / 2 - 0.01 <= at <= due + POLL_TICK + 0.05, (index, at - due)


def test_a_poll_cancelled_before_its_turn_holds_up_no_other_and_nothing_is_left_behind() -> None:
    went = _run_turns([0.2] * 4, cancel=(0, 2))

    assert [index for index, _, _ in went] == [1, 3]
    gc.collect()
    assert len(_TICKS) == 0  # a tick's waiting list goes with its timer and its chain of turns


def test_a_loop_that_ends_before_the_tick_leaves_no_waiting_list() -> None:
    async def main() -> None:
        waiter = asyncio.ensure_future(poll_turn(time.time() + 30))
        await asyncio.sleep(0)
        assert len(_TICKS) == 1
        waiter.cancel()

    asyncio.run(main())
    gc.collect()
    assert len(_TICKS) == 0


def test_loops_in_two_threads_release_their_own_polls() -> None:
    """A tick belongs to one event loop: another loop's polls due at the same time wait on its own timer."""
    results: list[list[tuple[int, int, float]]] = []
    threads = [threading.Thread(target=lambda: results.append(_run_turns([0.2] * 3))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert [sorted(index for index, _, _ in went) for went in results] == [[0, 1, 2], [0, 1, 2]]


def test_the_last_poll_before_a_deadline_is_not_early() -> None:
    async def main() -> float:
        at = time.time() + 0.2
        await poll_turn(at, early=False)
        return time.time() - at

    assert 0 <= asyncio.run(main()) <= POLL_TICK + 0.05


def test_by_default_a_poll_goes_at_the_nearest_tick_even_just_before_its_time() -> None:
    assert turn_tick(10.04, 9.9) == 100

    async def main() -> tuple[list[int], float]:
        at = (math.floor(time.time() / POLL_TICK) + 3) * POLL_TICK + 0.03  # just after a tick, 0.2 s ahead
        turn = poll_turn(at)
        ticks = [tick for loop_id, tick in _TICKS if loop_id == id(asyncio.get_running_loop())]
        turn.cancel()
        return ticks, at

    ticks, at = asyncio.run(main())
    assert ticks == [round(at / POLL_TICK)] and ticks[0] * POLL_TICK < at  # the timer is set before its time


def test_a_wait_beyond_any_tick_is_a_future_that_never_comes() -> None:
    async def main() -> bool:
        turn = poll_turn(math.inf)
        await asyncio.sleep(0.2)
        done = turn.done()
        turn.cancel()
        return done

    assert asyncio.run(main()) is False
