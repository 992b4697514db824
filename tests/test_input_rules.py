"""Every documented image rule and the prompt policy, checked before any EvoLink call.

Model rules (models.py) are held against local images read from their header (uploads.py); the simulator
enforces the same rules on the images it is given, written independently (simulator/validation.py).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkValidationError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.models import (
    HAPPYHORSE_FRAME_IMAGES,
    HAPPYHORSE_REFERENCE_IMAGES,
    SEEDANCE_IMAGES,
    image_limits,
    image_problems,
    validate_request,
)
from evolink_provider.simulator.validation import image_failure
from evolink_provider.submission import prepare_request
from tests.airflow_runs import only_dag
from tests.conftest import DAGS_FOLDER, SimulatorControl
from tests.media_files import write_png

RULE_IMAGES = DAGS_FOLDER / "rule_images"
MB = 1024 * 1024


@cache
def rule_dags() -> ModuleType:
    path = DAGS_FOLDER / "evolink_input_rule_dags.py"
    spec = importlib.util.spec_from_file_location("evolink_input_rule_dags", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_rule_dag(dag_id: str, only_task: str | None = None) -> dict[str, tuple[str, int]]:
    """A new run of the DAG (with ``only_task``: of that task alone, as a partial run) and its tasks."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    dag = rule_dags().DAGS[dag_id]
    if only_task is not None:
        dag = dag.partial_subset(only_task, include_upstream=False)
    with only_dag(dag_id, "evolink_input_rule_dags.py"):
        dag_run = dag.test()
    with create_session() as session:
        rows = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == dag_run.run_id
        )
        return {
            (f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id): (
                str(ti.state),
                ti.try_number,
            )
            for ti in rows
        }


@pytest.fixture(scope="module")
def rule_images() -> Path:
    write_png(RULE_IMAGES / "small-128.png", 128, 128)
    write_png(RULE_IMAGES / "wide-9-to-1.png", 2700, 300)
    write_png(RULE_IMAGES / "heavy-12mb.png", 480, 480, size=12 * MB)
    write_png(RULE_IMAGES / "fine-480.png", 480, 480)
    return RULE_IMAGES


# -- the rules themselves -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "width", "height", "size", "broken"),
    [
        ("happyhorse-1.0-reference-to-video", 400, 1000, 10 * MB, []),
        ("happyhorse-1.0-reference-to-video", 399, 1000, 1000, ["short side of at least 400 px"]),
        ("happyhorse-1.1-reference-to-video", 480, 480, 10 * MB + 1, ["at most 10 MB"]),
        ("happyhorse-1.0-image-to-video", 300, 750, 1000, []),
        ("happyhorse-1.0-image-to-video", 300, 751, 1000, ["ratio from 0.4 to 2.5"]),
        ("happyhorse-1.0-image-to-video", 2700, 300, 1000, ["ratio from 0.4 to 2.5 (it is 9)"]),
        ("happyhorse-1.0-image-to-video", 299, 400, 1000, ["width and height of at least 300 px"]),
        ("happyhorse-1.0-video-edit", 299, 400, 1000, ["width and height of at least 300 px"]),
        ("seedance-2.0-reference-to-video", 6000, 2400, 30 * MB, []),
        ("seedance-2.0-fast-image-to-video", 6001, 3000, 1000, ["at most 6000 px"]),
        ("seedance-2.0-mini-image-to-video", 299, 300, 1000, ["at least 300 px"]),
        ("seedance-2.0-image-to-video", 1000, 1000, 30 * MB + 1, ["at most 30 MB"]),
        ("seedance-2.0-image-to-video", 1000, 2501, 1000, ["ratio from 0.4 to 2.5"]),
    ],
)
def test_each_documented_image_rule_has_its_boundary(
    model: str, width: int, height: int, size: int, broken: list[str]
) -> None:
    limits = image_limits(model)
    assert limits is not None
    rules, _advice = image_problems(limits, width, height, size)
    assert len(rules) == len(broken), rules
    for rule, expected in zip(rules, broken, strict=True):
        assert expected in rule
    # The simulator, written independently, agrees on every boundary.
    assert (image_failure(model, width, height, size) is None) == (not broken)


def test_the_recommended_reference_ratio_only_advises() -> None:
    rules, advice = image_problems(HAPPYHORSE_REFERENCE_IMAGES, 400, 1001, 1000)
    assert rules == [] and "short/long side ratio of at least 0.4" in advice[0]
    assert image_problems(HAPPYHORSE_FRAME_IMAGES, 400, 1000, 1000) == ([], [])
    assert image_problems(SEEDANCE_IMAGES, -1, -1, 10)[0] == [
        "an image whose header gives its width and height"
    ]
    assert image_limits("some-future-model") is None
    assert image_limits("seedance-2.0-text-to-video") is SEEDANCE_IMAGES


class ListLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)

    info = warning


@pytest.mark.usefixtures("sim")
def test_the_refusal_names_the_file_its_size_and_the_rule(rule_images: Path) -> None:
    image = rule_images / "small-128.png"
    fields = {"prompt": "character1 waves", "image_urls": [str(image)]}
    with pytest.raises(AirflowFailException) as caught:
        prepare_request(EvolinkHook(), "happyhorse-1.0-reference-to-video", fields, ListLog())
    message = str(caught.value)
    assert f"image_urls[0]='{image}'" in message
    assert "a short side of at least 400 px" in message
    assert f"this file is 128x128 px, {image.stat().st_size} bytes" in message


@pytest.mark.usefixtures("sim")
def test_local_checks_warn_logs_what_the_image_breaks(rule_images: Path) -> None:
    image = rule_images / "small-128.png"
    log = ListLog()
    fields = {"prompt": "character1 waves", "image_urls": [str(image)]}
    prepared = prepare_request(
        EvolinkHook(), "happyhorse-1.0-reference-to-video", fields, log, local_checks="warn"
    )
    assert prepared.digests[str(image)]
    assert any("at least 400 px" in line and "local_checks='warn'" in line for line in log.lines)
    with pytest.raises(AirflowFailException, match="local_checks"):
        prepare_request(EvolinkHook(), "happyhorse-1.0-reference-to-video", fields, log, local_checks="no")


def test_upload_step_entries_are_sent_as_urls_and_identified_by_their_digest() -> None:
    model = "happyhorse-1.0-reference-to-video"
    hero, robot = "a" * 64, "b" * 64

    def prepared(*images: Any) -> Any:
        fields = {"prompt": "character1 and character2 wave", "image_urls": list(images)}
        return prepare_request(EvolinkHook(), model, fields, ListLog())

    def entry(url: str, sha256: str) -> dict[str, Any]:
        return {"source": "hero.png", "file_url": url, "sha256": sha256, "expires_at": 1.0, "reused": False}

    first = prepared(entry("https://files.example/1.png", hero), "https://cdn.example/robot.png")
    assert first.payload["image_urls"] == ["https://files.example/1.png", "https://cdn.example/robot.png"]
    again = prepared(entry("https://files.example/2.png", hero), "https://cdn.example/robot.png")
    assert again.fingerprint == first.fingerprint  # a new upload of the same bytes
    assert prepared(
        entry("https://files.example/1.png", robot), "https://cdn.example/robot.png"
    ).fingerprint != (first.fingerprint)
    # A plain URL stays its own identity.
    assert prepared("https://files.example/2.png", "https://cdn.example/robot.png").fingerprint != (
        prepared("https://files.example/1.png", "https://cdn.example/robot.png").fingerprint
    )
    for bad in (
        {"file_url": "https://files.example/1.png"},
        {"file_url": "https://files.example/1.png", "sha256": "A" * 64},
        {"file_url": 3, "sha256": hero},
    ):
        with pytest.raises(AirflowFailException, match=r"image_urls\[0\]=.*EvolinkUploadImagesOperator"):
            prepared(bad, "https://cdn.example/robot.png")
    with pytest.raises(AirflowFailException, match="one digest per URL"):
        prepared(entry("https://files.example/1.png", hero), entry("https://files.example/1.png", robot))


@pytest.mark.usefixtures("sim")
def test_seedance_caps_a_whole_request_at_64_mb(rule_images: Path) -> None:
    images = [write_png(rule_images / f"big-{index}.png", 1000, 1000, size=22 * MB) for index in range(3)]
    fields = {"prompt": "@image1 @image2 @image3 walk", "image_urls": [str(path) for path in images]}
    with pytest.raises(AirflowFailException, match="at most 64 MB of media in one request"):
        prepare_request(EvolinkHook(), "seedance-2.0-reference-to-video", fields, ListLog())
    fields["image_urls"] = fields["image_urls"][:2]
    fields["prompt"] = "@image1 @image2 walk"
    prepare_request(EvolinkHook(), "seedance-2.0-reference-to-video", fields, ListLog())
    for path in images:
        path.unlink()


