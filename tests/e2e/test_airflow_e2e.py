"""End to end on a real Airflow: api-server, scheduler, dag-processor and triggerer against the simulator.

One module-scoped session (``outcome``) starts the cluster, triggers the four example DAGs, the two recovery
DAGs and a canary DAG at once through the REST API, SIGKILLs the worker of the sync recovery task while it
polls, restarts the triggerer while the deferrable recovery task's trigger polls, waits for every run, stops
the cluster, and collects the evidence the tests below check.

Canaries prove the checks can fail: a planted DAG file that cannot be imported must show up in
``airflow dags list-import-errors``, and a DAG whose trigger cannot be serialized must fail its task with
the serde error the checks look for.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.editing import probe
from tests.e2e.airflow_cluster import (
    OVERALL_BOUND,
    AirflowCluster,
    ProcessGroups,
    TIKey,
    files_containing,
    processes_marked,
    secret_leaks,
)
from tests.e2e.dags.e2e_evolink_recovery import TRIGGERER_RESTART_PROMPT, WORKER_CRASH_PROMPT
from tests.e2e.dags.e2e_fast_generations import FAST_GENERATIONS, PROMPTS, REATTACHED

# The module's cluster session runs in its first test's setup: bounded by the cluster, not pytest's 900 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(OVERALL_BOUND + 300)]

EXAMPLES = [
    "example_evolink_text_to_video_edit",
    "example_evolink_reference_images",
    "example_evolink_character_to_video",
    "example_evolink_batch_concat",
]
WORKER_CRASH, TRIGGERER_RESTART = "e2e_worker_crash", "e2e_triggerer_restart"
SERIALIZATION_CANARY = "e2e_canary_unserializable_trigger"
FAST = "e2e_fast_generations"
REAL_DAGS = [*EXAMPLES, WORKER_CRASH, TRIGGERER_RESTART]
#: The deferrable EvoLink tasks of each DAG: (task_id, map indexes).
DEFERRABLE_TASKS = {
    "example_evolink_text_to_video_edit": [("generate", -1)],
    "example_evolink_reference_images": [("generate", -1)],
    "example_evolink_character_to_video": [
        ("source_clip", -1),
        ("extract_character", -1),
        ("cast_character", -1),
    ],
    "example_evolink_batch_concat": [("generate", 0), ("generate", 1), ("generate", 2)],
    TRIGGERER_RESTART: [("generate", -1)],
}
EVOLINK_TASKS = {**DEFERRABLE_TASKS, WORKER_CRASH: [("generate", -1)]}
TRIGGER_CLASSPATH = "evolink_provider.triggers.evolink.EvolinkTaskTrigger"
BROKEN_DAG_FILE = "e2e_canary_import_error.py"
BROKEN_DAG_SOURCE = '''"""Planted by the end-to-end test: list-import-errors must report this file."""
from airflow.sdk import DAG  # noqa: F401

raise RuntimeError("planted import error")
'''
RUN_TIMEOUT = 300
#: The 200 fast generations share the cluster's 8 slots with everything else.
FAST_RUN_EXTRA = 600


@dataclass
class Cleared:
    """A finished generation cleared through the REST API, and what its second run did."""

    task_ids: list[str]
    before: dict[str, Any]
    after: dict[str, Any]
    posts_added: int
    state: str


@dataclass
class Outcome:
    cluster: AirflowCluster
    runs: dict[str, str]
    states: dict[str, str]
    stats: dict[str, Any]
    import_errors: dict[str, str]
    timings: dict[str, float]
    killed_pids: list[int] = field(default_factory=list)
    killed_at: float = 0.0
    restarted_at: float = 0.0
    old_triggerers: set[int] = field(default_factory=set)
    all_runs: dict[tuple[str, str], str | None] = field(default_factory=dict)
    heartbeat_timeouts: int = 0
    leaks: list[str] = field(default_factory=list)
    left_running: list[int] = field(default_factory=list)
    cleared: Cleared | None = None

    def evolink_task_id(self, dag_id: str, task_id: str, map_index: int = -1) -> str:
        record = self.cluster.task_state_store(dag_id, self.runs[dag_id], task_id, map_index)
        return str(record["evolink_submission"]["task_id"])

    def idempotency_key(self, dag_id: str, task_id: str, map_index: int = -1) -> str:
        record = self.cluster.task_state_store(dag_id, self.runs[dag_id], task_id, map_index)
        return str(record["evolink_submission"]["idempotency_key"])

    def key(self, dag_id: str, task_id: str, map_index: int = -1) -> TIKey:
        return (dag_id, self.runs[dag_id], task_id, map_index)


def kill_worker_mid_wait(cluster: AirflowCluster, run_id: str) -> list[int]:
    """Once the sync task has submitted and is polling, SIGKILL its worker."""

    def polling() -> bool:
        ti = cluster.task_instances(WORKER_CRASH, run_id).get("generate")
        record = cluster.task_state_store(WORKER_CRASH, run_id, "generate").get("evolink_submission")
        if ti is None or ti.state != "running" or not record or not record.get("task_id"):
            return False
        return cluster.sim_stats()["polls_by_task"].get(record["task_id"], 0) >= 1

    cluster.wait_for(polling, 180, "the sync task to submit and poll")
    return cluster.kill_worker(WORKER_CRASH, run_id, "generate")


def restart_triggerer_mid_wait(cluster: AirflowCluster, run_id: str) -> set[int]:
    """Once the deferrable task's trigger runs in the triggerer and has polled, restart the triggerer.
    Returns the triggerer job ids that held the trigger before the restart."""
    key = (TRIGGERER_RESTART, run_id, "generate", -1)

    def trigger_polling() -> set[int] | None:
        if "deferred" not in cluster.seen(key):
            return None
        held_by = cluster.triggerers_holding(key)
        record = cluster.task_state_store(TRIGGERER_RESTART, run_id, "generate").get("evolink_submission")
        polls = cluster.sim_stats()["polls_by_task"].get((record or {}).get("task_id"), 0)
        return held_by if held_by and polls >= 1 else None

    held_by = cluster.wait_for(trigger_polling, 180, "the deferred task's trigger to poll")
    cluster.restart_triggerer()
    return held_by


#: Run once every other run has finished (so the figures above leave it out), then cleared.
CLEARED = "e2e_clearable"


def clear_a_finished_generation(cluster: AirflowCluster) -> Cleared:
    """Run CLEARED, clear its finished ``generate`` through the REST API, and wait for the run again."""
    run_id = cluster.trigger(CLEARED)
    assert cluster.wait_for_runs({CLEARED: run_id}, RUN_TIMEOUT)[CLEARED] == "success"

    def record() -> dict[str, Any]:
        return dict(cluster.task_state_store(CLEARED, run_id, "generate")["evolink_submission"])

    def posts() -> int:
        return int(cluster.sim_stats()["requests"].get("POST /v1/videos/generations", 0))

    before, posts_before = record(), posts()
    task_ids = cluster.clear(CLEARED, run_id, ["generate"])
    state = cluster.wait_for_runs({CLEARED: run_id}, RUN_TIMEOUT)[CLEARED]
    return Cleared(task_ids, before, record(), posts() - posts_before, state)


@pytest.fixture(scope="module")
def outcome(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    failed_before = request.session.testsfailed
    timings: dict[str, float] = {}
    began = time.monotonic()
    with AirflowCluster(extra_dag_sources={BROKEN_DAG_FILE: BROKEN_DAG_SOURCE}) as cluster:
        timings["cluster up"] = time.monotonic() - began
        cluster.wait_for_dags([*REAL_DAGS, SERIALIZATION_CANARY, FAST, CLEARED])
        cluster.wait_for(
            lambda: cluster.query(
                "select filename from import_error where filename like ?", f"%{BROKEN_DAG_FILE}"
            ),
            120,
            "the planted import error to be recorded",
        )
        timings["DAGs parsed"] = time.monotonic() - began
        runs = {dag_id: cluster.trigger(dag_id) for dag_id in [WORKER_CRASH, TRIGGERER_RESTART, *EXAMPLES]}
        runs[SERIALIZATION_CANARY] = cluster.trigger(SERIALIZATION_CANARY)
        runs[FAST] = cluster.trigger(FAST)
        timings["runs triggered"] = time.monotonic() - began
        result = Outcome(cluster, runs, {}, {}, {}, timings)
        result.killed_pids = kill_worker_mid_wait(cluster, runs[WORKER_CRASH])
        result.killed_at = time.time()
        timings["worker killed"] = time.monotonic() - began
        result.old_triggerers = restart_triggerer_mid_wait(cluster, runs[TRIGGERER_RESTART])
        result.restarted_at = time.time()
        timings["triggerer restarted"] = time.monotonic() - began
        result.states = cluster.wait_for_runs(runs, RUN_TIMEOUT + FAST_RUN_EXTRA)
        timings["runs finished"] = time.monotonic() - began
        result.stats = cluster.sim_stats()
        result.import_errors = cluster.import_errors()
        result.all_runs = cluster.runs()
        result.cleared = clear_a_finished_generation(cluster)
        timings["cleared run finished"] = time.monotonic() - began
        result.heartbeat_timeouts = len(
            cluster.query(
                "select id from log where event = 'heartbeat timeout' and dag_id = ? and run_id = ?",
                WORKER_CRASH,
                runs[WORKER_CRASH],
            )
        )
        if any(result.states[d] != "success" for d in REAL_DAGS):
            for dag_id in REAL_DAGS:
                instances = cluster.task_instances(dag_id, runs[dag_id])
                print(dag_id, result.states[dag_id], instances)
                for task, ti in instances.items():
                    if ti.state != "success":
                        task_id, _, index = task.partition("[")
                        log = cluster.task_log(
                            dag_id, runs[dag_id], task_id, ti.try_number, int(index[:-1] or -1)
                        )
                        print(f"--- {dag_id}.{task} try {ti.try_number} log ---\n{log[-6000:]}")
            for name in ("scheduler", "triggerer"):
                print(f"--- {name} log ---\n{cluster.log_tail(name)}")
    timings["stopped"] = time.monotonic() - began
    result.left_running = processes_marked(cluster.procs.marker)
    result.leaks = cluster.leaks()
    print("e2e timings (s):", {k: round(v, 1) for k, v in timings.items()})
    yield result
    if request.session.testsfailed == failed_before and not os.environ.get("EVOLINK_E2E_KEEP"):
        shutil.rmtree(cluster.home, ignore_errors=True)
    else:
        print(f"e2e AIRFLOW_HOME kept for inspection: {cluster.home}")


# -- the runs -----------------------------------------------------------------------------------


def test_every_run_succeeded(outcome: Outcome) -> None:
    assert {d: outcome.states[d] for d in REAL_DAGS} == dict.fromkeys(REAL_DAGS, "success")
    # No run the test did not start (a schedule, a catch-up) and none left unfinished.
    assert outcome.all_runs == {(d, r): outcome.states[d] for d, r in outcome.runs.items()}


def test_no_task_failed_or_logged_an_error(outcome: Outcome) -> None:
    cluster = outcome.cluster
    for dag_id in REAL_DAGS:
        instances = cluster.task_instances(dag_id, outcome.runs[dag_id])
        assert instances and {ti.state for ti in instances.values()} == {"success"}, (dag_id, instances)
        assert cluster.task_errors(dag_id, outcome.runs[dag_id]) == []
    assert cluster.watch_errors == []


def test_a_cleared_generation_kept_its_run_and_generated_anew(outcome: Outcome) -> None:
    """The UI's Clear (the REST API's): same run, same task_state_store row, a new generation and key."""
    cleared = outcome.cleared
    assert cleared is not None
    assert (cleared.task_ids, cleared.state) == (["generate"], "success")
    assert cleared.after["generation"] != cleared.before["generation"]
    assert cleared.after["task_id"] != cleared.before["task_id"]
    assert cleared.after["idempotency_key"] != cleared.before["idempotency_key"]
    assert cleared.posts_added == 1


def test_dag_files_import_cleanly_and_a_broken_one_is_reported(outcome: Outcome) -> None:
    """Exactly the planted file: an import error in any real DAG file would be listed here too."""
    assert list(outcome.import_errors) == [BROKEN_DAG_FILE]
    assert "planted import error" in outcome.import_errors[BROKEN_DAG_FILE]


def test_an_unserializable_trigger_fails_its_task_and_is_caught(outcome: Outcome) -> None:
    """The canary shows what a trigger that cannot be serialized does in a real Airflow, and that the
    checks above (run states, task states, logged errors) catch it."""
    run_id = outcome.runs[SERIALIZATION_CANARY]
    assert outcome.states[SERIALIZATION_CANARY] == "failed"
    assert outcome.cluster.task_instances(SERIALIZATION_CANARY, run_id)["defer"].state == "failed"
    errors = outcome.cluster.task_errors(SERIALIZATION_CANARY, run_id)
    assert any("Cannot serialize object" in error for error in errors), errors


# -- deferral -----------------------------------------------------------------------------------


def test_deferrable_tasks_went_through_the_triggerer(outcome: Outcome) -> None:
    cluster = outcome.cluster
    for dag_id, tasks in DEFERRABLE_TASKS.items():
        for task_id, map_index in tasks:
            key = outcome.key(dag_id, task_id, map_index)
            assert "deferred" in cluster.states_seen[key], (key, cluster.states_seen[key])
            triggers = cluster.triggers_of[key]
            assert triggers, f"no trigger row was seen for {key}"
            for trigger in triggers:
                seen = cluster.triggers[trigger]
                assert seen.classpath == TRIGGER_CLASSPATH
                assert seen.triggerer_ids, f"trigger {trigger} of {key} was never picked up"
                kwargs = cluster.trigger_kwargs(trigger)
                assert kwargs["evolink_task_id"] == outcome.evolink_task_id(dag_id, task_id, map_index)
                assert kwargs["evolink_conn_id"] == "evolink_default"


def test_the_triggerer_read_tasks_in_batches(outcome: Outcome) -> None:
    """The e2e connection turns batch polling on: the triggerer's waits went through the batch endpoint and
    never fell back to single reads (the simulator counts each id of a batch call as a poll)."""
    stats = outcome.stats
    assert stats["requests"].get("POST /v1/tasks/batch", 0) >= 1
    deferrable = sum(len(tasks) for tasks in DEFERRABLE_TASKS.values())
    batch_reads = sum(stats["polls_by_task"].values()) - stats["requests"].get("GET /v1/tasks", 0)
    assert batch_reads >= deferrable
    assert files_containing(outcome.cluster.home / "logs", "reading tasks one by one") == []


def test_sync_task_never_deferred(outcome: Outcome) -> None:
    key = outcome.key(WORKER_CRASH, "generate")
    assert "deferred" not in outcome.cluster.states_seen[key]
    assert not outcome.cluster.triggers_of[key]


# -- outputs --------------------------------------------------------------------------------------


def test_edited_video_and_thumbnail(outcome: Outcome) -> None:
    cluster = outcome.cluster
    dag_id = "example_evolink_text_to_video_edit"
    edit = cluster.xcom(dag_id, outcome.runs[dag_id], "edit")
    for path in edit.values():
        assert Path(path).is_relative_to(cluster.output), path
        assert Path(path).stat().st_size > 0, path
    raw, edited = probe(edit["raw"]), probe(edit["edited"])
    assert raw.duration == pytest.approx(5.0, abs=0.3)
    assert edited.duration == pytest.approx(4.0, abs=0.3)
    assert (edited.width, edited.height) == (raw.width, raw.height) == (1280, 720)
    assert probe(edit["thumbnail"]).width > 0


def test_reference_images_video_is_stored(outcome: Outcome) -> None:
    dag_id = "example_evolink_reference_images"
    generated = outcome.cluster.xcom(dag_id, outcome.runs[dag_id], "generate")
    (stored,) = generated["files"]
    assert Path(stored).is_relative_to(outcome.cluster.output)
    video = probe(stored)
    assert video.duration == pytest.approx(4.0, abs=0.3)
    assert (video.width, video.height) == (1280, 720)


def test_batch_reel_and_contact_sheet(outcome: Outcome) -> None:
    dag_id = "example_evolink_batch_concat"
    assembled = outcome.cluster.xcom(dag_id, outcome.runs[dag_id], "assemble")
    assert len(assembled["clips"]) == 3
    for clip in assembled["clips"]:
        assert probe(clip).duration == pytest.approx(4.0, abs=0.3)
    reel = probe(assembled["reel"])
    assert reel.duration == pytest.approx(12.0, abs=0.5)
    assert (reel.width, reel.height) == (1280, 720)
    assert Path(assembled["contact_sheet"]).stat().st_size > 0


def test_character_flows_into_the_next_generation(outcome: Outcome) -> None:
    dag_id = "example_evolink_character_to_video"
    summary = outcome.cluster.xcom(dag_id, outcome.runs[dag_id], "summarize")
    assert summary["character_name"].startswith("chr_")
    assert summary["video"].startswith(outcome.cluster.sim_url)


# -- crash and restart ----------------------------------------------------------------------------


def test_killed_worker_was_detected_retried_and_reattached(outcome: Outcome) -> None:
    cluster, run_id = outcome.cluster, outcome.runs[WORKER_CRASH]
    assert len(outcome.killed_pids) == 2
    assert outcome.heartbeat_timeouts >= 1, "the scheduler never noticed the dead worker"
    ti = cluster.task_instances(WORKER_CRASH, run_id)["generate"]
    assert (ti.state, ti.try_number) == ("success", 2)
    assert "up_for_retry" in cluster.states_seen[outcome.key(WORKER_CRASH, "generate")]
    evolink_id = outcome.evolink_task_id(WORKER_CRASH, "generate")
    first, second = (cluster.task_log(WORKER_CRASH, run_id, "generate", attempt) for attempt in (1, 2))
    assert f"Submitted EvoLink task {evolink_id}" in first
    assert f"Reattaching to EvoLink task {evolink_id}" in second
    assert "Submitted EvoLink task" not in second
    # The retry polled the same task after the kill.
    assert any(t > outcome.killed_at for t in outcome.stats["poll_times_by_task"][evolink_id])


def test_killed_worker_cost_one_post(outcome: Outcome) -> None:
    key = outcome.idempotency_key(WORKER_CRASH, "generate")
    assert outcome.stats["posts_by_idempotency_key"][key] == 1
    assert outcome.stats["tasks_by_prompt"][WORKER_CRASH_PROMPT] == 1


def test_restarted_triggerer_resumed_the_wait(outcome: Outcome) -> None:
    cluster = outcome.cluster
    key = outcome.key(TRIGGERER_RESTART, "generate")
    ti = cluster.task_instances(TRIGGERER_RESTART, outcome.runs[TRIGGERER_RESTART])["generate"]
    assert (ti.state, ti.try_number) == ("success", 1), "the wait should resume, not be retried"
    (trigger,) = cluster.triggers_of[key]
    held_by = cluster.triggers[trigger].triggerer_ids
    assert outcome.old_triggerers and outcome.old_triggerers < held_by, "no new triggerer took the trigger"
    old_jobs = dict(cluster.triggerer_jobs())
    assert all(old_jobs[job] != "running" for job in outcome.old_triggerers)
    evolink_id = outcome.evolink_task_id(TRIGGERER_RESTART, "generate")
    assert any(t > outcome.restarted_at for t in outcome.stats["poll_times_by_task"][evolink_id])


def test_restarted_triggerer_cost_one_post(outcome: Outcome) -> None:
    key = outcome.idempotency_key(TRIGGERER_RESTART, "generate")
    assert outcome.stats["posts_by_idempotency_key"][key] == 1
    assert outcome.stats["tasks_by_prompt"][TRIGGERER_RESTART_PROMPT] == 1


def test_one_post_per_generation(outcome: Outcome) -> None:
    stats = outcome.stats
    generations = sum(len(tasks) for tasks in EVOLINK_TASKS.values())
    keys = {outcome.idempotency_key(d, t, m) for d, tasks in EVOLINK_TASKS.items() for t, m in tasks}
    assert len(keys) == generations
    fast = {k: n for k, n in stats["posts_by_idempotency_key"].items() if k not in keys}
    assert stats["requests"]["POST /v1/videos/generations"] == generations + FAST_GENERATIONS
    assert {k: n for k, n in stats["posts_by_idempotency_key"].items() if k in keys} == dict.fromkeys(keys, 1)
    assert len(fast) == FAST_GENERATIONS and set(fast.values()) == {1}
    assert stats["tasks_created"] == generations + FAST_GENERATIONS
    assert stats["idempotent_replays"] == 0


def test_fast_deferrable_generations_survive_the_scheduler_race(outcome: Outcome) -> None:
    """200 mapped 1-5 s deferrable generations with retries=0 (docs/reliability.md, "Fast triggers")."""
    instances = outcome.cluster.task_instances(FAST, outcome.runs[FAST])
    generations = {k: ti for k, ti in instances.items() if k.startswith("generate[")}
    sensors = {k: ti for k, ti in instances.items() if k.startswith("reattach[")}
    assert len(generations) == FAST_GENERATIONS and len(sensors) == REATTACHED
    failed = {k: ti.state for k, ti in instances.items() if ti.state != "success"}
    assert failed == {}, failed
    assert {ti.try_number for ti in instances.values()} == {1}
    assert outcome.states[FAST] == "success"
    # One billable task per generation; the sensors reattached to finished tasks and created none.
    assert {p: outcome.stats["tasks_by_prompt"].get(p) for p in PROMPTS} == dict.fromkeys(PROMPTS, 1)
    deferred = [
        i
        for i in range(FAST_GENERATIONS)
        if "deferred" in outcome.cluster.seen(outcome.key(FAST, "generate", i))
    ]
    assert len(deferred) >= FAST_GENERATIONS // 2  # the odd ones at least went through the triggerer


# -- secrets and clean-up ---------------------------------------------------------------------------


def test_the_api_key_appears_nowhere_in_airflow_home(outcome: Outcome) -> None:
    cluster = outcome.cluster
    assert (cluster.home / "airflow.db").stat().st_size > 0
    assert any(cluster.home.joinpath("logs").rglob("*.log.trigger.*.log")), "no trigger log was written"
    assert cluster.triggers, "no trigger kwargs were captured to check"
    assert outcome.leaks == []


def test_every_process_was_stopped(outcome: Outcome) -> None:
    assert outcome.left_running == []
    assert outcome.cluster.procs.running == {}


def test_the_leak_check_finds_a_planted_key(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    secret, fernet_key = "sk-sim-e2e-planted0123456789", Fernet.generate_key().decode()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "clean.log").write_text("Authorization: Bearer ***")
    assert secret_leaks(tmp_path, secret, fernet_key) == []
    (tmp_path / "logs" / "task.log").write_text(f"Authorization: Bearer {secret}")
    with sqlite3.connect(tmp_path / "airflow.db") as db:
        db.execute("create table xcom (value text)")
        db.execute("insert into xcom values (?)", (f'{{"api_key": "{secret}"}}',))
    encrypted = Fernet(fernet_key.encode()).encrypt(f'{{"token": "{secret}"}}'.encode()).decode()
    assert secret.encode() not in encrypted.encode()
    assert secret_leaks(tmp_path, secret, fernet_key, [encrypted]) == [
        str(tmp_path / "airflow.db"),
        str(tmp_path / "logs" / "task.log"),
        "encrypted trigger kwargs #0",
    ]
    assert files_containing(tmp_path, "not-there") == []


def test_process_groups_stop_everything_even_on_failure(tmp_path: Path) -> None:
    """A child that ignores SIGTERM and a grandchild that escaped into its own session: both die."""
    marker = f"unit-{os.getpid()}-{time.time_ns()}"
    procs = ProcessGroups(tmp_path, dict(os.environ), marker)
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
        "start_new_session=True); time.sleep(600)"
    )
    strays: list[int] = []
    with pytest.raises(RuntimeError, match="the test body failed"):
        try:
            procs.spawn("stubborn", [sys.executable, "-c", stubborn])
            deadline = time.monotonic() + 30
            while len(processes_marked(marker)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(processes_marked(marker)) == 2
            raise RuntimeError("the test body failed")
        finally:
            strays = procs.stop_all(grace=1)
    assert processes_marked(marker) == []
    assert len(strays) == 1
    assert procs.running == {}


# -- assets and extra links (a cluster of their own) ---------------------------------------------------
#
# Asset-triggered runs are created by the scheduler's job schedule, which the cluster above turns off (an
# @daily example would start a run of its own on unpause). This one turns it on and unpauses only the two
# DAGs of the chain, so no other DAG can start a run.

ASSET_PRODUCER, ASSET_CONSUMER = "example_evolink_videos_as_assets", "example_evolink_publish_new_videos"


@dataclass
class AssetChain:
    cluster: AirflowCluster
    producer_run: str
    consumer_runs: list[dict[str, Any]]
    generated: dict[str, Any]
    asset_events: list[dict[str, Any]]
    upstream_events: list[dict[str, Any]]
    published: list[dict[str, Any]]
    links: dict[str, Any]
    errors: list[str]


@pytest.fixture(scope="module")
def asset_chain() -> Iterator[AssetChain]:
    with AirflowCluster(extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True"}) as cluster:
        cluster.wait_for_dags([ASSET_PRODUCER, ASSET_CONSUMER])
        cluster.unpause(ASSET_CONSUMER)
        run_id = cluster.trigger(ASSET_PRODUCER)
        cluster.wait_for_runs({ASSET_PRODUCER: run_id}, RUN_TIMEOUT)

        def consumer_runs_done() -> list[dict[str, Any]] | None:
            runs = cluster.api("GET", f"dags/{ASSET_CONSUMER}/dagRuns")["dag_runs"]
            return runs if runs and all(r["state"] in ("success", "failed") for r in runs) else None

        consumer_runs = cluster.wait_for(consumer_runs_done, 180, "the asset-triggered run to finish")
        consumer_run = consumer_runs[0]["dag_run_id"]
        chain = AssetChain(
            cluster=cluster,
            producer_run=run_id,
            consumer_runs=consumer_runs,
            generated=cluster.xcom(ASSET_PRODUCER, run_id, "generate"),
            asset_events=cluster.api("GET", "assets/events", params={"source_dag_id": ASSET_PRODUCER})[
                "asset_events"
            ],
            upstream_events=cluster.api(
                "GET", f"dags/{ASSET_CONSUMER}/dagRuns/{consumer_run}/upstreamAssetEvents"
            )["asset_events"],
            published=cluster.xcom(ASSET_CONSUMER, consumer_run, "publish"),
            links=cluster.api("GET", f"dags/{ASSET_PRODUCER}/dagRuns/{run_id}/taskInstances/generate/links")[
                "extra_links"
            ],
            errors=[],
        )
    chain.errors = cluster.task_errors(ASSET_PRODUCER) + cluster.task_errors(ASSET_CONSUMER)
    yield chain
    shutil.rmtree(cluster.home, ignore_errors=True)


def test_a_stored_video_triggered_the_publishing_dag(asset_chain: AssetChain) -> None:
    (run,) = asset_chain.consumer_runs
    assert (run["run_type"], run["state"]) == ("asset_triggered", "success")
    (stored,) = asset_chain.generated["files"]
    (event,) = asset_chain.upstream_events
    assert event["uri"] == Path(stored).resolve().as_uri()
    assert (event["source_dag_id"], event["source_run_id"]) == (ASSET_PRODUCER, asset_chain.producer_run)
    (card,) = asset_chain.published
    assert card["video"] == Path(stored).resolve().as_uri()
    assert card["evolink_task_id"] == asset_chain.generated["id"]
    assert probe(card["thumbnail"]).width > 0
    assert asset_chain.errors == []


def test_the_asset_event_carries_the_documented_extra(asset_chain: AssetChain) -> None:
    (event,) = asset_chain.asset_events
    (stored,) = asset_chain.generated["files"]
    extra = event["extra"]
    assert extra["evolink_task_id"] == asset_chain.generated["id"]
    assert extra["model"] == "seedance-2.0-fast-text-to-video"
    assert extra["duration"] == 4 and extra["result_index"] == 0
    assert extra["size_bytes"] == Path(stored).stat().st_size
    assert len(extra["prompt_sha256"]) == 64
    assert extra["credits_used"] == asset_chain.generated["credits"]["used"] is not None
    assert [run["dag_id"] for run in event["created_dagruns"]] == [ASSET_CONSUMER]


def test_the_extra_links_of_a_finished_task_through_the_rest_api(asset_chain: AssetChain) -> None:
    (video_url,) = asset_chain.generated["results"]
    assert video_url.startswith(asset_chain.cluster.sim_url)
    assert asset_chain.links == {
        "EvoLink video": video_url,
        "EvoLink profile picture": None,
        "Stored video": None,  # a local file has no web address
    }
