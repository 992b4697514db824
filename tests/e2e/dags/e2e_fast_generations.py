"""200 short deferrable generations with ``retries=0``: the Airflow 3.2-3.3 scheduler race must fail none.

Every generation lasts 1-5 s. Even ones carry an honest estimate (the operator waits on the worker); odd
ones announce 20 s (so they defer) and are polled every 1-3 s, so their trigger sees the end within seconds
of the deferral: exactly the fast trigger that the race turns into a failed task instance, held here by the
trigger's ``not_before``. Deferrable sensors then reattach to twenty of the already-finished tasks.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.sensors.evolink import EvolinkTaskSensor

FAST_GENERATIONS = 200
REATTACHED = 20


def prompt(index: int) -> str:
    seconds = 1 + index % 5
    estimate = seconds if index % 2 == 0 else 20
    return f"Fast take {index} [sim:seconds={seconds}] [sim:estimate={estimate}]"


PROMPTS = [prompt(index) for index in range(FAST_GENERATIONS)]

with DAG(
    "e2e_fast_generations",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=64,
):
    generated = EvolinkSeedanceTextToVideoOperator.partial(
        task_id="generate", duration=4, deferrable=True, poll_interval=1, max_poll_interval=3, retries=0
    ).expand(prompt=PROMPTS)

    @task(retries=0)
    def finished_ids(tasks: list[dict[str, object]]) -> list[str]:
        return [str(generation["id"]) for generation in list(tasks)[:REATTACHED]]

    EvolinkTaskSensor.partial(
        task_id="reattach", deferrable=True, poke_interval=1, max_poll_interval=3, retries=0, timeout=300
    ).expand(evolink_task_id=finished_ids(generated.output))
