"""The wheel as users get it: its files and metadata, and a plain install (no extras) that works.

The plain-install test builds the wheel, installs it without extras into a fresh virtualenv (uv, from its
shared cache, pinned to the versions of this environment so nothing new is downloaded), starts the
simulator from there and runs a deferrable DAG with ``dag.test()`` that stores the result: a valid MP4.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from evolink_provider.editing import probe
from evolink_provider.simulator.media import label_clip, placeholder_clip, placeholder_label, video_kind
from tests.conftest import REPO, migrated_db

UV = [sys.executable, "-m", "uv"]
API_KEY = "sk-sim-plain-install-7c41d2"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [*UV, "build", "--wheel", "--out-dir", str(out), str(REPO)], check=True, capture_output=True
    )
    (built,) = out.glob("airflow_provider_evolink-*.whl")
    return built


def metadata(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The wheel's file names and its METADATA headers (name -> every value)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(meta_name).decode())
    headers: dict[str, list[str]] = {}
    for key, value in message.items():
        headers.setdefault(key, []).append(value)
    return names, headers


def test_wheel_holds_the_package_its_media_and_the_license_only(wheel: Path) -> None:
    names, headers = metadata(wheel)

    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "evolink_provider").rglob("*.py")}
    assert sources <= set(names)
    assert {
        "evolink_provider/simulator/data/placeholder.mp4",
        "evolink_provider/simulator/data/placeholder-audio.mp4",
    } <= set(names)
    # airflow_provider_evolink: the module name Airflow's example-DAG discovery derives from the
    # distribution name (see its docstring).
    outside = {"airflow_provider_evolink/__init__.py"}
    assert all(
        name.startswith("evolink_provider/") or ".dist-info/" in name or name in outside for name in names
    ), names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]

    (license_name,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(license_name) == (REPO / "LICENSE").read_bytes()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert headers["License-Expression"] == ["Apache-2.0"]
    assert headers["License-File"] == ["LICENSE"]
    assert "[apache_airflow_provider]" in entry_points
    assert "evolink_provider.get_provider_info:get_provider_info" in entry_points


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the package that are neither stdlib nor its own -> importing files."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "evolink_provider").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "evolink_provider":
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_metadata_declares_every_module_the_package_imports(wheel: Path) -> None:
    _, headers = metadata(wheel)
    required: set[str] = set()
    ffmpeg_extra: set[str] = set()
    tls_extra: set[str] = set()
    older_pythons: set[str] = set()  # required only where a Python version condition holds
    for line in headers["Requires-Dist"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if requirement.marker is None:
            required.add(name)
        elif "extra" not in str(requirement.marker):
            older_pythons.add(name)
        elif requirement.marker.evaluate({"extra": "ffmpeg"}):
            ffmpeg_extra.add(name)
        elif requirement.marker.evaluate({"extra": "simulator-tls"}):
            tls_extra.add(name)
    distributions = packages_distributions()

    imports = third_party_imports()
    assert {"airflow", "aiohttp", "requests"} <= set(imports)  # the scan sees what it should
    for module, files in imports.items():
        providers = {canonicalize_name(dist) for dist in distributions.get(module, [])}
        if module == "airflow":  # the apache-airflow meta-distribution installs the packages that hold it
            providers.add("apache-airflow")
        if module == "imageio_ffmpeg":  # optional: imported inside functions, declared by the extra
            assert providers & ffmpeg_extra, f"{module} (imported by {files}) is not in the [ffmpeg] extra"
        elif module == "cryptography":  # the simulator's TLS mode only, declared by its extra
            assert files == {"evolink_provider/simulator/tls.py"}, files
            assert providers & tls_extra, f"{module} is not in the [simulator-tls] extra"
        elif not providers and canonicalize_name(module) in older_pythons:
            continue  # imported behind a version check, installed (and declared) only where it is needed
        else:
            assert providers & required, (
                f"{module} (imported by {sorted(files)}) is not a declared dependency"
            )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def plain_venv(wheel: Path, tmp_path: Path) -> Path:
    """A fresh virtualenv with the wheel and what it requires, nothing else (no extras)."""
    venv = tmp_path / "venv"
    subprocess.run([*UV, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    frozen = subprocess.run(
        [*UV, "pip", "freeze", "--python", sys.executable], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    pins = [line for line in frozen if "==" in line and not line.startswith("airflow-provider-evolink")]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [*UV, "pip", "install", "-q", "--python", str(python), str(wheel), "-c", str(constraints)], check=True
    )
    return python


@pytest.fixture
def plain_simulator(plain_venv: Path, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """The simulator started from the plain install with ``-v``: its URL and its output lines (growing)."""
    port = free_port()
    command = [str(plain_venv), "-m", "evolink_provider.simulator", "--port", str(port), "--api-key", API_KEY]
    command += ["--task-seconds", "1", "--media-dir", str(tmp_path / "sim-media"), "-v"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in process.stdout or []))
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("Media:") for line in lines) or process.poll() is not None)
        assert process.poll() is None, f"the simulator exited: {lines}"
        yield f"http://127.0.0.1:{port}", lines
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=30)


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.long
def test_plain_install_simulator_serves_a_valid_mp4_to_a_dag_run(
    plain_venv: Path, plain_simulator: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, simulator_output = plain_simulator
    home = tmp_path / "airflow-home"
    (home / "dags").mkdir(parents=True)
    dag_file = home / "dags" / "plain_install_dag.py"
    shutil.copy(REPO / "tests" / "plain_install" / "plain_install_dag.py", dag_file)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "EVOLINK"))}
    env |= {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_EVOLINK_DEFAULT": json.dumps(
            {"conn_type": "evolink", "password": API_KEY, "host": url}
        ),
    }
    # The plain install has the test environment's Airflow (pinned by plain_venv): its migrated DB fits.
    shutil.copyfile(migrated_db(), home / "airflow.db")

    output = tmp_path / "videos"
    run = subprocess.run(
        [str(plain_venv), "-I", str(dag_file), str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["state"] == "success", run.stderr[-3000:]
    assert result["imageio_ffmpeg"] is False  # really without the extra
    assert Path(result["provider"]).is_relative_to(plain_venv.parent.parent)  # the wheel, not the checkout
    (stored,) = result["files"]
    video = Path(stored).read_bytes()
    assert video[4:8] == b"ftyp" and video_kind(video) == "video/mp4"
    assert b"moov" in video and b"avc1" in video  # an H.264 track, not just a header
    assert b"requested 1280x720 4s with audio; this clip is 160x90 1s" in video  # Seedance's default audio
    info = probe(stored)  # with the ffmpeg of this (test) environment
    assert (info.width, info.height, info.has_audio) == (160, 90, True)

    assert any("pre-encoded" in line for line in simulator_output if line.startswith("Media:"))
    # -v logs each request once its answer is out: the download must be among them.
    wait_until(
        lambda: any(re.search(r"GET /media/\S+/video\.mp4 200 [\d.]+ ms", line) for line in simulator_output)
    )


def test_shipped_clip_is_a_playable_video(tmp_path: Path) -> None:
    """The clip a plain install serves, probed with the ffmpeg of the test environment."""
    for audio in (False, True):
        path = tmp_path / f"clip-{audio}.mp4"
        path.write_bytes(label_clip(placeholder_clip(audio), placeholder_label(1920, 1080, 12, audio)))
        info = probe(path)
        assert (info.width, info.height, info.has_audio) == (160, 90, audio)
        assert 0.9 <= info.duration <= 1.1
        assert len(path.read_bytes()) < 16_000
