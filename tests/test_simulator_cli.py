"""The simulator as a user meets it: --help, the start-up line, request logs, media without ffmpeg."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from evolink_provider.simulator import EvolinkSimulator
from evolink_provider.simulator.media import MediaCache, image_size, video_kind

KEY = "sk-sim-cli-test-key-31f0"


def test_help_names_the_command_and_reads_as_plain_text() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evolink_provider.simulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("usage: python -m evolink_provider.simulator ")
    assert not re.search(r"``|:mod:|:class:|__main__\.py", result.stdout), result.stdout
    for documented in ("--log-level", "-v, --verbose", "[sim:fail=", "[sim:seconds=", "--tls"):
        assert documented in result.stdout


def test_each_request_is_logged_at_debug_with_status_and_milliseconds(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="evolink_provider.simulator")
    with EvolinkSimulator(api_key=KEY, media_dir=tmp_path) as sim:
        ok = requests.get(f"{sim.base_url}/v1/credits", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        refused = requests.get(f"{sim.base_url}/v1/credits", timeout=5)
        # The line is written once the answer is out, so it may trail the client by a moment.
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if "/v1/credits" in r.getMessage()]) < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)

    assert (ok.status_code, refused.status_code) == (200, 401)
    lines = [r.getMessage() for r in caplog.records if "/v1/credits" in r.getMessage()]
    assert re.fullmatch(r"GET /v1/credits 200 \d+\.\d ms", lines[0]), lines
    assert re.fullmatch(r"GET /v1/credits 401 \d+\.\d ms", lines[1]), lines
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "/v1/credits" in r.getMessage())
    assert KEY not in caplog.text
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EvoLink simulator on")]
    assert started and "requested size and duration" in started[0]  # this environment has ffmpeg


def test_without_ffmpeg_it_serves_a_labelled_clip_and_draws_pictures(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path)
    cache.ffmpeg = None  # as on a plain install (tests/test_packaging.py runs a real one)

    video = cache.video(720, 1280, 8, audio=False).read_bytes()
    picture = cache.picture(512, 512).read_bytes()

    assert video_kind(video) == "video/mp4"
    assert b"requested 720x1280 8s; this clip is 160x90 1s" in video
    assert image_size(picture) == ("image/png", 512, 512)
    assert "pre-encoded" in cache.describe() and "[ffmpeg]" in cache.describe()
    assert cache.video(720, 1280, 8, audio=False).read_bytes() == video  # made once, then served


def test_time_scale_and_the_default_estimate_shape_what_a_task_says(tmp_path: Path) -> None:
    """``task_estimate`` is the estimate of a task with neither marker only; ``time_scale`` scales both."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def estimate(sim: EvolinkSimulator, prompt: str) -> int:
        body = {"model": "seedance-2.0-fast-text-to-video", "prompt": prompt}
        answer = requests.post(f"{sim.base_url}/v1/videos/generations", json=body, headers=headers, timeout=5)
        answer.raise_for_status()
        return int(answer.json()["task_info"]["estimated_time"])

    with EvolinkSimulator(api_key=KEY, media_dir=tmp_path, task_seconds=0.5, task_estimate=7) as sim:
        assert estimate(sim, "plain") == 7
        assert estimate(sim, "marked [sim:seconds=4]") == 4
        assert estimate(sim, "told [sim:estimate=9]") == 9
    with EvolinkSimulator(
        api_key=KEY, media_dir=tmp_path, task_seconds=10, task_estimate=30, time_scale=0.5
    ) as sim:
        assert estimate(sim, "plain") == 15
        assert estimate(sim, "marked [sim:seconds=4]") == 2


def test_the_credits_control_refuses_a_field_it_does_not_know() -> None:
    """An older body (``"unlimited"``) is refused: ignored, a test would run on another balance."""
    with EvolinkSimulator() as sim:
        url = f"{sim.base_url}/_simulator/credits"
        assert requests.post(url, json={"remaining": 5, "unlimited": True}, timeout=5).status_code == 400
        assert requests.post(url, json={"remaining": 5, "key_unlimited": True}, timeout=5).status_code == 200
