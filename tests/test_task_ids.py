"""Task ids are checked for safety, never for a guessed format (``answers.TASK_ID_PATTERN``).

EvoLink documents only the ``task-unified-`` prefix; its own create examples answer
``task-unified-1774857405-abc123`` (6 characters after the timestamp), and HappyHorse answered
``task-happyhorse-<19 digits>-<mixed case>-<model>`` until 2026-04. A paid POST answered with a safe id must
complete: the DAG runs below are counted by the simulator, which answers the create with those ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evolink_provider.answers import is_task_id
from evolink_provider.storage import STORED_NAME, StoredFile, _already_stored, verify_stored
from tests.airflow_runs import run_dag, xcom
from tests.conftest import SimulatorControl

DOCUMENTED_ID = "task-unified-1774857405-abc123"
HAPPYHORSE_ID = "task-happyhorse-1774857405123456789-AbCdEfGhXy-happyhorse-1.0-reference-to-video"


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize(
    ("mode", "task_id"),
    [("sync", DOCUMENTED_ID), ("deferrable", DOCUMENTED_ID), ("sync", HAPPYHORSE_ID)],
    ids=["documented-sync", "documented-deferrable", "happyhorse-sync"],
)
def test_a_documented_create_answer_completes_with_one_post(
    sim: SimulatorControl, tmp_path: Path, mode: str, task_id: str
) -> None:
    sim.issue_task_ids(task_id)

    state, tasks = run_dag(f"evolink_issued_id_{mode}", run_conf={"output_dir": str(tmp_path)})

    assert state == "success", tasks
    assert sim.posts() == 1
    assert sim.stats()["tasks_created"] == 1
    assert xcom(f"evolink_issued_id_{mode}", "generate")["id"] == task_id
    assert [p.name for p in tmp_path.iterdir()] == [f"{task_id}-0.mp4"]


@pytest.mark.parametrize(
    "task_id",
    [DOCUMENTED_ID, HAPPYHORSE_ID, "task-unified-1-mjv7", "a", "A_b.c-9", "x" * 128, "task..id"],
)
def test_safe_ids_of_any_shape_are_accepted(task_id: str) -> None:
    assert is_task_id(task_id)
    assert STORED_NAME.fullmatch(f"{task_id}-0.mp4")


@pytest.mark.parametrize(
    "task_id",
    ["", ".", "..", ".hidden", "-rf", "x" * 129, "a/b", "a%2Fb", "a:b", "a b", "a?b", "é", "a\n", 7, None],
)
def test_unsafe_ids_are_refused(task_id: object) -> None:
    assert not is_task_id(task_id)


def test_a_stored_result_counts_only_under_its_own_task_id(tmp_path: Path) -> None:
    """``a-0.5-0.mp4`` is result 0 of task ``a-0.5``; it matches the glob ``a-0.*`` of task ``a``."""
    (tmp_path / "a-0.5-0.mp4").write_bytes(b"x")
    assert _already_stored(tmp_path, "a", 0, None) is None
    assert _already_stored(tmp_path, "a-0.5", 0, None) == tmp_path / "a-0.5-0.mp4"
    recorded = StoredFile(0, "a-0.5-0.mp4", 1, "")
    assert verify_stored("a", str(tmp_path), [recorded], 1) is None
    assert verify_stored("a-0.5", str(tmp_path), [recorded], 1) == [str(tmp_path / "a-0.5-0.mp4")]


def test_clearing_stale_parts_of_a_result_leaves_another_tasks_download(tmp_path: Path) -> None:
    """``.a-0.part-1-0.part-…`` is a download of task ``a-0.part-1`` in progress; it matches the glob of
    task ``a``'s stale parts (``.a-0.part-*``) but is not one of them."""
    from evolink_provider.storage import _remove_stale_parts

    other = tmp_path / ".a-0.part-1-0.part-0123abcd"
    stale = tmp_path / ".a-0.part-deadbeef"
    other.write_bytes(b"in progress")
    stale.write_bytes(b"killed")
    _remove_stale_parts(tmp_path, "a-0")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]


def test_the_simulator_reads_the_ids_it_issued_and_refuses_unknown_ones_as_documented(
    sim: SimulatorControl,
) -> None:
    """EvoLink's task query answers 400 ``invalid_task_id`` ("must start with 'task-unified-'") for an id
    without the prefix; a task it issued with another shape (HappyHorse until 2026-04) was readable."""
    from evolink_provider.exceptions import EvolinkBadRequestError, EvolinkNotFoundError
    from evolink_provider.hooks.evolink import EvolinkHook

    sim.issue_task_ids(HAPPYHORSE_ID)
    hook = EvolinkHook()
    seedance = {"model": "seedance-2.0-fast-text-to-video", "prompt": "p", "duration": 4}
    created = hook.create_video_task(seedance)
    assert created["id"] == HAPPYHORSE_ID
    assert hook.get_task(HAPPYHORSE_ID)["id"] == HAPPYHORSE_ID
    with pytest.raises(EvolinkBadRequestError, match="must start with 'task-unified-'") as refused:
        hook.get_task("task-happyhorse-1-unknown")
    assert refused.value.code == "invalid_task_id"
    with pytest.raises(EvolinkNotFoundError):
        hook.get_task("task-unified-1-unknown")
