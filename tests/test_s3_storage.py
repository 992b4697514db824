"""Storage conventions on a real S3 API (moto's server mode over loopback, started here): a result stored
through ``s3://conn_id@bucket/key`` is written through that connection, handed downstream in that form,
and named ``s3://bucket/key`` by its link and its asset event."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.storage import object_uri
from tests.conftest import DAGS_FOLDER, SimulatorControl

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("airflow.providers.amazon")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, and the Airflow connection the DAG names."""
    from moto.server import ThreadedMotoServer

    from tests.conftest import _free_port

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    previous = {name: os.environ.get(name) for name in ("AIRFLOW_CONN_EVOLINK_TEST_S3",)}
    os.environ["AIRFLOW_CONN_EVOLINK_TEST_S3"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": url, "region_name": "us-east-1"},
        }
    )
    try:
        yield url
    finally:
        server.stop()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def load_dags() -> Any:
    spec = importlib.util.spec_from_file_location("evolink_s3_dags", DAGS_FOLDER / "evolink_s3_dags.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_object_uri_drops_only_the_connection() -> None:
    assert object_uri("s3://aws_default@bucket/a/b+c:d.mp4") == "s3://bucket/a/b+c:d.mp4"
    assert object_uri("s3://bucket/a@b.mp4") == "s3://bucket/a@b.mp4"
    assert object_uri("gs://conn@bucket") == "gs://bucket"
    assert object_uri("file:///tmp/x@y.mp4") == "file:///tmp/x@y.mp4"
    assert object_uri("/tmp/x.mp4") == "/tmp/x.mp4"


@pytest.mark.usefixtures("airflow_db")
def test_conn_id_paths_store_through_the_connection_and_name_the_object(
    sim: SimulatorControl, s3_server: str
) -> None:
    from airflow.sdk import Asset

    from tests.conftest import asset_events_of
    from tests.test_operators import xcom

    module = load_dags()
    client = s3_client(s3_server)
    client.create_bucket(Bucket=module.BUCKET)
    # The consumer, scheduled on Asset("s3://bucket/key") as a user writes it, known to Airflow first.
    module.DAGS["evolink_consume_s3_video"].test()
    unpause("evolink_consume_s3_video")
    sim.issue_task_ids(module.PRODUCED_TASK_ID)

    dag_run = module.DAGS["evolink_store_in_s3"].test(logical_date=module.LOGICAL_DATE)

    assert str(dag_run.state) == "success"
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=module.BUCKET).get("Contents", [])]
    assert len(keys) == 1 and keys[0].startswith("content/") and "/take+1:a/" in keys[0], keys
    assert client.get_object(Bucket=module.BUCKET, Key=keys[0])["Body"].read(12)[4:8] == b"ftyp"
    value = xcom("evolink_store_in_s3", "generate")
    # Downstream opens the file through the same connection: the conn_id@ form is kept.
    assert value["files"] == [f"s3://{module.S3_CONN_ID}@{module.BUCKET}/{keys[0]}"]
    # The asset is the object, as a consumer DAG writes it.
    events = asset_events_of("evolink_store_in_s3")
    assert [uri for uri, _extra, _aliases in events] == [Asset(f"s3://{module.BUCKET}/{keys[0]}").uri]
    assert events[0][1]["size_bytes"] > 0
    assert events[0][0] == module.PRODUCED_URI
    assert queued_runs_of("evolink_consume_s3_video") == [module.PRODUCED_URI], "the consumer is queued"
    # The consumer runs and reads the stored file through the asset's URI.
    assert str(module.DAGS["evolink_consume_s3_video"].test().state) == "success"
    read = xcom("evolink_consume_s3_video", "read_stored_video")
    assert read == {"uri": module.PRODUCED_URI, "box": "ftyp"}
    links = xcom_links()
    key = keys[0].replace("+", "%2B").replace(":", "%3A")
    assert links["stored_file"] == (
        f"https://s3.console.aws.amazon.com/s3/object/{module.BUCKET}?prefix={key}"
    )


def xcom_links() -> dict[str, str]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter(XComModel.dag_id == "evolink_store_in_s3", XComModel.key == "evolink_links")
            .order_by(XComModel.timestamp.desc())
            .first()
        )
        assert row is not None
        return dict(XComModel.deserialize_value(row))


