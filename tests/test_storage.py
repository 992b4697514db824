"""Results into storage and inputs from storage, over loopback against the simulator, with real files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkConfigurationError, EvolinkError, EvolinkNotFoundError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.models import validate_request
from evolink_provider.storage import EvolinkStorageError, StoredFile, store_results
from evolink_provider.uploads import upload_local_media
from tests.conftest import CONNECTION_EXTRA, TEST_API_KEY, SimulatorControl, _free_port

SEEDANCE = {"model": "seedance-2.0-fast-text-to-video", "prompt": "storage test", "duration": 4}


def completed_task(hook: EvolinkHook) -> dict[str, Any]:
    task = hook.create_video_task(dict(SEEDANCE))
    for _ in range(100):
        task = hook.get_task(task["id"])
        if task["status"] == "completed":
            return task
        time.sleep(0.1)
    raise AssertionError("the task did not complete")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def hook() -> EvolinkHook:
    return EvolinkHook()


@pytest.mark.parametrize("as_uri", [False, True], ids=["local-path", "file-uri"])
def test_result_is_stored_as_a_real_mp4(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, as_uri: bool
) -> None:
    task = completed_task(hook)
    folder = tmp_path / "videos" / "new"  # created with its parents
    target = folder.as_uri() if as_uri else str(folder)

    stored = store_results(hook, task, target)

    assert len(stored) == 1
    path = folder / f"{task['id']}-0.mp4"
    assert stored[0] == (path.as_uri() if as_uri else str(path))
    assert path.read_bytes()[4:8] == b"ftyp"
    assert leftovers(folder) == [path.name]  # no temporary file left behind


def test_an_output_folder_that_cannot_be_created_is_a_storage_error(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    task = completed_task(hook)
    in_the_way = tmp_path / "videos"
    in_the_way.write_bytes(b"a file, not a folder")

    with pytest.raises(EvolinkStorageError, match="cannot create the output folder"):
        store_results(hook, task, str(in_the_way / "new"))
    assert sim.stats()["requests"].get("GET /media", 0) == 0  # nothing fetched


def test_storing_again_reuses_the_same_result(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    task = completed_task(hook)
    first = store_results(hook, task, str(tmp_path))
    assert store_results(hook, task, str(tmp_path)) == first


def test_without_a_record_a_file_under_the_final_name_is_kept_unread(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a completed download's rename makes a final name, so it is kept (and logged), not fetched."""
    task = completed_task(hook)
    (tmp_path / f"{task['id']}-0.mp4").write_bytes(b"stored by an earlier try")

    assert store_results(hook, task, str(tmp_path)) == [str(tmp_path / f"{task['id']}-0.mp4")]
    assert sim.stats()["requests"].get("GET /media", 0) == 0
    assert "no record of it" in caplog.text


def test_a_file_that_contradicts_its_record_is_downloaded_again_and_recorded(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    task = completed_task(hook)
    seen: list[tuple[StoredFile, int]] = []
    (first,) = store_results(hook, task, str(tmp_path), on_stored=lambda item, n: seen.append((item, n)))
    real = Path(first).read_bytes()
    ((item, count),) = seen
    assert (item.index, item.name, item.size, count) == (0, Path(first).name, len(real), 1)
    assert item.sha256 == hashlib.sha256(real).hexdigest()

    Path(first).write_bytes(b"other bytes")
    store_results(hook, task, str(tmp_path), known=[item], on_stored=lambda item, n: seen.append((item, n)))
    assert Path(first).read_bytes() == real
    assert sim.stats()["requests"]["GET /media"] == 2

    store_results(hook, task, str(tmp_path), known=[seen[-1][0]])  # matching its record: not read again
    assert sim.stats()["requests"]["GET /media"] == 2


def test_other_bytes_of_the_same_size_contradict_the_record(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    task = completed_task(hook)
    seen: list[tuple[StoredFile, int]] = []
    (first,) = store_results(hook, task, str(tmp_path), on_stored=lambda item, n: seen.append((item, n)))
    real = Path(first).read_bytes()
    ((item, _count),) = seen

    Path(first).write_bytes(b"X" * len(real))  # same size, other bytes, written after the rename
    store_results(hook, task, str(tmp_path), known=[item])

    assert Path(first).read_bytes() == real
    assert sim.stats()["requests"]["GET /media"] == 2


def test_a_chunked_result_without_content_length_is_stored(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    sim.add_faults({"kind": "chunked", "method": "GET", "path_prefix": "/media/"})
    task = completed_task(hook)

    (stored,) = store_results(hook, task, str(tmp_path))

    assert Path(stored).read_bytes()[4:8] == b"ftyp"
    assert sim.stats()["faults_injected"] >= 1  # served chunked (a leftover request of another test may add)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"kind": "not_found"}, EvolinkNotFoundError),
        ({"kind": "truncated"}, EvolinkError),
        ({"kind": "content_length_lie"}, EvolinkError),
        ({"kind": "wrong_content_type"}, EvolinkStorageError),
        ({"kind": "redirect", "location": "http://10.0.0.1/video.mp4"}, EvolinkConfigurationError),
        ({"kind": "redirect", "location": "http://127.0.0.2:9/video.mp4"}, EvolinkConfigurationError),
        ({"kind": "redirect", "location": "file:///etc/passwd"}, EvolinkConfigurationError),
    ],
    ids=["expired", "truncated", "length-lie", "html", "redirect-10", "redirect-loopback", "redirect-file"],
)
def test_lying_responses_leave_no_file(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, fault: dict[str, Any], error: type[Exception]
) -> None:
    task = completed_task(hook)
    sim.add_faults({"method": "GET", "path_prefix": "/media/", **fault})
    with pytest.raises(error):
        store_results(hook, task, str(tmp_path / "out"))
    assert leftovers(tmp_path / "out") == []


def test_completed_task_without_results_is_an_error(hook: EvolinkHook, tmp_path: Path) -> None:
    with pytest.raises(EvolinkStorageError, match="without any result"):
        store_results(
            hook, {"id": "task-unified-1-abcdefgh", "status": "completed", "results": []}, str(tmp_path)
        )


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/v.mp4", "https://u:p@example.com/v.mp4"]
)
def test_non_http_or_credentialed_result_urls_are_refused(
    hook: EvolinkHook, tmp_path: Path, url: str
) -> None:
    task = {"id": "task-unified-1-abcdefgh", "status": "completed", "results": [url]}
    with pytest.raises(EvolinkConfigurationError):
        store_results(hook, task, str(tmp_path))


