"""The example DAGs: they parse with no import error, and each runs to success on the simulator."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.editing import probe
from tests.airflow_runs import EXAMPLE_FILES, only_files, xcom
from tests.conftest import DAGS_FOLDER, REPO, SimulatorControl, migrated_db

EXAMPLES = {
    "example_evolink_text_to_video_edit",
    "example_evolink_reference_images",
    "example_evolink_character_to_video",
    "example_evolink_batch_concat",
    "example_evolink_videos_as_assets",
    "example_evolink_publish_new_videos",
}


def test_example_dags_parse_without_import_errors() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "example_dags"))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == EXAMPLES
    for dag_id in EXAMPLES:
        source = (REPO / "example_dags" / f"{dag_id}.py").read_text()
        assert ast.get_docstring(ast.parse(source)), f"{dag_id} has no docstring saying what it shows"
        assert "# [START howto_" in source and "# [END howto_" in source


def test_every_deferrable_example_task_has_a_retry() -> None:
    """The examples do what the provider's defer-race warning asks (they printed it in the demo)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "example_dags"))
    deferrable = [
        (dag_id, task.task_id, task.retries)
        for dag_id in EXAMPLES
        for task in bag.dags[dag_id].tasks
        if getattr(task, "deferrable", False)
    ]
    assert deferrable, "no deferrable task in the examples"
    assert [entry for entry in deferrable if entry[2] < 1] == []


def run_example(dag_id: str) -> dict[str, Any]:
    import importlib.util

    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    spec = importlib.util.spec_from_file_location(dag_id, DAGS_FOLDER / f"{dag_id}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with only_files(*EXAMPLE_FILES):
        run = module.dag.test()
    with create_session() as session:
        states = {
            ti.task_id: str(ti.state)
            for ti in session.query(TaskInstance).filter(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id
            )
        }
    assert str(run.state) == "success", states
    return states


@pytest.fixture
def demo_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EVOLINK_DEMO_OUTPUT", str(tmp_path))
    return tmp_path


@pytest.mark.usefixtures("airflow_db")
def test_reference_images_are_uploaded(sim: SimulatorControl, demo_output: Path) -> None:
    run_example("example_evolink_reference_images")
    generated = xcom("example_evolink_reference_images", "generate")
    assert probe(generated["files"][0]).duration == pytest.approx(4.0, abs=0.3)
    assert sim.stats()["requests"]["POST /api/v1/files/upload/stream"] == 3


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.long
def test_character_to_video_keeps_the_character_name(sim: SimulatorControl, demo_output: Path) -> None:
    run_example("example_evolink_character_to_video")
    summary = xcom("example_evolink_character_to_video", "summarize")
    assert summary["character_name"].startswith("chr_")
    assert summary["video"].endswith(".mp4")
    generations = [
        xcom("example_evolink_character_to_video", task_id)
        for task_id in ("source_clip", "extract_character", "cast_character")
    ]
    assert summary["credits_used"] == sum(g["usage"]["credits_reserved"] for g in generations) > 0


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.long
def test_batch_concat_reel_and_contact_sheet(sim: SimulatorControl, demo_output: Path) -> None:
    run_example("example_evolink_batch_concat")
    result = xcom("example_evolink_batch_concat", "assemble")
    assert len(result["clips"]) == 3
    assert probe(result["reel"]).duration == pytest.approx(12.0, abs=0.5)
    assert Path(result["contact_sheet"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.long
def test_demo_command_prints_the_three_paths(tmp_path: Path) -> None:
    """The README's demo command: the text-to-video-edit example end to end, its files where it says.

    Its ``airflow db migrate`` finds the DB already migrated (a copy of the suite's), which saves the
    migration's 15 s of CPU; a fresh clone's run of the command itself migrates from nothing.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EVOLINK"))}
    home = tmp_path / "demo-output" / "airflow-home"
    home.mkdir(parents=True)
    shutil.copyfile(migrated_db(), home / "airflow.db")
    result = subprocess.run(
        [sys.executable, str(REPO / "example_dags" / "run_demo.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = {line.split(":")[0].strip(): line for line in result.stdout.splitlines() if line.startswith("  ")}
    paths = {label: Path(lines[label].split(":", 1)[1].strip().split("  (")[0]) for label in lines}
    # The text-to-video-edit example's outputs (this is its run): a 5 s take, cut to 4 s at 1280x720.
    raw, edited = probe(paths["raw video"]), probe(paths["edited video"])
    assert raw.duration == pytest.approx(5.0, abs=0.3)
    assert edited.duration == pytest.approx(4.0, abs=0.3)
    assert (edited.width, edited.height) == (1280, 720)
    assert paths["thumbnail"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(path.is_relative_to(tmp_path / "demo-output" / "videos") for path in paths.values()), paths