def test_prompt_policy_refuse_refuses_what_warn_warns() -> None:
    long_prompt = "a paper boat " * 700
    warned = validate_request("happyhorse-1.0-text-to-video", {"prompt": long_prompt})
    assert any("PROMPT WILL BE CUT" in warning for warning in warned.warnings)
    with pytest.raises(EvolinkValidationError, match="prompt_policy='refuse'"):
        validate_request("happyhorse-1.0-text-to-video", {"prompt": long_prompt}, prompt_policy="refuse")
    words = "word " * 1001
    assert validate_request("seedance-2.0-text-to-video", {"prompt": words}).warnings
    with pytest.raises(EvolinkValidationError, match="EvoLink does not say"):
        validate_request("seedance-2.0-text-to-video", {"prompt": words}, prompt_policy="refuse")
    with pytest.raises(EvolinkValidationError, match="prompt_policy"):
        validate_request("seedance-2.0-text-to-video", {"prompt": "a"}, prompt_policy="cut")


# -- in real DAG runs -------------------------------------------------------------------------------


@pytest.mark.usefixtures("airflow_db")
def test_images_breaking_the_rules_are_refused_before_any_call(
    sim: SimulatorControl, rule_images: Path
) -> None:
    tasks = run_rule_dag("evolink_image_rules_refused")

    assert tasks == {
        "small_reference": ("failed", 1),
        "wide_frame": ("failed", 1),
        "heavy_reference": ("failed", 1),
    }, "each fails at once, no retry spent"
    assert sim.stats()["requests"] == {}, "not one EvoLink call"


@pytest.mark.usefixtures("airflow_db")
def test_local_checks_warn_lets_the_image_through_to_evolink(
    sim: SimulatorControl, rule_images: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    tasks = run_rule_dag("evolink_image_rules_warned")

    requests = sim.stats()["requests"]
    assert requests["POST /api/v1/files/upload/stream"] == 1
    assert requests["POST /v1/videos/generations"] == 1
    # EvoLink (the simulator) fails what the documented rules refuse, after accepting the task.
    assert tasks == {"small_reference": ("failed", 1)}
    out, err = capfd.readouterr()
    assert "sent (local_checks='warn')" in out + err


@pytest.mark.usefixtures("airflow_db")
def test_prompt_policy_refuse_fails_before_any_call(sim: SimulatorControl) -> None:
    tasks = run_rule_dag("evolink_prompt_refused")

    assert tasks == {"long_prompt": ("failed", 1)}
    assert sim.stats()["requests"] == {}


# -- upload once per run ----------------------------------------------------------------------------


def set_files_quota(sim: SimulatorControl, max_files: int) -> None:
    import requests

    body = {"max_files": max_files}
    requests.post(f"{sim.base_url}/_simulator/files_quota", json=body, timeout=5).raise_for_status()


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.long
def test_a_mapped_run_sharing_three_images_uploads_three_files(sim: SimulatorControl) -> None:
    tasks = run_rule_dag("evolink_upload_once_mapped")

    assert tasks["upload"] == ("success", 1)
    assert len(tasks) == 51 and all(state == "success" for state, _ in tasks.values()), tasks
    requests_made = sim.stats()["requests"]
    assert requests_made["POST /api/v1/files/upload/stream"] == 3, "not 150"
    assert requests_made["GET /api/v1/files/quota"] == 1
    assert requests_made["POST /v1/videos/generations"] == 50

    # The next run reuses the uploads (72 h, more than 6 h left): no upload, no quota read. (Its upload task
    # alone: the 50 generations again would cost 10 s of CPU and show nothing new.)
    tasks = run_rule_dag("evolink_upload_once_mapped", only_task="upload")
    assert tasks == {"upload": ("success", 1)}
    requests_made = sim.stats()["requests"]
    assert requests_made["POST /api/v1/files/upload/stream"] == 3
    assert requests_made["GET /api/v1/files/quota"] == 1


@pytest.mark.usefixtures("sim")
def test_a_quota_below_need_fails_before_the_first_upload(sim: SimulatorControl) -> None:
    from evolink_provider.exceptions import EvolinkInputRefusedError
    from evolink_provider.uploads import upload_once

    set_files_quota(sim, 2)
    assets = DAGS_FOLDER / "assets"
    sources = [str(assets / name) for name in ("hero.png", "sidekick.png", "robot.png")]
    with pytest.raises(EvolinkInputRefusedError) as caught:
        upload_once(EvolinkHook(), sources)
    message = str(caught.value)
    assert "<3 new files>" in message and "the 2 files left" in message and "used 0 of 2" in message
    requests_made = sim.stats()["requests"]
    assert requests_made == {"GET /api/v1/files/quota": 1}, requests_made