def test_large_result_streams_in_constant_memory(sim: SimulatorControl, tmp_path: Path) -> None:
    """50 MB through the real code path in a fresh interpreter: peak RSS grows far less than the file,
    while reading the same body into memory (the control) shows the measurement sees such growth."""
    # The result is 50 MB of a valid MP4 header and padding, served from a thread of the measured
    # process itself (constant memory: one block resent): storage only keeps files that start like one.
    port = _free_port()
    script = f"""
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.storage import store_results
SIZE = 52428800
BLOCK = bytes(1 << 20)
HEAD = b"\\x00\\x00\\x00\\x18ftypisom\\x00\\x00\\x02\\x00isommp41"
class Blob(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(SIZE))
        self.end_headers()
        self.wfile.write(HEAD + BLOCK[len(HEAD):])
        for _ in range(SIZE // len(BLOCK) - 1):
            self.wfile.write(BLOCK)
server = ThreadingHTTPServer(("127.0.0.1", {port}), Blob)
threading.Thread(target=server.serve_forever, daemon=True).start()
def peak_growth_kb(action):
    # Reset the peak (VmHWM) to the current RSS first, so the imports' own peak cannot hide growth.
    status = lambda field: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = status("VmRSS:")
    result = action()
    return status("VmHWM:") - before, result
hook = EvolinkHook()
hook.settings
url = "http://127.0.0.1:{port}/media/blob.mp4"
task = {{"id": "task-unified-1-bigblob0", "results": [url]}}
growth, paths = peak_growth_kb(lambda: store_results(hook, task, {str(tmp_path)!r}))
control, body = peak_growth_kb(lambda: hook.session.get(url, timeout=60).content)
report = {{"growth_kb": growth, "control_kb": control, "path": paths[0], "control_bytes": len(body)}}
print(json.dumps(report))
"""
    # A longer read timeout than the suite's 2 s: this measures memory, not the machine's load.
    connection = {
        "conn_type": "evolink",
        "password": TEST_API_KEY,
        "host": f"http://127.0.0.1:{port}",
        "extra": {"read_timeout": 60},
    }
    env = {**os.environ, "AIRFLOW_CONN_EVOLINK_DEFAULT": json.dumps(connection)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["path"]).stat().st_size == report["control_bytes"] == 52428800
    assert report["growth_kb"] < 30 * 1024, report
    assert report["control_kb"] > 45 * 1024, report


def test_local_and_uri_inputs_are_uploaded_and_then_valid(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imageio_ffmpeg

    # Uploads come only from allowed folders (default: the DAGs folder): allow this test's folder.
    connection = {
        "conn_type": "evolink",
        "password": TEST_API_KEY,
        "host": sim.base_url,
        "extra": {**CONNECTION_EXTRA, "upload_allowed_dirs": [str(tmp_path)]},
    }
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_DEFAULT", json.dumps(connection))

    pictures = []
    for name in ("a.png", "b.png"):
        path = tmp_path / name
        subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "color=blue:size=480x480",
                "-frames:v",
                "1",
                str(path),
            ],
            check=True,
        )
        pictures.append(path)
    fields = {"prompt": "character1 meets character2", "image_urls": [str(pictures[0]), pictures[1].as_uri()]}
    model = "happyhorse-1.0-reference-to-video"
    refs = validate_request(model, fields, allow_local_media=True).local_media

    uploaded = upload_local_media(hook, fields, refs)

    assert all(url.startswith(f"{sim.base_url}/media/uploads/") for url in uploaded["image_urls"])
    assert validate_request(model, uploaded).payload["image_urls"] == uploaded["image_urls"]
    assert sim.stats()["requests"]["POST /api/v1/files/upload/stream"] == 2
