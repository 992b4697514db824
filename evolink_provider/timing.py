"""The clock and the time constants of waiting for a generation, in one place that is read at call time.

The wait-on-worker window, the trigger hold and the schedule of polls decide *when* a deferrable
operator defers and when its trigger may fire. They are read from :func:`current` each time they are
used, never copied into a constant elsewhere, so that a test can shorten them (a deferrable test then
really defers within seconds) and check each one, and so that a change here reaches every reader.

Why the two constants have the values they have:

* :attr:`Timing.trigger_hold` (15 s): Airflow 3.2-3.3's scheduler can fail a task instance whose trigger
  fires seconds after the deferral (apache/airflow#66374, #67287, #71580, #72716; docs/reliability.md,
  "Fast triggers"). The operators and the sensor set the trigger's ``not_before`` to the deferral time
  plus this hold, and the trigger fires no event before it.
* :attr:`Timing.wait_on_worker_window` (15 s, the hold): a deferrable operator whose task is expected to
  end within this window waits for it on the worker, and defers only if it is still running after it;
  deferring it would only make it wait out the hold.

They are not user settings. Tests steer them with :func:`steered`; the separate processes of an
end-to-end test cluster read the test-only environment variable :data:`TEST_TIMING_ENV` (a JSON object
of the fields, e.g. ``{"trigger_hold": 2, "wait_on_worker_window": 1}``) when this module is imported.
Deployments leave it unset.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

#: Test-only: the environment variable an end-to-end test cluster's processes read their timing from.
TEST_TIMING_ENV = "EVOLINK_PROVIDER_TEST_TIMING"


@dataclass(frozen=True)
class Timing:
    """The clock and the constants of waiting (see the module docstring for their values)."""

    trigger_hold: float = 15.0
    wait_on_worker_window: float = 15.0
    #: The first pause before the ledger reads a recorded task again (then three times it); see
    #: :mod:`evolink_provider.ledger`.
    reread_pause: float = 1.0
    #: Epoch seconds now.
    clock: Callable[[], float] = time.time

    def now(self) -> float:
        return self.clock()


def from_environment(value: str | None) -> Timing:
    """The timing a test cluster asked for in :data:`TEST_TIMING_ENV` (the defaults when unset).

    Only the number fields can be set there; anything else is refused, so that a typo does not silently
    leave a test on the production timing.
    """
    if not value:
        return Timing()
    numbers = {f.name for f in fields(Timing) if f.name != "clock"}
    wanted = json.loads(value)
    if not isinstance(wanted, dict) or not set(wanted) <= numbers:
        raise ValueError(f"{TEST_TIMING_ENV} takes a JSON object of {sorted(numbers)}, not {value!r}")
    seconds: dict[str, Any] = {name: float(value) for name, value in wanted.items()}
    return replace(Timing(), **seconds)


_current = from_environment(os.environ.get(TEST_TIMING_ENV))


def current() -> Timing:
    """The timing in force now."""
    return _current


@contextmanager
def steered(**changes: Any) -> Iterator[Timing]:
    """Test-only: run a block with some fields of the timing changed (``trigger_hold=1``, ``clock=...``)."""
    global _current
    before = _current
    _current = replace(before, **changes)
    try:
        yield _current
    finally:
        _current = before
