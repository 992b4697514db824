"""Real media for results: small H.264 MP4s and PNGs made once with the ffmpeg of imageio-ffmpeg."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from pathlib import Path


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "The simulator makes real MP4s with a bundled ffmpeg: "
            "pip install 'airflow-provider-evolink[ffmpeg]'"
        ) from None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


class MediaCache:
    """Clips by (width, height, seconds, audio), each made once even when many requests race for it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _once(self, name: str, make: list[str]) -> Path:
        target = self.directory / name
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if not target.exists():
                partial = target.with_name(f".{name}.{os.getpid()}.part{target.suffix}")
                command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *make, str(partial)]
                subprocess.run(command, check=True, capture_output=True, timeout=120)
                partial.replace(target)
        return target

    def video(self, width: int, height: int, seconds: int, audio: bool) -> Path:
        inputs = ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=12:duration={seconds}"]
        codecs = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "40", "-pix_fmt", "yuv420p"]
        if audio:
            inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
            codecs += ["-c:a", "aac", "-b:a", "32k", "-shortest"]
        return self._once(
            f"clip-{width}x{height}-{seconds}s{'-audio' if audio else ''}.mp4",
            [*inputs, *codecs, "-movflags", "+faststart"],
        )

    def picture(self, width: int = 512, height: int = 512) -> Path:
        return self._once(
            f"profile-{width}x{height}.png",
            ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}", "-frames:v", "1"],
        )


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(kind, width, height) of a PNG, JPEG, GIF or WEBP read from its header; None when not an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8 " and len(data) >= 30:
            width, height = struct.unpack("<HH", data[26:30])
            return "image/webp", width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return "image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X" and len(data) >= 30:
            width = int.from_bytes(data[24:27], "little") + 1
            height = int.from_bytes(data[27:30], "little") + 1
            return "image/webp", width, height
        return "image/webp", 0, 0
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                index += 1
                continue
            marker = data[index + 1]
            length = int.from_bytes(data[index + 2 : index + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return "image/jpeg", width, height
            index += 2 + length
        return "image/jpeg", 0, 0
    return None


def video_kind(data: bytes) -> str | None:
    """The MIME type of an MP4/MOV/WEBM file from its first bytes."""
    if data[4:8] == b"ftyp":
        return "video/quicktime" if data[8:10] == b"qt" else "video/mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return None
