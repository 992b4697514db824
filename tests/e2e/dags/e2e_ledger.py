"""End-to-end money path of the ledger (evolink_provider/ledger.py): each DAG's first try fails the way real
operation does, and a retry or a clear must deliver the video the first try paid for without paying again.

The test (tests/e2e/test_ledger_e2e.py) runs them one at a time, adding simulator faults before a run; faults
that must hit a *retry* come in the run's ``conf`` and are added by ``on_retry_callback`` in the worker.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import pendulum
import requests
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

OUTPUT = os.path.join(os.environ.get("EVOLINK_DEMO_OUTPUT", "/tmp/evolink-e2e-videos"), "ledger")


def faults_for_the_retry(context: Any) -> None:
    """Add the run's ``conf["retry_faults"]`` to the simulator: the retry's first requests meet them."""
    rules = (context["dag_run"].conf or {}).get("retry_faults")
    if rules:
        host = json.loads(os.environ["AIRFLOW_CONN_EVOLINK_DEFAULT"])["host"]
        requests.post(f"{host}/_simulator/faults", json={"rules": rules}, timeout=5).raise_for_status()


def generation(dag_id: str, prompt: str, retries: int, **kwargs: Any) -> None:
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
        EvolinkSeedanceTextToVideoOperator(
            task_id="generate",
            prompt=prompt,
            duration=4,
            poll_interval=1,
            max_poll_interval=2,
            retries=retries,
            retry_delay=timedelta(seconds=1),
            **kwargs,
        )


# A refused fresh link (403 once), and chunked results whose second download fails: the retry delivers.
generation("e2e_ledger_refused", "one paid take [sim:seconds=2]", 2, output_path=OUTPUT)
generation("e2e_ledger_chunked", "two paid takes [sim:seconds=2] [sim:results=2]", 2, output_path=OUTPUT)
# No retries: the run fails with its video paid for; the test clears it.
generation("e2e_ledger_failed", "a take to collect on a clear [sim:seconds=2]", 0, output_path=OUTPUT)
# Every try stops waiting after 0.5 s of a 3 s generation: the retry reads the recorded task first.
generation(
    "e2e_ledger_reread",
    "read me again [sim:seconds=3]",
    4,
    timeout=0.5,
    on_retry_callback=faults_for_the_retry,
)
# The worker is SIGKILLed while its POST waits for an answer (the task already created): the retry resends
# the recorded Idempotency-Key (tests/e2e/test_ledger_e2e.py).
generation("e2e_ledger_killed_at_post", "killed between the POST and its answer [sim:seconds=2]", 2)