def test_a_reel_is_built_from_s3_clips_and_written_back_to_s3(s3_server: str, tmp_path: Path) -> None:
    from evolink_provider import editing
    from tests.test_editing import make_clip

    client = s3_client(s3_server)
    client.create_bucket(Bucket="evolink-edits")
    for name, seconds in (("a.mp4", 2), ("b.mp4", 1)):
        client.upload_file(str(make_clip(tmp_path / name, seconds)), "evolink-edits", f"clips/{name}")
    base = "s3://evolink_test_s3@evolink-edits"

    reel = editing.concat(
        [f"{base}/clips/a.mp4", f"{base}/clips/b.mp4"], f"{base}/reels/reel.mp4", width=320, height=180
    )
    sheet = editing.thumbnail(reel, f"{base}/reels/reel.png", at_seconds=0.5)

    assert str(reel) == f"{base}/reels/reel.mp4" and str(sheet) == f"{base}/reels/reel.png"
    info = editing.probe(f"{base}/reels/reel.mp4")
    assert info.duration == pytest.approx(3.0, abs=0.2) and (info.width, info.height) == (320, 180)
    listed = sorted(item["Key"] for item in client.list_objects_v2(Bucket="evolink-edits")["Contents"])
    assert listed == ["clips/a.mp4", "clips/b.mp4", "reels/reel.mp4", "reels/reel.png"]
    assert client.get_object(Bucket="evolink-edits", Key="reels/reel.png")["Body"].read(4) == b"\x89PNG"


def unpause(dag_id: str) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(DagModel).filter(DagModel.dag_id == dag_id).update({"is_paused": False})


def queued_runs_of(dag_id: str) -> list[str]:
    """The assets whose events queued a run of ``dag_id`` (Airflow's asset-triggered run queue)."""
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetModel.uri)
            .join(AssetDagRunQueue, AssetDagRunQueue.asset_id == AssetModel.id)
            .filter(AssetDagRunQueue.target_dag_id == dag_id)
        )
        return [uri for (uri,) in rows]


@pytest.mark.usefixtures("airflow_db", "sim")
def test_the_readme_reel_pipeline_runs_s3_in_s3_out(s3_server: str) -> None:
    from evolink_provider import editing

    module = load_dags()
    client = s3_client(s3_server)
    if module.BUCKET not in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=module.BUCKET)

    dag_run = module.DAGS["evolink_s3_reel"].test(logical_date=module.LOGICAL_DATE)

    assert str(dag_run.state) == "success"
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=module.BUCKET, Prefix="reels/")["Contents"]]
    assert keys == ["reels/2026-01-01.mp4"]
    info = editing.probe(f"s3://{module.S3_CONN_ID}@{module.BUCKET}/reels/2026-01-01.mp4")
    assert info.duration == pytest.approx(12.0, abs=0.5) and (info.width, info.height) == (320, 180)


@pytest.mark.usefixtures("sim")
def test_a_reference_image_in_s3_is_allowed_by_its_prefix_whatever_connection_reads_it(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's allow-list form: a comma-separated string naming ``s3://bucket/refs/``; the input is
    read through ``s3://conn_id@bucket/refs/...``. A URI outside the prefix is refused, listing it."""
    from evolink_provider.exceptions import EvolinkInputRefusedError
    from evolink_provider.field_rules import MediaRef
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.uploads import upload_local_media
    from tests.conftest import CONNECTION_EXTRA, SIMULATOR_URL, TEST_API_KEY
    from tests.media_files import png_bytes

    client = s3_client(s3_server)
    client.create_bucket(Bucket="evolink-refs")
    client.put_object(Bucket="evolink-refs", Key="refs/hero.png", Body=png_bytes(640, 480))
    extra = {**CONNECTION_EXTRA, "upload_allowed_dirs": f"{DAGS_FOLDER},s3://evolink-refs/refs/"}
    connection = {"conn_type": "evolink", "password": TEST_API_KEY, "host": SIMULATOR_URL, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_S3_REFS", json.dumps(connection))
    hook = EvolinkHook("evolink_s3_refs")

    inside = MediaRef("image_urls", 0, "s3://evolink_test_s3@evolink-refs/refs/hero.png")
    fields = upload_local_media(hook, {"prompt": "p", "image_urls": [inside.value]}, [inside])
    assert fields["image_urls"][0].startswith("http")

    outside = MediaRef("image_urls", 0, "s3://evolink_test_s3@evolink-refs/private/hero.png")
    with pytest.raises(EvolinkInputRefusedError, match=r"storage input.*listed now: s3://evolink-refs/refs/"):
        upload_local_media(hook, {"prompt": "p", "image_urls": [outside.value]}, [outside])
