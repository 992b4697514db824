"""The shared decide-after-poll function and its adaptive schedule (pure functions, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkTransportError
from evolink_provider.hooks.retry import Verdict
from evolink_provider.polling import (
    Outcome,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    next_poll_delay,
)


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


def test_progress_is_reported_on_change_only() -> None:
    reporter = ProgressReporter()
    assert reporter.update(task("pending", 0, estimate=165)) is not None
    assert reporter.update(task("pending", 0, estimate=165)) is None
    line = reporter.update(task("processing", 40, estimate=165))
    assert line is not None and "40%" in line and "165" in line


def test_failure_budget_resets_on_success() -> None:
    budget = PollFailureBudget(3, poll_interval=1.0, max_poll_interval=60.0)
    transient = EvolinkTransportError("reset", request_sent=True)
    assert budget.after_failure(transient).verdict is Verdict.REPEAT
    assert budget.after_failure(transient).verdict is Verdict.REPEAT
    budget.success()
    assert budget.after_failure(transient).delay == 1.0
    assert budget.after_failure(transient).delay == 2.0
    assert budget.after_failure(transient).verdict is Verdict.GIVE_UP
