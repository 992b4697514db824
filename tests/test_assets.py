"""Assets, extra links and lineage of finished generations, in real DAG runs (``dag.test()``).

The asset events and links come from the example DAG on the simulator; a hostile server on loopback shows
that an answer cannot make a link or an asset of anything but a plain http(s) URL; OpenLineage events are
read from the OpenLineage provider's own file transport in a separate process (its configuration is read
once per process).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from evolink_provider.assets import asset_events, summarize_request
from evolink_provider.lineage import dataset_name, output_locations
from evolink_provider.links import link_targets, safe_link, stored_file_link
from evolink_provider.results import credits_of
from tests.airflow_runs import only_files
from tests.conftest import DAGS_FOLDER, REPO, SimulatorControl, asset_events_of
from tests.test_example_dags import run_example
from tests.test_hostile import TASK_ID, HostileServer, set_connection, task

PRODUCER = "example_evolink_videos_as_assets"
HOSTILE_URLS = [
    "javascript:alert(document.cookie)",
    "JavaScript://evolink.ai/%0Aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://evolink.ai@attacker.example/video.mp4",
    '" onmouseover="alert(1)',
    'https://files.example/v.mp4"><script>alert(1)</script>',
    "//attacker.example/video.mp4",
    "https:///video.mp4",
    "vbscript:msgbox(1)",
    "https://files.example:99999/v.mp4",
    " https://files.example/v.mp4",
]


def xcom_value(dag_id: str, task_id: str, key: str, run_id: str | None = None) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = session.query(XComModel).filter(
            XComModel.dag_id == dag_id, XComModel.task_id == task_id, XComModel.key == key
        )
        if run_id:
            query = query.filter(XComModel.run_id == run_id)
        row = query.order_by(XComModel.timestamp.desc()).first()
        return None if row is None else XComModel.deserialize_value(row)


# -- the example: one asset event per stored file, links in XCom ---------------------------------------


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.long
def test_stored_files_become_asset_events_with_the_documented_extra(
    sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOLINK_DEMO_OUTPUT", str(tmp_path))
    run_example(PRODUCER)
    generated = xcom_value(PRODUCER, "generate", "return_value")
    (stored,) = generated["files"]
    assert Path(stored).is_relative_to(tmp_path)

    (event,) = asset_events_of(PRODUCER)
    uri, extra, aliases = event
    assert uri == Path(stored).resolve().as_uri()
    assert aliases == ["evolink_videos"]
    prompt = importlib_module(PRODUCER).dag.params["prompt"]
    assert extra == {
        "evolink_task_id": generated["id"],
        "model": "seedance-2.0-fast-text-to-video",
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "duration": 4,
        "size_bytes": os.path.getsize(stored),
        "credits_reserved": credits_of(generated)["reserved"],
        "credits_used": credits_of(generated)["used"],
        "result_index": 0,
    }
    assert extra["credits_used"] is not None
    assert prompt not in json.dumps(extra)


@pytest.mark.usefixtures("airflow_db")
def test_extra_links_are_kept_per_task_instance(
    sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVOLINK_DEMO_OUTPUT", str(tmp_path))
    run_example(PRODUCER)
    generated = xcom_value(PRODUCER, "generate", "return_value")
    (video_url,) = generated["results"]
    assert video_url.startswith(sim.base_url)
    # What the operator kept, and what Airflow stored for the UI after calling each link's get_link.
    assert xcom_value(PRODUCER, "generate", "evolink_links") == {"video": video_url}
    assert xcom_value(PRODUCER, "generate", "_link_EvolinkVideoLink") == video_url
    assert xcom_value(PRODUCER, "generate", "_link_EvolinkProfilePictureLink") == ""
    assert xcom_value(PRODUCER, "generate", "_link_EvolinkStoredFileLink") == ""  # a local file


def importlib_module(dag_id: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(dag_id, DAGS_FOLDER / f"{dag_id}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_publishing_dag_is_scheduled_on_the_alias() -> None:
    from airflow.sdk import AssetAlias

    consumer = importlib_module("example_evolink_publish_new_videos").dag
    assert consumer.timetable.asset_condition == AssetAlias("evolink_videos")
    producer = importlib_module(PRODUCER).dag.get_task("generate")
    assert AssetAlias("evolink_videos") in producer.outlets


# -- a hostile answer -----------------------------------------------------------------------------------


@pytest.fixture
def hostile_evolink(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    server = HostileServer()
    set_connection(monkeypatch, "evolink_hostile", server.url)
    yield server
    server.close()


@pytest.mark.usefixtures("airflow_db")
def test_a_hostile_answer_makes_no_link_and_no_asset(hostile_evolink: HostileServer) -> None:
    """Result URLs of every dangerous shape, through a real DAG run: no link, no asset event; the one
    plain https URL among them becomes both."""
    good = "https://files.example/results/video.mp4"
    created = task(status="pending", progress=0, created=int(time.time()))
    hostile_evolink.json("/v1/videos/generations", created)
    hostile_evolink.json(
        f"/v1/tasks/{TASK_ID}",
        {
            **created,
            "status": "completed",
            "progress": 100,
            "results": [*HOSTILE_URLS, good],
            "result_data": {"profile_picture_url": "javascript:alert(1)"},
        },
    )
    spec = importlib.util.spec_from_file_location("asset_dags", DAGS_FOLDER / "evolink_asset_test_dags.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with only_files("evolink_asset_test_dags.py"):
        run = module.hostile_links.test()
    assert str(run.state) == "success"

    dag_id = "evolink_hostile_result_links"
    links = {
        key: xcom_value(dag_id, "generate", key, run.run_id)
        for key in (
            "_link_EvolinkVideoLink",
            "_link_EvolinkProfilePictureLink",
            "_link_EvolinkStoredFileLink",
        )
    }
    assert links == {
        "_link_EvolinkVideoLink": good,
        "_link_EvolinkProfilePictureLink": "",
        "_link_EvolinkStoredFileLink": "",
    }
    events = asset_events_of(dag_id)
    assert [(uri, extra["result_index"], extra["expires_in_hours"]) for uri, extra, _ in events] == [
        (good, len(HOSTILE_URLS), 24)
    ]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_only_plain_http_urls_are_links(url: str) -> None:
    assert safe_link(url) is None
    hostile = {"id": TASK_ID, "status": "completed", "results": [url], "files": [url]}
    assert link_targets(hostile) == {}


def test_a_try_that_finished_nothing_has_no_link_and_reads_no_xcom() -> None:
    """A failed try has no ``evolink_links`` XCom: reading it would log Airflow's "XCom not found" error
    (the ``ti_key`` here would fail any lookup)."""
    from evolink_provider.links import RESULT_LINKS
    from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

    operator = EvolinkSeedanceTextToVideoOperator(task_id="failed", prompt="x")
    assert operator.finished_task is None
    assert [link.get_link(operator, ti_key=object()) for link in RESULT_LINKS] == ["", "", ""]  # type: ignore[arg-type]


def test_stored_files_get_a_link_only_where_storage_has_a_web_address() -> None:
    assert stored_file_link("/tmp/videos/a.mp4") is None
    assert stored_file_link("file:///tmp/videos/a.mp4") is None
    assert stored_file_link("s3://bucket/videos/a b.mp4") == (
        "https://s3.console.aws.amazon.com/s3/object/bucket?prefix=videos/a%20b.mp4"
    )
    assert stored_file_link("gs://bucket/a.mp4") == "https://storage.cloud.google.com/bucket/a.mp4"
    assert stored_file_link("s3://bucket/") is None
    assert safe_link("https://files.example/v.mp4?sig=a%2Fb") == "https://files.example/v.mp4?sig=a%2Fb"


def test_result_urls_are_announced_only_when_asked() -> None:
    done = {"id": TASK_ID, "status": "completed", "results": ["https://files.example/v.mp4"]}
    request = summarize_request("seedance-2.0-fast-text-to-video", {"prompt": "secret plan", "duration": "5"})
    assert request.duration == 5
    assert asset_events(done, request, announce_result_urls=False) == []
    ((uri, extra),) = asset_events(done, request, announce_result_urls=True)
    assert uri == "https://files.example/v.mp4"
    assert extra["expires_in_hours"] == 24 and extra["size_bytes"] is None
    assert "secret plan" not in json.dumps(extra)


# -- lineage ----------------------------------------------------------------------------------------------


def test_dataset_names_follow_openlineage_naming() -> None:
    assert dataset_name("/tmp/out/a.mp4") == ("file", "/tmp/out/a.mp4")
    assert dataset_name("file:///tmp/out/a.mp4") == ("file", "/tmp/out/a.mp4")
    assert dataset_name("s3://bucket/out/a.mp4") == ("s3://bucket", "out/a.mp4")
    assert dataset_name("https://Files.example:8443/a.png?sig=secret#x") == (
        "https://files.example:8443",
        "/a.png",
    )
    assert dataset_name("https://user:pw@files.example/a.png") is None


def test_lineage_outputs_are_only_plain_http_result_urls() -> None:
    # Result URLs come from an untrusted answer: none may be named as a local file or someone's bucket.
    good = "https://files.example/results/video.mp4"
    finished = {"id": TASK_ID, "status": "completed", "results": [*HOSTILE_URLS, "s3://victim/k", good]}
    assert output_locations(finished) == [good]


LINEAGE_RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lineage_dag", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
state = module.dag.test().state
print(f"RUN STATE {state}", flush=True)  # one write: a log thread may print between two
"""


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.long
def test_openlineage_events_name_the_inputs_and_the_stored_outputs(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    """The reference-images example through the OpenLineage provider's file transport: the three local
    images are the inputs, the stored video the output."""
    pytest.importorskip("airflow.providers.openlineage")
    events_file = tmp_path / "openlineage.jsonl"
    env = {
        **os.environ,
        "EVOLINK_DEMO_OUTPUT": str(tmp_path / "videos"),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "evolink-tests",
    }
    dag_file = DAGS_FOLDER / "example_evolink_reference_images.py"
    result = subprocess.run(
        [sys.executable, "-c", LINEAGE_RUN, str(dag_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert "RUN STATE success" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    generate = [e for e in events if e["job"]["name"] == "example_evolink_reference_images.generate"]
    (complete,) = [e for e in generate if e["eventType"] == "COMPLETE"]
    (start,) = [e for e in generate if e["eventType"] == "START"]
    images = sorted(
        ("file", str(DAGS_FOLDER / "assets" / name)) for name in ("hero.png", "robot.png", "sidekick.png")
    )
    assert sorted((d["namespace"], d["name"]) for d in complete["inputs"]) == images
    assert sorted((d["namespace"], d["name"]) for d in start["inputs"]) == images
    (output,) = complete["outputs"]
    assert output["namespace"] == "file"
    assert Path(output["name"]).is_relative_to(tmp_path / "videos")
    assert Path(output["name"]).suffix == ".mp4" and Path(output["name"]).is_file()


#: Characters that hide or reorder what a reader sees: a bidi override (U+202E), a zero-width space, a C1
#: control (U+0085), a line separator, a no-break space.
HIDING_CHARACTERS = ["\u202e", "\u200b", "\u0085", "\u2028", "\u00a0"]


@pytest.mark.parametrize("char", HIDING_CHARACTERS, ids=lambda char: f"U+{ord(char):04X}")
def test_unicode_control_and_format_characters_make_no_link_and_no_asset(char: str) -> None:
    url = f"https://files.example/4pm.{char}vm.mp4"
    assert safe_link(url) is None
    done = {"id": TASK_ID, "status": "completed", "results": [url]}
    assert link_targets(done) == {}
    request = summarize_request("seedance-2.0-fast-text-to-video", {"prompt": "p"})
    assert asset_events(done, request, announce_result_urls=True) == []
    stored = {**done, "files": [f"file:///tmp/evolink-no-such-folder/{char}4pm.mp4"]}
    assert asset_events(stored, request, announce_result_urls=False) == []
