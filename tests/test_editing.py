"""evolink_provider.editing on small clips made with the bundled ffmpeg."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from evolink_provider import editing


def make_clip(path: Path, seconds: int, size: str = "640x360", audio: bool = True) -> Path:
    command = [
        editing.ffmpeg_executable(),
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate=12:duration={seconds}",
    ]
    if audio:
        command += ["-f", "lavfi", "-i", f"sine=duration={seconds}", "-c:a", "aac", "-shortest"]
    subprocess.run([*command, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def test_probe_reads_duration_size_and_audio(tmp_path: Path) -> None:
    info = editing.probe(make_clip(tmp_path / "a.mp4", 3))
    assert info.duration == pytest.approx(3.0, abs=0.1)
    assert (info.width, info.height, info.has_audio) == (640, 360, True)


def test_trim_watermark_thumbnail(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "a.mp4", 4)
    cut = editing.trim(clip, tmp_path / "cut.mp4", start=1.0, duration=2.0)
    marked = editing.add_watermark(cut, tmp_path / "marked.mp4", "Hello, 100% 'quoted'")
    thumb = editing.thumbnail(marked, tmp_path / "thumb.png", at_seconds=0.5)
    assert editing.probe(marked).duration == pytest.approx(2.0, abs=0.2)
    assert thumb.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "cut.mp4", "marked.mp4", "thumb.png"]


def test_concat_joins_clips_of_different_shapes(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / "w.mp4", 2), make_clip(tmp_path / "t.mp4", 1, size="360x640", audio=False)]
    reel = editing.probe(editing.concat(clips, tmp_path / "reel.mp4", width=640, height=360))
    assert reel.duration == pytest.approx(3.0, abs=0.2)
    assert (reel.width, reel.height) == (640, 360)


def test_contact_sheet_tiles_thumbnails(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "a.mp4", 2)
    thumbs = [editing.thumbnail(clip, tmp_path / f"t{i}.png", at_seconds=i * 0.5) for i in range(4)]
    sheet = editing.contact_sheet(thumbs, tmp_path / "sheet.png", columns=2, width=160)
    info = editing.probe(sheet)
    assert (info.width, info.height) == (320, 180)


def test_failure_leaves_no_output_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(editing.EditingError, match="ffmpeg could not write"):
        editing.trim(tmp_path / "broken.mp4", tmp_path / "out.mp4", 0, 1)
    assert not (tmp_path / "out.mp4").exists()
    assert not list(tmp_path.glob(".*part*"))
